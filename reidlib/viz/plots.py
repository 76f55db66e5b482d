"""Figures of the results: per-dataset bars with error bars over seeds, the per-seed gains over
the baseline, CMC curves, and the training curves of one run. Every function saves a 300 dpi PNG
and a PDF of it (:func:`~reidlib.viz.figures.save_figure`) and returns the matplotlib figure (shown
inline in a notebook).

Example::

    runs = collect_metrics("results")
    plot_bars(runs, "results/figures/bars.png")
    plot_gains(runs, "results/figures/gains.png")
    plot_cmc(runs, "results/figures/cmc.png")
    plot_training_curves("results/market1501/proposed/seed0/metrics.jsonl", "curves.png")
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory

from .figures import save_figure
from .tables import METHOD_ORDER, METRIC_NAMES, NOT_COMPARED, format_p, method_label, ordered_datasets, paired_test


def _palette(methods) -> dict:
    import seaborn as sns
    colors = sns.color_palette("colorblind", len(METHOD_ORDER) + 4)
    known = {m: colors[i] for i, m in enumerate(METHOD_ORDER)}
    known.update({m: (0.62, 0.62, 0.62) for m in NOT_COMPARED})   # untrained reference points: grey
    extra = [m for m in methods if m not in known]
    known.update({m: colors[len(METHOD_ORDER) + i % 4] for i, m in enumerate(extra)})
    return {method_label(m): known[m] for m in methods}


def _ordered_methods(methods) -> list[str]:
    present = list(dict.fromkeys(methods))
    return [m for m in METHOD_ORDER if m in present] + sorted(m for m in present if m not in METHOD_ORDER)


def _save(fig, out_png: str | Path | None):
    save_figure(fig, out_png)       # a 300 dpi PNG and its PDF
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
        top = np.nanmax(data[metric + "_pct"].to_numpy()) if len(data) else 100
        ax.set_ylim(0, min(100, top * 1.15 + 2))
        _label_bars(ax)
        ax.set_xticks(ax.get_xticks(), [_wrap(t.get_text()) for t in ax.get_xticklabels()])
        ax.set_ylabel(f"{METRIC_NAMES[metric]} (%)")
        ax.set_xlabel("Data set")
        ax.set_title(f"{METRIC_NAMES[metric]}: mean ± std over seeds")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        handles, labels = ax.get_legend_handles_labels()
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    trained = runs[~runs["method"].isin(NOT_COMPARED)]
    seeds = (trained if len(trained) else runs).groupby(["dataset", "method"]).size()
    n_text = f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()}-{seeds.max()}"
    fig.legend(handles[: len(order)], labels[: len(order)], loc="lower center", ncol=len(order),
               frameon=False, bbox_to_anchor=(0.5, -0.02))
    grey = "; grey: the starting weights, before any re-ID training" if len(trained) < len(runs) else ""
    fig.suptitle(f"Bars: mean over {n_text} seeds; error bars: ±1 std; dots: single seeds{grey}", fontsize=9,
                 y=0.99)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    return _save(fig, out_png)


def _label_bars(ax) -> None:
    """Each bar's value: inside a bar tall enough to hold it, else just above it."""
    limit = ax.get_ylim()[1]
    for container in ax.containers:
        for bar in getattr(container, "patches", []):
            height = bar.get_height()
            if not np.isfinite(height) or height <= 0:
                continue
            x = bar.get_x() + bar.get_width() / 2
            if height >= 0.12 * limit:
                ax.text(x, height / 2, f"{height:.1f}", ha="center", va="center", fontsize=8, color="white",
                        fontweight="bold")
            else:
                ax.text(x, height + 0.035 * limit, f"{height:.1f}", ha="center", va="bottom", fontsize=8,
                        color="black", fontweight="bold")


