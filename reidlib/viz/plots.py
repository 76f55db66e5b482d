"""Figures of the results: per-dataset bars with error bars over seeds, the per-seed gains over
the baseline, CMC curves, and the training curves of one run. Every function saves a PNG and
returns the matplotlib figure (shown inline in a notebook).

Example::

    runs = collect_metrics("results")
    plot_bars(runs, "results/figures/bars.png")
    plot_gains(runs, "results/figures/gains.png")
    plot_cmc(runs, "results/figures/cmc.png")
    plot_training_curves("results/market1501/proposed/seed0/metrics.jsonl", "curves.png")
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from .tables import METHOD_ORDER, METRIC_NAMES, format_p, method_label, ordered_datasets, paired_test

DPI = 150


def _palette(methods) -> dict:
    import seaborn as sns
    colors = sns.color_palette("colorblind", len(METHOD_ORDER) + 4)
    known = {m: colors[i] for i, m in enumerate(METHOD_ORDER)}
    extra = [m for m in methods if m not in known]
    known.update({m: colors[len(METHOD_ORDER) + i % 4] for i, m in enumerate(extra)})
    return {method_label(m): known[m] for m in methods}


def _ordered_methods(methods) -> list[str]:
    present = list(dict.fromkeys(methods))
    return [m for m in METHOD_ORDER if m in present] + sorted(m for m in present if m not in METHOD_ORDER)


def _save(fig, out_png: str | Path | None):
    if out_png is not None:
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=DPI, bbox_inches="tight")
    return fig


def plot_bars(runs: pd.DataFrame, out_png: str | Path | None = None,
              metrics: tuple[str, ...] = ("rank1", "mAP")):
    """One panel per metric: a bar per (dataset, method) at the mean over seeds, the error bar
    one standard deviation, and each seed's value as a dot."""
    import seaborn as sns  # here: seaborn takes seconds to import, training curves do not need it
    methods = _ordered_methods(runs["method"])
    data = runs.assign(Method=runs["method"].map(method_label), Dataset=runs["dataset"])
    order = [method_label(m) for m in methods]
    palette = _palette(methods)
    datasets = ordered_datasets(data["Dataset"])
    width = max(4.5, 1.5 + 0.45 * len(datasets) * len(methods))
    fig, axes = plt.subplots(1, len(metrics), figsize=(width * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        data[metric + "_pct"] = 100 * data[metric].astype(float)
        sns.barplot(data=data, x="Dataset", y=metric + "_pct", hue="Method", order=datasets,
                    hue_order=order, palette=palette, errorbar="sd", capsize=0.15, err_kws={"linewidth": 1.2},
                    alpha=0.85, ax=ax)
        sns.stripplot(data=data, x="Dataset", y=metric + "_pct", hue="Method", order=datasets,
                      hue_order=order, palette=palette, dodge=True, jitter=False, size=4,
                      edgecolor="black", linewidth=0.6, legend=False, ax=ax)
        for container in ax.containers:
            if hasattr(container, "patches"):
                ax.bar_label(container, fmt="%.1f", fontsize=8, label_type="center", color="white",
                             fontweight="bold")
        top = np.nanmax(data[metric + "_pct"].to_numpy()) if len(data) else 100
        ax.set_ylim(0, min(100, top * 1.15 + 2))
        ax.set_ylabel(f"{METRIC_NAMES[metric]} (%)")
        ax.set_xlabel("Data set")
        ax.set_title(f"{METRIC_NAMES[metric]}: mean ± std over seeds")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        handles, labels = ax.get_legend_handles_labels()
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    seeds = runs.groupby(["dataset", "method"]).size()
    n_text = f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()}-{seeds.max()}"
    fig.legend(handles[: len(order)], labels[: len(order)], loc="lower center", ncol=len(order),
               frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"Bars: mean over {n_text} seeds; error bars: ±1 std; dots: single seeds", fontsize=9, y=0.99)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    return _save(fig, out_png)


def plot_gains(runs: pd.DataFrame, out_png: str | Path | None = None, reference: str = "baseline",
               metrics: tuple[str, ...] = ("rank1", "mAP")):
    """The gain of each method over ``reference``, seed by seed (runs paired by seed), in
    percentage points: a dot per seed, the mean with a ±1 std bar, and the zero line. A gain of
    a few tenths of a point is invisible on bars that start at 0; here it is not."""
    methods = [m for m in _ordered_methods(runs["method"]) if m != reference]
    palette = _palette(methods)
    datasets = ordered_datasets(runs["dataset"])
    width = max(4.5, 1.5 + 0.6 * len(datasets) * max(2, len(methods)))
    fig, axes = plt.subplots(1, len(metrics), figsize=(width * len(metrics), 4.0), squeeze=False)
    slot = 0.7 / max(1, len(methods))  # horizontal room of one method within a data set
    for ax, metric in zip(axes[0], metrics):
        labelled = set()
        for j, method in enumerate(methods):
            for i, dataset in enumerate(datasets):
                sel = runs[runs["dataset"] == dataset]
                ref = dict(zip(sel[sel["method"] == reference]["seed"], sel[sel["method"] == reference][metric]))
                new = dict(zip(sel[sel["method"] == method]["seed"], sel[sel["method"] == method][metric]))
                diff = 100 * np.array([new[s] - ref[s] for s in sorted(set(new) & set(ref))], dtype=float)
                if not len(diff):
                    continue
                x = i + (j - (len(methods) - 1) / 2) * slot
                color = palette[method_label(method)]
                ax.scatter(np.full(len(diff), x), diff, color=color, edgecolor="black", linewidth=0.5,
                           s=22, zorder=3, label=None if method in labelled else method_label(method))
                labelled.add(method)
                std = diff.std(ddof=1) if len(diff) > 1 else 0.0
                ax.errorbar(x + slot * 0.25, diff.mean(), yerr=std, fmt="D", color=color, capsize=4,
                            markersize=6, markeredgecolor="black", zorder=4)
                if len(methods) == 1:  # with several methods the numbers would overlap: see the table
                    # the paired t-test of the table: a one-sample test of the per-seed differences
                    p = paired_test(dict(enumerate(diff)), dict(enumerate(np.zeros_like(diff))))["p_ttest"]
                    ax.annotate(f"{diff.mean():+.2f}\n(p={format_p(p)})", (x + slot * 0.3, diff.mean()),
                                xytext=(6, 0), textcoords="offset points", va="center", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(datasets)), datasets)
        ax.set_xlim(-0.6, len(datasets) - 0.4)
        ax.set_xlabel("Data set")
        ax.set_ylabel(f"Δ {METRIC_NAMES[metric]} vs {method_label(reference)} (pp)")
        ax.set_title(f"Gain in {METRIC_NAMES[metric]}, paired by seed")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    note = "; p: paired t-test" if len(methods) == 1 else "; numbers and p-values: summary.md"
    fig.suptitle("Dots: single seeds; diamonds: mean ± 1 std of the per-seed differences" + note,
                 fontsize=9, y=0.99)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    return _save(fig, out_png)


