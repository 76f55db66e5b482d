"""Query-by-gallery distances, and the input checks that metrics and re-ranking share.

One distance kernel, :class:`GalleryDistance`, serves evaluation and k-reciprocal re-ranking:
squared Euclidean or cosine distance, computed chunk by chunk so that Market-size (3,368 x 15,913)
and MSMT17-size problems stay within a few hundred MiB. Where it runs: the device asked for, else
the device of the input tensors (the CPU for arrays), never a device the inputs are not on.

Example:
    >>> d = compute_distance(torch.randn(3, 8), torch.randn(5, 8))
    >>> d.shape
    torch.Size([3, 5])
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

METRICS = ("euclidean", "cosine")

# Query rows per chunk are chosen so that one distance block holds about this many elements
# (128 MiB in float32); two such blocks (distances and their sorted copy) are alive at a time.
CHUNK_ELEMENTS = 1 << 25


# --------------------------------------------------------------------------------------------
# Threads under load
# --------------------------------------------------------------------------------------------

# A GEMM of at least this many rows per thread is split over rows and columns only, so its result
# does not depend on the thread count (MKL splits the inner dimension, changing the rounding, below
# ~32 rows a thread; measured on this repository's torch with 1 to 16 threads).
ROWS_PER_THREAD = 64
_threads_before: list[int] = []   # the caller's thread count, while cpu_threads() lowers it


def free_cores() -> int:
    """Cores this process may run on minus the threads of other processes running right now (from
    ``/proc/loadavg``'s instantaneous count, less this process's own running threads); at least 1.
    Where /proc is missing, every core of the affinity mask."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        cores = os.cpu_count() or 1
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        own = sum(1 for task in Path("/proc/self/task").iterdir() if _running(task))
    except (OSError, ValueError, IndexError):
        return cores
    others = max(0, running - own)
    total = os.cpu_count() or cores
    if total > cores:   # a slice of a bigger machine: the others spread over all its cores
        others = -(-others * cores // total)
    return max(1, cores - others)


def _running(task: Path) -> bool:
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
    except (OSError, IndexError):
        return False


@contextlib.contextmanager
def cpu_threads(device: torch.device | None = None):
    """Run the block with no more torch threads than :func:`free_cores`, the caller's count restored
    afterwards. On a busy CPU, OpenMP threads of one parallel region wait for the one sharing a core
    with another process: re-ranking on 2 cores with one busy took 3.4 s with 2 threads, 1.7 s with 1.
    Results do not change: GEMMs too small to be split over rows alone keep the caller's count
    (:func:`gemm_threads`), and the other operations do not depend on it."""
    before = torch.get_num_threads()
    wanted = before if device is not None and device.type != "cpu" else min(before, free_cores())
    if wanted >= before:
        yield
        return
    torch.set_num_threads(wanted)
    _threads_before.append(before)
    try:
        yield
    finally:
        _threads_before.pop()
        torch.set_num_threads(before)


@contextlib.contextmanager
def gemm_threads(rows: int):
    """Inside :func:`cpu_threads`: the caller's own thread count for a GEMM of ``rows`` rows too few
    to be split over rows and columns alone, so that its rounding is exactly what it was."""
    if not _threads_before or rows >= ROWS_PER_THREAD * _threads_before[0]:
        yield
        return
    lowered = torch.get_num_threads()
    torch.set_num_threads(_threads_before[0])   # the outermost caller's: nested calls lower it again
    try:
        yield
    finally:
        torch.set_num_threads(lowered)


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """A detached tensor view of ``x`` (NumPy arrays and lists are wrapped without copying)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a tensor or array, got {type(x).__name__}") from err


def as_features(x: Any, name: str) -> torch.Tensor:
    """A 2-D floating-point feature matrix; half precision is widened to float32.

    NaN/inf are caught later from the squared norms (one value per row, no extra full pass).
    """
    feats = as_tensor(x, name)
    if feats.dim() != 2:
        raise ValueError(f"{name} must be 2-D (num_images x dim), got shape {tuple(feats.shape)}")
    if feats.dtype != torch.float64:
        feats = feats.float()
    return feats


def check_finite(squared_norms: torch.Tensor, name: str, features: torch.Tensor | None = None) -> None:
    """Raise ValueError when a row's squared norm (or norm) is not finite, saying why.

    That happens when the row holds NaN or inf, or when its values are finite but so large that
    their squares overflow the dtype (about 1.8e19 in float32): distances would then be inf or NaN.
    Given the ``features`` the norms came from, the message tells the two apart.

    >>> x = torch.tensor([[1.0, 2.0], [1e20, 0.0]])
    >>> check_finite(squared_norms(x), "qf", x)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: qf row 1 holds values up to 1e+20, too large for float32 distances (its squared norm ...
    """
    bad = ~torch.isfinite(squared_norms)
    if not bool(bad.any()):
        return
    row = int(bad.nonzero()[0, 0])
    if features is not None and bool(torch.isfinite(features[row]).all()):
        dtype = features.dtype
        largest = float(features[row].abs().max())
        raise ValueError(f"{name} row {row} holds values up to {largest:.3g}, too large for "
                         f"{str(dtype).replace('torch.', '')} distances (its squared norm overflows "
                         f"{str(dtype).replace('torch.', '')}'s largest value, {torch.finfo(dtype).max:.2g}); "
                         "scale the features down or pass them as float64")
    raise ValueError(f"{name} contains NaN or infinite values (row {row})")


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def resolve_device(device: Any, *arrays: Any) -> torch.device:
    """The requested device, else the device of the first tensor given, else the CPU."""
    if device is not None:
        return torch.device(device)
    for a in arrays:
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------


def squared_norms(x: torch.Tensor, dim: int = 1, step: int = 8192) -> torch.Tensor:
    """``sum(x**2)`` over ``dim`` of a 2-D tensor, in slices of ``step`` along the other dimension
    so no full-size temporary is made.

    (``vector_norm(x) ** 2`` would round through a square root: exact integer inputs would no
    longer give exact distances.)
    """
    other, length = 1 - dim, x.shape[1 - dim]
    parts = [x.narrow(other, s, min(step, length - s)).square().sum(dim) for s in range(0, length, step)]
    return torch.cat(parts) if parts else x.new_zeros(0)


class GalleryDistance:
    """The distance kernel: distances from batches of query rows to a fixed gallery, one GEMM per
    batch. Evaluation (:func:`compute_distance`, :func:`reidlib.eval.evaluate`) and re-ranking
    (:func:`reidlib.eval.rerank`, with the gallery being all query and gallery rows) both use it.

    Squared Euclidean is ``|q|^2 + |g|^2 - 2 q.g``, clamped at 0 (rounding can make it slightly
    negative); cosine distance is ``1 - q.g`` on L2-normalised features. The norm and constant
    terms ride along as extra feature columns, ``[q, |q|^2, 1] . [-2g, 1, |g|^2]``, so the whole
    distance comes out of a single matrix product with no extra passes over the ``Q x G`` block.

    It computes on the gallery's device (pass the gallery where the work should happen); query
    batches are moved there.
    """

    def __init__(self, gf: torch.Tensor, metric: str, normalize: bool, names=("qf", "gf")):
        self.euclidean = metric == "euclidean"
        self.normalize = normalize or not self.euclidean  # cosine is defined on unit vectors
        self.names = names
        self.dim = dim = gf.shape[1]
        # Stored transposed and contiguous: the GEMM runs ~25% faster than on a transposed view.
        self.gallery_t = torch.empty(dim + 1 + self.euclidean, len(gf), dtype=gf.dtype, device=gf.device)
        body = self.gallery_t[:dim]
        body.copy_(gf.t())
        norms = None
        if self.normalize:
            norms = torch.linalg.vector_norm(gf, dim=1)
            check_finite(norms, names[1], gf)  # an overflowing norm would zero the row silently
            norms.clamp_(min=1e-12)  # as F.normalize
            body.div_(norms)
        # Summed down the stored columns, as evaluation always has (changing the order moves mAP by
        # float-rounding tie swaps; the table's digits must not move).
        sq = squared_norms(body, dim=0)
        check_finite(sq, names[1], gf)
        body.mul_(-2 if self.euclidean else -1)
        self.gallery_t[dim] = 1
        if self.euclidean:
            self.gallery_t[dim + 1] = sq
        # The gallery rows as given, for pair look-ups (``pairs``) without a strided gather; when
        # normalised they are read back from ``gallery_t`` instead of keeping a second copy.
        self._rows = None if self.normalize else gf

    def _prepared(self, qf: torch.Tensor) -> torch.Tensor:
        """Query rows on the kernel's device and dtype, L2-normalised when the kernel normalises."""
        q = qf.to(self.gallery_t.device, self.gallery_t.dtype)
        if self.normalize:
            check_finite(torch.linalg.vector_norm(q, dim=1), self.names[0], q)
            q = F.normalize(q, dim=1)
        return q

    def _augment(self, qf: torch.Tensor) -> torch.Tensor:
        q = self._prepared(qf)
        sq = squared_norms(q)
        check_finite(sq, self.names[0], q)
        ones = torch.ones(len(q), 1, dtype=q.dtype, device=q.device)
        return torch.cat([q, sq[:, None], ones] if self.euclidean else [q, ones], 1)

    def __call__(self, qf: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Distances of ``qf`` to the gallery, written into ``out`` when given (reused memory
        avoids page-faulting a fresh block for every chunk)."""
        augmented = self._augment(qf)
        with gemm_threads(len(augmented)):
            dist = torch.mm(augmented, self.gallery_t, out=out)
        return dist.clamp_(min=0) if self.euclidean else dist

    def _gallery_rows(self, index: torch.Tensor) -> torch.Tensor:
        if self._rows is not None:
            return self._rows.index_select(0, index)
        # -2g or -g: scaling back by a power of two gives the stored rows exactly.
        scale = -0.5 if self.euclidean else -1.0
        return self.gallery_t[: self.dim].index_select(1, index).t().mul(scale).contiguous()

    def pairs(self, qf: torch.Tensor, q_index: torch.Tensor, g_index: torch.Tensor,
              step: int = 4096) -> torch.Tensor:
        """Distances of the pairs ``(qf[q_index[t]], gallery row g_index[t])``, a few thousand at a
        time: a handful of entries without computing their whole rows (re-ranking's look-ups)."""
        parts = []
        for s in range(0, len(q_index), step):
            q = self._prepared(qf.index_select(0, q_index[s : s + step]))
            g_at = g_index[s : s + step].to(self.gallery_t.device)
            dot = (q * self._gallery_rows(g_at)).sum(1)
            if self.euclidean:
                parts.append(squared_norms(q) + self.gallery_t[self.dim + 1].index_select(0, g_at) - 2 * dot)
            else:
                parts.append(1 - dot)
        if not parts:
            return self.gallery_t.new_zeros(0)
        dist = torch.cat(parts)
        return dist.clamp_(min=0) if self.euclidean else dist


def compute_distance(
    qf: Any, gf: Any, metric: str = "euclidean", normalize: bool = True, device: Any = None
) -> torch.Tensor:
    """Query-by-gallery distance matrix (smaller = closer).

    Args:
        qf, gf: query and gallery features, ``(Q, D)`` and ``(G, D)``, tensors or arrays.
        metric: ``"euclidean"`` (squared Euclidean) or ``"cosine"`` (``1 - cos``).
        normalize: L2-normalise the features first (always done for cosine). On unit vectors the
            squared Euclidean distance is ``2 - 2 cos``, so both metrics rank identically.
        device: where to compute; default the device of ``qf`` (the CPU for arrays).

    Returns:
        A ``(Q, G)`` float tensor.

    Example:
        >>> d = compute_distance(torch.randn(3, 8), torch.randn(5, 8))
        >>> d.shape
        torch.Size([3, 5])
    """
    check_metric(metric)
    qf, gf = as_features(qf, "qf"), as_features(gf, "gf")
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(f"qf has dimension {qf.shape[1]} but gf has dimension {gf.shape[1]}")
    dev = resolve_device(device, qf)
    dtype = torch.promote_types(qf.dtype, gf.dtype)
    return GalleryDistance(gf.to(dev, dtype), metric, normalize)(qf.to(dev, dtype))
