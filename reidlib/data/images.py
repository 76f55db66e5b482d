"""Images from disk: a strict ``read_image`` and the torch ``ImageDataset``.

An unreadable or truncated file raises once with its path (the reference's reader retried forever on
IOError). The dataset replaces such an image by another image of the same person, so that a P x K
batch keeps its K instances, and counts the replacements.

Example::

    from reidlib.data import ImageDataset, build_transforms, read_image
    image = read_image("0002_c1s1_000451_03.jpg")              # PIL RGB
    ds = ImageDataset(dataset.train, build_transforms(cfg.data, [256, 128], train=True))
    tensor, pid, camid, index = ds[0]
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
import os

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("reidlib.data")

WARN_AT_MOST = 5  # unreadable-image warnings per dataset; later ones are only counted
COUNTER_SLOTS = 65  # the main process and up to 64 DataLoader workers count their own skips


def cpu_cores() -> int:
    """The CPU cores this process may use (its affinity where the OS has one), as torch's DataLoader
    counts them when it warns about too many workers."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except OSError:
            pass
    return os.cpu_count() or 1


def usable_workers(requested: int, key: str = "data.num_workers", quiet: bool = False) -> int:
    """``requested`` DataLoader workers, at most the cores this process may use: more only compete
    for them (and torch warns about it on every loader). Lowering it is said in one INFO line
    (DEBUG with ``quiet``, e.g. on the ranks other than 0).

    >>> usable_workers(0)
    0
    """
    cores = cpu_cores()
    if requested <= cores:
        return requested
    log.log(logging.DEBUG if quiet else logging.INFO,
            "%s=%d lowered to %d: this process may use %d CPU core(s)", key, requested, cores, cores)
    return cores


class UnreadableImageError(OSError):
    """An image file that is missing, not an image, or truncated."""


def read_image(path) -> Image.Image:
    """Decode an image file fully and return it as an RGB PIL image.

    Grayscale, CMYK, palette and alpha images are converted to RGB. The pixels are decoded here
    (``load()``), so a truncated JPEG fails now rather than later; PIL's ``LOAD_TRUNCATED_IMAGES``
    must stay False (its default) for that. Raises :class:`UnreadableImageError` (an ``OSError``)
    naming the file.

    Example::

        read_image("query/0001_c1s1_001051_00.jpg").size   # (64, 128): width, height
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("P", "PA"):  # palette transparency would otherwise be lost with a warning
                image = image.convert("RGBA")
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"cannot read image {path}: {err}") from err


class ImageDataset(torch.utils.data.Dataset):
    """A torch Dataset over ``(path, pid, camid)`` items returning ``(image, pid, camid, index)``.

    ``image`` is ``transform(PIL image)`` (the PIL image itself when ``transform`` is None). An
    unreadable image is logged (the first few), counted in :attr:`num_skipped` (shared with DataLoader
    worker processes) and replaced by the next readable image of the same pid, whose camid is then
    returned; ``index`` stays the requested one. With ``substitute=False`` it raises instead.

    Example::

        ds = ImageDataset(items, transform)
        loader = DataLoader(ds, batch_size=64, sampler=RandomIdentitySampler(items), drop_last=True)
        ...
        print(ds.num_skipped)
    """

    def __init__(self, items, transform=None, substitute: bool = True):
        self.items = list(items)
        self.transform = transform
        self.substitute = substitute
        self._skipped = _new_counter()
        self._bad = _new_flags(len(self.items))  # shared: which items any process failed to read
        self._unreadable: set[int] = set()  # per process: known bad, not read again
        self._same_pid: dict[int, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_skipped(self) -> int:
        """Failed image reads so far, over all worker processes (a process reads a bad file once)."""
        return sum(self._skipped)

    @property
    def unreadable_indices(self) -> list[int]:
        """The items found unreadable so far, by any process, each once (unlike
        :attr:`num_skipped`, which counts failed reads).

        Example::

            for batch in loader: ...
            print(len(ds.unreadable_indices), "unreadable images")
        """
        return np.flatnonzero(np.frombuffer(self._bad, dtype=np.int8)).tolist()

    def __getitem__(self, index: int):
        path, pid, camid = self.items[index]
        for i in self._candidates(index):
            try:
                image = read_image(self.items[i][0])
            except UnreadableImageError as err:
                self._unreadable.add(i)
                self._bad[i] = 1
                self._count_skip(err)
                if not self.substitute:
                    raise
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, pid, self.items[i][2], index
        raise UnreadableImageError(f"{path}: unreadable, and no other image of pid {pid} is readable")

    def _candidates(self, index: int):
        """The requested index, then the other images of its pid in order after it."""
        if index not in self._unreadable or not self.substitute:
            yield index
        if not self.substitute:
            return
        if self._same_pid is None:
            self._same_pid = indices_by_pid(self.items)
        group = self._same_pid[self.items[index][1]]
        start = group.index(index)
        for i in group[start + 1:] + group[:start]:
            if i not in self._unreadable:
                yield i

    def _count_skip(self, err: Exception) -> None:
        worker = torch.utils.data.get_worker_info()
        self._skipped[0 if worker is None else 1 + worker.id % (COUNTER_SLOTS - 1)] += 1
        count = self.num_skipped
        if count <= WARN_AT_MOST:
            log.warning("%s; %s%s", err, "using another image of the same person" if self.substitute
                        else "not replaced", " (further ones only counted)" if count == WARN_AT_MOST else "")

    def __getstate__(self):
        state = self.__dict__.copy()
        # DataLoader workers receive the dataset while a process is being started: the counter then
        # travels as shared memory. Any other pickling or copy keeps only its current value.
        if multiprocessing.context.get_spawning_popen() is None:
            state["_skipped"] = list(self._skipped)
            state["_bad"] = bytes(self._bad)
        return state

    def __setstate__(self, state):
        if isinstance(state["_skipped"], list):
            state["_skipped"] = _new_counter(state["_skipped"])
        if isinstance(state["_bad"], bytes):
            state["_bad"] = _new_flags(len(state["_bad"]), state["_bad"])
        self.__dict__.update(state)


def _new_counter(values=None):
    """Shared memory with one slot per process (main + DataLoader workers): each process adds to
    its own slot only, so no lock is needed, and any start method (fork, spawn) can inherit it."""
    return multiprocessing.RawArray("q", values if values is not None else COUNTER_SLOTS)


def _new_flags(length: int, values: bytes | None = None):
    """One shared byte per item, set to 1 by whichever process finds the item unreadable (a
    write of the same value from several processes needs no lock)."""
    flags = multiprocessing.RawArray("b", length)
    if values:
        flags[:] = list(values)
    return flags


def indices_by_pid(items) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, (_, pid, _) in enumerate(items):
        groups.setdefault(pid, []).append(i)
    return groups
