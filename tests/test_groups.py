"""Runs of several sweeps in one table (the demo's two starting points), and never two runs of one
(data set, method, seed) averaged as one."""
import json

import pytest

from reidlib.viz import collect_groups, collect_metrics, summarize


def write_run(root, dataset, method, seed, mAP):
    folder = root / dataset / method / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"dataset": dataset, "method": method, "seed": seed,
                                                     "rank1": mAP, "mAP": mAP, "cmc": [mAP]}))


@pytest.fixture
def two_sweeps(tmp_path):
    for group, offset in (("pretrained", 0.5), ("random", 0.1)):
        for seed in (0, 1):
            write_run(tmp_path / group, "synth", "baseline", seed, offset + 0.01 * seed)
            write_run(tmp_path / group, "synth", "proposed", seed, offset + 0.02 + 0.01 * seed)
    return tmp_path


def test_groups_are_kept_apart_in_the_table(two_sweeps):
    runs = collect_groups({"pretrained miniature": two_sweeps / "pretrained", "random init": two_sweeps / "random"})
    assert runs["dataset"].tolist() == ["synth, pretrained miniature"] * 4 + ["synth, random init"] * 4
    summary = summarize(runs).set_index(["dataset", "method"])
    assert summary.loc[("synth, pretrained miniature", "baseline"), "mAP_mean"] == pytest.approx(50.5)
    assert summary.loc[("synth, random init", "proposed"), "mAP_mean"] == pytest.approx(12.5)
    assert summary.loc[("synth, random init", "proposed"), "mAP_delta"] == pytest.approx(2.0)


def test_two_runs_of_one_seed_under_one_root_are_an_error(two_sweeps):
    with pytest.raises(ValueError, match=r"2 runs of synth baseline seed 0 .*collect_groups"):
        collect_metrics(two_sweeps)
    assert len(collect_metrics(two_sweeps / "random")) == 4


def test_an_empty_group_leaves_the_others(two_sweeps, tmp_path):
    runs = collect_groups({"pretrained miniature": two_sweeps / "pretrained", "none yet": tmp_path / "missing"})
    assert len(runs) == 4 and set(runs["dataset"]) == {"synth, pretrained miniature"}
    with pytest.raises(ValueError, match="no groups"):
        collect_groups({})
