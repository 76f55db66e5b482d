"""The retrieval explorer's plain logic, without widgets or models: each query's ranking, AP and
first true match, the query orders, what one query's view shows, and the cache files.

The protocol is :mod:`reidlib.eval.protocol`'s, the one rule evaluation uses: a gallery image of
the query's identity and exclusion label (its camera, or its own file without camera ids) is left
out of the query's ranking; rankings are stable (equal distances keep the gallery order). So the
mean of the APs here is the ``mAP`` that :func:`reidlib.eval.evaluate` reports, and the share of
first true matches at rank 1 its ``rank1``.

Example:
    >>> import torch
    >>> query = [("q0.jpg", 1, 0), ("q1.jpg", 2, 0)]
    >>> gallery = [("g0.jpg", 1, 0), ("g1.jpg", 1, 1), ("g2.jpg", 2, 1), ("g3.jpg", 3, 1)]
    >>> dist = torch.tensor([[0.0, 0.3, 0.1, 0.2], [0.5, 0.4, 0.3, 0.1]])
    >>> r = rank_queries(lambda rows: dist[rows], query, gallery, keep=3)
    >>> r.top.tolist(), r.ap.tolist(), r.first_hit.tolist()    # g0: same identity and camera as q0
    ([[2, 3, 1], [3, 2, 1]], [0.3333333333333333, 0.5], [2, 1])
    >>> view = query_view(r, 1, query, gallery, k=2)
    >>> [(m.index, m.correct, m.colour) for m in view.matches]
    [(3, False, '#d73027'), (2, True, '#1a9850')]
"""
from __future__ import annotations

import csv
import hashlib
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..eval.protocol import GalleryIdentities, excluded, exclusion_labels, ranked_gallery

# The frames of the retrieval grids (reidlib.viz.retrieval), written here so that this module
# does not load matplotlib.
CORRECT, WRONG, UNKNOWN, QUERY = "#1a9850", "#d73027", "#9e9e9e", "#2c7bb6"

# Query orders: key -> what the sort menu says ("B" is the second model).
SORTS = {
    "index": "query order",
    "ap": "AP, worst first",
    "b_wins": "AP of B - A: B wins most",
    "b_loses": "AP of B - A: B loses most",
}


@dataclass
class Rankings:
    """One model's rankings of every query (one distance: plain or re-ranked, flip or not).

    ``ap``: AP per query, NaN where the protocol leaves no true match; ``first_hit``: 0-based rank of
    the first true match, -1 where there is none; ``top`` / ``top_dist``: the first ``keep`` gallery
    indices of each ranking (excluded images left out; -1 pads) and their distances.
    """

    ap: np.ndarray
    first_hit: np.ndarray
    top: np.ndarray
    top_dist: np.ndarray

    def mean_ap(self) -> float:
        """mAP over the scorable queries (evaluation's ``mAP``)."""
        return float(np.nanmean(self.ap)) if np.isfinite(self.ap).any() else float("nan")

    def rank1(self) -> float:
        """Share of scorable queries whose first true match ranks first (evaluation's ``rank1``)."""
        scorable = self.first_hit >= 0
        return float((self.first_hit[scorable] == 0).mean()) if scorable.any() else float("nan")

    def arrays(self) -> dict:
        return {"ap": self.ap, "first_hit": self.first_hit, "top": self.top, "top_dist": self.top_dist}

    @classmethod
    def from_arrays(cls, arrays: dict) -> "Rankings":
        return cls(*(np.asarray(arrays[k]) for k in ("ap", "first_hit", "top", "top_dist")))


# --------------------------------------------------------------------------- rankings

def _labels(query: Sequence[tuple], gallery: Sequence[tuple]):
    """Identity and exclusion-label tensors of query and gallery (the protocol's labels)."""
    q_labels, g_labels, _ = exclusion_labels(query, gallery)
    as_long = lambda values: torch.tensor(list(values), dtype=torch.long)  # noqa: E731
    return (as_long(p for _, p, _ in query), as_long(q_labels),
            as_long(p for _, p, _ in gallery), as_long(g_labels))


