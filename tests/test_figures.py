"""Figures fit for a thesis: every saved figure a 300 dpi PNG with a PDF beside, gains.png legible
(labels apart, numbers inside the frame), and the demo's table and bars with the zero-shot row."""
import json

import matplotlib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reidlib.demo.run import ZERO_SHOT_METHOD, write_zero_shot
from reidlib.viz import (
    collect_groups,
    plot_bars,
    plot_cmc,
    plot_gains,
    plot_training_curves,
    retrieval_grid,
    save_figure,
    summarize,
    summary_markdown,
    write_summary,
)

matplotlib.use("Agg")

GROUPS = {"pretrained miniature": "pretrained", "random init": "random"}
# Made-up (Rank-1, mAP) per seed, the demo's shape: two groups, two methods, seeds 0 and 1.
VALUES = {"pretrained": {"baseline": [(0.705, 0.583), (0.695, 0.56)], "proposed": [(0.66, 0.57), (0.71, 0.625)]},
          "random": {"baseline": [(0.26, 0.24), (0.37, 0.27)], "proposed": [(0.14, 0.118), (0.18, 0.127)]}}


def metrics(rank1, mAP):
    cmc = np.minimum(1.0, rank1 + np.linspace(0, 0.4, 50)).tolist()
    return {"rank1": rank1, "rank5": cmc[4], "rank10": cmc[9], "mAP": mAP, "mINP": mAP / 2, "cmc": cmc,
            "num_valid_queries": 30}


@pytest.fixture
def demo_like(tmp_path):
    """A results folder shaped as the demo's (no zero-shot runs yet)."""
    for group, methods in VALUES.items():
        for method, seeds in methods.items():
            for seed, (rank1, mAP) in enumerate(seeds):
                run = tmp_path / group / "synth" / method / f"seed{seed}"
                run.mkdir(parents=True)
                (run / "metrics.json").write_text(json.dumps({"dataset": "synth", "method": method, "seed": seed,
                                                              **metrics(rank1, mAP)}))
    return tmp_path


def runs_of(root):
    return collect_groups({label: root / folder for label, folder in GROUPS.items()})


def assert_thesis_figure(png):
    png = type(png)(png)
    assert round(Image.open(png).info["dpi"][0]) == 300, png
    pdf = png.with_suffix(".pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-", pdf


def test_every_plot_saves_300_dpi_and_a_pdf(demo_like, tmp_path):
    runs = runs_of(demo_like)
    out = tmp_path / "figures"
    for name, plot in (("bars", plot_bars), ("gains", plot_gains), ("cmc", plot_cmc)):
        plot(runs, out / f"{name}.png")
        assert_thesis_figure(out / f"{name}.png")
    lines = [{"stage": 1, "epoch": 1, "loss": 2.0, "lr": 1e-3}, {"stage": "final", "eval": {"rank1": 0.5, "mAP": 0.3}}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    plot_training_curves(tmp_path / "metrics.jsonl", out / "curves.png")
    assert_thesis_figure(out / "curves.png")
    images = []
    for i in range(3):
        images.append(tmp_path / f"im{i}.jpg")
        Image.new("RGB", (64, 128), (80 * i, 100, 200)).save(images[-1])
    retrieval_grid(images[0], images[1:], [True, False], out / "grid.png", close=True)
    assert_thesis_figure(out / "grid.png")


def test_save_figure_writes_both(tmp_path):
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(1, 1))
    assert [p.name for p in save_figure(fig, tmp_path / "a.pdf")] == ["a.png", "a.pdf"]
    assert [p.name for p in save_figure(fig, tmp_path / "b")] == ["b.png", "b.pdf"]
    assert save_figure(fig, None) == []
    plt.close(fig)


def test_attention_figure_is_saved_at_300_dpi(small_generated, tmp_path, one_thread):
    import torch

    from reidlib.config import load_config
    from reidlib.data import load_dataset
    from reidlib.model import build_model
    from reidlib.viz import attention_figure
    cfg = load_config("tiny", ["device=cpu"])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=4)
    data = load_dataset("market1501", small_generated)
    attention_figure({"baseline": (model, cfg)}, data.query[:2], tmp_path / "attention.png")
    assert_thesis_figure(tmp_path / "attention.png")


def _bbox(artist, renderer):
    return artist.get_window_extent(renderer)


def test_gains_labels_apart_and_numbers_inside_the_frame(demo_like):
    fig = plot_gains(runs_of(demo_like))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        frame = ax.get_window_extent(renderer)
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        assert len(labels) == 2 and all("\n" in t.get_text() for t in labels)     # wrapped
        boxes = [_bbox(t, renderer) for t in labels]
        assert boxes[0].x1 < boxes[1].x0                                          # apart
        numbers = [t for t in ax.texts if "p=" in t.get_text()]
        assert len(numbers) == 2
        for text in numbers:
            box = _bbox(text, renderer)
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, \
                text.get_text()
        # the numbers stand above every point
        points = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections if len(c.get_offsets())])
        top_point = ax.transData.transform((0, points.max()))[1]
        assert all(_bbox(t, renderer).y0 > top_point for t in numbers)


def test_demo_summary_gains_a_zero_shot_row_and_keeps_the_others(demo_like, tmp_path):
    before_runs = runs_of(demo_like)
    before = summarize(before_runs)
    before_md = summary_markdown(before)
    before_paths = write_summary(before, tmp_path / "before")
    zero = {"pretrained": (0.82, 0.746), "random": (0.10, 0.043)}
    for folder, (rank1, mAP) in zero.items():
        path = write_zero_shot(demo_like / folder, metrics(rank1, mAP))
        assert path == demo_like / folder / "synth" / ZERO_SHOT_METHOD / "metrics.json"
    runs = runs_of(demo_like)
    after = summarize(runs)
    after_md = summary_markdown(after)
    after_paths = write_summary(after, tmp_path / "after")
    # only rows added: every line of the summary before is there, in the same order
    added = [line for line in after_md.splitlines() if line not in before_md.splitlines()]
    assert [line for line in after_md.splitlines() if line in before_md.splitlines()] == before_md.splitlines()
    assert added == [
        "| synth, pretrained miniature | Zero-shot (no re-ID training) | – | 82.00 | 85.27 | 74.60 | 37.30 |",
        "| synth, random init | Zero-shot (no re-ID training) | – | 10.00 | 13.27 | 4.30 | 2.15 |"]
    old_csv = before_paths["csv"].read_text().splitlines()
    new_csv = after_paths["csv"].read_text().splitlines()
    assert old_csv[0] == new_csv[0] and set(old_csv) <= set(new_csv) and len(new_csv) == len(old_csv) + 2
    table = pd.read_csv(after_paths["csv"]).set_index(["dataset", "method"])
    assert table.loc[("synth, pretrained miniature", "zero_shot"), "mAP_mean"] == pytest.approx(74.6)
    assert np.isnan(table.loc[("synth, pretrained miniature", "zero_shot"), "mAP_delta"])   # never compared
    # the bars show it; the gains leave it out
    bars = plot_bars(runs)
    legend = [t.get_text() for t in bars.legends[0].get_texts()]
    assert legend == ["CLIP-ReID (baseline)", "Proposed (deep prompts + LoRA)", "Zero-shot (no re-ID training)"]
    values = {round(float(t.get_text()), 1) for ax in bars.axes for t in ax.texts}
    assert {82.0, 74.6, 10.0, 4.3} <= values
    gains = plot_gains(runs)
    assert [t.get_text() for t in gains.legends[0].get_texts()] == ["Proposed (deep prompts + LoRA)"]
