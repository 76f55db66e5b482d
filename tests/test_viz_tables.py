"""Results tables: metrics.json files -> mean ± std over seeds and the paired test vs the baseline."""
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from reidlib.viz import (
    collect_metrics,
    comparison_table,
    paired_test,
    plot_bars,
    plot_cmc,
    plot_gains,
    plot_training_curves,
    retrieval_grid,
    summarize,
    summary_markdown,
    write_summary,
)

# Hand-made runs (fractions, as the trainer writes them): proposed beats the baseline on every seed.
BASE_R1 = {0: 0.700, 1: 0.710, 2: 0.705}
PROP_R1 = {0: 0.706, 1: 0.719, 2: 0.707}
BASE_MAP = {0: 0.500, 1: 0.490, 2: 0.510}
PROP_MAP = {0: 0.505, 1: 0.493, 2: 0.520}


def write_run(root, dataset, method, seed, rank1, mAP):
    run = root / dataset / method / f"seed{seed}"
    run.mkdir(parents=True)
    cmc = np.minimum(1.0, rank1 + np.linspace(0, 0.3, 50)).tolist()
    (run / "metrics.json").write_text(json.dumps({
        "dataset": dataset, "method": method, "seed": seed, "rank1": rank1, "rank5": cmc[4],
        "rank10": cmc[9], "mAP": mAP, "mINP": mAP / 2, "cmc": cmc, "num_valid_queries": 10}))
    return run


@pytest.fixture
def results(tmp_path):
    for seed in BASE_R1:
        write_run(tmp_path, "market1501", "baseline", seed, BASE_R1[seed], BASE_MAP[seed])
        write_run(tmp_path, "market1501", "proposed", seed, PROP_R1[seed], PROP_MAP[seed])
    write_run(tmp_path, "dukemtmc", "baseline", 0, 0.6, 0.4)   # one seed only: tests are n/a
    write_run(tmp_path, "dukemtmc", "proposed", 0, 0.61, 0.41)
    (tmp_path / "runs").mkdir()  # executed notebooks live here, no metrics
    return tmp_path


def test_collect_reads_every_run(results):
    runs = collect_metrics(results)
    assert len(runs) == 8
    assert list(runs.columns[:9]) == ["dataset", "method", "seed", "rank1", "rank5", "rank10", "mAP",
                                      "mINP", "num_valid_queries"]
    assert list(runs[runs.dataset == "market1501"]["method"].unique()) == ["baseline", "proposed"]


def test_summary_mean_std_and_paired_test(results):
    summary = summarize(collect_metrics(results)).set_index(["dataset", "method"])
    base, prop = summary.loc[("market1501", "baseline")], summary.loc[("market1501", "proposed")]
    r1_base = 100 * np.array(list(BASE_R1.values()))
    r1_prop = 100 * np.array([PROP_R1[s] for s in BASE_R1])
    assert base["n_seeds"] == 3 and prop["n_pairs"] == 3 and base["seeds"] == "0,1,2"
    assert base["rank1_mean"] == pytest.approx(r1_base.mean())
    assert base["rank1_std"] == pytest.approx(r1_base.std(ddof=1))
    assert prop["rank1_delta"] == pytest.approx(r1_prop.mean() - r1_base.mean())
    assert prop["rank1_delta_std"] == pytest.approx((r1_prop - r1_base).std(ddof=1))
    expected = stats.ttest_rel(r1_prop, r1_base)
    assert prop["rank1_t"] == pytest.approx(expected.statistic)
    assert prop["rank1_p_ttest"] == pytest.approx(expected.pvalue)
    m_base = 100 * np.array(list(BASE_MAP.values()))
    m_prop = 100 * np.array([PROP_MAP[s] for s in BASE_MAP])
    assert prop["mAP_p_ttest"] == pytest.approx(stats.ttest_rel(m_prop, m_base).pvalue)
    assert math.isnan(prop["rank1_p_wilcoxon"])  # 3 pairs: below the Wilcoxon threshold
    assert math.isnan(base["rank1_delta"])        # the reference has no gain over itself


def test_single_seed_reports_na(results):
    summary = summarize(collect_metrics(results))
    table = comparison_table(summary)
    duke = table[table["Dataset"] == "dukemtmc"].iloc[0]
    assert "n/a" in duke["Δ Rank-1 (pp)"] and duke["Seeds"] == "1 / 1"
    assert "±" not in duke[table.columns[2]]      # one seed: no std
    market = table[table["Dataset"] == "market1501"].iloc[0]
    assert "±" in market[table.columns[2]] and "p=" in market["Δ Rank-1 (pp)"]


def test_paired_test_matches_scipy_and_pairs_by_seed():
    a = {0: 71.0, 1: 72.5, 2: 70.2, 3: 73.1, 4: 71.9, 5: 72.2, 9: 99.0}   # seed 9 has no partner
    b = {5: 71.8, 4: 71.0, 3: 72.0, 2: 70.0, 1: 72.6, 0: 70.1}
    seeds = sorted(set(a) & set(b))
    x, y = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    out = paired_test(a, b)
    assert out["n_pairs"] == 6
    assert out["p_ttest"] == pytest.approx(stats.ttest_rel(x, y).pvalue)
    assert out["p_wilcoxon"] == pytest.approx(stats.wilcoxon(x, y).pvalue)
    assert out["diff_mean"] == pytest.approx((x - y).mean())
    assert math.isnan(paired_test({0: 1.0}, {0: 0.5})["p_ttest"])
    assert math.isnan(paired_test({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5})["p_ttest"])  # constant gap