def _match_ranks(dist: torch.Tensor, index: torch.Tensor, real: torch.Tensor, junk: torch.Tensor):
    """0-based ranks of each query's same-identity gallery images among the images it may see.

    ``index``/``real``/``junk``: :meth:`GalleryIdentities.same_identity`'s output for these rows.
    Returns ``(ranks, is_match)`` with the entries in ranking order along each row. A rank is the
    number of gallery images strictly closer, plus those as close with a smaller index (the stable
    order), less the excluded ones ranked before.
    """
    values = torch.where(real, dist.gather(1, index), torch.full_like(dist[:, :1], float("inf")))
    values, order = torch.sort(values, dim=1, stable=True)     # index ascends along a row: ties stay stable
    index, real, junk = index.gather(1, order), real.gather(1, order), junk.gather(1, order)
    # NumPy's sort: several times faster than torch.sort on the CPU (bench/README.md).
    ordered = torch.from_numpy(np.sort(dist.numpy(), axis=1))
    closer = torch.searchsorted(ordered, values.contiguous())
    equal = torch.searchsorted(ordered, values.contiguous(), right=True) - closer
    for r, c in torch.nonzero(real & (equal > 1)).tolist():    # exact ties: rare with real features
        closer[r, c] += int(((dist[r] == values[r, c]) & (torch.arange(dist.shape[1]) < index[r, c])).sum())
    junk = real & junk
    return closer - (torch.cumsum(junk, 1) - junk.long()), real & ~junk


def _ap_and_first(ranks: torch.Tensor, is_match: torch.Tensor):
    """AP (``mean_j (j + 1) / (rank_j + 1)``) and the first match's rank; NaN and -1 without one."""
    count = is_match.sum(1)
    hits = torch.cumsum(is_match, 1).double()
    precision = torch.where(is_match, hits / (ranks.double() + 1), torch.zeros_like(hits))
    ap = torch.where(count > 0, precision.sum(1) / count.clamp(min=1), torch.full_like(hits[:, 0], float("nan")))
    big = torch.iinfo(torch.long).max
    first = torch.where(is_match, ranks, torch.full_like(ranks, big)).amin(1) if ranks.shape[1] else \
        torch.full((len(ranks),), big, dtype=torch.long)
    return ap.numpy(), torch.where(first == big, torch.full_like(first, -1), first).numpy()


def _top_rows(dist: torch.Tensor, q_pids, q_labels, g_pids, g_labels, excluded_count, keep: int):
    """Each row's first ``keep`` gallery indices and distances under the protocol, through
    :func:`ranked_gallery` on the few candidates that can reach them (the ``keep + excluded``
    nearest, ties included)."""
    rows, num_gallery = dist.shape
    top = np.full((rows, keep), -1, dtype=np.int64)
    top_dist = np.full((rows, keep), np.nan, dtype=np.float32)
    reach = min(num_gallery, keep + int(excluded_count.max(initial=0)))
    if reach == 0:
        return top, top_dist
    threshold = torch.topk(dist, reach, dim=1, largest=False).values[:, -1]
    for r in range(rows):
        candidates = torch.nonzero(dist[r] <= threshold[r]).flatten()
        mask = excluded(q_pids[r:r + 1], q_labels[r:r + 1], g_pids[candidates], g_labels[candidates])[0]
        order = candidates[ranked_gallery(dist[r, candidates], mask, keep)]
        top[r, :len(order)] = order.numpy()
        top_dist[r, :len(order)] = dist[r, order].numpy()
    return top, top_dist


def rank_queries(distance_rows: Callable[[slice], torch.Tensor], query: Sequence[tuple], gallery: Sequence[tuple],
                 keep: int = 50, chunk: int = 256) -> Rankings:
    """Every query's AP, first true match and first ``keep`` matches, from its distance rows.

    ``distance_rows(rows)``: the ``(len(rows), G)`` distances (smaller = closer, on the CPU) of a
    slice of the queries; called once per chunk of ``chunk`` queries, so the whole ``Q x G``
    matrix never needs to exist. ``query``/``gallery``: ``(path, pid, camid)`` items.

    >>> d = torch.tensor([[0.2, 0.1, 0.3]])
    >>> rank_queries(lambda rows: d[rows], [("q", 4, -1)], [("a", 4, -1), ("b", 5, -1), ("c", 4, -1)]).ap.tolist()
    [0.5833333333333333]
    """
    q_pids, q_labels, g_pids, g_labels = _labels(query, gallery)
    same = GalleryIdentities(g_pids, g_labels)
    parts = []
    for start in range(0, len(query), chunk):
        rows = slice(start, min(start + chunk, len(query)))
        dist = distance_rows(rows).detach().float().cpu().contiguous()
        index, real, junk = same.same_identity(q_pids[rows], q_labels[rows])
        ap, first = _ap_and_first(*_match_ranks(dist, index, real, junk))
        top, top_dist = _top_rows(dist, q_pids[rows], q_labels[rows], g_pids, g_labels,
                                  (real & junk).sum(1).numpy(), keep)
        parts.append((ap, first, top, top_dist))
    if not parts:
        empty = np.zeros((0, keep))
        return Rankings(np.zeros(0), np.zeros(0, np.int64), empty.astype(np.int64), empty.astype(np.float32))
    return Rankings(*(np.concatenate(column) for column in zip(*parts)))


