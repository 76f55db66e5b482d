"""The three notebooks, executed by papermill on a tiny config and a tiny generated data set.

One sweep (baseline and proposed, seeds 0 and 1, one epoch per stage) runs train_eval.ipynb four
times and compare.ipynb once; attention.ipynb then reads the trained models. Any cell that raises
fails these tests. The summary is checked against the metrics files, recomputed here.
"""
import json

import nbformat
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from reidlib.sweep import ATTENTION_NOTEBOOK, execute_notebook, run_dir, run_sweep

METHODS, SEEDS = ["baseline", "proposed"], [0, 1]
TINY = ["stage1.epochs=1", "stage2.epochs=1", "stage2.ims_per_batch=16", "stage2.steps=[1]",
        "model.lora.lr=1e-3"]


@pytest.fixture(scope="module", autouse=True)
def one_thread_kernels():
    """The notebooks' kernels inherit this: one OpenMP thread is as fast for the tiny model and
    many times faster when other processes share the cores."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from reidlib.data.synth import generate_market
    return generate_market(tmp_path_factory.mktemp("synth") / "market", ids=16, cams=3, seed=0,
                           images_per_id=8)


@pytest.fixture(scope="module")
def sweep(data_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    lines = []
    report = run_sweep(["market1501"], METHODS, SEEDS, data_roots=str(data_root), results_root=root,
                       overrides=TINY, base_config="tiny", device="cpu", echo=lines.append)
    return report, root, lines


def _errors(path):
    book = nbformat.read(path, as_version=4)
    return [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]


def test_train_eval_runs_write_their_folders(sweep):
    report, root, lines = sweep
    assert report.ok, report.format()
    assert len(report.ran) == 4 and report.summary == root / "summary.md"
    assert any("[4/4] market1501 proposed seed 1: done" in line for line in lines)
    for method in METHODS:
        for seed in SEEDS:
            folder = run_dir(root, "market1501", method, seed)
            metrics = json.loads((folder / "metrics.json").read_text())
            assert (metrics["method"], metrics["seed"], len(metrics["cmc"])) == (method, seed, 50)
            for name in ("config.yaml", "metrics.jsonl", "model_final.pt"):
                assert (folder / name).is_file(), name
            assert (folder / "training_curves.png").stat().st_size > 20_000
            executed = root / "runs" / f"market1501_{method}_seed{seed}.ipynb"
            assert executed.is_file() and not _errors(executed)


def test_summary_matches_metrics_files(sweep):
    _, root, _ = sweep
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
    assert "| Dataset | Seeds |" in table and "| market1501 | 2 / 2 |" in table
    assert "paired t-test" in table
    r1 = 100 * np.array([values["baseline", s]["rank1"] for s in SEEDS])
    assert f"{r1.mean():.2f} ± {r1.std(ddof=1):.2f}" in table


def test_compare_notebook_figures(sweep):
    _, root, _ = sweep
    assert not _errors(root / "runs" / "compare.ipynb")
    for name in ("bars.png", "gains.png", "cmc.png"):
        assert (root / "figures" / name).stat().st_size > 20_000, name


def test_attention_notebook(sweep, data_root):
    _, root, _ = sweep
    out = root / "runs" / "attention.ipynb"
    execute_notebook(ATTENTION_NOTEBOOK, out, {"results_root": str(root), "data_root": str(data_root),
                                                "queries": [0, 5], "top": 5})
    assert not _errors(out)
    for name in ("attention_rollout", "attention_last", "retrieval"):
        assert (root / "figures" / f"{name}_market1501_seed0.png").stat().st_size > 20_000, name


def test_rerun_skips_and_a_broken_run_is_reported(sweep, data_root):
    _, root, _ = sweep
    again = run_sweep(["market1501"], METHODS, SEEDS, data_roots=str(data_root), results_root=root,
                      overrides=TINY, base_config="tiny", compare_notebook=None, echo=lambda text: None)
    assert len(again.skipped) == 4 and not again.ran and again.ok
    broken = run_sweep(["market1501"], ["baseline"], [7], data_roots=str(data_root), results_root=root,
                       overrides=TINY + ["stage2.epochs=many"], base_config="tiny", compare_notebook=None,
                       echo=lambda text: None)
    assert not broken.ok and len(broken.failed) == 1
    assert "stage2.epochs" in broken.failed[0][1] and "wants a number" in broken.failed[0][1]
    assert not (run_dir(root, "market1501", "baseline", 7) / "metrics.json").exists()
    assert "market1501 baseline seed 7" in (root / "sweep_failures.log").read_text()
