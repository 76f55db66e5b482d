"""Stage 2: fine-tune the image encoder (fully or through LoRA) with ID, triplet and i2t losses.

The text features of all identities, computed once after stage 1 with the prompts frozen, act as
a fixed classifier for the image-to-text loss (Li et al., CLIP-ReID, AAAI 2023, §3.3).
"""
from __future__ import annotations

import time

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..data import TrainBatches
from ..losses import Stage2Loss
from ..runtime import Runtime, epoch_seed
from .nonfinite import LossWatch
from .schedule import set_epoch_lr, stage2_schedule


def make_stage2_optimizer(params, cfg, uses_lora: bool):
    """Adam with the reference's groups: biases get LR x bias_lr_factor and their own decay."""
    s = cfg.stage2
    base_lr = cfg.model.lora.lr if uses_lora else s.lr
    weights = [p for name, p in params if not name.endswith("bias")]
    biases = [p for name, p in params if name.endswith("bias")]
    groups = [{"params": weights, "lr": base_lr, "weight_decay": s.weight_decay},
              {"params": biases, "lr": base_lr * s.bias_lr_factor, "weight_decay": s.weight_decay_bias}]
    groups = [g for g in groups if g["params"]]
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.Adam(groups, lr=base_lr, fused=fused or None)


def stage2_lr_schedule(cfg):
    """epoch, base LR -> LR: linear warm-up, then x gamma at each step epoch (spec §5)."""
    s = cfg.stage2
    return stage2_schedule(milestones=tuple(s.steps), gamma=s.gamma,
                           warmup_epochs=s.warmup_epochs, warmup_factor=s.warmup_factor)


def make_loss(cfg) -> Stage2Loss:
    s = cfg.stage2
    return Stage2Loss(id_weight=s.id_weight, tri_weight=s.tri_weight, i2t_weight=s.i2t_weight,
                      margin=s.margin, epsilon=s.label_smoothing)


def wrap_for_stage2(model, runtime: Runtime, compile_model: bool = False):
    module = model
    if runtime.distributed:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        module = DistributedDataParallel(model, device_ids=ids)
    if compile_model and runtime.device.type == "cuda":
        module = torch.compile(module)
    return module


def stage2_step(train_module, optimizer, loss_fn, text_feats, images, pids, cams, views,
                runtime: Runtime):
    """One P x K step; returns the detached total loss and its parts (no host sync)."""
    with runtime.autocast():
        out = train_module(images, labels=pids, cams=cams, views=views)
    loss, parts = loss_fn(out["logits"], out["feats"], pids, out["f_proj"], text_feats)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), parts


def train_stage2_epoch(model, train_module, optimizer, batches: TrainBatches, loss_fn, text_feats,
                       epoch: int, cfg, runtime: Runtime) -> dict:
    """One epoch of P x K batches; returns the epoch's mean losses, LR and throughput."""
    # Numbered from 1 as the reference (WarmupMultiStepLR steps once on construction and once per
    # epoch): the first epoch trains at factor 0.19, and "x0.1 at epoch 30" means the 30th epoch.
    set_epoch_lr(optimizer, epoch + 1, stage2_lr_schedule(cfg))
    torch.manual_seed(epoch_seed(cfg.seed, 2, epoch))  # augmentation and dropout draws
    model.train()
    sums: dict[str, torch.Tensor] = {}
    steps, images_seen, started = 0, 0, time.time()
    use_cams, use_views = bool(getattr(model, "sie_cameras", 0)), bool(getattr(model, "sie_views", 0))
    bar = tqdm(batches.epoch(epoch), total=batches.num_batches(epoch), leave=False, disable=not runtime.is_main,
               desc=f"stage 2 epoch {epoch + 1}/{cfg.stage2.epochs}")
    watch = LossWatch(runtime.device)
    hint = f"lower {'model.lora.lr' if getattr(model, 'uses_lora', False) else 'stage2.lr'}"
    for images, pids, camids, views in bar:
        loss, parts = stage2_step(train_module, optimizer, loss_fn, text_feats, images, pids,
                                  camids if use_cams else None, views if use_views else None, runtime)
        for name, value in {"loss": loss, **parts}.items():
            sums[name] = sums.get(name, 0) + value.float()
        steps += 1
        watch.update(loss, steps)
        images_seen += len(images) * runtime.world_size
        if steps % cfg.stage2.log_period == 0:
            watch.check(runtime, 2, epoch + 1, hint)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{images_seen / (time.time() - started):.0f}")
    watch.check(runtime, 2, epoch + 1, hint)
    seconds = time.time() - started
    record = {"stage": 2, "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
              "img_per_s": images_seen / max(seconds, 1e-9), "steps": steps}
    record.update({k: (v / max(steps, 1)).item() for k, v in sums.items()})
    return record