def average_precision(correct: Sequence[bool]) -> float:
    """AP of one full ranking given as match flags in rank order (NaN without a match).

    >>> average_precision([False, True, True])
    0.5833333333333333
    """
    flags = np.asarray(correct, dtype=bool)
    if not flags.any():
        return float("nan")
    ranks = np.flatnonzero(flags)
    return float(np.mean(np.arange(1, len(ranks) + 1) / (ranks + 1)))


# --------------------------------------------------------------------------- query orders

def filter_queries(query: Sequence[tuple], pid: int | None = None, camera: int | None = None) -> list[int]:
    """Indices of the queries of identity ``pid`` and camera ``camera`` (None: any).

    >>> filter_queries([("a", 1, 0), ("b", 2, 0), ("c", 1, 1)], pid=1)
    [0, 2]
    """
    return [i for i, (_, p, c) in enumerate(query)
            if (pid is None or p == pid) and (camera is None or c == camera)]


def sort_queries(indices: Sequence[int], sort: str = "index", ap_a: np.ndarray | None = None,
                 ap_b: np.ndarray | None = None) -> list[int]:
    """``indices`` in the order ``sort`` names (a key of :data:`SORTS`): query order; AP of model A
    (``ap_a``) worst first; or the AP of B minus A, largest (B wins most) or smallest (B loses most)
    first. Queries without an AP (no true match) go last; ties keep query order.

    >>> ap_a, ap_b = np.array([0.5, 0.9, np.nan]), np.array([0.7, 0.4, 0.1])
    >>> sort_queries([0, 1, 2], "ap", ap_a), sort_queries([0, 1, 2], "b_wins", ap_a, ap_b)
    ([0, 1, 2], [0, 1, 2])
    >>> sort_queries([0, 1, 2], "b_loses", ap_a, ap_b)
    [1, 0, 2]
    """
    indices = list(indices)
    if sort == "index":
        return indices
    if sort not in SORTS:
        raise ValueError(f"sort '{sort}': one of {', '.join(SORTS)}")
    if sort == "ap":
        key = np.asarray(ap_a, dtype=float)
    else:
        if ap_b is None:
            raise ValueError(f"sort '{sort}' compares two models; only one is loaded")
        gain = np.asarray(ap_b, dtype=float) - np.asarray(ap_a, dtype=float)
        key = -gain if sort == "b_wins" else gain
    # NaN last: sort on (is NaN, value, position), stable.
    return sorted(indices, key=lambda i: (math.isnan(key[i]), 0.0 if math.isnan(key[i]) else key[i]))


# --------------------------------------------------------------------------- one query's view

@dataclass
class Match:
    """One ranked gallery image: its index, file, identity, camera, whether it is a true match
    (None: unknown) and the colour of its frame."""

    rank: int
    index: int
    path: str
    pid: int
    camera: int
    distance: float
    correct: bool | None

    @property
    def colour(self) -> str:
        return UNKNOWN if self.correct is None else (CORRECT if self.correct else WRONG)


@dataclass
class QueryView:
    """What the explorer shows for one query under one model."""

    model: str
    query: int
    path: str
    pid: int
    camera: int
    ap: float
    first_hit: int               # 0-based; -1: no true match
    matches: list[Match] = field(default_factory=list)
    caption: str | None = None   # a text query instead of the image

    def summary(self) -> str:
        """One line: the AP and where the first true match ranks.

        >>> QueryView("m", 0, "q.jpg", 3, 1, 0.25, 3).summary()
        'AP 25.0%, first true match at rank 4'
        """
        if math.isnan(self.ap):
            return "no true match in the gallery under the protocol (counts nowhere)"
        return f"AP {100 * self.ap:.1f}%, first true match at rank {self.first_hit + 1}"


def query_view(rankings: Rankings, i: int, query: Sequence[tuple], gallery: Sequence[tuple], k: int = 10,
               model: str = "") -> QueryView:
    """Query ``i``'s view: its first ``k`` matches, framed by identity, with its AP."""
    path, pid, camera = query[i]
    matches = []
    for rank, (g, d) in enumerate(zip(rankings.top[i][:k], rankings.top_dist[i][:k])):
        if g < 0:
            break
        g_path, g_pid, g_cam = gallery[g]
        matches.append(Match(rank, int(g), str(g_path), int(g_pid), int(g_cam), float(d), bool(g_pid == pid)))
    return QueryView(model, i, str(path), int(pid), int(camera), float(rankings.ap[i]), int(rankings.first_hit[i]),
                     matches)


