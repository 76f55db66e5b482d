"""The three notebooks, executed by papermill through ``python -m reidlib demo`` on a tiny set-up.

The demo writes a generated data set (16 identities), sweeps baseline and proposed over seeds 0
and 1 from the session's pretrained miniature and from random weights (one epoch per stage, two
notebooks at a time: train_eval.ipynb eight times), then runs compare.ipynb on both groups and
attention.ipynb, and draws the miniature's text-to-image search. A cell that raises fails these
tests. The summary is checked against the metrics files, recomputed here.
"""
import contextlib
import io
import json
import os

import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from reidlib.demo import run as demo
from reidlib.experiments.sweep import run_dir, run_sweep

pytestmark = pytest.mark.slow  # pretraining, notebooks, whole runs: `make test-fast` leaves them out

METHODS, SEEDS = ["baseline", "proposed"], [0, 1]
GROUPS = {"pretrained": "synth, pretrained miniature", "random": "synth, random init"}  # folder: table label
TINY = ["stage1.epochs=1", "stage2.epochs=1", "stage2.ims_per_batch=16", "stage2.steps=[1]"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, miniature):
    """(exit status, printed output, results folder, data folder, miniature) of one demo run."""
    tmp = tmp_path_factory.mktemp("demo")
    data, results = tmp / "synth", tmp / "results"
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        # the kernels inherit this: one thread is as fast for the tiny model, and many times
        # faster when other processes share the cores
        patch.setenv("OMP_NUM_THREADS", "1")
        status = demo.main(["--seeds", *map(str, SEEDS), "--data", str(data), "--results", str(results),
                            "--ids", "16", "--jobs", "2", "--strict", "--miniature", str(miniature[0]),
                            "--set", *TINY])
    return status, out.getvalue(), results, data, miniature[0]


def _errors(path):
    book = nbformat.read(path, as_version=4)
    return [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]


def test_demo_runs_every_notebook(demo_run):
    status, printed, root, _, _ = demo_run
    assert status == 0, printed
    assert "split   | ids | images | cameras" in printed            # the data set's statistics
    assert printed.count("0 already complete, 4 to run") == 2 and printed.count("4 ran, 0 skipped") == 2
    assert "| Dataset | Seeds | Baseline Rank-1 (%)" in printed      # the summary table
    executed = [root / "runs" / f"{name}.ipynb" for name in ("compare", "attention")]
    executed += [root / group / "runs" / f"synth_{m}_seed{s}.ipynb" for group in GROUPS for m in METHODS for s in SEEDS]
    for path in executed:
        assert path.is_file() and not _errors(path), path


def test_run_folders(demo_run):
    _, _, root, _, miniature = demo_run
    for group, weights in (("pretrained", str(miniature)), ("random", "none")):
        for method in METHODS:
            for seed in SEEDS:
                folder = run_dir(root / group, "synth", method, seed)
                metrics = json.loads((folder / "metrics.json").read_text())
                assert (metrics["dataset"], metrics["method"], metrics["seed"], len(metrics["cmc"])) == \
                    ("synth", method, seed, 50)
                for name in ("config.yaml", "metrics.jsonl", "model/model.safetensors"):
                    assert (folder / name).is_file(), name
                assert (folder / "training_curves.png").stat().st_size > 20_000
                model = yaml.safe_load((folder / "config.yaml").read_text())["model"]
                assert (model["pretrained"], model["quick_gelu"]) == (weights, "false")


