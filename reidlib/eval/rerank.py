"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), exact and memory-lean.

The published code (``re_ranking`` in torchreid and fast-reid) works on dense ``N x N`` matrices,
``N = Q + G``: the distance, its argsort, the encoding ``V`` and its query expansion, about 6 GB
and minutes on Market-1501. This version computes the same numbers from the features with:

- the ``N x N`` distances produced in row chunks and reduced at once to each row's maximum and its
  nearest neighbours (``topk``), never stored whole;
- ``V`` kept sparse: a row has non-zeros only on its expanded k-reciprocal set (tens of entries);
- the Jaccard distance computed for query rows against gallery columns only, by enumerating the
  (query, gallery) pairs that share a non-zero column (the published inverted index, vectorised).

Memory is dominated by the returned ``Q x G`` matrix. Algorithm, on ``d`` = plain Euclidean
distance of the features (the published function squares its input, so this is the published
function fed with plain Euclidean distances):

1. ``D = d^2 / rowmax(d^2)`` (the published ``D / max(D, axis=0)`` then transpose).
2. ``R(i, k)``: the k + 1 nearest of i by D, self included; the k-reciprocal set
   ``{f in R(i, k1) : i in R(f, k1)}``.
3. Expansion: add the round(k1/2)-reciprocal set of each member when more than 2/3 of it lies in the
   k1-reciprocal set.
4. ``V[i, e] = exp(-D[i, e])`` over the expanded set e, normalised to sum 1.
5. Local query expansion: ``V[i] = mean of V[j] for j in the k2 nearest of i``.
6. Jaccard distance ``1 - s / (2 - s)`` with ``s = sum_k min(V[q, k], V[g, k])``.
7. ``(1 - lambda) * jaccard + lambda * D``, the query-by-gallery block.

Ties in step 2 are broken by index (a stable sort); the published ``argsort`` leaves them to the
sort algorithm. With real-valued features they are rare (two float32 distances equal by chance).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from .distance import CHUNK_ELEMENTS, GalleryDistance, check_finite, cpu_threads, resolve_device, squared_norms

# The nearest-neighbour lists keep this many times (k1 + 1) entries: the distance of a row to most
# members of its expanded set is then read from the list instead of being recomputed.
_LOOKUP_FACTOR = 3
# (query entry, gallery entry) pairs enumerated per step of the Jaccard computation.
_PAIRS_PER_STEP = 1 << 22
# Sparse entries handled per step of the query expansion.
_SPARSE_STEP = 1 << 20


def rerank(
    qf: Any,
    gf: Any,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    chunk_size: int | None = None,
    device: Any = None,
    memory_budget_gb: float | None = None,
) -> Any:
    """Re-ranked query-by-gallery distances by k-reciprocal encoding (Zhong et al., CVPR 2017).

    Args:
        qf, gf: query ``(Q, D)`` and gallery ``(G, D)`` features, tensors or arrays. Pass them
            L2-normalised if that is how they are compared (``evaluate`` does).
        k1, k2, lambda_value: the method's parameters (paper and published defaults 20, 6, 0.3).
        chunk_size: rows of the ``N x N`` distance computed at a time (default: ~128 MiB worth).
        device: where to compute; default the features' device (the CPU for arrays), as for
            every distance in :mod:`reidlib.eval.distance`.
        memory_budget_gb: refuse to start (``MemoryError``) when the estimated peak exceeds this;
            default the memory currently available on the device.

    Returns:
        The ``(Q, G)`` float32 re-ranked distance (smaller = closer): a NumPy array if ``qf`` is
        one, otherwise a tensor on ``qf``'s device.

    Example:
        >>> qf, gf = torch.randn(5, 32), torch.randn(40, 32)
        >>> rerank(qf, gf, k1=6, k2=3).shape
        torch.Size([5, 40])
    """
    _check_parameters(k1, k2, lambda_value)
    q, g = _features(qf, "qf"), _features(gf, "gf")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"qf has dimension {q.shape[1]} but gf has dimension {g.shape[1]}")
    dev = resolve_device(device, qf, gf)
    with cpu_threads(dev):   # as many threads as there are free cores: see cpu_threads
        result = _rerank(q, g, k1, k2, lambda_value, chunk_size, dev, memory_budget_gb)
    if isinstance(qf, torch.Tensor):
        return result.to(qf.device)
    return result.cpu().numpy()


