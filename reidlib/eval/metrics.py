"""Re-identification metrics: CMC, mAP and mINP under the Market-1501 / DukeMTMC / MSMT17 protocol.

Protocol (the one of torchreid and fast-reid, with mINP from Ye et al., "Deep Learning for Person
Re-identification: A Survey and Outlook", TPAMI 2021; which items are excluded is stated in
:mod:`reidlib.eval.protocol`):

- each query ranks the gallery by distance (smaller = closer);
- gallery items with the query's identity AND camera are junk and dropped for that query only
  (pass per-file labels as camids for the camera-less rule, see
  :func:`~reidlib.eval.protocol.exclusion_labels`);
- a query with no remaining same-identity item is skipped (it counts nowhere);
- with ``hits`` the 0-based positions of the remaining matches in the ranking:
  ``CMC@k = 1 if hits[0] < k``, ``AP = mean_j (j + 1) / (hits[j] + 1)``,
  ``INP = len(hits) / (hits[-1] + 1)``; all averaged over the valid queries.

Ranking is a stable sort by distance, then by gallery index, so equal distances never make the
result depend on the sort algorithm.

How it is computed, in steps (:func:`evaluate`): distances from the shared kernel
(:mod:`reidlib.eval.distance`, or a given / re-ranked matrix), the exclusion by the protocol, each
query's AP/CMC/INP, and the summary over the scorable queries. The metrics need only the position
of each true match among the valid gallery items, not the full ranking. Per chunk of queries the
distance rows are sorted by value (a vectorised SIMD sort in NumPy on the CPU, ``torch.sort``
elsewhere), and each match's position is read off with ``searchsorted``: the number of gallery
items strictly closer, plus equal-distance items with a smaller index (counted only where ties
exist), minus the junk items ranked before it.
Memory stays at a few ``chunk_size x num_gallery`` blocks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .distance import (
    CHUNK_ELEMENTS,
    GalleryDistance,
    as_features,
    as_tensor,
    check_finite,
    check_metric,
    cpu_threads,
    resolve_device,
    squared_norms,
)
from .protocol import MARKET_DROPPED_REASON, GalleryIdentities, scorable_queries
from .rerank import rerank as k_reciprocal_rerank

# Why a query counts nowhere (the protocol above), as stored next to the count in the results.
DROPPED_REASON = MARKET_DROPPED_REASON
NO_VALID_QUERY = (
    "no query has a match in the gallery from another camera (same identity, different camera); "
    "check that q_pids/g_pids and q_camids/g_camids are right"
)

NON_FINITE_DISTMAT = "distmat contains NaN or infinite values"
# The former name of :func:`reidlib.eval.protocol.scorable_queries` (labels: camera ids).
valid_queries = scorable_queries


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


def _as_labels(x: Any, name: str, length: int, length_of: str) -> torch.Tensor:
    """Identity or camera labels as a 1-D int64 tensor whose length matches ``length_of``."""
    if x is None:
        raise ValueError(f"{name} is required")
    labels = as_tensor(x, name)
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got dtype {labels.dtype}")
    if len(labels) != length:
        raise ValueError(f"{name} has {len(labels)} entries but {length_of} has {length} rows")
    return labels.long()


def _default_chunk(num_gallery: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, num_gallery))


# --------------------------------------------------------------------------------------------
# Ranking of the true matches
# --------------------------------------------------------------------------------------------


def _sort_rows(dist: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Each row sorted ascending (values only; NaN last), into ``out`` when given.

    On the CPU NumPy's SIMD quicksort is several times faster than ``torch.sort``.
    """
    if dist.device.type != "cpu":
        return torch.sort(dist, dim=1).values
    if out is None:
        return torch.from_numpy(np.sort(dist.numpy(), axis=1))
    out.copy_(dist)
    out.numpy().sort(axis=1)
    return out


