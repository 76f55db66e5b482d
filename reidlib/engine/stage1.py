"""Stage 1: learn the text prompts with CLIP frozen (Li et al., CLIP-ReID, AAAI 2023, §3.2).

The image encoder is frozen, so every training image's projected feature is computed once
(eval mode, test transform) and cached; each epoch then shuffles the cache into batches and trains
the prompt learner with the image<->text contrastive loss.
"""
from __future__ import annotations

import time

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..data import ImageDataset, build_transforms, test_tensor_transform
from ..losses import stage1_loss
from ..runtime import Runtime, epoch_seed, gather_tensor, shard
from .nonfinite import LossWatch
from .schedule import stage1_scheduler


def stage1_images(items, cfg) -> ImageDataset:
    """The training images as stage 1 reads them: the test transform, unreadable ones replaced by
    another image of the same person (and listed in ``unreadable_indices``)."""
    return ImageDataset(items, build_transforms(cfg.data, cfg.model.image_size, train=False))


@torch.no_grad()
def cache_image_features(model, items, cfg, runtime: Runtime, image_cache=None):
    """Projected image features (no SIE) and labels of every training image, on the device.

    ``items``: (path, pid, camid) tuples, or their :func:`stage1_images` (to read which were
    unreadable afterwards). ``image_cache`` (a :class:`~reidlib.data.TrainImageCache` on the
    device, resized with the test interpolation) skips decoding: batches are normalised and
    encoded straight from it."""
    if image_cache is not None:
        return _features_from_cache(model, image_cache, cfg, runtime)
    dataset = items if isinstance(items, ImageDataset) else stage1_images(items, cfg)
    local = Subset(dataset, list(shard(len(dataset), runtime)))
    loader = DataLoader(local, batch_size=cfg.test.batch_size, shuffle=False,
                        num_workers=cfg.data.num_workers, pin_memory=runtime.device.type == "cuda")
    model.eval()
    feats, labels = [], []
    for images, pids, _, _ in tqdm(loader, desc="stage 1: caching image features", leave=False,
                                   disable=not runtime.is_main):
        with runtime.autocast():
            feats.append(model.image_proj_features(images.to(runtime.device, non_blocking=True)).float())
        labels.append(pids.to(runtime.device))
    return gather_tensor(torch.cat(feats), runtime), gather_tensor(torch.cat(labels), runtime)


def _features_from_cache(model, cache, cfg, runtime: Runtime):
    model.eval()
    feats = []
    for batch in torch.arange(len(cache), device=cache.images.device).split(cfg.test.batch_size):
        with runtime.autocast():
            images = test_tensor_transform(cache.images[batch], cfg.data)
            feats.append(model.image_proj_features(images).float())
    return torch.cat(feats), cache.pids


class _PromptStep(torch.nn.Module):
    """Text features of labels: the one forward stage 1 trains through (wrapped by DDP)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, labels):
        return self.model.encode_text(labels)


def make_stage1_optimizer(params, cfg):
    return torch.optim.Adam([p for _, p in params], lr=cfg.stage1.lr,
                            weight_decay=cfg.stage1.weight_decay)


def make_stage1_scheduler(optimizer, cfg):
    """Linear warm-up, then cosine (spec §5); build it after loading a resumed optimizer's state."""
    s = cfg.stage1
    return stage1_scheduler(optimizer, s.epochs, warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr,
                            min_lr=s.min_lr)


def stage1_step(step_module, optimizer, feats, labels, runtime: Runtime) -> torch.Tensor:
    """One prompt-learning step on cached image features; returns the detached loss."""
    with runtime.autocast():
        text = step_module(labels)
    loss = stage1_loss(feats, text.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_stage1_epoch(model, step_module, optimizer, scheduler, feats, labels, epoch: int, cfg,
                       runtime: Runtime) -> dict:
    """One epoch over the cached features; returns the epoch's mean loss and LR."""
    # Epochs are numbered from 1 in the schedule, as the reference steps it (timm's
    # scheduler.step(epoch) with epoch = 1..N): the first epoch trains above warmup_lr.
    scheduler.step(epoch + 1)
    generator = torch.Generator().manual_seed(epoch_seed(cfg.seed, 1, epoch))
    order = torch.randperm(len(feats), generator=generator).to(feats.device)
    batches = list(order.split(cfg.stage1.batch_size))  # the last batch may be short, never empty
    if len(batches) > 1 and len(batches[-1]) < runtime.world_size:
        # every rank needs a share of every batch (DDP steps together): fold a tiny tail in
        batches[-2:] = [torch.cat(batches[-2:])]
    model.train()
    loss_sum = torch.zeros((), device=feats.device)
    started = time.time()
    bar = tqdm(batches, desc=f"stage 1 epoch {epoch + 1}/{cfg.stage1.epochs}", leave=False,
               disable=not runtime.is_main)
    watch = LossWatch(feats.device)
    for step, batch in enumerate(bar):
        local = batch[runtime.rank::runtime.world_size]  # each rank takes its share of the batch
        loss = stage1_step(step_module, optimizer, feats[local], labels[local], runtime)
        loss_sum += loss
        watch.update(loss, step + 1)
        if (step + 1) % cfg.stage1.log_period == 0:
            watch.check(runtime, 1, epoch + 1, "lower stage1.lr")
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    watch.check(runtime, 1, epoch + 1, "lower stage1.lr")
    seconds = time.time() - started
    mean_loss = (loss_sum / len(batches)).item()
    return {"stage": 1, "epoch": epoch + 1, "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"],
            "prompts_per_s": len(feats) / max(seconds, 1e-9)}


def wrap_for_stage1(model, runtime: Runtime):
    step_module = _PromptStep(model)
    if runtime.distributed:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        step_module = DistributedDataParallel(step_module, device_ids=ids, broadcast_buffers=False)
    return step_module
