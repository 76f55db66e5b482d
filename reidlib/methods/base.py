"""What a training method is: a model to build and a list of stages, each of which says what
trains, with which optimizer and for how many epochs, and how one epoch goes.

The engine (:mod:`reidlib.engine.loop`) runs any method's stages in order and owns what they share:
resuming (a checkpoint names its stage and epoch), checkpoints every ``checkpoint_period`` epochs,
the non-finite loss and weight checks, DDP, logging to ``metrics.jsonl`` and evaluation every
``eval_period`` epochs. A method holds no loop of its own beyond one epoch.

A method that trains the image encoder on P x K batches with a loss of its own needs little
more than :class:`ImageBatchStage` and a ``loss``::

    from reidlib.losses import cross_entropy_ls, triplet_hard
    from reidlib.methods import ImageBatchStage, Method, register_method

    class IDTriplet(ImageBatchStage):
        def loss(self, out, pids):
            ce = cross_entropy_ls(out["logits"][0], pids)
            tri = triplet_hard(out["feats"][1], pids)
            return ce + tri, {"id_loss": ce.detach(), "tri_loss": tri.detach()}

    @register_method
    class Plain(Method):
        name, summary = "plain", "image encoder with ID + triplet, no text"
        def stages(self, cfg):
            return [IDTriplet(number=1, name="image encoder")]

Settings a method adds go in an ``Options`` dataclass; users set them as ``options.NAME=value``
and the method reads them typed with :meth:`Method.options`.
"""
from __future__ import annotations

import dataclasses
import difflib
import time
from dataclasses import dataclass
from typing import Any, get_type_hints

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..config import Config, coerce
from ..data import TrainBatches
from ..model import build_model, parameter_table, set_trainable
from ..optim import LossWatch, set_epoch_lr, stage2_schedule
from ..runtime import Runtime, epoch_seed


@dataclass
class StageContext:
    """What a stage works on: the model, the data set, the config and the runtime (device, rank,
    precision, run folder); ``image_cache`` is the device-resident train set when there is one."""
    model: nn.Module
    dataset: Any
    cfg: Config
    runtime: Runtime
    image_cache: Any = None


class Stage:
    """One stage of a method. ``number`` (1, 2, ...) names its checkpoints and log records.

    The engine calls, in this order: :meth:`trainable` (sets ``requires_grad``), :meth:`optimizer`,
    (the optimizer's state is restored on resume), :meth:`prepare`, then :meth:`train_epoch` for
    each epoch left. :meth:`skip` lets a stage stand aside for something else that gives its result
    (CLIP-ReID's prompts loaded from another run) when the run is not resuming.
    """

    def __init__(self, number: int = 1, name: str = "train"):
        self.number, self.name = number, name

    # what and how long
    def epochs(self, cfg: Config) -> int:
        """Epochs of this stage (default: ``stage2.epochs``, the image-encoder stage's key)."""
        return cfg.stage2.epochs

    def checkpoint_period(self, cfg: Config) -> int:
        return cfg.stage2.checkpoint_period

    def eval_period(self, cfg: Config) -> int:
        """Evaluate on query/gallery every N epochs (0: only the final model is tested)."""
        return 0

    def lr_key(self, cfg: Config, model) -> str:
        """The config key to lower when a loss turns non-finite (named in the error)."""
        return "stage2.lr"

    def trainable(self, model) -> list[tuple[str, nn.Parameter]]:
        raise NotImplementedError(f"{type(self).__name__}.trainable: return the (name, parameter) pairs that train")

    def optimizer(self, params, ctx: StageContext) -> torch.optim.Optimizer:
        raise NotImplementedError(f"{type(self).__name__}.optimizer: build the stage's optimizer")

    def skip(self, ctx: StageContext) -> bool:
        """True to leave this stage out of a fresh run (after loading what it would have made)."""
        return False

    def prepare(self, ctx: StageContext, optimizer) -> None:
        """Set-up before the first epoch left (caches, batches, DDP wrapping)."""

    def train_epoch(self, ctx: StageContext, optimizer, epoch: int) -> dict:
        """Train epoch ``epoch`` (0-based); return its log record (``stage``, ``epoch``, ``loss``, ``lr``...)."""
        raise NotImplementedError(f"{type(self).__name__}.train_epoch")

    @property
    def unreadable_indices(self) -> list[int]:
        """Training images this stage found unreadable (each replaced by another of the same person)."""
        return []


def wrap_for_training(module: nn.Module, runtime: Runtime, compile_model: bool = False) -> nn.Module:
    """``module`` as a training step calls it: under DDP when the run has several processes, and
    compiled when asked on CUDA."""
    if runtime.distributed:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        module = DistributedDataParallel(module, device_ids=ids)
    if compile_model and runtime.device.type == "cuda":
        module = torch.compile(module)
    return module


