"""Ranked-retrieval grids: a query image and its top-k gallery matches, framed green when the
match has the query's identity and red when not.

Gallery images are left out before ranking as in the evaluation (:mod:`reidlib.eval.protocol`):
those of the query's identity taken by the query's camera (the Market-1501 protocol, Zheng et al.,
ICCV 2015: finding them is trivial), or, on data without camera ids, the query's own image only.

Standalone (e.g. from ``python -m reidlib search``)::

    retrieval_grid("q.jpg", ["g3.jpg", "g7.jpg", ...], None, "grid.png", title="top 10")

From a distance matrix, with the protocol's labels (camera ids, or per-file numbers without them)::

    q_labels, g_labels, _ = exclusion_labels(query_items, gallery_items)
    order, flags = rank_gallery(dist[i], q_pid, q_labels[i], g_pids, g_labels, top=10)
    retrieval_grid(query_path, [gallery_paths[j] for j in order], flags, "grid.png")
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Patch
from PIL import Image

from ..eval.protocol import excluded, exclusion_labels, ranked_gallery
from .figures import save_figure

CORRECT, WRONG, UNKNOWN, QUERY = "#1a9850", "#d73027", "#9e9e9e", "#2c7bb6"
CELL = (1.25, 2.5)  # inches per image (width, height): person crops are 2:1


def rank_gallery(dist_row, q_pid: int, q_label: int, g_pids, g_labels, top: int = 10):
    """Gallery indices of the ``top`` nearest matches of one query, with the images the protocol
    excludes left out, and whether each has the query's identity. ``q_label`` and ``g_labels`` are
    the protocol's exclusion labels (:func:`reidlib.eval.protocol.exclusion_labels`): the camera
    ids when every image has one; raw camids of -1 would exclude every same-identity image.

    >>> rank_gallery([0.0, 0.1, 0.2], 5, 0, [5, 5, 7], [0, 1, 2])   # labels of own files
    ([1, 2], [True, False])
    """
    g_pids = np.asarray(g_pids)
    order = ranked_gallery(dist_row, excluded([q_pid], [q_label], g_pids, g_labels)[0], top)
    return order, (g_pids[order] == q_pid).tolist()


def _model_rankings(model, cfg, queries, q_labels, gallery, g_labels, top: int):
    """``(gallery indices, correct flags)`` of each query's ``top`` matches under one model."""
    from ..eval.distance import compute_distance
    from ..eval.inference import extract_features
    qf, _, _, q_kept = extract_features(model, queries, cfg, progress=False, return_kept=True)
    gf, _, _, g_kept = extract_features(model, gallery, cfg, progress=False, return_kept=True)
    if not bool(q_kept.all()):
        unread = [path for (path, _, _), kept in zip(queries, q_kept.tolist()) if not kept]
        raise ValueError(f"cannot read the query image(s) {unread}")
    dist = compute_distance(qf, gf, metric=cfg.test.metric, normalize=cfg.test.feat_norm).cpu()
    # The columns of dist are the readable gallery images only: rank those, then map back.
    readable = torch.nonzero(g_kept).flatten().tolist()
    g_pids, g_labels = [gallery[j][1] for j in readable], [g_labels[j] for j in readable]
    rankings = []
    for i, (_, pid, _) in enumerate(queries):
        order, flags = rank_gallery(dist[i], pid, q_labels[i], g_pids, g_labels, top)
        rankings.append(([readable[j] for j in order], flags))
    return rankings


def _show(ax, path, color: str, label: str, caption: str | None = None, width: int = 6) -> None:
    image = Image.open(path).convert("RGB")
    ax.imshow(image, aspect="auto")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(width)
    ax.set_title(label, fontsize=9, color=color if color != UNKNOWN else "black")
    if caption:
        ax.set_xlabel(caption, fontsize=7)


