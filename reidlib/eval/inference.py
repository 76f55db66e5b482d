"""Feature extraction for lists of (path, pid, camid) items, and the query/gallery evaluation of a
model; both go through :class:`~reidlib.eval.extractor.FeatureExtractor`.

Which gallery images a query may not be matched with is the protocol of
:mod:`reidlib.eval.protocol`, whose name is printed beside the metrics (``metrics["protocol"]``):

* data with camera ids: the Market-1501 protocol, gallery images of the query's identity from the
  query's own camera are left out of its ranking (:data:`MARKET_PROTOCOL`);
* data without camera ids (your own, VehicleID): same-camera matches cannot be told apart, so only
  the query's own image (the same file, when the gallery holds it) is left out. A query set that is
  the gallery itself thus gives "each image against all the others" (:data:`SAME_IMAGE_PROTOCOL`).

Example::

    feats, pids, camids = extract_features(model, dataset.query, cfg)
    metrics = evaluate_model(model, dataset, cfg)      # {'rank1': ..., 'mAP': ..., 'protocol': ...}
"""
from __future__ import annotations

import logging

import torch

from ..runtime import Runtime
from .extractor import FeatureExtractor
from .metrics import evaluate
from .protocol import (
    MARKET_PROTOCOL,
    SAME_IMAGE_PROTOCOL,
    SAME_IMAGE_REASON,
    check_valid_queries,
    dropped_reason,
    exclusion_labels,
)

log = logging.getLogger("reidlib")

# The protocol's names are re-exported: the trainer and older callers import them from here.
__all__ = ["extract_features", "evaluate_model", "check_valid_queries", "exclusion_labels", "MARKET_PROTOCOL",
           "SAME_IMAGE_PROTOCOL", "SAME_IMAGE_REASON"]


def extract_features(model, items, cfg, runtime: Runtime | None = None, progress: bool = True,
                     desc: str = "features", return_kept: bool = False, views=None):
    """Test features of ``items`` ((path, pid, camid) tuples) in their order, through
    :class:`~reidlib.eval.extractor.FeatureExtractor`.

    Returns ``(features [N, D] float32 on the CPU, pids [N], camids [N])``. Uses the test transform,
    ``cfg.test.precision`` (fp32 by default, as the reference infers; bf16 autocast when asked),
    ``cfg.test.flip`` (mean of the image's and its mirror's feature), and under torchrun each
    rank encodes a contiguous shard which is then gathered. Unreadable images are
    skipped and counted in a warning; with ``return_kept`` a fourth value, a bool mask over ``items``,
    says which were kept. ``views``: view ids of the items, for a model with view SIE.
    """
    extractor = FeatureExtractor.from_model(model, cfg, runtime)
    feats, pids, camids, keep = extractor.extract_items(items, desc, progress, views=views)
    return (feats, pids, camids, keep) if return_kept else (feats, pids, camids)


def evaluate_model(model, dataset, cfg, runtime: Runtime | None = None, progress: bool = True) -> dict:
    """Encode query and gallery and compute CMC/mAP/mINP (and re-ranked metrics when asked).

    The result also says which ``protocol`` was used. Queries the protocol drops are counted in
    ``num_dropped_queries`` and logged with the reason. A data set whose query and gallery are
    drawn (VehicleID: ``dataset.num_trials`` draws) is encoded once and scored per draw; the
    metrics are the means over the draws, and ``trial_rank1`` / ``trial_mAP`` list each draw's.
    """
    extractor = FeatureExtractor.from_model(model, cfg, runtime)
    if getattr(dataset, "test_pool", None) is not None:
        return _evaluate_trials(extractor, dataset, cfg, runtime, progress)
    q_views, g_views = dataset.view_ids(dataset.query), dataset.view_ids(dataset.gallery)
    qf, q_pids, _, q_kept = extractor.extract_items(dataset.query, "query", progress, views=q_views)
    gf, g_pids, _, g_kept = extractor.extract_items(dataset.gallery, "gallery", progress, views=g_views)
    if runtime is not None and not runtime.is_main:
        return {}
    q_labels, g_labels, protocol = exclusion_labels(dataset.query, dataset.gallery)
    q_labels, g_labels = torch.tensor(q_labels)[q_kept], torch.tensor(g_labels)[g_kept]
    metrics = _score(qf, gf, q_pids, g_pids, q_labels, g_labels, protocol, cfg, runtime)
    if metrics["num_dropped_queries"] and progress:
        log.info("%d of %d queries dropped from the metrics: %s", metrics["num_dropped_queries"],
                 len(qf), metrics["dropped_queries_reason"])
    return metrics


