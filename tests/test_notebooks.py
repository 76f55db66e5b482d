"""The three notebooks, executed by papermill through ``python -m reidlib demo`` on a tiny set-up.

The demo writes a generated data set (16 identities), sweeps baseline and proposed over seeds 0
and 1 (one epoch per stage, two notebooks at a time: train_eval.ipynb four times), then runs
compare.ipynb and attention.ipynb. A cell that raises fails these tests. The summary is checked
against the metrics files, recomputed here.
"""
import contextlib
import io
import json

import nbformat
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from reidlib import demo
from reidlib.sweep import run_dir, run_sweep

METHODS, SEEDS = ["baseline", "proposed"], [0, 1]
TINY = ["stage1.epochs=1", "stage2.epochs=1", "stage2.ims_per_batch=16", "stage2.steps=[1]"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """(exit status, printed output, results folder, data folder) of one demo run."""
    tmp = tmp_path_factory.mktemp("demo")
    data, results = tmp / "synth", tmp / "results"
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        # the kernels inherit this: one thread is as fast for the tiny model, and many times
        # faster when other processes share the cores
        patch.setenv("OMP_NUM_THREADS", "1")
        status = demo.main(["--seeds", *map(str, SEEDS), "--data", str(data), "--results", str(results),
                            "--ids", "16", "--jobs", "2", "--strict", "--set", *TINY])
    return status, out.getvalue(), results, data


def _errors(path):
    book = nbformat.read(path, as_version=4)
    return [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]


def test_demo_runs_every_notebook(demo_run):
    status, printed, root, _ = demo_run
    assert status == 0, printed
    assert "split   | ids | images | cameras" in printed            # the data set's statistics
    assert "0 already complete, 4 to run" in printed and "4 ran, 0 skipped" in printed
    assert "| Dataset | Seeds | Baseline Rank-1 (%)" in printed      # the summary table
    for name in ["compare", "attention"] + [f"market1501_{m}_seed{s}" for m in METHODS for s in SEEDS]:
        executed = root / "runs" / f"{name}.ipynb"
        assert executed.is_file() and not _errors(executed), name


def test_run_folders(demo_run):
    _, _, root, _ = demo_run
    for method in METHODS:
        for seed in SEEDS:
            folder = run_dir(root, "market1501", method, seed)
            metrics = json.loads((folder / "metrics.json").read_text())
            assert (metrics["method"], metrics["seed"], len(metrics["cmc"])) == (method, seed, 50)
            for name in ("config.yaml", "metrics.jsonl", "model_final.pt"):
                assert (folder / name).is_file(), name
            assert (folder / "training_curves.png").stat().st_size > 20_000


def test_summary_matches_metrics_files(demo_run):
    _, _, root, _ = demo_run
    summary = pd.read_csv(root / "summary.csv").set_index("method")
    for column in ("dataset", "n_seeds", "seeds", "rank1_mean", "rank1_std", "mAP_mean", "mAP_std",
                   "n_pairs", "rank1_delta", "mAP_delta", "rank1_p_ttest", "mAP_p_ttest"):
        assert column in summary.reset_index().columns, column
    values = {(m, s): json.loads((run_dir(root, "market1501", m, s) / "metrics.json").read_text())
              for m in METHODS for s in SEEDS}
    for metric in ("rank1", "mAP"):
        per_method = {m: 100 * np.array([values[m, s][metric] for s in SEEDS]) for m in METHODS}
        for m in METHODS:
            assert summary.loc[m, "n_seeds"] == len(SEEDS)
            assert summary.loc[m, f"{metric}_mean"] == pytest.approx(per_method[m].mean())
            assert summary.loc[m, f"{metric}_std"] == pytest.approx(per_method[m].std(ddof=1), abs=1e-9)
        gain = per_method["proposed"] - per_method["baseline"]
        assert summary.loc["proposed", f"{metric}_delta"] == pytest.approx(gain.mean(), abs=1e-9)
        if np.ptp(gain) > 1e-9:  # scipy's t-test is undefined when the two gains are equal
            expected = stats.ttest_rel(per_method["proposed"], per_method["baseline"]).pvalue
            assert summary.loc["proposed", f"{metric}_p_ttest"] == pytest.approx(expected)
    table = (root / "summary.md").read_text()
    assert "| market1501 | 2 / 2 |" in table and "paired t-test" in table
    r1 = 100 * np.array([values["baseline", s]["rank1"] for s in SEEDS])
    assert f"{r1.mean():.2f} ± {r1.std(ddof=1):.2f}" in table


def test_figures(demo_run):
    _, _, root, _ = demo_run
    names = ["bars", "gains", "cmc"] + [f"{kind}_market1501_seed0"
                                        for kind in ("attention_rollout", "attention_last", "retrieval")]
    for name in names:
        assert (root / "figures" / f"{name}.png").stat().st_size > 20_000, name


def test_rerun_skips_and_a_broken_run_is_reported(demo_run):
    _, _, root, data = demo_run
    again = run_sweep(["market1501"], METHODS, SEEDS, data_roots=str(data), results_root=root,
                      overrides=TINY, base_config="tiny", compare_notebook=None, echo=lambda text: None)
    assert len(again.skipped) == 4 and not again.ran and again.ok
    broken = run_sweep(["market1501"], ["baseline"], [7], data_roots=str(data), results_root=root,
                       overrides=TINY + ["stage2.epochs=many"], base_config="tiny", compare_notebook=None,
                       jobs=2, echo=lambda text: None)  # the failure comes back from a worker process
    assert not broken.ok and len(broken.failed) == 1
    assert "stage2.epochs" in broken.failed[0][1] and "wants a number" in broken.failed[0][1]
    assert not (run_dir(root, "market1501", "baseline", 7) / "metrics.json").exists()
    assert "market1501 baseline seed 7" in (root / "sweep_failures.log").read_text()