def _rerank(q, g, k1, k2, lambda_value, chunk_size, dev, memory_budget_gb) -> torch.Tensor:
    num_query, num_gallery = len(q), len(g)
    n = num_query + num_gallery
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // n)
    _check_memory(num_query, num_gallery, q.shape[1], chunk, k1, k2, dev, memory_budget_gb)

    # Checked apart, so that an error names the right matrix and row.
    check_finite(squared_norms(q), "qf", q)
    check_finite(squared_norms(g), "gf", g)
    distance = _RowDistance(torch.cat([q, g]).to(dev))
    result = torch.empty(num_query, num_gallery, dtype=torch.float32, device=dev)
    nearest = _nearest_neighbours(distance, k1, k2, chunk, result)
    members = _expanded_sets(nearest.index, k1, chunk)
    weights = _gaussian_weights(distance, nearest, members)
    encoding = _query_expansion(members, weights, nearest.index[:, :k2]) if k2 > 1 else (
        _sparse_rows(members, weights)
    )
    _mix_jaccard(result, encoding, num_query, lambda_value, chunk)
    return result


# --------------------------------------------------------------------------------------------
# Inputs, device and memory
# --------------------------------------------------------------------------------------------


def _check_parameters(k1: int, k2: int, lambda_value: float) -> None:
    if int(k1) != k1 or k1 < 1:
        raise ValueError(f"k1 must be a positive integer, got {k1}")
    if int(k2) != k2 or k2 < 1:
        raise ValueError(f"k2 must be a positive integer, got {k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")


def _features(x: Any, name: str) -> torch.Tensor:
    feats = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if feats.dim() != 2 or len(feats) == 0:
        raise ValueError(f"{name} must be a non-empty 2-D matrix (num_images x dim), got {tuple(feats.shape)}")
    return feats.float()  # the published code works in float32; NaN/inf are checked on the norms


