"""The evaluation protocol, stated once: which gallery images a query may not be matched with, and
which queries can be scored at all. The metrics, the pre-flight check, ``search`` and the retrieval
grids all ask this module.

The rule, for a query q and a gallery image g (both ``(path, pid, camid)`` items):

* **standard** (every image has a camera id: Market-1501, DukeMTMC-reID, MSMT17, VeRi-776): g is
  excluded when it shows q's identity AND was taken by q's camera; finding a person again in the
  same camera is trivial (Zheng et al., "Scalable Person Re-identification: A Benchmark",
  ICCV 2015). Reported as :data:`MARKET_PROTOCOL`.
* **camera-less** (some image has no camera id, camid -1: your own images, VehicleID): same-camera
  pairs cannot be told apart, so only q's own image (the same file) is excluded, when the gallery
  holds it. Reported as :data:`SAME_IMAGE_PROTOCOL`.
* **drawn galleries** (VehicleID: one gallery image per identity per trial, the other images are the
  queries; drawn by :meth:`reidlib.data.ReIDDataset.trial_indices`): each draw is a query set and a
  gallery without camera ids, so the camera-less rule applies to it. Query and gallery of a draw
  are different files, so nothing is excluded: every query is scored against the whole draw.

Both rules are one test on two integer labels per image, its identity and its *exclusion label*:
g is excluded from q's ranking when both are equal (:func:`excluded`). The exclusion label is the
camera id under the standard rule, and a number per image file under the camera-less one
(:func:`exclusion_labels`); :func:`reidlib.eval.evaluate` takes these labels as its camids.

A query is scorable when at least one gallery image of its identity is left
(:func:`scorable_queries`); the others count nowhere, and the metrics say why
(:func:`dropped_reason`). Rankings are stable: equal distances keep the gallery order
(:func:`ranked_gallery`).

Example:
    >>> query = [("q.jpg", 7, -1)]
    >>> gallery = [("q.jpg", 7, -1), ("a.jpg", 7, -1), ("b.jpg", 3, -1)]
    >>> q_labels, g_labels, protocol = exclusion_labels(query, gallery)
    >>> protocol == SAME_IMAGE_PROTOCOL, excluded([7], q_labels, [7, 7, 3], g_labels).tolist()
    (True, [[True, False, False]])
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .distance import as_tensor

MARKET_PROTOCOL = "same-identity gallery images from the query's own camera are excluded (Market-1501 protocol)"
SAME_IMAGE_PROTOCOL = ("no camera ids: only the query's own image is excluded, so same-camera matches count "
                       "(scores run higher than under the Market-1501 protocol)")
# Why a query counts nowhere, as stored next to the count in the metrics.
MARKET_DROPPED_REASON = "no gallery image of the same identity from another camera"
SAME_IMAGE_REASON = "no other gallery image of the same identity"


def exclusion_labels(query: Sequence[tuple], gallery: Sequence[tuple]) -> tuple[list[int], list[int], str]:
    """(query labels, gallery labels, protocol name) for ``(path, pid, camid)`` items.

    With a camera id on every item the labels are the camera ids (:data:`MARKET_PROTOCOL`).
    Otherwise each image file gets a number of its own, shared by a query and a gallery entry of the
    same path, so that "same identity and same label" leaves out exactly the query's own image
    (:data:`SAME_IMAGE_PROTOCOL`). Paths are compared as given: pass them resolved when the same
    file may be named two ways.

    >>> exclusion_labels([("a.jpg", 1, -1)], [("a.jpg", 1, -1), ("b.jpg", 1, -1)])[:2]
    ([0], [0, 1])
    >>> exclusion_labels([("a.jpg", 1, 0)], [("b.jpg", 1, 0), ("c.jpg", 1, 2)])[:2]
    ([0], [0, 2])
    """
    items = list(query) + list(gallery)
    if items and all(cam >= 0 for _, _, cam in items):
        return [c for _, _, c in query], [c for _, _, c in gallery], MARKET_PROTOCOL
    number: dict[str, int] = {}
    labels = [number.setdefault(path, len(number)) for path, _, _ in items]
    return labels[:len(query)], labels[len(query):], SAME_IMAGE_PROTOCOL


def dropped_reason(protocol: str) -> str:
    """Why a query counts nowhere under ``protocol`` (the metrics' ``dropped_queries_reason``).

    >>> dropped_reason(MARKET_PROTOCOL)
    'no gallery image of the same identity from another camera'
    """
    return SAME_IMAGE_REASON if protocol == SAME_IMAGE_PROTOCOL else MARKET_DROPPED_REASON


def _is_excluded(q_pid: torch.Tensor, q_label: torch.Tensor, g_pid: torch.Tensor,
                 g_label: torch.Tensor) -> torch.Tensor:
    """The rule itself, element-wise (broadcasting): same identity and same exclusion label."""
    return (q_pid == g_pid) & (q_label == g_label)


def _as_labels(x: Any, name: str) -> torch.Tensor:
    return as_tensor(x, name).long().reshape(-1)


def excluded(q_pids: Any, q_labels: Any, g_pids: Any, g_labels: Any) -> torch.Tensor:
    """``(Q, G)`` bool mask, True where gallery image g may not appear in query q's ranking.

    Labels from :func:`exclusion_labels` (camera ids when every image has one). Dense: for one
    query or a few; the metrics use :class:`GalleryIdentities`, which never builds the full mask.

    >>> excluded([1, 2], [0, 0], [1, 1, 2], [0, 1, 1]).tolist()   # standard: same id, same camera
    [[True, False, False], [False, False, False]]
    """
    q_pids, q_labels = _as_labels(q_pids, "q_pids"), _as_labels(q_labels, "q_labels")
    g_pids, g_labels = _as_labels(g_pids, "g_pids"), _as_labels(g_labels, "g_labels")
    return _is_excluded(q_pids[:, None], q_labels[:, None], g_pids[None, :], g_labels[None, :])


def ranked_gallery(dist_row: Any, excluded_row: Any, top: int | None = None) -> list[int]:
    """Gallery indices by increasing distance (ties in gallery order), excluded ones left out, at
    most ``top`` of them (all when None).

    >>> ranked_gallery([0.0, 0.5, 0.2, 0.5], [True, False, False, False])
    [2, 1, 3]
    """
    dist_row = as_tensor(dist_row, "dist_row").reshape(-1)
    keep = ~as_tensor(excluded_row, "excluded_row").to(torch.bool).reshape(-1).cpu()
    order = torch.argsort(dist_row.cpu(), stable=True)
    return order[keep[order]][:top].tolist()


class GalleryIdentities:
    """Gallery indices grouped by identity, to list each query's same-identity images quickly and
    apply the rule to those only (a few per query, instead of a ``Q x G`` mask).

    >>> index, real, excl = GalleryIdentities([1, 2, 1], [0, 1, 1]).same_identity(
    ...     torch.tensor([1]), torch.tensor([0]))
    >>> index.tolist(), excl.tolist()
    ([[0, 2]], [[True, False]])
    """

    def __init__(self, g_pids: Any, g_labels: Any):
        self.g_pids, self.g_labels = _as_labels(g_pids, "g_pids"), _as_labels(g_labels, "g_labels")
        self.order = torch.argsort(self.g_pids, stable=True)  # within an identity: ascending index
        self.pids, self.counts = torch.unique_consecutive(self.g_pids[self.order], return_counts=True)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def same_identity(self, q_pids: torch.Tensor, q_labels: torch.Tensor):
        """Per query: its same-identity gallery indices (padded), which are real, which excluded.

        Returns ``(index, real, excluded)``, each ``(len(q_pids), width)``; ``index`` is ascending
        along each row, padding sits at the end with ``real == False``.
        """
        if len(self.pids) == 0:
            empty = torch.zeros(len(q_pids), 0, dtype=torch.long, device=q_pids.device)
            return empty, empty.bool(), empty.bool()
        slot = torch.searchsorted(self.pids, q_pids).clamp_(max=len(self.pids) - 1)
        found = self.pids[slot] == q_pids
        count = torch.where(found, self.counts[slot], torch.zeros_like(slot))
        width = int(count.max()) if len(count) else 0
        offset = torch.arange(width, device=q_pids.device)
        real = offset < count[:, None]
        pos = (self.starts[slot][:, None] + offset).clamp_(max=len(self.order) - 1)
        index = torch.where(real, self.order[pos], torch.zeros_like(pos))
        rule = _is_excluded(q_pids[:, None], q_labels[:, None], self.g_pids[index], self.g_labels[index])
        return index, real, real & rule


def scorable_queries(q_pids: Any, q_labels: Any, g_pids: Any, g_labels: Any) -> torch.Tensor:
    """Which queries can be scored: a bool mask, True where at least one gallery image of the
    query's identity is left after the exclusion. Needs only the labels, so it can run before any
    feature is extracted.

    >>> scorable_queries([1, 2, 3], [0, 0, 0], [1, 2, 2], [1, 0, 1]).tolist()   # cameras
    [True, True, False]
    >>> scorable_queries([1, 2], [0, 1], [1, 2, 2], [0, 2, 3]).tolist()         # own images
    [False, True]
    """
    q_pids, q_labels = _as_labels(q_pids, "q_pids"), _as_labels(q_labels, "q_labels")
    if len(q_pids) == 0:
        return torch.zeros(0, dtype=torch.bool)
    index, real, excl = GalleryIdentities(g_pids, g_labels).same_identity(q_pids, q_labels)
    return (real & ~excl).any(1)


def check_valid_queries(dataset) -> int:
    """The number of queries of ``dataset`` (its ``query`` and ``gallery``; draw 0 of a drawn
    gallery) the protocol can score, from the labels alone; raises ValueError before any training
    or extraction when there is none (e.g. a single-camera data set), saying what to check.

    Example::

        check_valid_queries(load_dataset("market1501", "data"))     # 3368
    """
    q_labels, g_labels, protocol = exclusion_labels(dataset.query, dataset.gallery)
    q_pids, g_pids = [p for _, p, _ in dataset.query], [p for _, p, _ in dataset.gallery]
    valid = int(scorable_queries(q_pids, q_labels, g_pids, g_labels).sum())
    if valid == 0:
        if protocol == MARKET_PROTOCOL:
            why = (f"{MARKET_DROPPED_REASON}; cameras seen: {sorted(set(q_labels + g_labels))}); a query needs a "
                   "gallery image of its identity taken by another camera: check the camera numbers in the file "
                   "names or the csv files")
        else:
            why = (f"{SAME_IMAGE_REASON}); a query needs another gallery image of its identity: check the "
                   "identities in the file names or the csv files")
        raise ValueError(f"data set {dataset.name} at {dataset.root}: none of its {len(q_pids)} queries can be "
                         f"scored ({why}")
    return valid


__all__ = ["MARKET_PROTOCOL", "SAME_IMAGE_PROTOCOL", "MARKET_DROPPED_REASON", "SAME_IMAGE_REASON",
           "exclusion_labels", "dropped_reason", "excluded", "ranked_gallery", "GalleryIdentities",
           "scorable_queries", "check_valid_queries"]