def plot_gains(runs: pd.DataFrame, out_png: str | Path | None = None, reference: str = "baseline",
               metrics: tuple[str, ...] = ("rank1", "mAP")):
    """The gain of each method over ``reference``, seed by seed (runs paired by seed), in
    percentage points: a dot per seed, the mean with a ±1 std bar, and the zero line. A gain of
    a few tenths of a point is invisible on bars that start at 0; here it is not. With one method
    the mean gain and its p-value stand above its points, inside the frame. Reference points that
    were not trained (:data:`~reidlib.viz.tables.NOT_COMPARED`) are left out."""
    methods = [m for m in _ordered_methods(runs["method"]) if m != reference and m not in NOT_COMPARED]
    palette = _palette(methods)
    datasets = ordered_datasets(runs["dataset"])
    width = max(4.5, 1.5 + 0.6 * len(datasets) * max(2, len(methods)))
    fig, axes = plt.subplots(1, len(metrics), figsize=(width * len(metrics), 4.6), squeeze=False,
                             layout="constrained")
    slot = 0.7 / max(1, len(methods))  # horizontal room of one method within a data set
    for ax, metric in zip(axes[0], metrics):
        labelled, values, notes = set(), [0.0], []
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
                values += [*diff.tolist(), diff.mean() - std, diff.mean() + std]
                if len(methods) == 1:  # with several methods the numbers would overlap: see the table
                    # the paired t-test of the table: a one-sample test of the per-seed differences
                    p = paired_test(dict(enumerate(diff)), dict(enumerate(np.zeros_like(diff))))["p_ttest"]
                    notes.append((x + slot * 0.125, f"{diff.mean():+.2f} pp\n(p={format_p(p)})"))
        ax.axhline(0, color="black", linewidth=0.8)
        low, high = min(values), max(values)
        span = (high - low) or 1.0
        # headroom above the points for the numbers: they stay inside the frame
        ax.set_ylim(low - 0.08 * span, high + (0.32 if notes else 0.08) * span)
        on_top = blended_transform_factory(ax.transData, ax.transAxes)
        for x, text in notes:
            ax.text(x, 0.97, text, transform=on_top, ha="center", va="top", fontsize=8, zorder=5,
                    bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.85})
        ax.set_xticks(range(len(datasets)), [_wrap(d) for d in datasets])
        ax.set_xlim(-0.6, len(datasets) - 0.4)
        ax.set_xlabel("Data set")
        ax.set_ylabel(f"Δ {METRIC_NAMES[metric]} vs {method_label(reference)} (pp)")
        ax.set_title(f"Gain in {METRIC_NAMES[metric]}, paired by seed")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=max(1, len(labels)), frameon=False)
    note = "; p: paired t-test" if len(methods) == 1 else "; numbers and p-values: summary.md"
    fig.suptitle("Dots: single seeds; diamonds: mean ± 1 std of the per-seed differences" + note, fontsize=9)
    return _save(fig, out_png)


def _wrap(label: str, width: int = 20) -> str:
    """A data set's label on short lines: ``"synth, pretrained miniature"`` -> ``"synth,\npretrained miniature"``."""
    parts = label.split(", ")
    lines = [line for i, part in enumerate(parts)
             for line in textwrap.wrap(part + ("," if i < len(parts) - 1 else ""), width) or [""]]
    return "\n".join(lines)


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
            count = "" if method in NOT_COMPARED else f" (n={len(curves)})"
            ax.plot(ranks, mean, marker="o", markersize=3, color=color, label=f"{method_label(method)}{count}")
            if len(curves) > 1:
                std = cmc.std(0, ddof=1)
                ax.fill_between(ranks, mean - std, np.minimum(100, mean + std), color=color, alpha=0.2)
        ax.set_xlabel("Rank k")
        ax.set_ylabel("Matching rate at rank ≤ k (%)")
        ax.set_title(f"CMC, {dataset}")
        ax.set_xlim(1, max_rank)
        ax.set_xticks([1, 5, 10, 15, 20] if max_rank == 20 else ax.get_xticks())
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8, title="mean ± std over seeds", title_fontsize=8)
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


# Numbers of an epoch record that are not a part of the stage's loss.
NOT_LOSS_PARTS = ("stage", "epoch", "time", "steps", "lr", "lr_groups", "loss")
PART_LABELS = {"id": "ID (label-smoothed CE)", "tri": "triplet (batch-hard)", "i2t": "image-to-text CE",
               "t2i": "text-to-image CE"}


def _epoch_records(records: list[dict]) -> dict[int, pd.DataFrame]:
    """stage -> its epoch records (the last of an epoch logged twice by a resumed run wins)."""
    stages = sorted({r["stage"] for r in records if isinstance(r.get("stage"), int) and "loss" in r})
    frames = {}
    for stage in stages:
        frame = pd.DataFrame([r for r in records if r.get("stage") == stage and "loss" in r])
        frames[stage] = frame.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)
    return frames