def optimizer_step(loss: torch.Tensor, optimizer, runtime: Runtime) -> None:
    """Backward and update, through the run's GradScaler under fp16 (``runtime.scaler``).

    Example::

        with runtime.autocast():
            loss = model(x).square().mean()
        optimizer_step(loss, optimizer, runtime)
    """
    optimizer.zero_grad(set_to_none=True)
    scaler = runtime.scaler
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    # fp16's range: the loss is scaled up so that small gradients do not flush to zero; a step
    # whose gradients overflowed is skipped and the scale lowered
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def image_step(train_module, optimizer, compute_loss, images, pids, cams, views, runtime: Runtime):
    """One step on a batch of images: forward (under the run's autocast), loss, backward, update;
    returns the detached total loss and its parts (no host sync, except GradScaler's check for
    inf gradients under fp16 when the optimizer is not fused)."""
    with runtime.autocast():
        out = train_module(images, labels=pids, cams=cams, views=views)
    loss, parts = compute_loss(out, pids)
    optimizer_step(loss, optimizer, runtime)
    return loss.detach(), parts


def use_fused_adam(params) -> bool:
    """Adam's fused kernel (one launch for every tensor) when all ``params`` are on CUDA; tests
    force it on the CPU, where torch has it too (>= 2.4).

    >>> use_fused_adam([torch.zeros(1)])
    False
    """
    return all(p.is_cuda for p in params)


def weight_and_bias_groups(params, lr: float, s) -> list[dict]:
    """The reference's optimizer groups of the (name, parameter) pairs ``params``: weights at ``lr``
    with ``s.weight_decay``, biases at ``lr x s.bias_lr_factor`` with ``s.weight_decay_bias`` (``s``:
    the stage's config section); an empty group is left out.

    >>> from reidlib.config import Stage2Config
    >>> s = Stage2Config()
    >>> [(len(g["params"]), g["lr"]) for g in weight_and_bias_groups([("w", nn.Parameter(torch.ones(1)))], 0.1, s)]
    [(1, 0.1)]
    """
    weights = [p for name, p in params if not name.endswith("bias")]
    biases = [p for name, p in params if name.endswith("bias")]
    groups = [{"params": weights, "lr": lr, "weight_decay": s.weight_decay},
              {"params": biases, "lr": lr * s.bias_lr_factor, "weight_decay": s.weight_decay_bias}]
    return [g for g in groups if g["params"]]