def _count_tied_before(dist, values, index, where, max_elements=CHUNK_ELEMENTS):
    """For the entries flagged in ``where``: how many gallery items in the same row have exactly
    the entry's distance and a smaller gallery index (they rank first under the stable order)."""
    counts = torch.zeros_like(index)
    rows, cols = torch.nonzero(where, as_tuple=True)
    step = max(1, max_elements // max(1, dist.shape[1]))
    arange = torch.arange(dist.shape[1], device=dist.device)
    for s in range(0, len(rows), step):
        r, c = rows[s : s + step], cols[s : s + step]
        tied = dist[r] == values[r, c][:, None]
        before = arange[None, :] < index[r, c][:, None]
        counts[r, c] = (tied & before).sum(1)
    return counts


def _match_positions(dist, sorted_dist, index, real, junk):
    """0-based positions of each query's true matches in its ranking with junk removed.

    Returns ``(positions, is_match)``, both ``(rows, width)``; along a row the matches appear in
    ranking order, so ``positions`` restricted to ``is_match`` is increasing.
    """
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    values = torch.where(real, dist.gather(1, index), inf)
    # Stable sort: ``index`` is ascending along a row, so equal distances stay in index order.
    values, order = torch.sort(values, dim=1, stable=True)
    index, real, junk = index.gather(1, order), real.gather(1, order), junk.gather(1, order)
    is_match = real & ~junk

    closer = torch.searchsorted(sorted_dist, values)
    equal = torch.searchsorted(sorted_dist, values, right=True) - closer
    # Every entry equals itself; only rows with other items at exactly the same distance need the
    # (slow, but rare for real-valued features) count of equal items with a smaller index.
    tied_before = _count_tied_before(dist, values, index, is_match & (equal > 1))
    junk_before = torch.cumsum(junk, 1) - junk.long()
    return closer + tied_before - junk_before, is_match


class _MetricTotals:
    """Running sums over valid queries, chunk by chunk."""

    def __init__(self):
        self.ap, self.inp, self.first_hits = 0.0, 0.0, []

    def add(self, positions: torch.Tensor, is_match: torch.Tensor) -> None:
        num_matches = is_match.sum(1)
        valid = num_matches > 0
        positions, is_match, num_matches = positions[valid], is_match[valid], num_matches[valid]
        if len(positions) == 0:
            return
        pos = positions.double()
        ordinal = torch.cumsum(is_match, 1).double()  # j + 1 at the j-th match
        precision = torch.where(is_match, ordinal / (pos + 1), torch.zeros_like(pos))
        self.ap += float((precision.sum(1) / num_matches).sum())
        last = torch.where(is_match, positions, torch.full_like(positions, -1)).amax(1)
        self.inp += float((num_matches.double() / (last.double() + 1)).sum())
        big = torch.full_like(positions, torch.iinfo(positions.dtype).max)
        self.first_hits.append(torch.where(is_match, positions, big).amin(1).cpu())

    def result(self, max_rank: int, num_query: int) -> dict:
        first = torch.cat(self.first_hits) if self.first_hits else torch.zeros(0, dtype=torch.long)
        n = len(first)
        if n == 0:
            raise ValueError(NO_VALID_QUERY)
        hist = torch.bincount(first.clamp(max=max_rank), minlength=max_rank + 1)
        cmc = (torch.cumsum(hist, 0)[:max_rank].double() / n).tolist()

        def rank(k: int) -> float:
            return float((first < k).sum()) / n

        return {
            "cmc": cmc,
            "rank1": rank(1),
            "rank5": rank(5),
            "rank10": rank(10),
            "mAP": self.ap / n,
            "mINP": self.inp / n,
            "num_valid_queries": n,
            "num_dropped_queries": num_query - n,
            "dropped_queries_reason": DROPPED_REASON,
        }


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def evaluate(
    qf: Any = None,
    gf: Any = None,
    q_pids: Any = None,
    g_pids: Any = None,
    q_camids: Any = None,
    g_camids: Any = None,
    *,
    distmat: Any = None,
    metric: str = "euclidean",
    normalize: bool = True,
    max_rank: int = 50,
    chunk_size: int | None = None,
    device: Any = None,
    rerank: bool | dict = False,
) -> dict:
    """CMC, mAP and mINP of a query set against a gallery (Market-1501 protocol).

    Give either features (``qf``, ``gf``) or a distance matrix (``distmat``, smaller = closer).

    Args:
        qf, gf: query ``(Q, D)`` and gallery ``(G, D)`` features, tensors or arrays.
        q_pids, g_pids, q_camids, g_camids: identity and camera labels (integers). Identity 0
            (Market distractors) is an ordinary negative. For data without camera ids pass the
            per-file labels of :func:`reidlib.eval.protocol.exclusion_labels` as camids, so that
            only each query's own image is excluded.
        distmat: a ``(Q, G)`` distance matrix, instead of features.
        metric: ``"euclidean"`` (squared) or ``"cosine"``; used with features only.
        normalize: L2-normalise features before the distance (default, as in CLIP-ReID).
        max_rank: length of the returned CMC curve. ``cmc[k-1]`` is the fraction of valid queries
            whose first true match ranks within the top k, for every k, also beyond the gallery
            size (where it is 1).
        chunk_size: queries per chunk; memory is a few ``chunk_size x G`` blocks. Default: enough
            rows for about 128 MiB per block. Results do not depend on it.
        device: where to compute; default the device of the input tensors (CPU for arrays).
        rerank: ``True`` or a dict of keyword arguments for :func:`reidlib.eval.rerank` (k1, k2,
            lambda_value, ...) to score k-reciprocal re-ranked distances; needs features.

    Returns:
        ``{"cmc": list of max_rank floats, "rank1", "rank5", "rank10", "mAP", "mINP": floats in
        [0, 1], "num_valid_queries": int, "num_dropped_queries": int (queries counted nowhere),
        "dropped_queries_reason": str (why: DROPPED_REASON)}``.

    Ties: the ranking is a stable sort by distance, then gallery index.

    Steps: the inputs checked, distances (the shared kernel, or the given / re-ranked matrix), the
    protocol's exclusion and each query's AP/CMC/INP chunk by chunk, the summary.

    Raises:
        ValueError: missing or mismatched inputs, NaN/inf values, or no query with a match.

    Example:
        >>> qf, gf = torch.randn(4, 16), torch.randn(10, 16)
        >>> r = evaluate(qf, gf, [1, 2, 3, 4], [1, 2, 3, 4, 0, 0, 1, 2, 3, 4],
        ...              [0, 0, 0, 0], [1] * 10)
        >>> r["num_valid_queries"], len(r["cmc"])
        (4, 50)
    """
    _check_arguments(qf, gf, distmat, metric, max_rank, rerank)
    dev = resolve_device(device, qf, gf, distmat)
    if distmat is None:
        qf, gf = _checked_features(qf, gf)
        shape, names = (len(qf), len(gf)), ("qf", "gf")
    else:
        distmat = _checked_matrix(distmat)
        shape, names = tuple(distmat.shape), ("distmat", "distmat columns")
    labels = _checked_labels(q_pids, g_pids, q_camids, g_camids, shape, names, dev)
    with cpu_threads(dev):   # as many threads as there are free cores: see cpu_threads
        return _evaluate(qf, gf, distmat, labels, shape, metric, normalize, max_rank, chunk_size, dev, rerank)


def _evaluate(qf, gf, distmat, labels, shape, metric, normalize, max_rank, chunk_size, dev, rerank) -> dict:
    if rerank:
        distances = _MatrixDistances(_reranked(qf, gf, normalize, rerank, dev), dev, chunk_size)
    elif distmat is None:
        distances = _FeatureDistances(qf, gf, metric, normalize, dev, chunk_size)
    else:
        distances = _MatrixDistances(distmat, dev, chunk_size)
    return _score_queries(distances, labels).result(max_rank, shape[0])


# --------------------------------------------------------------------------------------------
# The steps of evaluate(): checked inputs, distances, exclusion, per-query scores
# --------------------------------------------------------------------------------------------


def _check_arguments(qf, gf, distmat, metric: str, max_rank: int, rerank) -> None:
    """Which inputs were given and the settings: errors before any work."""
    check_metric(metric)
    if max_rank < 1:
        raise ValueError(f"max_rank must be at least 1, got {max_rank}")
    has_features = qf is not None or gf is not None
    if has_features and distmat is not None:
        raise ValueError("pass either features (qf, gf) or distmat, not both")
    if has_features and (qf is None or gf is None):
        raise ValueError("both qf and gf are required")
    if not has_features and distmat is None:
        raise ValueError("pass features (qf, gf) or distmat")
    if rerank and not has_features:
        raise ValueError("rerank needs features (qf, gf), not a distance matrix")


def _checked_features(qf: Any, gf: Any) -> tuple[torch.Tensor, torch.Tensor]:
    qf, gf = as_features(qf, "qf"), as_features(gf, "gf")
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(f"qf has dimension {qf.shape[1]} but gf has dimension {gf.shape[1]}")
    # Before any normalisation, which would turn a row too large for float32 into zeros.
    check_finite(squared_norms(qf), "qf", qf)
    check_finite(squared_norms(gf), "gf", gf)
    return qf, gf


def _checked_matrix(distmat: Any) -> torch.Tensor:
    """A 2-D floating-point matrix; its values are checked as its rows are read."""
    distmat = as_tensor(distmat, "distmat")
    if distmat.dim() != 2:
        raise ValueError(f"distmat must be 2-D (Q x G), got shape {tuple(distmat.shape)}")
    return distmat if distmat.is_floating_point() else distmat.double()


class _Labels(NamedTuple):
    """Identities and exclusion labels (camera ids, or per-file numbers: see the protocol)."""

    q_pids: torch.Tensor
    q_labels: torch.Tensor
    g_pids: torch.Tensor
    g_labels: torch.Tensor


def _checked_labels(q_pids, g_pids, q_camids, g_camids, shape, names, device) -> _Labels:
    num_query, num_gallery = shape
    labels = _Labels(
        _as_labels(q_pids, "q_pids", num_query, names[0]).to(device),
        _as_labels(q_camids, "q_camids", num_query, names[0]).to(device),
        _as_labels(g_pids, "g_pids", num_gallery, names[1]).to(device),
        _as_labels(g_camids, "g_camids", num_gallery, names[1]).to(device),
    )
    if num_gallery == 0:
        raise ValueError("the gallery is empty")
    return labels


def _reranked(qf: torch.Tensor, gf: torch.Tensor, normalize: bool, options, device) -> torch.Tensor:
    """k-reciprocal re-ranked distances (Zhong et al., CVPR 2017) of the features, L2-normalised
    first when the plain distances normalise them."""
    if normalize:
        qf, gf = F.normalize(qf, dim=1), F.normalize(gf, dim=1)
    options = {"device": device, **(options if isinstance(options, dict) else {})}
    return k_reciprocal_rerank(qf.to(device), gf.to(device), **options)


class _QueryDistances:
    """Step 1: distances of a chunk of queries to the whole gallery, and each row sorted, into
    reused buffers (fresh blocks per chunk would page-fault every time)."""

    def __init__(self, num_query: int, num_gallery: int, dtype: torch.dtype, device: torch.device,
                 chunk_size: int | None):
        self.num_query, self.num_gallery, self.device = num_query, num_gallery, device
        self.chunk = min(chunk_size or _default_chunk(num_gallery), max(1, num_query))
        self._sorted = (torch.empty(self.chunk, num_gallery, dtype=dtype, device=device)
                        if device.type == "cpu" else None)

    def chunks(self):
        """Consecutive row slices covering the queries."""
        return (slice(start, start + self.chunk) for start in range(0, self.num_query, self.chunk))

    def rows(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """``(distances, each row sorted ascending)`` of the queries in ``rows``."""
        dist = self._distances(rows)
        sorted_dist = _sort_rows(dist, out=None if self._sorted is None else self._sorted[: len(dist)])
        self._check_sorted(sorted_dist)
        return dist, sorted_dist

    def skip(self, rows: slice) -> None:
        """The queries in ``rows`` are not ranked (none is scorable); bad input is still refused."""

    def _distances(self, rows: slice) -> torch.Tensor:
        raise NotImplementedError

    def _check_sorted(self, sorted_dist: torch.Tensor) -> None:
        pass


class _FeatureDistances(_QueryDistances):
    """Distances computed from the features by the shared kernel."""

    def __init__(self, qf, gf, metric: str, normalize: bool, device, chunk_size):
        dtype = torch.promote_types(qf.dtype, gf.dtype)
        super().__init__(len(qf), len(gf), dtype, device, chunk_size)
        self.qf = qf
        self.kernel = GalleryDistance(gf.to(device, dtype), metric, normalize)
        self._out = torch.empty(self.chunk, len(gf), dtype=dtype, device=device)

    def _distances(self, rows: slice) -> torch.Tensor:
        queries = self.qf[rows]
        return self.kernel(queries, out=self._out[: len(queries)])


class _MatrixDistances(_QueryDistances):
    """Distances read from a matrix (given, or re-ranked), whose values are checked as read."""

    def __init__(self, distmat: torch.Tensor, device, chunk_size):
        super().__init__(distmat.shape[0], distmat.shape[1], distmat.dtype, device, chunk_size)
        self.distmat = distmat

    def _distances(self, rows: slice) -> torch.Tensor:
        return self.distmat[rows].to(self.device)

    def skip(self, rows: slice) -> None:
        if not bool(torch.isfinite(self.distmat[rows]).all()):
            raise ValueError(NON_FINITE_DISTMAT)

    def _check_sorted(self, sorted_dist: torch.Tensor) -> None:
        # Sorted rows hold each row's minimum first and its maximum (or NaN) last.
        if not bool(torch.isfinite(sorted_dist[:, [0, -1]]).all()):
            raise ValueError(NON_FINITE_DISTMAT)


def _score_queries(distances: _QueryDistances, labels: _Labels) -> _MetricTotals:
    """Steps 2-3, chunk by chunk: the protocol's exclusion, then where each query's true matches
    rank, summed into AP, INP and first hits (CMC)."""
    identities = GalleryIdentities(labels.g_pids, labels.g_labels)
    totals = _MetricTotals()
    for rows in distances.chunks():
        index, real, excluded = identities.same_identity(labels.q_pids[rows], labels.q_labels[rows])
        if not bool((real & ~excluded).any()):
            distances.skip(rows)  # nothing to rank in this chunk
            continue
        dist, sorted_dist = distances.rows(rows)
        totals.add(*_match_positions(dist, sorted_dist, index, real, excluded))
    return totals