def _evaluations(records: list[dict], epochs: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """One row per evaluation: its stage and epoch (the final model's: the last stage's last epoch),
    ``final`` and the metrics; the last of a repeated one wins."""
    last_stage = max(epochs) if epochs else 1
    last_epoch = int(epochs[last_stage]["epoch"].max()) if epochs else 0
    rows = []
    for r in records:
        if not isinstance(r.get("eval"), dict):
            continue
        final = r.get("stage") == "final"
        stage, epoch = (last_stage, last_epoch) if final else (r.get("stage"), r.get("epoch", last_epoch))
        rows.append({"stage": stage, "epoch": epoch, "final": final,
                     **{k: v for k, v in r["eval"].items() if isinstance(v, (int, float))}})
    frame = pd.DataFrame(rows)
    if len(frame):
        frame = frame.drop_duplicates(["stage", "epoch", "final"], keep="last")
    return frame


def _integer_epochs(ax, count: int) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if 0 < count <= 12:  # few epochs: one tick each, not fractions of an epoch
        ax.set_xlim(0.5, count + 0.5)


def training_curves(run: str | Path, title: str | None = None):
    """One run's training, from its ``metrics.jsonl``, as a matplotlib Figure: a panel per stage
    with its loss per epoch (the total and the parts its records hold), the learning rate of every
    stage and parameter group (log scale), and the evaluations (mAP and Rank-1, %; the final model's
    marked). Any number of stages: a one-stage method gets one loss panel. ``run``: the run folder
    or its ``metrics.jsonl``.

    Example::

        fig = training_curves("results/runs/tiny")      # shown inline in a notebook
        save_figure(fig, "curves.png")                   # curves.png (300 dpi) and curves.pdf
    """
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    records = read_jsonl(path)
    epochs = _epoch_records(records)
    evals = _evaluations(records, epochs)
    stages = list(epochs) or [1]
    fig = plt.figure(figsize=(max(10.0, 4.6 * len(stages)), 7.4), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=(1, 1))
    loss_axes = top.subplots(1, len(stages), squeeze=False)[0]
    for ax, stage in zip(loss_axes, stages):
        frame = epochs.get(stage)
        if frame is None or not len(frame):
            ax.text(0.5, 0.5, "no epoch logged", ha="center", va="center", transform=ax.transAxes)
        else:
            parts = [c for c in frame.columns if c not in NOT_LOSS_PARTS and not c.endswith("_per_s")
                     and pd.api.types.is_numeric_dtype(frame[c])]
            ax.plot(frame["epoch"], frame["loss"], marker="o", markersize=3, color="black",
                    label="total (weighted)" if parts else "loss")
            for part in parts:
                ax.plot(frame["epoch"], frame[part], marker=".", label=PART_LABELS.get(part, part))
            if parts:
                low, high = ax.get_ylim()
                ax.set_ylim(low, high + 0.45 * (high - low))  # room for the legend above the curves
                ax.legend(fontsize=8, loc="upper center", ncol=2)
            _integer_epochs(ax, int(frame["epoch"].max()))
        ax.set(title=f"Stage {stage}: loss per epoch", xlabel=f"Epoch (stage {stage})", ylabel="Loss")
        ax.grid(alpha=0.3)
    lr_ax, eval_ax = bottom.subplots(1, 2)
    styles = ["-", "--", ":", "-."]
    for i, (stage, frame) in enumerate(epochs.items()):
        color = f"C{i}"
        groups = frame["lr_groups"].tolist() if "lr_groups" in frame else None
        if groups and all(isinstance(g, list) for g in groups) and len({len(g) for g in groups}) == 1:
            for j in range(len(groups[0])):
                ax_label = f"stage {stage}" + (f", group {j}" if len(groups[0]) > 1 else "")
                lr_ax.plot(frame["epoch"], [g[j] for g in groups], styles[j % len(styles)], color=color,
                           marker="o", markersize=3, label=ax_label)
        elif "lr" in frame:
            lr_ax.plot(frame["epoch"], frame["lr"], marker="o", markersize=3, color=color, label=f"stage {stage}")
    if epochs:
        lr_ax.set_yscale("log")
        lr_ax.legend(fontsize=8)
        _integer_epochs(lr_ax, max(int(f["epoch"].max()) for f in epochs.values()))
    lr_ax.set(title="Learning rate (each parameter group)", xlabel="Epoch (of its stage)", ylabel="Learning rate")
    lr_ax.grid(alpha=0.3)
    shown = [k for k in ("mAP", "rank1") if len(evals) and k in evals and evals[k].notna().any()]
    if shown:
        eval_stages = sorted(evals["stage"].dropna().unique().tolist())
        ordered = evals.sort_values(["stage", "epoch", "final"])
        for key, marker in zip(shown, ("s", "o")):
            line = eval_ax.plot(ordered["epoch"], 100 * ordered[key], marker=marker, markersize=4,
                                label=METRIC_NAMES[key])
            final = ordered[ordered["final"]]
            if len(final):
                eval_ax.plot(final["epoch"], 100 * final[key], marker="*", markersize=13, linestyle="none",
                             color=line[0].get_color(), markeredgecolor="black",
                             label=f"{METRIC_NAMES[key]}, final model")
        top_value = 100 * np.nanmax(evals[shown].to_numpy(dtype=float))
        eval_ax.set_ylim(0, min(100, 1.2 * top_value + 5))
        eval_ax.legend(fontsize=8, loc="lower right")
        stage_text = f"stage {eval_stages[0]}" if len(eval_stages) == 1 else "of its stage"
        eval_ax.set_xlabel(f"Epoch ({stage_text})")
        last = max(int(f["epoch"].max()) for f in epochs.values()) if epochs else 0
        _integer_epochs(eval_ax, last if len(eval_stages) > 1 else int(epochs[eval_stages[0]]["epoch"].max())
                        if eval_stages[0] in epochs else last)
    else:
        eval_ax.text(0.5, 0.5, "no evaluation logged", ha="center", va="center", transform=eval_ax.transAxes)
        eval_ax.set_xlabel("Epoch")
    eval_ax.set(title="Test set: during training and the final model", ylabel="Score (%)")
    eval_ax.grid(alpha=0.3)
    fig.suptitle(title or str(path.parent), fontsize=10)
    return fig


def plot_training_curves(metrics_jsonl: str | Path, out_png: str | Path | None = None,
                         title: str | None = None):
    """:func:`training_curves` of one run (its ``metrics.jsonl`` or folder), saved to ``out_png``
    (300 dpi) and a PDF beside."""
    return _save(training_curves(metrics_jsonl, title), out_png)
