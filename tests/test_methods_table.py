"""compare.ipynb's tables with more methods than the thesis's two, and the groups a results folder names."""
import numpy as np
import pytest
from scipy import stats
from test_viz_tables import write_run

from reidlib.viz import collect_metrics, collect_runs, frontier_table, summarize, summary_markdown, write_groups

# Hand-made Rank-1 / mAP fractions per seed.
R1 = {"baseline": [0.70, 0.71, 0.72], "proposed": [0.71, 0.71, 0.73], "pcl": [0.74, 0.76, 0.75],
      "promptsg": [0.69, 0.72, 0.70]}
MAP = {"baseline": [0.50, 0.52, 0.51], "proposed": [0.51, 0.52, 0.52], "pcl": [0.55, 0.58, 0.56],
       "promptsg": [0.49, 0.53, 0.50]}


@pytest.fixture
def four_methods(tmp_path):
    for method in R1:
        for seed in range(3):
            write_run(tmp_path, "market1501", method, seed, R1[method][seed], MAP[method][seed])
    return tmp_path


def test_frontier_table_gains_and_paired_test(four_methods):
    summary = summarize(collect_metrics(four_methods))
    table = frontier_table(summary).set_index("Method")
    assert list(table.index) == ["CLIP-ReID (baseline)", "Proposed (deep prompts + LoRA)", "PCL-CLIP", "PromptSG"]
    assert table.loc["CLIP-ReID (baseline)", "Δ mAP (pp)"] == ""     # the reference has no gain
    pcl, base = 100 * np.array(MAP["pcl"]), 100 * np.array(MAP["baseline"])
    gain = pcl - base                                                  # 5, 6, 5 pp
    assert table.loc["PCL-CLIP", "mAP (%)"] == f"{pcl.mean():.2f} ± {pcl.std(ddof=1):.2f}"
    p = stats.ttest_rel(pcl, base).pvalue
    assert table.loc["PCL-CLIP", "Δ mAP (pp)"].startswith(f"+{gain.mean():.2f} ± {gain.std(ddof=1):.2f}")
    assert f"p={p:.3f}" in table.loc["PCL-CLIP", "Δ mAP (pp)"]
    assert table.loc["PromptSG", "Δ Rank-1 (pp)"].startswith("-0.67")   # (69+72+70)/3 - 71


def test_summary_keeps_the_thesis_table_and_adds_the_methods_table(four_methods, tmp_path):
    summary = summarize(collect_metrics(four_methods))
    text = summary_markdown(summary)
    assert "## Proposed (deep prompts + LoRA) vs CLIP-ReID (baseline)" in text      # the thesis table
    assert "## PCL-CLIP vs" not in text                                               # no pairwise table per method
    assert "## Every method vs CLIP-ReID (baseline)" in text and "| market1501 | PromptSG | 3 |" in text
    # with the thesis's two methods alone, the summary is as before: no methods table
    for method in ("pcl", "promptsg"):
        for seed in range(3):
            (four_methods / "market1501" / method / f"seed{seed}" / "metrics.json").unlink()
    two = summary_markdown(summarize(collect_metrics(four_methods)))
    assert "Every method" not in two and "## Proposed (deep prompts + LoRA) vs" in two


def test_collect_runs_reads_the_groups_a_folder_names(tmp_path):
    for group, shift in (("pretrained", 0.2), ("random", 0.0)):
        for seed in range(2):
            write_run(tmp_path / group, "synth", "baseline", seed, 0.3 + shift, 0.2 + shift)
    with pytest.raises(ValueError, match="holds 2 runs of synth baseline seed 0.*groups.json"):
        collect_runs(tmp_path)                        # no groups.json: the same run twice is refused
    write_groups(tmp_path, {"pretrained miniature": "pretrained", "random init": "random"})
    runs = collect_runs(tmp_path)                     # "auto": from groups.json, folders relative to it
    assert sorted(runs["dataset"].unique()) == ["synth, pretrained miniature", "synth, random init"]
    assert runs[runs["dataset"] == "synth, random init"]["mAP"].tolist() == pytest.approx([0.2, 0.2])
    assert len(collect_runs(tmp_path / "random", groups=None)) == 2
    (tmp_path / "groups.json").write_text("{not json")
    with pytest.raises(ValueError, match="groups.json is not valid JSON"):
        collect_runs(tmp_path)