@pytest.mark.parametrize("group", GROUPS)
def test_summary_matches_metrics_files(demo_run, group):
    _, _, root, _, _ = demo_run
    summary = pd.read_csv(root / "summary.csv")
    for column in ("dataset", "n_seeds", "seeds", "rank1_mean", "rank1_std", "mAP_mean", "mAP_std",
                   "n_pairs", "rank1_delta", "mAP_delta", "rank1_p_ttest", "mAP_p_ttest"):
        assert column in summary.columns, column
    assert sorted(summary["dataset"].unique()) == sorted(GROUPS.values())   # all four rows, each group apart
    summary = summary[summary["dataset"] == GROUPS[group]].set_index("method")
    values = {(m, s): json.loads((run_dir(root / group, "synth", m, s) / "metrics.json").read_text())
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
    assert f"| {GROUPS[group]} | 2 / 2 |" in table and "paired t-test" in table
    r1 = 100 * np.array([values["baseline", s]["rank1"] for s in SEEDS])
    assert f"{r1.mean():.2f} ± {r1.std(ddof=1):.2f}" in table


def test_figures(demo_run):
    _, _, root, _, _ = demo_run
    names = ["bars", "gains", "cmc", "zero_shot_text_search"] + [
        f"{kind}_synth_seed0" for kind in ("attention_rollout", "attention_last", "retrieval")]
    for name in names:
        assert (root / "figures" / f"{name}.png").stat().st_size > 20_000, name
        assert (root / "figures" / f"{name}.pdf").is_file(), name          # every figure: 300 dpi PNG + PDF


def test_zero_shot_rows(demo_run):
    _, _, root, _, _ = demo_run
    summary = pd.read_csv(root / "summary.csv")
    zero = summary[summary["method"] == "zero_shot"].set_index("dataset")
    assert sorted(zero.index) == sorted(GROUPS.values())                   # the starting weights of both groups
    assert zero.loc[GROUPS["pretrained"], "mAP_mean"] > zero.loc[GROUPS["random"], "mAP_mean"] + 10
    assert zero["mAP_delta"].isna().all()                                  # a reference point, never tested
    assert "| Zero-shot (no re-ID training) | – |" in (root / "summary.md").read_text()


def test_rerun_skips_and_a_broken_run_is_reported(demo_run):
    _, _, root, data, miniature = demo_run
    overrides = demo.DEMO_OVERRIDES + demo.group_overrides("pretrained", miniature) + TINY  # as the demo's
    root = root / "pretrained"
    again = run_sweep(["synth"], METHODS, SEEDS, data_roots=str(data), results_root=root,
                      overrides=overrides, base_config="tiny", compare_notebook=None, echo=lambda text: None)
    assert len(again.skipped) == 4 and not again.ran and again.ok
    # A bad override fails before anything runs (every run's config is built first), naming the key;
    # failures inside a worker are covered in test_sweep.py.
    with pytest.raises(ValueError, match=r"stage2\.epochs.*wants an integer"):
        run_sweep(["synth"], ["baseline"], [7], data_roots=str(data), results_root=root,
                  overrides=overrides + ["stage2.epochs=many"], base_config="tiny", compare_notebook=None,
                  jobs=2, echo=lambda text: None)
    assert not run_dir(root, "synth", "baseline", 7).exists()


def test_every_notebook_runs_with_its_defaults_after_the_demo(demo_run, tmp_path):
    """A new user's path: after `make demo`, open each notebook and run it as it is. The repository's
    layout is rebuilt around the demo's output (notebooks/ beside data/ and results/demo/, the demo's
    miniature where `make demo` caches it), and each notebook is executed with no parameter given."""
    import shutil

    import papermill as pm

    from reidlib.demo.pretrain import PretrainRecipe, miniature_path
    from reidlib.experiments.sweep import COMPARE_NOTEBOOK

    _, _, results, data, miniature = demo_run
    repo = tmp_path / "repo"
    shutil.copytree(COMPARE_NOTEBOOK.parent, repo / "notebooks", ignore=shutil.ignore_patterns("*.md"))
    (repo / "data").mkdir()
    (repo / "data" / "synth").symlink_to(data)
    cached = miniature_path(PretrainRecipe(), repo / "data" / "miniature")
    cached.parent.mkdir()
    cached.symlink_to(miniature)        # where `make demo` caches the miniature of its recipe
    (repo / "results").mkdir()
    (repo / "results" / "demo").symlink_to(results)
    for name in ("compare", "attention", "explore", "train_eval"):
        out = tmp_path / f"{name}_defaults.ipynb"
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("OMP_NUM_THREADS", "1")
            pm.execute_notebook(str(repo / "notebooks" / f"{name}.ipynb"), str(out), kernel_name="python3",
                                progress_bar=False, cwd=str(repo / "notebooks"))
        assert not _errors(out), name
    # train_eval.ipynb trained from the demo's miniature, not from random weights, and drew its curves
    run = repo / "results" / "synth" / "proposed" / "seed0"
    model = yaml.safe_load((run / "config.yaml").read_text())["model"]
    started = os.path.normpath(repo / "notebooks" / model["pretrained"])   # relative to the notebook's folder
    assert started == str(cached) and (run / "training_curves.png").is_file()
    assert json.loads((run / "metrics.json").read_text())["mAP"] > 0.3
    # compare.ipynb kept the demo's two groups apart (groups.json), as the demo's own summary does
    assert (results / "summary.md").read_text().count("synth, random init") >= 1