def _available_bytes(device: torch.device) -> int | None:
    """Free memory on the device, or None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_memory(
    num_query: int, num_gallery: int, dim: int, k1: int = 20, k2: int = 6, chunk_size: int | None = None
) -> int:
    """Estimated peak bytes :func:`rerank` needs (an upper bound on the sparse parts).

    Example:
        >>> estimate_memory(3368, 15913, 1280) / 2**30 < 3
        True
    """
    n = num_query + num_gallery
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // n)
    half = _half(k1)
    set_width = (k1 + 1) * (half + 2)  # k-reciprocal set plus every accepted half set
    width = _LOOKUP_FACTOR * (k1 + 1) + 1
    parts = [
        num_query * num_gallery * 4,  # the result
        n * (dim + 2) * 4 * 2,  # features and their transposed, augmented copy
        chunk * n * 4 * 3,  # a distance block and the top-k work space
        min(chunk, num_query) * num_gallery * 4,  # Jaccard scratch block
        n * width * 12,  # neighbour lists: index and distance
        n * set_width * 12 * 2,  # expanded sets and their weights, with sort work space
        min(n * k2 * set_width, n * n) * 16,  # query-expanded encoding (worst case) and its work space
        _PAIRS_PER_STEP * 64,  # Jaccard pair enumeration work space
    ]
    return int(sum(parts))


def _check_memory(num_query, num_gallery, dim, chunk, k1, k2, device, budget_gb) -> None:
    need = estimate_memory(num_query, num_gallery, dim, k1, k2, chunk)
    budget = budget_gb * 2**30 if budget_gb is not None else _available_bytes(device)
    if budget is not None and need > budget:
        raise MemoryError(
            f"re-ranking {num_query} queries x {num_gallery} gallery images needs about "
            f"{need / 2**30:.2f} GiB but the budget is {budget / 2**30:.2f} GiB "
            f"({'memory_budget_gb' if budget_gb is not None else 'available memory'} on {device}); "
            f"raise memory_budget_gb, use a machine with more memory, or re-rank fewer queries at a time"
        )


def _half(k1: int) -> int:
    # np.around in the published code rounds halves to even, like Python's round().
    return int(round(k1 / 2))


# --------------------------------------------------------------------------------------------
# Step 1-2: row-normalised distances and nearest neighbours
# --------------------------------------------------------------------------------------------


class _RowDistance:
    """Squared Euclidean distances from any rows of ``x`` (query and gallery features stacked) to
    all N rows, by the shared distance kernel (no normalisation: the caller normalises)."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.kernel = GalleryDistance(x, "euclidean", normalize=False, names=("features", "features"))

    def to_all(self, rows, out: torch.Tensor | None = None) -> torch.Tensor:
        """``(rows, N)`` squared distances."""
        return self.kernel(self.x[rows], out=out)

    def pairs(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Squared distances of the pairs ``(i[t], j[t])``."""
        return self.kernel.pairs(self.x, i, j)


class _Neighbours:
    """Per row: nearest rows by normalised distance, in (distance, index) order, with distances,
    and the row maximum of the squared distance used for the normalisation."""

    def __init__(self, index: torch.Tensor, value: torch.Tensor, row_max: torch.Tensor):
        self.index, self.value, self.row_max = index, value, row_max


def _nearest_neighbours(
    distance: _RowDistance, k1: int, k2: int, chunk: int, result: torch.Tensor
) -> _Neighbours:
    """One pass over the N x N distances, a chunk of rows at a time: row maxima, nearest-neighbour
    lists, and the normalised query-by-gallery block written into ``result``."""
    n = len(distance.x)
    exact = min(max(k1 + 1, k2), n)  # list prefix whose order must be exact
    keep = min(max(exact, _LOOKUP_FACTOR * (k1 + 1)), n)
    probe = min(keep + 1, n)  # one more, to see whether ties cross the end of the exact prefix
    dev = distance.x.device
    index = torch.empty(n, keep, dtype=torch.long, device=dev)
    value = torch.empty(n, keep, dtype=torch.float32, device=dev)
    row_max = torch.empty(n, dtype=torch.float32, device=dev)
    buffer = torch.empty(min(chunk, n), n, dtype=torch.float32, device=dev)  # reused: no page faults
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        d = distance.to_all(rows, out=buffer[: rows.stop - start])
        row_max[rows] = d.amax(1)
        d.div_(row_max[rows, None])  # true division, as published: it fixes the rounding (and ties)
        _copy_query_gallery(result, d, start, 0)
        vals, idx = _smallest_in_order(d, probe, exact)
        index[rows], value[rows] = idx[:, :keep], vals[:, :keep]
    return _Neighbours(index, value, row_max)


def _smallest_in_order(d: torch.Tensor, probe: int, exact: int):
    """The ``probe`` smallest entries of each row, ordered by (value, column index); the first
    ``exact`` are guaranteed to be the stable-sort prefix of the row."""
    vals, idx = torch.topk(d, probe, dim=1, largest=False, sorted=False)
    vals, idx = _order_by_value_then_index(vals, idx)
    if probe < d.shape[1]:
        # If the value ending the exact prefix equals the last probed one, items with that value
        # and a smaller index may be missing: redo those rows (ties only, rare) with a full sort.
        redo = torch.nonzero(vals[:, exact - 1] == vals[:, probe - 1]).flatten()
        if len(redo):
            vals[redo], idx[redo] = (t[:, :probe] for t in torch.sort(d[redo], dim=1, stable=True))
    return vals, idx


def _copy_query_gallery(result: torch.Tensor, d: torch.Tensor, row0: int, col0: int) -> None:
    """Copy the query-row x gallery-column part of block ``d`` into ``result``."""
    num_query = len(result)
    row1, col1 = row0 + d.shape[0], col0 + d.shape[1]
    if row0 >= num_query or col1 <= num_query:
        return
    q1, g0 = min(row1, num_query), max(col0, num_query)
    result[row0:q1, g0 - num_query : col1 - num_query] = d[: q1 - row0, g0 - col0 :]


def _order_by_value_then_index(value: torch.Tensor, index: torch.Tensor):
    """Sort each row by value, ties by index (a stable order). NumPy's lexsort on the CPU: small
    rows sort ~4x faster there than with ``torch.sort``."""
    if value.device.type == "cpu":
        order = torch.from_numpy(np.lexsort((index.numpy(), value.numpy()), axis=1))
    else:
        index, first = torch.sort(index, dim=1)
        value = value.gather(1, first)
        order = torch.sort(value, dim=1, stable=True).indices
    return value.gather(1, order), index.gather(1, order)


# --------------------------------------------------------------------------------------------
# Step 2-3: k-reciprocal sets and their expansion
# --------------------------------------------------------------------------------------------


def _reciprocal(nearest: torch.Tensor, rows: slice) -> torch.Tensor:
    """``mask[i, a]``: row ``i`` is among the nearest of its neighbour ``nearest[i, a]``."""
    own = torch.arange(rows.start, rows.stop, device=nearest.device)
    return (nearest[nearest[rows]] == own[:, None, None]).any(2)


def _expanded_sets(index: torch.Tensor, k1: int, chunk: int) -> torch.Tensor:
    """Per row, the expanded k-reciprocal set: ascending indices, padded with ``N`` at the end.

    Set operations use a boolean ``rows x (N + 1)`` membership block per chunk (the extra column
    absorbs padding): overlap counts are gathers from it, and the union is read back with
    ``nonzero``, which yields each row's members sorted and without duplicates.
    """
    n = len(index)
    k = min(k1 + 1, n)
    near, half_near = index[:, :k], index[:, : min(_half(k1) + 1, n)]
    half_set = torch.cat([_reciprocal(half_near, slice(s, min(s + chunk, n))) for s in range(0, n, chunk)])
    half_size = half_set.sum(1)
    parts = []
    block = torch.zeros(min(chunk, n), n + 1, dtype=torch.bool, device=index.device)  # reused
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        count = rows.stop - start
        local = torch.arange(count, device=index.device)
        is_member = _reciprocal(near, rows)  # the k-reciprocal set of each row, over near[rows]
        member = block[:count]
        member[local[:, None], torch.where(is_member, near[rows], n)] = True
        member[:, n] = False
        # Candidates: the half-reciprocal set of every k-reciprocal neighbour c.
        cand = near[rows]
        cand_sets = torch.where(half_set[cand], half_near[cand], n)  # n: empty slot
        overlap = member[local[:, None, None], cand_sets].sum(2)
        # Published test: len(intersection) > 2/3 * len(candidate set), in float64.
        accept = is_member & (overlap.double() > (2.0 / 3.0) * half_size[cand].double())
        member[local[:, None, None], torch.where(accept[..., None], cand_sets, n)] = True
        member[:, n] = False
        parts.append(_padded_rows(member, n))
        member.zero_()
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=n) for p in parts])


def _padded_rows(mask: torch.Tensor, pad: int) -> torch.Tensor:
    """Column indices of each (contiguous) row's True entries, ascending, right-padded with ``pad``."""
    row, col = _true_positions(mask)
    count = torch.bincount(row, minlength=len(mask))
    width = int(count.amax()) if len(count) else 0
    slot = torch.arange(len(row), device=mask.device) - (torch.cumsum(count, 0) - count).index_select(0, row)
    out = torch.full((len(mask), width), pad, dtype=torch.long, device=mask.device)
    out.view(-1).index_copy_(0, row * width + slot, col)
    return out


# --------------------------------------------------------------------------------------------
# Step 4-5: Gaussian weights and local query expansion
# --------------------------------------------------------------------------------------------


def _gaussian_weights(distance: _RowDistance, nearest: _Neighbours, members: torch.Tensor) -> torch.Tensor:
    """``V[i, members[i]] = exp(-D[i, e]) / sum``, zero on padding.

    ``D[i, e]`` is read from row i's neighbour list when e is in it (the same value the ranking
    used), else recomputed from the features.
    """
    n = len(members)
    rows = torch.arange(n, device=members.device)[:, None]
    # Neighbour lists as one sorted key array: key = row * (N + 1) + column.
    listed, order = torch.sort(nearest.index, dim=1)
    listed_key = (listed + rows * (n + 1)).view(-1)
    listed_value = nearest.value.gather(1, order).view(-1)
    key = members + rows * (n + 1)  # padding (column N) never matches a listed key
    slot = torch.searchsorted(listed_key, key).clamp_(max=len(listed_key) - 1)
    found = listed_key[slot] == key
    d = listed_value[slot]
    real = members < n
    missing = torch.nonzero(real & ~found, as_tuple=True)
    if len(missing[0]):
        i = missing[0]
        d[missing] = distance.pairs(i, members[missing]) / nearest.row_max[i]
    w = torch.where(real, torch.exp(-d), torch.zeros_like(d))
    total = w.sum(1, keepdim=True)
    # A row with an empty set (only possible with many exact duplicates) stays all zero, as published.
    return torch.where(total > 0, w / total, torch.zeros_like(w))


class _Sparse:
    """A sparse N x N matrix as COO triplets sorted by row, then column."""

    def __init__(self, row: torch.Tensor, col: torch.Tensor, val: torch.Tensor):
        self.row, self.col, self.val = row, col, val


def _sparse_rows(members: torch.Tensor, weights: torch.Tensor) -> _Sparse:
    n = len(members)
    real = members < n
    row = torch.arange(n, device=members.device)[:, None].expand_as(members)
    return _Sparse(row[real], members[real], weights[real])


def _query_expansion(members: torch.Tensor, weights: torch.Tensor, near: torch.Tensor) -> _Sparse:
    """``V_qe[i] = mean(V[j] for j in near[i])`` with V given row-wise as (members, weights)."""
    n, k2 = len(members), near.shape[1]
    parts = []
    step = max(1, _SPARSE_STEP // max(1, k2 * members.shape[1]))
    for start in range(0, n, step):
        stop = min(start + step, n)
        cols, vals = members[near[start:stop]].view(-1), weights[near[start:stop]].view(-1)
        # key = row * (N + 1) + column, sorted: equal keys are the entries to add up. Padding
        # (column N) gives one extra key per row, dropped at the end.
        key = cols.view(stop - start, -1) + torch.arange(start, stop, device=cols.device)[:, None] * (n + 1)
        order = _argsort_runs(key.view(-1))
        key, vals = key.view(-1).index_select(0, order), vals.index_select(0, order)
        uniq, inverse = torch.unique_consecutive(key, return_inverse=True)
        total = torch.zeros(len(uniq), dtype=vals.dtype, device=vals.device).index_add_(0, inverse, vals)
        keep = _true_indices(uniq % (n + 1) < n)
        uniq = uniq.index_select(0, keep)
        parts.append((uniq // (n + 1), uniq % (n + 1), total.index_select(0, keep) / k2))
    return _Sparse(*(torch.cat(p) for p in zip(*parts)))


def _true_indices(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the True entries of a 1-D mask (NumPy's flatnonzero on the CPU: ~8x faster
    than ``torch.nonzero``)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return torch.nonzero(mask).flatten()


def _true_positions(mask: torch.Tensor):
    """(row, column) of the True entries of a contiguous 2-D mask, in row-major order."""
    flat = _true_indices(mask.view(-1))
    return flat // mask.shape[1], flat % mask.shape[1]


def _argsort_runs(key: torch.Tensor) -> torch.Tensor:
    """Stable argsort of a 1-D tensor made of a few ascending runs per row.

    On the CPU NumPy's stable sort (timsort for int64) exploits the runs and is ~2x faster than
    ``torch.sort``.
    """
    if key.device.type == "cpu":
        return torch.from_numpy(np.argsort(key.numpy(), kind="stable"))
    return torch.sort(key, stable=True).indices


# --------------------------------------------------------------------------------------------
# Step 6-7: Jaccard distance of query rows to gallery rows, and the final mix
# --------------------------------------------------------------------------------------------


def _mix_jaccard(result: torch.Tensor, v: _Sparse, num_query: int, lambda_value: float, chunk: int) -> None:
    """``result = (1 - lambda) * jaccard + lambda * result`` where ``result`` holds the normalised
    original distance on entry.

    ``s[q, g] = sum_k min(V[q, k], V[g, k])`` has contributions only from columns k where both rows
    are non-zero: the gallery entries are grouped by column, every query entry is paired with the
    gallery entries of its column, and the contributions are summed per (q, g) in a scratch block.
    Elsewhere ``s = 0`` and the Jaccard distance is exactly 1.
    """
    num_gallery = result.shape[1]
    n = num_query + num_gallery
    q_end = int(torch.searchsorted(v.row, torch.tensor([num_query], device=v.row.device)))  # rows are sorted
    q_row, q_col, q_val = v.row[:q_end], v.col[:q_end], v.val[:q_end]
    g_col, order = torch.sort(v.col[q_end:], stable=True)
    g_row, g_val = v.row[q_end:].index_select(0, order) - num_query, v.val[q_end:].index_select(0, order)
    col_count = torch.bincount(g_col, minlength=n)
    col_start = torch.cumsum(col_count, 0) - col_count
    pairs = col_count.index_select(0, q_col)  # gallery partners of each query entry
    # Entries of query q are q_first[q]:q_first[q + 1].
    q_first = torch.searchsorted(q_row, torch.arange(num_query + 1, device=q_row.device))
    pair_end = torch.cat([pairs.new_zeros(1), torch.cumsum(pairs, 0)]).index_select(0, q_first)
    pairs_per_query = pair_end[1:] - pair_end[:-1]

    max_rows = max(1, min(chunk, num_query, CHUNK_ELEMENTS // max(1, num_gallery)))
    scratch = torch.zeros(max_rows * num_gallery, dtype=torch.float32, device=result.device)
    for start, stop in _split_by_total(pairs_per_query, _PAIRS_PER_STEP, max_rows):
        a, b = int(q_first[start]), int(q_first[stop])
        count = pairs[a:b]
        entry = torch.repeat_interleave(torch.arange(a, b, device=count.device), count)
        within = torch.arange(len(entry), device=count.device) - torch.repeat_interleave(
            torch.cumsum(count, 0) - count, count
        )
        partner = col_start.index_select(0, q_col.index_select(0, entry)) + within
        contrib = torch.minimum(q_val.index_select(0, entry), g_val.index_select(0, partner))
        # Position in the row block; repeated keys are fine below (same value read and written).
        key = (q_row.index_select(0, entry) - start) * num_gallery + g_row.index_select(0, partner)
        overlap = scratch.index_add_(0, key, contrib).index_select(0, key)
        scratch.index_fill_(0, key, 0)
        block = result[start:stop].view(-1)
        original = block.index_select(0, key)
        block.mul_(lambda_value).add_(1 - lambda_value)  # the final value wherever s = 0
        jaccard = 1 - overlap / (2 - overlap)
        block.index_copy_(0, key, jaccard * (1 - lambda_value) + original * lambda_value)


def _split_by_total(counts: torch.Tensor, limit: int, max_len: int):
    """Consecutive ranges ``[a, b)`` covering ``counts``, each at most ``max_len`` long and with a
    sum within ``limit`` (a single entry above the limit gets a range of its own)."""
    ends = torch.cumsum(counts, 0).cpu().numpy()
    ranges, a, base = [], 0, 0
    while a < len(ends):
        b = int(np.searchsorted(ends, base + limit, side="right"))
        b = min(max(b, a + 1), a + max_len)
        ranges.append((a, b))
        base, a = int(ends[b - 1]), b
    return ranges


__all__ = ["rerank", "estimate_memory"]
