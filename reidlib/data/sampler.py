"""P x K identity sampling: each batch holds P identities with K images each (triplet loss needs it).

The epoch is built as the reference's ``RandomIdentitySampler`` (torchreid, CLIP-ReID): for every
pid, shuffle its images (drawn with replacement up to K when it has fewer) and cut them into groups
of K, dropping the remainder; then repeatedly pick P random pids among those with groups left and
take one group of each, while at least P such pids remain. Only full batches are produced.

Unlike the reference, the order depends only on ``(seed, epoch)`` (call :meth:`set_epoch` each
epoch, as with torch's ``DistributedSampler``), so a run resumed at an epoch sees the same batches,
and ``len()`` is the exact number of indices of the epoch rather than an estimate.

Both samplers yield a flat sequence of indices in which every ``batch_size`` (per rank:
``batch_size // world_size``) consecutive indices form one batch; use them with
``DataLoader(..., batch_size=that, sampler=sampler, drop_last=True)``. :meth:`batches` gives the
same as a list of index lists.

Example::

    sampler = RandomIdentitySampler(dataset.train, batch_size=64, num_instance=4, seed=1234)
    loader = DataLoader(ImageDataset(dataset.train, tf), batch_size=64, sampler=sampler, drop_last=True)
    for epoch in range(start, epochs):
        sampler.set_epoch(epoch)
        for images, pids, camids, _ in loader:
            ...
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler


def pids_of(items_or_pids) -> list[int]:
    """Pids from ``(path, pid, camid)`` items or from a plain sequence of pids."""
    return [int(x[1]) if isinstance(x, (tuple, list)) else int(x) for x in items_or_pids]


def identity_batches(pids: list[int], num_pids: int, num_instance: int,
                     rng: np.random.Generator) -> list[list[list[int]]]:
    """One epoch: a list of batches, each a list of ``num_pids`` groups of ``num_instance`` indices
    (one group per pid, all pids of a batch distinct)."""
    if num_pids < 1 or num_instance < 1:  # 0 identities per batch would never run out of batches
        raise ValueError(f"a P x K batch needs P >= 1 and K >= 1, got P={num_pids}, K={num_instance}")
    by_pid: dict[int, list[int]] = {}
    for index, pid in enumerate(pids):
        by_pid.setdefault(pid, []).append(index)
    groups: dict[int, list[list[int]]] = {}
    for pid in sorted(by_pid):
        indices = np.asarray(by_pid[pid])
        if len(indices) < num_instance:
            indices = rng.choice(indices, size=num_instance, replace=True)
        indices = rng.permutation(indices)
        usable = len(indices) // num_instance * num_instance  # the remainder is dropped, as the reference
        groups[pid] = [indices[i:i + num_instance].tolist() for i in range(0, usable, num_instance)]
    available = sorted(groups)
    batches = []
    while len(available) >= num_pids:
        chosen = [available[i] for i in rng.choice(len(available), size=num_pids, replace=False)]
        batches.append([groups[pid].pop() for pid in chosen])
        available = [pid for pid in available if groups[pid]]
    return batches


class RandomIdentitySampler(Sampler[int]):
    """P x K sampler (P = ``batch_size / num_instance`` identities x K = ``num_instance`` images).

    ``items_or_pids``: ``(path, pid, camid)`` items or the pid of each item. Yields flat indices;
    ``len()`` is the number of indices this epoch (a multiple of ``batch_size``).

    Example::

        s = RandomIdentitySampler(pids, batch_size=8, num_instance=4, seed=0)
        s.set_epoch(3)
        s.batches()[0]          # 8 indices: 2 identities x 4 images
    """

    def __init__(self, items_or_pids, batch_size: int = 64, num_instance: int = 4, seed: int = 0):
        if batch_size < 1 or num_instance < 1:
            raise ValueError(f"batch_size ({batch_size}) and num_instance ({num_instance}) must be positive")
        if batch_size % num_instance:
            raise ValueError(f"batch_size {batch_size} is not a multiple of num_instance {num_instance}")
        self.pids = pids_of(items_or_pids)
        self.batch_size, self.num_instance = batch_size, num_instance
        self.num_pids_per_batch = batch_size // num_instance
        self.seed, self.epoch = int(seed), 0
        num_ids = len(set(self.pids))
        if num_ids < self.num_pids_per_batch:
            raise ValueError(f"{num_ids} identities cannot fill a batch of {self.num_pids_per_batch} "
                             f"identities x {num_instance}; lower batch_size or num_instance")
        self._plan: tuple[tuple[int, int], list] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration the one of ``epoch`` (depends only on ``seed`` and ``epoch``)."""
        self.epoch = int(epoch)

    def _epoch_plan(self) -> list[list[list[int]]]:
        key = (self.seed, self.epoch)
        if self._plan is None or self._plan[0] != key:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._plan = (key, identity_batches(self.pids, self.num_pids_per_batch, self.num_instance, rng))
        return self._plan[1]

    def batches(self) -> list[list[int]]:
        """This epoch's batches, each a list of ``batch_size`` indices (K per identity, adjacent)."""
        return [[i for group in groups for i in group] for groups in self._epoch_plan()]

    def __iter__(self):
        for batch in self.batches():
            yield from batch

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches())

    @property
    def nominal_length(self) -> int:
        """The reference's length estimate: sum over pids of ``floor(max(n, K) / K) * K``."""
        counts = np.bincount(np.unique(self.pids, return_inverse=True)[1])
        k = self.num_instance
        return int(sum(max(n, k) // k * k for n in counts))

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "batch_size": self.batch_size,
                "num_instance": self.num_instance}

    def load_state_dict(self, state: dict) -> None:
        for key in ("batch_size", "num_instance"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]}, this sampler {getattr(self, key)}")
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])


class DistributedIdentitySampler(RandomIdentitySampler):
    """P x K sampling split over ranks by identity.

    All ranks build the same global epoch (``batch_size`` images = P identities x K); each global
    batch is split by identity, so rank ``r`` gets P / ``world_size`` whole identities x K images,
    no identity is on two ranks in the same step, and every rank has the same number of batches
    (the idea of fast-reid's ``reorder_index``). The DataLoader batch size on each rank is
    :attr:`per_rank_batch_size` = ``batch_size // world_size``.

    Example::

        s = DistributedIdentitySampler(pids, batch_size=64, num_instance=4, seed=0,
                                       rank=dist.get_rank(), world_size=dist.get_world_size())
        DataLoader(ds, batch_size=s.per_rank_batch_size, sampler=s, drop_last=True)
    """

    def __init__(self, items_or_pids, batch_size: int = 64, num_instance: int = 4, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__(items_or_pids, batch_size, num_instance, seed)
        initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.world_size = world_size if world_size is not None else (
            torch.distributed.get_world_size() if initialised else 1)
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if initialised else 0)
        if self.num_pids_per_batch % self.world_size:
            raise ValueError(f"{self.num_pids_per_batch} identities per batch do not split over "
                             f"{self.world_size} ranks; make batch_size/num_instance a multiple of it")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world_size - 1}")
        self.per_rank_batch_size = batch_size // self.world_size

    def batches(self) -> list[list[int]]:
        """This rank's share of every global batch: P / world_size identities x K indices."""
        share = self.num_pids_per_batch // self.world_size
        mine = slice(self.rank * share, (self.rank + 1) * share)
        return [[i for group in groups[mine] for i in group] for groups in self._epoch_plan()]
