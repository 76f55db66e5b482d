"""CLIP-ReID (Li, Sun, Li, "CLIP-ReID: Exploiting Vision-Language Model for Image Re-identification
without Concrete Text Labels", AAAI 2023, arXiv 2211.13977): the baseline.

Two stages on the shared CLIP re-ID model (:class:`reidlib.model.ReIDModel`):

1. **Prompts** (§3.2): CLIP frozen, each identity's learnable tokens in "A photo of a X X X X
   person." train with the image<->text contrastive loss. The image encoder does not change, so
   every training image's projected feature is computed once (test transform) and cached; an epoch
   shuffles the cache into batches. Adam, warm-up then cosine (spec §5).
2. **Image encoder** (§3.3): the prompts frozen, the text features of all identities act as a fixed
   classifier for the image-to-text loss, beside label-smoothed ID and batch-hard triplet losses on
   P x K batches. Adam with the reference's bias groups; warm-up, then x0.1 at the step epochs.

Settings: ``stage1.*``, ``stage2.*`` and ``model.*``; ``stage1_weights=RUN/...`` skips stage 1 and
takes its prompts from another run. The thesis's deep prompts and LoRA are :mod:`.thesis`.
"""
from __future__ import annotations

import time

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..data import ImageDataset, build_transforms, test_tensor_transform
from ..losses import Stage2Loss, stage1_loss
from ..model import set_trainable
from ..optim import LossWatch, stage1_scheduler
from ..runtime import Runtime, epoch_seed, gather_tensor, shard
from ..storage import load_checkpoint
from ..weights import read_trained, trained_folder
from .base import ImageBatchStage, Method, Stage, StageContext, optimizer_step, use_fused_adam
from .registry import register_method

# --------------------------------------------------------------------------- stage 1: prompts


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


def wrap_for_stage1(model, runtime: Runtime):
    step_module = _PromptStep(model)
    if runtime.distributed:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        step_module = DistributedDataParallel(step_module, device_ids=ids, broadcast_buffers=False)
    return step_module


def make_stage1_optimizer(params, cfg):
    """Adam on the prompts; fused on CUDA, where fp16's GradScaler then checks for inf gradients
    on the device instead of reading them back every step."""
    tensors = [p for _, p in params]
    return torch.optim.Adam(tensors, lr=cfg.stage1.lr, weight_decay=cfg.stage1.weight_decay,
                            fused=use_fused_adam(tensors) or None)


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
    optimizer_step(loss, optimizer, runtime)
    return loss.detach()


def train_stage1_epoch(model, step_module, optimizer, scheduler, feats, labels, epoch: int, cfg,
                       runtime: Runtime) -> dict:
    """One epoch over the cached features; returns the epoch's mean loss and LR."""
    # Epochs are numbered from 1 in the schedule, as the reference steps it (timm's
    # scheduler.step(epoch) with epoch = 1..N): the first epoch trains above warmup_lr.
    scheduler.step(epoch + 1)
    # rank 0's seed on every rank: all ranks cut the same batches and each takes its share
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


def load_stage1_prompts(model, path: str) -> None:
    """Take the prompt learner's weights from another run's stage-1 checkpoint or trained model
    (its model folder, or a reidlib 0.2 ``model_final.pt``)."""
    state = read_trained(path) if trained_folder(path) is not None else load_checkpoint(path, map_location="cpu")
    prompts = {k: v for k, v in state["model"].items() if k.startswith("prompts.")}
    if not prompts:
        raise ValueError(f"{path}: no prompt weights in this checkpoint; pass a stage-1 or final checkpoint")
    missing = model.load_state_dict(prompts, strict=False)
    if any(k.startswith("prompts.") for k in missing.missing_keys):
        raise ValueError(f"{path}: prompt shapes do not match this config (number of identities or prompt settings)")


class PromptStage(Stage):
    """Stage 1: the prompt learner trains on cached image features, CLIP frozen."""

    def epochs(self, cfg):
        return cfg.stage1.epochs

    def checkpoint_period(self, cfg):
        return cfg.stage1.checkpoint_period

    def lr_key(self, cfg, model):
        return "stage1.lr"

    def trainable(self, model):
        return set_trainable(model, "stage1")

    def optimizer(self, params, ctx):
        return make_stage1_optimizer(params, ctx.cfg)

    def skip(self, ctx):
        if not ctx.cfg.stage1_weights:
            return False
        load_stage1_prompts(ctx.model, ctx.cfg.stage1_weights)
        return True

    def prepare(self, ctx: StageContext, optimizer):
        cfg = ctx.cfg
        self.scheduler = make_stage1_scheduler(optimizer, cfg)
        # The GPU image cache is resized with the train interpolation; stage 1 wants the test one.
        same_resize = cfg.data.interpolation == cfg.data.test_interpolation
        self.images = stage1_images(ctx.dataset.train, cfg)
        self.feats, self.labels = cache_image_features(ctx.model, self.images, cfg, ctx.runtime,
                                                       ctx.image_cache if same_resize else None)
        self.step_module = wrap_for_stage1(ctx.model, ctx.runtime)

    def train_epoch(self, ctx, optimizer, epoch):
        return train_stage1_epoch(ctx.model, self.step_module, optimizer, self.scheduler, self.feats,
                                  self.labels, epoch, ctx.cfg, ctx.runtime)

    @property
    def unreadable_indices(self):
        images = getattr(self, "images", None)
        return images.unreadable_indices if images is not None else []


# --------------------------------------------------------------------------- stage 2: image encoder

def make_loss(cfg) -> Stage2Loss:
    s = cfg.stage2
    return Stage2Loss(id_weight=s.id_weight, tri_weight=s.tri_weight, i2t_weight=s.i2t_weight,
                      margin=s.margin, epsilon=s.label_smoothing)


class ImageEncoderStage(ImageBatchStage):
    """Stage 2: the image side trains with ID + triplet + image-to-text losses; prompts frozen."""

    def base_lr(self, cfg, model):
        return cfg.model.lora.lr if getattr(model, "uses_lora", False) else cfg.stage2.lr

    def lr_key(self, cfg, model):
        return "model.lora.lr" if getattr(model, "uses_lora", False) else "stage2.lr"

    def prepare(self, ctx, optimizer):
        self.text_feats = ctx.model.all_text_features().float()  # prompts are frozen from here on
        super().prepare(ctx, optimizer)
        self.loss_fn = make_loss(ctx.cfg)

    def loss(self, out, pids):
        return self.loss_fn(out["logits"], out["feats"], pids, out["f_proj"], self.text_feats)


# --------------------------------------------------------------------------- the method

@register_method
class CLIPReID(Method):
    name = "clipreid"
    summary = "CLIP-ReID (Li et al., AAAI 2023): learn identity prompts, then fine-tune the image encoder"
    config = "vit_clipreid"
    variants = {"baseline": (None, [])}

    def check(self, cfg):
        super().check(cfg)
        if cfg.model.prompt != "clipreid" or cfg.model.lora.enabled:
            key = "model.prompt=deep" if cfg.model.prompt != "clipreid" else "model.lora.enabled=true"
            raise ValueError(f"{key} is the thesis's addition to CLIP-ReID: set method=thesis "
                             "(python -m reidlib methods)")

    def stages(self, cfg):
        return [PromptStage(1, "prompts"), ImageEncoderStage(2, "image encoder")]

    def run_label(self, cfg):
        return "baseline"