def plot_cmc(runs: pd.DataFrame, out_png: str | Path | None = None, max_rank: int = 20):
    """One panel per data set: the CMC curve of each method, mean over seeds with a ±1 std band."""
    methods = _ordered_methods(runs["method"])
    palette = _palette(methods)
    datasets = ordered_datasets(runs["dataset"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for method in methods:
            group = runs[(runs["dataset"] == dataset) & (runs["method"] == method)]
            curves = [c for c in group["cmc"] if isinstance(c, (list, tuple)) and len(c)]
            if not curves:
                continue
            length = min(max_rank, min(len(c) for c in curves))
            cmc = 100 * np.array([c[:length] for c in curves], dtype=float)
            ranks = np.arange(1, length + 1)
            mean = cmc.mean(0)
            color = palette[method_label(method)]
            ax.plot(ranks, mean, marker="o", markersize=3, color=color,
                    label=f"{method_label(method)} (n={len(curves)})")
            if len(curves) > 1:
                std = cmc.std(0, ddof=1)
                ax.fill_between(ranks, mean - std, np.minimum(100, mean + std), color=color, alpha=0.2)
        ax.set_xlabel("Rank k")
        ax.set_ylabel("Matching rate at rank ≤ k (%)")
        ax.set_title(f"CMC, {dataset}")
        ax.set_xlim(1, max_rank)
        ax.set_xticks([1, 5, 10, 15, 20] if max_rank == 20 else ax.get_xticks())
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8, title="mean ± std over seeds", title_fontsize=8)
    fig.tight_layout()
    return _save(fig, out_png)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a line cut short by a crash is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def training_frames(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(stage-1 epochs, stage-2 epochs, evaluations) of a run's ``metrics.jsonl``. A run resumed
    after a crash logs some epochs twice; the last record of an epoch wins."""
    records = read_jsonl(path)
    s1 = pd.DataFrame([r for r in records if r.get("stage") == 1 and "loss" in r])
    s2 = pd.DataFrame([r for r in records if r.get("stage") == 2 and "loss" in r])
    evals = []
    last_epoch = int(s2["epoch"].max()) if len(s2) else 0
    for r in records:
        if "eval" in r and isinstance(r["eval"], dict):
            epoch = r.get("epoch", last_epoch) if r.get("stage") != "final" else last_epoch
            evals.append({"epoch": epoch, **{k: v for k, v in r["eval"].items() if not isinstance(v, list)}})
    ev = pd.DataFrame(evals)
    frames = [f.drop_duplicates("epoch", keep="last").sort_values("epoch") if len(f) else f
              for f in (s1, s2, ev)]
    return tuple(frames)


def plot_training_curves(metrics_jsonl: str | Path, out_png: str | Path | None = None,
                         title: str | None = None):
    """Four panels of one run: stage-1 loss, stage-2 losses (total and its parts), the learning
    rates of both stages, and the test-set evaluations (Rank-1 and mAP, %)."""
    s1, s2, ev = training_frames(metrics_jsonl)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ax = axes[0, 0]
    if len(s1):
        ax.plot(s1["epoch"], s1["loss"], marker="o", markersize=3, label="image-text contrastive")
        ax.legend(fontsize=8)
    ax.set(title="Stage 1: prompt learning", xlabel="Epoch", ylabel="Loss")
    ax = axes[0, 1]
    if len(s2):
        ax.plot(s2["epoch"], s2["loss"], marker="o", markersize=3, color="black", label="total (weighted)")
        for part, label in (("id", "ID (label-smoothed CE)"), ("tri", "triplet (batch-hard)"),
                            ("i2t", "image-to-text CE")):
            if part in s2:
                ax.plot(s2["epoch"], s2[part], marker=".", label=label)
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + 0.4 * (high - low))  # room for the legend above the curves
        ax.legend(fontsize=8, loc="upper center", ncol=2)
    ax.set(title="Stage 2: image-encoder fine-tuning", xlabel="Epoch", ylabel="Loss")
    ax = axes[1, 0]
    if len(s1):
        ax.plot(s1["epoch"], s1["lr"], marker="o", markersize=3, label="stage 1 (prompts)")
    if len(s2):
        ax.plot(s2["epoch"], s2["lr"], marker="o", markersize=3, label="stage 2 (image encoder)")
    if len(s1) or len(s2):
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set(title="Learning rate (base parameter group)", xlabel="Epoch", ylabel="Learning rate")
    ax = axes[1, 1]
    if len(ev):
        for key, marker in (("rank1", "o"), ("mAP", "s")):
            if key in ev:
                ax.plot(ev["epoch"], 100 * ev[key], marker=marker, label=METRIC_NAMES[key])
        ax.legend(fontsize=8)
        top = 100 * np.nanmax(ev[[k for k in ("rank1", "mAP") if k in ev]].to_numpy(dtype=float))
        ax.set_ylim(0, min(100, 1.2 * top + 5))
    else:
        ax.text(0.5, 0.5, "no evaluation logged", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="Test set (stage-2 epoch; last = final model)", xlabel="Epoch (stage 2)", ylabel="Score (%)")
    last = {ax: len(frame) for ax, frame in ((axes[0, 0], s1), (axes[0, 1], s2), (axes[1, 1], s2))}
    last[axes[1, 0]] = max(len(s1), len(s2))
    for a in axes.flat:
        a.grid(alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        if 0 < last[a] <= 12:  # few epochs: one tick each, not fractions of an epoch
            a.set_xlim(0.5, last[a] + 0.5)
    fig.suptitle(title or str(Path(metrics_jsonl).parent), fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)