def test_written_summary_and_figures(results, tmp_path):
    runs = collect_metrics(results)
    summary = summarize(runs)
    paths = write_summary(summary, tmp_path / "out")
    text = paths["md"].read_text()
    assert "paired t-test" in text and "scipy.stats.ttest_rel" in text and "market1501" in text
    back = pd.read_csv(paths["csv"])
    assert back["rank1_mean"].tolist() == pytest.approx(summary["rank1_mean"].tolist())
    assert summary_markdown(summary).count("|---") >= 2
    for fig_path, fn in ((tmp_path / "bars.png", plot_bars), (tmp_path / "cmc.png", plot_cmc),
                        (tmp_path / "gains.png", plot_gains)):
        fn(runs, fig_path)
        assert fig_path.stat().st_size > 10_000


def test_training_curves_and_retrieval_grid(tmp_path):
    from PIL import Image
    lines = [{"time": 1, "stage": 1, "epoch": e, "loss": 3 - e / 2, "lr": 1e-3, "prompts_per_s": 9}
             for e in (1, 2, 3)]
    lines += [{"time": 2, "stage": 2, "epoch": e, "loss": 5 - e, "id": 2, "tri": 1, "i2t": 2 - e / 3,
               "lr": 3e-4, "img_per_s": 50} for e in (1, 2)]
    lines += [{"time": 3, "stage": "final", "eval": {"rank1": 0.5, "mAP": 0.3, "cmc": [0.5]}}]
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in lines) + "\n{\"cut short")
    plot_training_curves(jsonl, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    images = []
    for i in range(4):
        path = tmp_path / f"im{i}.jpg"
        Image.new("RGB", (64, 128), (60 * i, 100, 200 - 40 * i)).save(path)
        images.append(path)
    retrieval_grid(images[0], images[1:], [True, False, True], tmp_path / "grid.png", title="t", close=True)
    retrieval_grid(images[0], images[1:], None, tmp_path / "grid_unknown.png", close=True)
    assert (tmp_path / "grid.png").stat().st_size > 5_000


def test_attention_rollout_by_hand():
    import torch

    from reidlib.viz.attention import attention_rollout, last_layer_cls_attention
    a1 = torch.softmax(torch.randn(2, 3, 5, 5), -1)   # [B, heads, N, N]
    a2 = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    eye = torch.eye(5)
    m1, m2 = 0.5 * a1.mean(1) + 0.5 * eye, 0.5 * a2.mean(1) + 0.5 * eye   # rows already sum to 1
    expected = (m2 @ m1)[:, 0, 1:]
    assert torch.allclose(attention_rollout([a1, a2]), expected, atol=1e-6)
    assert torch.allclose(last_layer_cls_attention([a1, a2]), a2.mean(1)[:, 0, 1:])


@pytest.mark.parametrize("overlap", [False, True])
def test_hooked_attention_is_the_blocks_attention(overlap):
    """softmax(q k^T / sqrt(d)) from the q/k hooks, times the hooked v, gives exactly what the
    block feeds its output projection (LoRA on); the maps have the model's non-square token grid,
    with and without overlapping patches."""
    import torch

    from reidlib.config import load_config
    from reidlib.model import build_model
    from reidlib.viz.attention import AttentionRecorder, attention_maps
    torch.manual_seed(0)
    cfg = load_config("tiny", ["model.lora.enabled=true"]).model
    patch = build_model(cfg, num_classes=3).visual.vit.conv1.kernel_size[0]
    cfg.stride = patch * 3 // 4 if overlap else patch
    model = build_model(cfg, num_classes=3).eval()
    height, width = cfg.image_size
    grid = ((height - patch) // cfg.stride + 1, (width - patch) // cfg.stride + 1)
    assert grid[0] > grid[1]
    attn = model.visual.vit.transformer.resblocks[-1].attn
    seen = {}
    hooks = [attn.v_proj.register_forward_hook(lambda m, i, o: seen.update(v=o)),
             attn.out_proj.register_forward_pre_hook(lambda m, i: seen.update(mixed=i[0]))]
    images = torch.randn(2, 3, 128, 64)
    with torch.no_grad(), AttentionRecorder(model) as recorder:
        model.encode_image(images)
    for h in hooks:
        h.remove()
    weights = recorder.attentions()
    assert len(weights) == len(model.visual.vit.transformer.resblocks)
    batch, length, dim = seen["v"].shape
    v = seen["v"].view(batch, length, attn.num_heads, -1).transpose(1, 2)
    mixed = (weights[-1] @ v).transpose(1, 2).reshape(batch, length, dim)
    assert length == 1 + grid[0] * grid[1]
    assert torch.allclose(mixed, seen["mixed"], atol=1e-5)
    maps = attention_maps(model, images)
    assert maps.shape == (2, *grid) and torch.allclose(maps.amax(dim=(1, 2)), torch.ones(2))
