"""Run a trained model on your own images: extract features of a folder, search a gallery.

Which gallery images are left out of a query's ranking is the evaluation protocol
(:mod:`reidlib.eval.protocol`): when the query and every gallery image have a camera id, those of
the query's identity from its camera; otherwise only the query's own file.

Changed from the rule ``search`` had before (same identity and same camera, or the query's own
file), in two edge cases where the old rule disagreed with the evaluation:

* a gallery mixing images with and without a camera id: only the query's own file is left out now,
  so same-identity images from the query's camera are shown (before, they were left out);
* a query of unknown identity (pid -1, e.g. ``-1_c1s1_....jpg``) with cameras everywhere: gallery
  images with pid -1 from the query's camera are left out now, as in the evaluation, where -1 is an
  identity label like any other (before, only the query's own file was).

Example::

    cfg = load_config("vit_proposed", ["test.weights=runs/x/model"])
    extract_folder(cfg, "my_images/", "feats.npz")               # features, paths, pids, camids
    ranked = search(cfg, "person.jpg", "feats.npz", top=10, grid="grid.png")
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .data.datasets import list_image_folder, parse_identity_name
from .data.images import usable_workers
from .eval.distance import compute_distance
from .eval.extractor import FeatureExtractor
from .eval.protocol import excluded, exclusion_labels, ranked_gallery
from .storage import check_writable, disk_full_as_such

log = logging.getLogger("reidlib")


def _require_weights(cfg) -> None:
    """Fail before any work when the weights are missing."""
    if not cfg.test.weights:
        raise ValueError("no weights given: pass weights=PATH (a run's model folder, a checkpoint or a "
                         "reference state dict)")
    if not Path(cfg.test.weights).exists():
        raise FileNotFoundError(f"weights not found: {cfg.test.weights}; pass weights=PATH to a trained model "
                                "(a run's model folder)")


def _extractor_for(cfg) -> FeatureExtractor:
    # -1 in the config means "no default": images without the id are then an error
    default_camera = cfg.test.default_camera if cfg.test.default_camera >= 0 else None
    default_view = cfg.test.default_view if cfg.test.default_view >= 0 else None
    return FeatureExtractor(cfg.test.weights, device=cfg.device, precision=cfg.test.precision,
                            batch_size=cfg.test.batch_size, config=cfg, default_camera=default_camera,
                            default_view=default_view, num_workers=usable_workers(cfg.data.num_workers))


def extract_folder(cfg, images: str | Path, out: str | Path) -> Path:
    """Encode every image under ``images`` and write ``out`` (.npz: features [N, D] float32, paths,
    pids, camids). Unreadable images are skipped and counted."""
    _require_weights(cfg)
    out = Path(out)
    check_writable(out.parent, "out")   # before the images are encoded, not after
    items = list_image_folder(images)
    feats, pids, camids, kept = _extractor_for(cfg).extract_items(items, desc="extract")
    paths = np.array([p for (p, _, _), k in zip(items, kept.tolist()) if k])
    tmp = out.with_name(out.name + ".tmp.npz")
    try:
        with disk_full_as_such(out):
            np.savez(tmp, features=feats.numpy(), paths=paths, pids=pids.numpy(), camids=camids.numpy())
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    log.info("wrote %d features of dimension %d to %s", len(paths), feats.shape[1], out)
    return out


def _gallery(extractor: FeatureExtractor, gallery: str | Path):
    gallery = Path(gallery)
    if gallery.suffix == ".npz":
        if not gallery.is_file():
            raise FileNotFoundError(f"gallery features not found: {gallery}; "
                                    "make them with `python -m reidlib extract`")
        data = np.load(gallery)
        feats, paths, pids, camids = (torch.from_numpy(data["features"]), list(data["paths"]), data["pids"],
                                      data["camids"])
    else:
        items = list_image_folder(gallery)
        feats, pids, camids, kept = extractor.extract_items(items, desc="gallery")
        paths, pids, camids = [p for (p, _, _), k in zip(items, kept.tolist()) if k], pids.numpy(), camids.numpy()
    if len(paths) == 0:   # an empty grid would look like "no match" rather than "nothing to search"
        raise ValueError(f"gallery {gallery} holds no readable image (0 rows); nothing to search")
    return feats, paths, pids, camids


def _excluded(q_item, paths, g_pids, g_cams) -> torch.Tensor:
    """Which gallery images the protocol leaves out of the query's ranking (bool per image). Paths
    are compared resolved: the query may be named relative to another folder than the gallery."""
    query = [(str(Path(q_item[0]).resolve()), q_item[1], q_item[2])]
    gallery = [(str(Path(p).resolve()), int(pid), int(cam)) for p, pid, cam in zip(paths, g_pids, g_cams)]
    q_labels, g_labels, _ = exclusion_labels(query, gallery)
    return excluded([q_item[1]], q_labels, [pid for _, pid, _ in gallery], g_labels)[0]


def search(cfg, query: str | Path, gallery: str | Path, top: int = 10,
           grid: str | Path | None = "retrieval.png") -> list[tuple[str, float]]:
    """Rank the gallery (a folder or an ``extract`` .npz) for one query image; print the top
    ``top`` and save a retrieval grid (green/red borders when Market-style names give identities)."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top={top!r}: must be a positive number of results, e.g. top=10")
    _require_weights(cfg)
    query = Path(query)
    if not query.is_file():
        raise FileNotFoundError(f"query image not found: {query}")
    extractor = _extractor_for(cfg)
    q_pid, q_cam = parse_identity_name(query.name) or (-1, None)
    q_item = (str(query), q_pid, -1 if q_cam is None else q_cam - 1)
    qf, _, _, _ = extractor.extract_items([q_item], desc="query", progress=False)
    if len(qf) == 0:
        raise ValueError(f"cannot read the query image {query}")
    gf, paths, g_pids, g_cams = _gallery(extractor, gallery)
    dist = compute_distance(qf, gf, metric=cfg.test.metric, normalize=cfg.test.feat_norm)[0]
    order = ranked_gallery(dist, _excluded(q_item, paths, g_pids, g_cams), top)
    ranked = [(str(paths[i]), float(dist[i])) for i in order]
    for rank, (path, d) in enumerate(ranked, 1):
        print(f"{rank:3d}  {d:.4f}  {path}")
    if grid:
        from .viz.retrieval import retrieval_grid  # here: matplotlib takes a second to import
        correct = [int(g_pids[i]) == q_item[1] for i in order] if q_item[1] >= 0 else None
        retrieval_grid(str(query), [p for p, _ in ranked], correct, grid, title=f"query {query.name}",
                       top=top, captions=[f"{d:.3f}" for _, d in ranked], close=True)
        log.info("retrieval grid saved to %s", grid)
    return ranked
