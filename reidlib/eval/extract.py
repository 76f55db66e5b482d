"""Feature extraction for lists of (path, pid, camid) items, and the query/gallery evaluation of a
model; both go through :class:`~reidlib.eval.extractor.FeatureExtractor`.

Example::

    feats, pids, camids = extract_features(model, dataset.query, cfg)
    metrics = evaluate_model(model, dataset, cfg)      # {'rank1': ..., 'mAP': ..., ...}
"""
from __future__ import annotations

import logging

from ..runtime import Runtime
from .extractor import FeatureExtractor
from .metrics import DROPPED_REASON, evaluate, valid_queries

log = logging.getLogger("reidlib")


def extract_features(model, items, cfg, runtime: Runtime | None = None, progress: bool = True,
                     desc: str = "features", return_kept: bool = False):
    """Test features of ``items`` ((path, pid, camid) tuples) in their order, through
    :class:`~reidlib.eval.extractor.FeatureExtractor`.

    Returns ``(features [N, D] float32 on the CPU, pids [N], camids [N])``. Uses the test transform,
    ``cfg.test.precision`` (fp32 by default, as the reference infers; bf16 autocast when asked),
    ``cfg.test.flip`` (mean of the image's and its mirror's feature), and under torchrun each
    rank encodes a contiguous shard which is then gathered. Unreadable images are
    skipped and counted in a warning; with ``return_kept`` a fourth value, a bool mask over ``items``,
    says which were kept.
    """
    extractor = FeatureExtractor.from_model(model, cfg, runtime)
    feats, pids, camids, keep = extractor.extract_items(items, desc, progress)
    return (feats, pids, camids, keep) if return_kept else (feats, pids, camids)


def check_valid_queries(dataset) -> int:
    """The number of queries the protocol can score, from the labels alone; raises ValueError
    before any training or extraction when there is none (e.g. a single-camera data set).

    Example::

        check_valid_queries(load_dataset("market1501", "data"))     # 3368
    """
    q_pids, q_cams = [p for _, p, _ in dataset.query], [c for _, _, c in dataset.query]
    g_pids, g_cams = [p for _, p, _ in dataset.gallery], [c for _, _, c in dataset.gallery]
    valid = int(valid_queries(q_pids, q_cams, g_pids, g_cams).sum())
    if valid == 0:
        cams = sorted(set(q_cams + g_cams))
        raise ValueError(
            f"data set {dataset.name} at {dataset.root}: none of its {len(q_pids)} queries can be scored "
            f"({DROPPED_REASON}; cameras seen: {cams}); a query needs a gallery image of its identity "
            "taken by another camera: check the camera numbers in the file names or the csv files")
    return valid


def evaluate_model(model, dataset, cfg, runtime: Runtime | None = None, progress: bool = True) -> dict:
    """Encode query and gallery and compute CMC/mAP/mINP (and re-ranked metrics when asked).
    Queries the protocol drops are counted in ``num_dropped_queries`` and logged with the reason."""
    extractor = FeatureExtractor.from_model(model, cfg, runtime)
    qf, q_pids, q_cams, _ = extractor.extract_items(dataset.query, "query", progress)
    gf, g_pids, g_cams, _ = extractor.extract_items(dataset.gallery, "gallery", progress)
    if runtime is not None and not runtime.is_main:
        return {}
    device = runtime.device if runtime is not None else None
    kwargs = dict(metric=cfg.test.metric, normalize=cfg.test.feat_norm, max_rank=cfg.test.max_rank,
                  device=device)
    metrics = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, **kwargs)
    if metrics["num_dropped_queries"] and progress:
        log.info("%d of %d queries dropped from the metrics: %s", metrics["num_dropped_queries"],
                 len(qf), metrics["dropped_queries_reason"])
    if cfg.test.rerank:
        options = dict(k1=cfg.test.k1, k2=cfg.test.k2, lambda_value=cfg.test.lambda_value)
        reranked = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, rerank=options, **kwargs)
        metrics.update({f"rerank_{k}": v for k, v in reranked.items()
                        if k not in ("num_dropped_queries", "dropped_queries_reason")})  # the same
    return metrics