def _show_text(ax, text: str, label: str = "query (text)") -> None:
    """A text query in an image's place: the words, wrapped to the cell, in a query frame."""
    ax.text(0.5, 0.5, textwrap.fill(text, width=18), ha="center", va="center", fontsize=7,
            transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(QUERY)
        spine.set_linewidth(6)
    ax.set_title(label, fontsize=9)


def retrieval_rows(rows: list[dict], out_png: str | Path | None = None, title: str | None = None):
    """Several queries, one per row. Each row is a dict with ``query`` (path) or ``query_text`` (a
    caption, for text-to-image search), ``gallery`` (ranked paths), and optionally ``correct``
    (booleans or None), ``label`` (text left of the row), ``query_caption`` and ``captions`` (text
    under each image)."""
    top = max(len(r["gallery"]) for r in rows)
    fig, axes = plt.subplots(len(rows), top + 1, figsize=(CELL[0] * (top + 1) + 0.4, CELL[1] * len(rows) + 1.1),
                             squeeze=False, gridspec_kw={"wspace": 0.12, "hspace": 0.35})
    any_flags = False
    for axrow, row in zip(axes, rows):
        flags = row.get("correct")
        any_flags |= flags is not None
        captions = row.get("captions") or [None] * len(row["gallery"])
        if row.get("query") is None:
            _show_text(axrow[0], row["query_text"])
        else:
            _show(axrow[0], row["query"], QUERY, "query", row.get("query_caption"))
        if row.get("label"):
            axrow[0].set_ylabel(row["label"], fontsize=9)
        for k, ax in enumerate(axrow[1:]):
            if k >= len(row["gallery"]):
                ax.axis("off")
                continue
            color = UNKNOWN if flags is None else (CORRECT if flags[k] else WRONG)
            mark = "" if flags is None else (" ✓" if flags[k] else " ✗")
            _show(ax, row["gallery"][k], color, f"rank {k + 1}{mark}", captions[k])
    handles = [Patch(facecolor="white", edgecolor=QUERY, linewidth=3, label="query")]
    if any_flags:
        handles += [Patch(facecolor="white", edgecolor=CORRECT, linewidth=3, label="same identity (correct)"),
                    Patch(facecolor="white", edgecolor=WRONG, linewidth=3, label="other identity (wrong)")]
    if any(r.get("correct") is None for r in rows):
        handles.append(Patch(facecolor="white", edgecolor=UNKNOWN, linewidth=3, label="match (identity unknown)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    height = fig.get_figheight()
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.1 / height, va="top")
    has_captions = any(r.get("captions") or r.get("query_caption") for r in rows)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=(0.65 if has_captions else 0.4) / height,
                        top=1 - (0.75 if title else 0.3) / height)
    save_figure(fig, out_png)      # 300 dpi PNG and its PDF
    return fig


def retrieval_grid(query_path, gallery_paths_ranked, correct=None, out_png: str | Path | None = None,
                   title: str | None = None, top: int = 10, captions=None, close: bool = False):
    """One query and its ranked gallery matches (at most ``top``) in one row. ``correct`` holds
    one boolean per match (green/red frame) or is None when identities are unknown (grey)."""
    gallery = list(gallery_paths_ranked)[:top]
    flags = None if correct is None else list(correct)[:top]
    fig = retrieval_rows([{"query": query_path, "gallery": gallery, "correct": flags,
                           "captions": None if captions is None else list(captions)[:top]}],
                         out_png, title)
    if close:
        plt.close(fig)
    return fig


def retrieval_figure(models: dict, dataset, query_indices, out_png: str | Path | None = None,
                     top: int = 10, title: str | None = None):
    """Each chosen query's top-``top`` matches in the whole gallery, one row per (query, model),
    so the models' rankings of a query sit next to each other. ``models``: name -> (model, cfg);
    ``dataset``: a loaded data set (``.query``, ``.gallery``)."""
    from .tables import method_label
    queries = [dataset.query[i] for i in query_indices]
    g_paths = [path for path, _, _ in dataset.gallery]
    # The protocol of the whole query set and gallery, as the evaluation decides it.
    q_labels, g_labels, _ = exclusion_labels(dataset.query, dataset.gallery)
    q_labels = [q_labels[i] for i in query_indices]
    ranked = {name: _model_rankings(model, cfg, queries, q_labels, dataset.gallery, g_labels, top)
              for name, (model, cfg) in models.items()}
    rows = []
    for i, (path, pid, cam) in enumerate(queries):
        for name in models:
            order, flags = ranked[name][i]
            rows.append({"query": path, "gallery": [g_paths[j] for j in order], "correct": flags,
                         "label": method_label(name).replace(" (", "\n("),
                         "query_caption": f"id {pid}, cam {cam}",
                         "captions": [f"id {dataset.gallery[j][1]}, cam {dataset.gallery[j][2]}" for j in order]})
    return retrieval_rows(rows, out_png, title or f"Top-{top} retrieval ({dataset.name})")