def text_view(scores: torch.Tensor, caption: str, gallery: Sequence[tuple], k: int = 10, pid: int | None = None,
              model: str = "") -> QueryView:
    """The gallery ranked by similarity ``scores`` (larger = closer) to a caption. Frames say
    whether a match shows identity ``pid`` (the selected query's); grey when ``pid`` is None. The
    AP is that of the whole ranking for ``pid``; nothing is excluded (a caption has no camera).

    >>> v = text_view(torch.tensor([0.1, 0.9, 0.5]), "red top", [("a", 1, 0), ("b", 2, 0), ("c", 1, 1)], k=2, pid=1)
    >>> [(m.index, m.correct) for m in v.matches], v.summary()
    ([(1, False), (2, True)], 'AP 58.3%, first true match at rank 2')
    """
    order = ranked_gallery(-scores.float(), torch.zeros(len(scores), dtype=torch.bool))
    flags = [None if pid is None else gallery[g][1] == pid for g in order]
    matches = [Match(r, g, str(gallery[g][0]), int(gallery[g][1]), int(gallery[g][2]), float(-scores[g]), flags[r])
               for r, g in enumerate(order[:k])]
    ap = float("nan") if pid is None else average_precision(flags)
    first = next((r for r, f in enumerate(flags) if f), -1)
    return QueryView(model, -1, "", -1 if pid is None else int(pid), -1, ap, first, matches, caption=caption)


# --------------------------------------------------------------------------- cache files

_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, remembered per (path, size, mtime) for this process.

    >>> import tempfile; f = tempfile.NamedTemporaryFile(delete=False); _ = f.write(b"x"); f.close()
    >>> file_digest(f.name)[:12]
    '2d711642b726'
    """
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        sha = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                sha.update(block)
        _DIGESTS[key] = sha.hexdigest()
    return _DIGESTS[key]


def cache_key(*parts) -> str:
    """A short hex key of the parts' text (weights digest, data set lists, settings).

    >>> cache_key("a", [("q.jpg", 1, 0)], True) == cache_key("a", [("q.jpg", 1, 0)], True)
    True
    """
    sha = hashlib.sha256()
    for part in parts:
        sha.update(repr(part).encode())
        sha.update(b"\0")
    return sha.hexdigest()[:20]


def load_arrays(path: str | Path) -> dict | None:
    """The arrays of an ``.npz`` cache file, or None when it is missing or unreadable (then it is
    simply computed again)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError):
        return None


def save_arrays(path: str | Path, arrays: dict) -> Path | None:
    """Write ``arrays`` to ``path`` (``.npz``) atomically: a temp file beside it, then a rename, so
    a reader never sees half a file. Returns None (and writes nothing) where the folder is not
    writable: the cache is an optimisation only.

    >>> import tempfile; folder = Path(tempfile.mkdtemp())
    >>> _ = save_arrays(folder / "a.npz", {"x": np.arange(3)})
    >>> load_arrays(folder / "a.npz")["x"].tolist()
    [0, 1, 2]
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.npz", dir=path.parent)
    except OSError:
        return None
    try:
        with os.fdopen(handle, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def cached_arrays(path: str | Path | None, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """``(arrays, reused)``: those saved at ``path``, else ``compute()``'s, saved there.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "x.npz"
    >>> cached_arrays(p, lambda: {"a": np.ones(2)})[1], cached_arrays(p, lambda: {"a": np.ones(2)})[1]
    (False, True)
    """
    if path is not None:
        arrays = load_arrays(path)
        if arrays is not None:
            return arrays, True
    arrays = compute()
    if path is not None:
        save_arrays(path, arrays)
    return arrays, False


def read_captions(root: str | Path | None) -> dict[str, str]:
    """Captions of a data set's images from ``captions.csv`` in its root (``path,caption``, paths
    relative to the root), as absolute path -> caption; empty when there is none. The generated
    data sets have one; the explorer puts the query's caption into its text box.
    """
    if root is None:
        return {}
    file = Path(root) / "captions.csv"
    if not file.is_file():
        return {}
    with open(file, newline="") as fh:
        return {str((Path(root) / row["path"]).absolute()): row["caption"]
                for row in csv.DictReader(fh) if row.get("path") and row.get("caption")}