def _score(qf, gf, q_pids, g_pids, q_labels, g_labels, protocol: str, cfg, runtime) -> dict:
    """The metrics of one query/gallery pair of feature sets, re-ranked too when asked."""
    device = runtime.device if runtime is not None else None
    kwargs = dict(metric=cfg.test.metric, normalize=cfg.test.feat_norm, max_rank=cfg.test.max_rank,
                  device=device)
    metrics = evaluate(qf, gf, q_pids, g_pids, q_labels, g_labels, **kwargs)
    if cfg.test.rerank:
        options = dict(k1=cfg.test.k1, k2=cfg.test.k2, lambda_value=cfg.test.lambda_value)
        reranked = evaluate(qf, gf, q_pids, g_pids, q_labels, g_labels, rerank=options, **kwargs)
        metrics.update({f"rerank_{k}": v for k, v in reranked.items()
                        if k not in ("num_dropped_queries", "dropped_queries_reason")})  # the same
    metrics["protocol"] = protocol
    metrics["dropped_queries_reason"] = dropped_reason(protocol)
    return metrics


def _evaluate_trials(extractor, dataset, cfg, runtime, progress: bool) -> dict:
    """Every test image encoded once; each draw of query and gallery scored on its rows."""
    pool = dataset.test_pool
    feats, pids, _, kept = extractor.extract_items(pool, "test images", progress,
                                                   views=dataset.view_ids(pool))
    if runtime is not None and not runtime.is_main:
        return {}
    row = torch.full((len(pool),), -1, dtype=torch.long)     # pool index -> feature row (-1: unreadable)
    row[kept] = torch.arange(int(kept.sum()))
    runs = []
    for k in range(dataset.num_trials):
        q_idx, g_idx = (torch.tensor(i, dtype=torch.long) for i in dataset.trial_indices(k))
        q_idx, g_idx = q_idx[row[q_idx] >= 0], g_idx[row[g_idx] >= 0]
        query, gallery = [pool[i] for i in q_idx], [pool[i] for i in g_idx]
        q_labels, g_labels, protocol = exclusion_labels(query, gallery)  # each draw under the protocol
        runs.append(_score(feats[row[q_idx]], feats[row[g_idx]], pids[row[q_idx]], pids[row[g_idx]],
                           torch.tensor(q_labels), torch.tensor(g_labels), protocol, cfg, runtime))
    metrics = _mean_over_trials(runs)
    metrics["protocol"] = f"{dataset.protocol}; {runs[0]['protocol']}" if dataset.protocol else runs[0]["protocol"]
    if progress:
        log.info("%d draws of query and gallery: R1 %s", len(runs),
                 " ".join(f"{100 * r['rank1']:.1f}" for r in runs))
    return metrics


def _mean_over_trials(runs: list[dict]) -> dict:
    """Means of the numbers (element-wise for curves) over draws; each draw's R1 and mAP listed."""
    out = {}
    for key, first in runs[0].items():
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            out[key] = sum(r[key] for r in runs) / len(runs)
        elif isinstance(first, list):
            out[key] = [sum(values) / len(runs) for values in zip(*(r[key] for r in runs))]
        else:
            out[key] = first
    out["num_trials"] = len(runs)
    out["trial_rank1"] = [r["rank1"] for r in runs]
    out["trial_mAP"] = [r["mAP"] for r in runs]
    return out