class ImageBatchStage(Stage):
    """Epochs of P x K batches of augmented training images (``stage2.ims_per_batch`` and
    ``stage2.num_instance``), the LR following ``stage2``'s warm-up and steps. Subclasses give
    :meth:`loss`; :meth:`start_epoch` and :meth:`after_step` are there for methods that keep state
    beside the weights (a memory of class centres, say)."""

    def eval_period(self, cfg: Config) -> int:
        return cfg.stage2.eval_period

    def trainable(self, model):
        return set_trainable(model, "stage2")

    def optimizer(self, params, ctx: StageContext):
        """Adam with the reference's groups (:func:`weight_and_bias_groups`)."""
        base_lr = self.base_lr(ctx.cfg, ctx.model)
        groups = weight_and_bias_groups(params, base_lr, ctx.cfg.stage2)
        fused = use_fused_adam([p for g in groups for p in g["params"]])
        return torch.optim.Adam(groups, lr=base_lr, fused=fused or None)

    def base_lr(self, cfg: Config, model) -> float:
        return cfg.stage2.lr

    def schedule(self, cfg: Config):
        """epoch (from 1), base LR -> LR: linear warm-up, then x gamma at each step epoch."""
        s = cfg.stage2
        return stage2_schedule(milestones=tuple(s.steps), gamma=s.gamma, warmup_epochs=s.warmup_epochs,
                               warmup_factor=s.warmup_factor)

    def prepare(self, ctx: StageContext, optimizer) -> None:
        self.batches = TrainBatches(ctx.dataset, ctx.cfg, ctx.runtime, ctx.image_cache)
        self.module = wrap_for_training(ctx.model, ctx.runtime, ctx.cfg.compile)

    def loss(self, out: dict, pids: torch.Tensor):
        """(total loss, {name: detached part}) of the model's training outputs ``out`` for labels ``pids``."""
        raise NotImplementedError(f"{type(self).__name__}.loss")

    def start_epoch(self, ctx: StageContext, epoch: int) -> None:
        """Called after the epoch's LR and seed are set, before its first batch."""

    def after_step(self, ctx: StageContext, pids: torch.Tensor) -> None:
        """Called after each optimizer step."""

    def train_epoch(self, ctx: StageContext, optimizer, epoch: int) -> dict:
        cfg, runtime, model = ctx.cfg, ctx.runtime, ctx.model
        # Numbered from 1 as the reference (WarmupMultiStepLR steps once on construction and once per
        # epoch): the first epoch trains at factor 0.19, and "x0.1 at epoch 30" means the 30th epoch.
        set_epoch_lr(optimizer, epoch + 1, self.schedule(cfg))
        # augmentation and dropout draws, each rank its own (rank 0: a single process's)
        torch.manual_seed(epoch_seed(cfg.seed, self.number, epoch, runtime.rank))
        model.train()
        self.start_epoch(ctx, epoch)
        sums: dict[str, torch.Tensor] = {}
        steps, images_seen, started = 0, 0, time.time()
        use_cams, use_views = bool(getattr(model, "sie_cameras", 0)), bool(getattr(model, "sie_views", 0))
        epochs = self.epochs(cfg)
        bar = tqdm(self.batches.epoch(epoch), total=self.batches.num_batches(epoch), leave=False,
                   disable=not runtime.is_main, desc=f"stage {self.number} epoch {epoch + 1}/{epochs}")
        watch = LossWatch(runtime.device)
        hint = f"lower {self.lr_key(cfg, model)}"
        for images, pids, camids, views in bar:
            loss, parts = image_step(self.module, optimizer, self.loss, images, pids,
                                     camids if use_cams else None, views if use_views else None, runtime)
            self.after_step(ctx, pids)
            for name, value in {"loss": loss, **parts}.items():
                sums[name] = sums.get(name, 0) + value.float()
            steps += 1
            watch.update(loss, steps)
            images_seen += len(images) * runtime.world_size
            if steps % cfg.stage2.log_period == 0:
                watch.check(runtime, self.number, epoch + 1, hint)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                img_s=f"{images_seen / (time.time() - started):.0f}")
        watch.check(runtime, self.number, epoch + 1, hint)
        seconds = time.time() - started
        record = {"stage": self.number, "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                  "img_per_s": images_seen / max(seconds, 1e-9), "steps": steps}
        record.update({k: (v / max(steps, 1)).item() for k, v in sums.items()})
        return record

    @property
    def unreadable_indices(self) -> list[int]:
        batches = getattr(self, "batches", None)
        return batches.unreadable_indices if batches is not None else []


class Method:
    """A training method: the model it builds, its stages, its settings.

    Class attributes: ``name`` (the registry's key and the ``method`` config value), ``summary``
    (one line for ``python -m reidlib methods``), ``config`` (the shipped YAML, or a path, with its
    settings at full scale; None: the defaults), ``variants`` (more names a sweep accepts: name ->
    (a YAML instead of ``config``, or None; ``key=value`` settings on top)) and ``Options`` (a
    dataclass of the method's own keys, set as ``options.NAME=value``).
    """
    name: str = ""
    summary: str = ""
    config: str | None = None
    variants: dict[str, tuple[str | None, list[str]]] = {}
    Options: type | None = None

    def check(self, cfg: Config) -> None:
        """Raise ValueError (one line naming the key) for settings this method cannot train with."""
        self.options(cfg)

    def build_model(self, cfg: Config, num_classes: int, num_cameras: int = 0, num_views: int = 0) -> nn.Module:
        """The model this method trains (default: the shared CLIP re-ID model of ``cfg.model``)."""
        return build_model(cfg.model, num_classes=num_classes, num_cameras=num_cameras, num_views=num_views)

    def stages(self, cfg: Config) -> list[Stage]:
        raise NotImplementedError(f"method {self.name}: stages() must list the stages to train")

    def run_label(self, cfg: Config) -> str:
        """What runs of this method are called in tables and ``metrics.json`` (a variant's name)."""
        return self.name

    def options(self, cfg: Config):
        """The method's ``Options`` with ``cfg.options`` applied, typed; a one-line error names an
        unknown or badly typed key (None when the method has no options)."""
        known = {f.name: f for f in dataclasses.fields(self.Options)} if self.Options else {}
        unknown = [k for k in cfg.options if k not in known]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(known), n=1)
            hint = f"; did you mean options.{close[0]}?" if close else \
                f"; {self.name} takes {', '.join('options.' + k for k in known) or 'no options'}"
            raise ValueError(f"options.{unknown[0]} is not a setting of method {self.name}{hint}")
        if self.Options is None:
            return None
        types = get_type_hints(self.Options)
        values = {k: coerce(v, types[k], f"options.{k}") for k, v in cfg.options.items()}
        return self.Options(**values)

    def describe_options(self) -> list[str]:
        """``options.NAME = default  help`` lines (the dataclass fields' ``help`` metadata)."""
        if self.Options is None:
            return []
        return [f"options.{f.name} = {_default(f)!r}  {f.metadata.get('help', '')}".rstrip()
                for f in dataclasses.fields(self.Options)]

    def __repr__(self) -> str:
        return f"<method {self.name}: {self.summary}>"


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def log_parameters(model, runtime: Runtime, stage: Stage, log) -> None:
    if runtime.is_main:
        log.info("stage %d (%s) parameters:\n%s", stage.number, stage.name, parameter_table(model))
