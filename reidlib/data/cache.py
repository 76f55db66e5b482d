"""Training images on the device: a decoded-image cache, and the P x K batches of an epoch.

On CUDA every training image is decoded once into a uint8 tensor on the GPU
(:class:`TrainImageCache`), shared by stage 1's feature cache and stage 2's augmentation, which
then runs on the device (:func:`~reidlib.data.transforms.gpu_train_augment`). Elsewhere
:class:`TrainBatches` reads the same P x K batches through a DataLoader.

Example::

    cache = make_image_cache(dataset, cfg, runtime)          # None on the CPU
    batches = TrainBatches(dataset, cfg, runtime, cache)
    for images, pids, camids, views in batches.epoch(0):
        ...
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader

from ..runtime import Runtime, device_memory, epoch_seed, host_memory
from .images import ImageDataset, UnreadableImageError, indices_by_pid, read_image
from .sampler import DistributedIdentitySampler, RandomIdentitySampler
from .transforms import build_transforms, gpu_train_augment, interpolation_mode

log = logging.getLogger("reidlib.data")


class TrainImageCache:
    """Every training image decoded once and resized, in one uint8 tensor ``images [N, 3, H, W]``.

    For the GPU path: move the cache to the device once, then index batches out of it and augment
    them there with :func:`reidlib.data.gpu_train_augment`, so that no image is decoded twice and no
    DataLoader worker is needed. The resize is PIL's with the configured interpolation, exactly what
    the train transform's ``Resize`` does, so the two paths start from the same pixels.

    Memory is ``N * 3 * H * W`` bytes: Market-1501's 12,936 train images take 1.27 GB at 256x128 and
    318 MB at 128x64. Unreadable images are replaced by another image of the same pid (counted in
    ``num_skipped``). Decoding uses ``num_threads`` threads (PIL releases the GIL while decoding).

    Example::

        cache = TrainImageCache(dataset.train, [256, 128], "bicubic").to("cuda")
        batch = torch.tensor(indices, device="cuda")
        images = gpu_train_augment(cache.images[batch], cfg.data)
        pids, camids = cache.pids[batch], cache.camids[batch]
    """

    def __init__(self, items, image_size, interpolation: str = "bicubic",
                 num_threads: int | None = None):
        self.items = list(items)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.interpolation = interpolation
        height, width = self.image_size
        self.images = torch.empty((len(self.items), 3, height, width), dtype=torch.uint8)
        self.pids = torch.tensor([pid for _, pid, _ in self.items], dtype=torch.long)
        self.camids = torch.tensor([cam for _, _, cam in self.items], dtype=torch.long)
        log.info("decoding %d train images into a %.0f MB uint8 cache at %dx%d", len(self.items),
                 self.images.numel() / 2**20, height, width)
        self.unreadable_indices = self._decode_all(num_threads or min(8, os.cpu_count() or 1))
        self.num_skipped = len(self.unreadable_indices)

    def _decode_one(self, index: int) -> bool:
        try:
            image = read_image(self.items[index][0])
        except UnreadableImageError as err:
            log.warning("%s; using another image of the same person", err)
            return False
        image = TF.resize(image, list(self.image_size), interpolation=interpolation_mode(self.interpolation))
        self.images[index] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        return True

    def _decode_all(self, num_threads: int) -> list[int]:
        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            ok = list(pool.map(self._decode_one, range(len(self.items))))
        bad = [i for i, good in enumerate(ok) if not good]
        groups = indices_by_pid(self.items)
        for i in bad:
            donors = [j for j in groups[self.items[i][1]] if ok[j]]
            if not donors:
                raise UnreadableImageError(f"{self.items[i][0]}: unreadable, and no other image of "
                                           f"pid {self.items[i][1]} is readable")
            self.images[i] = self.images[donors[0]]
            self.camids[i] = self.camids[donors[0]]
        return bad

    def to(self, device) -> "TrainImageCache":
        """Move images, pids and camids to ``device``; returns the cache."""
        self.images, self.pids, self.camids = (t.to(device) for t in (self.images, self.pids, self.camids))
        return self

    def __len__(self) -> int:
        return len(self.items)

    @property
    def nbytes(self) -> int:
        return self.images.numel()


def decode_images(paths, image_size, interpolation: str = "bicubic",
                  num_threads: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """Image files decoded and resized into one uint8 tensor ``[N, 3, H, W]``, and the indices of
    the files that could not be read: left out of the tensor, logged with a count.

    For image sets without identities (pretraining pairs, zero-shot search), where an unreadable
    image has no same-person stand-in.

    Example::

        images, skipped = decode_images(["a.jpg", "b.jpg"], (128, 64))   # images.shape [2, 3, 128, 64]
    """
    size, mode = [int(image_size[0]), int(image_size[1])], interpolation_mode(interpolation)

    def decode(path):
        try:
            image = TF.resize(read_image(path), size, interpolation=mode)
        except UnreadableImageError as err:
            return err
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)

    with ThreadPoolExecutor(max_workers=num_threads or min(8, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(decode, list(paths)))
    skipped = [i for i, image in enumerate(decoded) if isinstance(image, Exception)]
    if skipped:
        log.warning("%d unreadable image(s) left out, e.g. %s", len(skipped), decoded[skipped[0]])
    kept = [image for image in decoded if not isinstance(image, Exception)]
    images = torch.stack(kept) if kept else torch.zeros((0, 3, *size), dtype=torch.uint8)
    return images, skipped


GiB = 2**30
# What the image cache must leave free for training itself (weights, activations, Adam's moments,
# the allocator's fragmentation): a quarter of the memory plus 2 GiB.
KEEP_FRACTION, KEEP_BYTES = 0.25, 2 * GiB


def cache_bytes(num_images: int, image_size) -> int:
    """Bytes of the uint8 image cache: N x 3 x H x W.

    >>> round(cache_bytes(12936, (256, 128)) / GiB, 2)       # Market-1501's train set
    1.18
    """
    return int(num_images) * 3 * int(image_size[0]) * int(image_size[1])


def _usable(free: int, total: int) -> int:
    return int(free - KEEP_FRACTION * total - KEEP_BYTES)


def plan_image_cache(need: int, where: str, device_free: int, device_total: int,
                     host_free: int | None = None, host_total: int | None = None,
                     ranks_on_host: int = 1) -> tuple[bool, str]:
    """Whether an image cache of ``need`` bytes fits, and the log line that says so.

    It must fit on the device and, while it is decoded, in host RAM (every rank on the host
    decodes its own copy), each keeping 25% + 2 GiB free for training; ``host_free`` None skips
    the host check. A pure function: tests pass made-up numbers.

    >>> plan_image_cache(cache_bytes(12936, (256, 128)), "cuda:0", 79 * GiB, 80 * GiB)
    (True, 'image cache: 1.18 GiB on cuda:0')
    >>> plan_image_cache(10 * GiB, "cuda:0", 15 * GiB, 16 * GiB)[1]
    'image cache off: needs 10.00 GiB, 15.00 GiB free on cuda:0 (25% + 2 GiB kept for training); using the DataLoader'
    """
    host_need = need * max(1, ranks_on_host)
    if need > _usable(device_free, device_total):
        short = f"{device_free / GiB:.2f} GiB free on {where}"
    elif host_free is not None and host_total is not None and host_need > _usable(host_free, host_total):
        short = f"{host_free / GiB:.2f} GiB free in host RAM to decode it"
        need = host_need
    else:
        return True, f"image cache: {need / GiB:.2f} GiB on {where}"
    return False, (f"image cache off: needs {need / GiB:.2f} GiB, {short} (25% + 2 GiB kept for training); "
                   "using the DataLoader")


def _all_ranks_agree(fits: bool, runtime: Runtime) -> bool:
    """True only when every rank's cache fits: the ranks must take the same path (stage 1 gathers
    features over ranks on the DataLoader path only)."""
    if not runtime.distributed or not dist.is_initialized():
        return fits
    flag = torch.tensor(int(fits), device=runtime.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def make_image_cache(dataset, cfg, runtime: Runtime):
    """On CUDA (and ``data.gpu_augment``): every training image decoded once into a uint8 tensor
    on the GPU, shared by stage 1's feature cache and stage 2's augmentation; None elsewhere, and
    None (the DataLoader path, one log line says why) when it would not leave room for training."""
    if runtime.device.type != "cuda" or not cfg.data.gpu_augment:
        return None
    need = cache_bytes(len(dataset.train), cfg.model.image_size)
    fits, line = plan_image_cache(need, str(runtime.device), *device_memory(runtime.device), *host_memory(),
                                  ranks_on_host=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    agreed = _all_ranks_agree(fits, runtime)     # every rank calls it once: a collective
    if fits and not agreed:
        line = "image cache off: another rank's device has no room for it; using the DataLoader"
    if runtime.is_main:
        log.info(line)
    if not agreed:
        return None
    return TrainImageCache(dataset.train, cfg.model.image_size,
                           interpolation=cfg.data.interpolation).to(runtime.device)


class TrainBatches:
    """P x K batches of augmented training images, from a DataLoader (CPU) or a GPU-resident
    uint8 cache augmented on the device (CUDA; the data pipeline then costs almost nothing)."""

    def __init__(self, dataset, cfg, runtime: Runtime, image_cache=None):
        pids = [pid for _, pid, _ in dataset.train]
        s = cfg.stage2
        if runtime.distributed:
            self.sampler = DistributedIdentitySampler(pids, batch_size=s.ims_per_batch,
                                                      num_instance=s.num_instance, seed=cfg.seed,
                                                      rank=runtime.rank, world_size=runtime.world_size)
        else:
            self.sampler = RandomIdentitySampler(pids, batch_size=s.ims_per_batch,
                                                 num_instance=s.num_instance, seed=cfg.seed)
        self.batch_size = s.ims_per_batch // runtime.world_size
        self.cfg, self.runtime = cfg, runtime
        self.items = dataset.train
        self.cache = image_cache
        # View ids (-1: none) by train index, for view SIE. An unreadable image replaced by another of
        # the same identity (on either path) keeps its own view label: the one item's label is off.
        self.views = torch.tensor(dataset.view_ids(dataset.train), dtype=torch.long)
        if self.cache is not None:
            self.labels, self.cams = self.cache.pids, self.cache.camids
            self.views = self.views.to(runtime.device)
        else:
            self.dataset = ImageDataset(self.items, build_transforms(cfg.data, cfg.model.image_size, train=True))

    def epoch(self, epoch: int):
        """Yield (images, pids, camids, views) on the device for one epoch (views -1: none)."""
        self.sampler.set_epoch(epoch)
        device = self.runtime.device
        if self.cache is not None:
            indices = torch.tensor(list(iter(self.sampler)), device=device)
            generator = torch.Generator(device=device).manual_seed(self._seed(epoch))
            for batch in indices.split(self.batch_size):
                if len(batch) < self.batch_size:
                    break
                images = gpu_train_augment(self.cache.images[batch], self.cfg.data, generator=generator)
                yield images, self.labels[batch], self.cams[batch], self.views[batch]
            return
        generator = torch.Generator().manual_seed(self._seed(epoch))
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                            num_workers=self.cfg.data.num_workers, drop_last=True, generator=generator,
                            pin_memory=device.type == "cuda",
                            persistent_workers=False)
        for images, pids, camids, index in loader:
            yield (images.to(device, non_blocking=True), pids.to(device, non_blocking=True),
                   camids.to(device, non_blocking=True), self.views[index].to(device, non_blocking=True))

    def _seed(self, epoch: int) -> int:
        """The augmentation seed of ``epoch`` on this rank (the sampler's own seed is shared by all
        ranks, so that their identities do not overlap)."""
        return epoch_seed(self.cfg.seed, 2, epoch, self.runtime.rank)

    @property
    def unreadable_indices(self) -> list[int]:
        """Training items found unreadable so far (replaced by another image of the same person)."""
        return (self.cache if self.cache is not None else self.dataset).unreadable_indices

    def num_batches(self, epoch: int) -> int:
        self.sampler.set_epoch(epoch)
        return len(self.sampler) // self.batch_size
