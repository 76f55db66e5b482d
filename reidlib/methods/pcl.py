"""PCL-CLIP (Li & Gong, "Prototypical Contrastive Learning-based CLIP Fine-tuning for Object
Re-identification", arXiv 2310.17218; public code github.com/RikoLi/PCL-CLIP): CLIP's image
encoder fine-tuned against a memory of identity prototypes, one stage, no text.

What it trains, as the public code does (``pcl/model.py``, ``pcl/loss.py``, ``pcl/processor_pcl.py``):

* **Model** (:class:`PCLModel`): CLIP's image tower (reidlib's :func:`~reidlib.model.backbone.reid_image_tower`)
  with a BatchNorm on the CLS feature after ``ln_post`` (``f``, 768-d) and one on its projection
  (``f_proj``, 512-d), biases frozen at 0; the feature is their concatenation (1280-d), fed to a
  bias-free classifier (init N(0, 0.001)). The ViT's patch projection (``conv1``) stays frozen
  (the public code's stability trick, after MoCo v3). No text tower is built.
* **Memory** (:func:`class_centroids`): at the start of every epoch, every training image (test
  transform, eval mode, no gradient) -> the BN'd feature, L2-normalised -> each identity's mean,
  L2-normalised. After every step the row of each identity in the batch moves toward its *hardest*
  sample (least similar to the row): ``m <- mu m + (1 - mu) x``, renormalised (:func:`update_memory`).
* **Loss** (:func:`pcl_loss`): ``pcl_weight`` x CE(normalised features . memory^T / temperature)
  + ``id_weight`` x label-smoothed CE of the classifier (``stage2.label_smoothing``).
* **Optimiser and schedule**: SGD with momentum (``options.sgd_momentum``) on ``stage2.lr``,
  ``stage2.weight_decay``; linear warm-up then x ``gamma`` at ``stage2.steps``, the epochs counted
  as the public code steps its scheduler (at the end of each epoch: the first epoch trains at
  ``warmup_factor``). An epoch is ``options.iters_per_epoch`` P x K batches (its IterLoader's 200;
  0 = one pass of the sampler, reidlib's usual epoch).

Resume: the memory is rebuilt from the weights at every epoch start, so it needs no checkpoint and
a run resumed at an epoch boundary is bit-identical on the CPU. Under torchrun every rank encodes
a shard of the train set, the shards are gathered in order and every rank computes the same
centroids from the same tensor; each step's hardest samples are picked from the gathered batch of
all ranks, so the memories stay equal. The centroids are summed on the CPU, where the sum's order
is fixed.

RN50 (``rn50_pcl``, not in the public code): the same design on reidlib's ResNet tower gives
[BN(pooled layer4) | BN(attention pool)], 3072-d, with nothing frozen. ``model.pretrained`` may
name a trained re-ID model (any method's): its image encoder and BNs are taken, the classifier is new.

Settings: ``stage2.*`` (batch, LR, schedule, epochs), ``model.*`` (architecture, input size,
stride, ``neck_feat`` for the test feature), ``options.*`` (:class:`PCLOptions`). Shipped configs:
``vit_pcl``, ``rn50_pcl`` (docs/methods/pcl_clip.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..data import ImageDataset, build_transforms, test_tensor_transform
from ..losses import cross_entropy_ls
from ..model.backbone import ReIDViT, reid_image_tower
from ..model.reid import WeightsMismatch, describe_mismatch, load_start_clip
from ..optim import stage2_schedule
from ..runtime import Runtime, gather_tensor, shard
from ..weights.finetune import take_trained_weights
from .base import ImageBatchStage, Method, StageContext, weight_and_bias_groups
from .registry import register_method

# --------------------------------------------------------------------------- the model


class PCLModel(nn.Module):
    """CLIP's image tower + two BatchNorms (biases frozen) + one bias-free classifier on their
    concatenation, as the public code's ``TransReID`` (``pcl/model.py``) without SIE.

    ``forward`` (training) gives ``feat`` (the BN'd concatenation the losses use) and ``logits``;
    :meth:`encode_image` gives the test feature, after the BNs (the public code's) with
    ``model.neck_feat=after``, before them with ``before``.

    Example::

        model = build_pcl_model(load_config("tiny", ["method=pcl"]), num_classes=12)
        out = model(torch.randn(4, 3, 128, 64))          # {"feat": [4, 96], "logits": [4, 12]}
        model.eval().encode_image(torch.randn(2, 3, 128, 64)).shape    # [2, 96]
    """

    uses_sie = False      # features do not depend on cameras or views
    uses_lora = False
    sie_cameras = 0
    sie_views = 0

    def __init__(self, clip, model_cfg, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.visual = reid_image_tower(clip.visual, tuple(model_cfg.image_size), model_cfg.stride)
        width, embed = self.visual.width, self.visual.embed_dim
        self.bottleneck, self.bottleneck_proj = nn.BatchNorm1d(width), nn.BatchNorm1d(embed)
        for bn in (self.bottleneck, self.bottleneck_proj):     # weight 1, bias 0 and frozen
            bn.bias.requires_grad_(False)
        self.classifier = nn.Linear(width + embed, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)
        self.num_classes, self.feature_dim, self.embed_dim = num_classes, width + embed, embed
        self.neck_feat = model_cfg.neck_feat

    def frozen_names(self) -> set[str]:
        """Parameters that never train: the BN biases, and the ViT's patch projection."""
        names = {"bottleneck.bias", "bottleneck_proj.bias"}
        if isinstance(self.visual, ReIDViT):
            names |= {f"visual.vit.conv1.{n}" for n, _ in self.visual.vit.conv1.named_parameters()}
        return names

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[BN(f) | BN(f_proj)]: the feature the losses and the memory use (batch statistics in
        train mode, running ones in eval mode)."""
        _, f, f_proj = self.visual(x)
        return torch.cat([self.bottleneck(f), self.bottleneck_proj(f_proj)], dim=1)

    def forward(self, x: torch.Tensor, labels=None, cams=None, views=None) -> dict:
        """Training outputs: ``feat`` [B, feature_dim] and ``logits`` [B, num_classes]
        (``labels``, ``cams`` and ``views`` are accepted as the engine passes them, and unused)."""
        feat = self.features(x)
        return {"feat": feat, "logits": self.classifier(feat)}

    def encode_image(self, x: torch.Tensor, cams=None, views=None) -> torch.Tensor:
        """The test feature [B, feature_dim] (cameras and views do not change it)."""
        if self.neck_feat == "after":
            return self.features(x)
        _, f, f_proj = self.visual(x)
        return torch.cat([f, f_proj], dim=1)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` with a one-line :class:`~reidlib.model.reid.WeightsMismatch`."""
        problem = describe_mismatch(self.state_dict(), state_dict, strict)
        if problem:
            raise WeightsMismatch(f"the weights do not fit this PCL-CLIP model: {problem}; were they trained "
                                  "with another config (model.*), data set (identities) or method?")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def build_pcl_model(cfg, num_classes: int) -> PCLModel:
    """The PCL-CLIP model of ``cfg``: CLIP's weights (``model.pretrained``), or the image encoder
    and BNs of a trained re-ID model (any method's, or the CLIP-ReID reference's) with a new
    classifier."""
    clip, source = load_start_clip(cfg.model, needs_text=False)     # no prompts to learn: any source
    model = PCLModel(clip, cfg.model, num_classes)     # the text tower is dropped with ``clip``
    if source is not None:
        take_trained_weights(model, source)
    return model


# --------------------------------------------------------------------------- memory and loss


def class_centroids(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """L2-normalised mean of the L2-normalised ``feats`` of each class (the public code's
    ``compute_cluster_centroids``): [num_classes, D] float32 on ``feats``' device. Summed in
    float64 on the CPU, in a fixed order (every rank, every resume, the same bits).

    >>> class_centroids(torch.tensor([[3., 4.], [0., 2.], [1., 0.]]), torch.tensor([0, 0, 1]), 2)
    tensor([[0.3162, 0.9487],
            [1.0000, 0.0000]])
    """
    x = F.normalize(feats.detach().double().cpu(), dim=1)
    labels = labels.cpu()
    counts = torch.bincount(labels, minlength=num_classes)
    if bool((counts == 0).any()):
        raise ValueError(f"class {int((counts == 0).nonzero()[0])} has no training image: the memory needs "
                         "every identity 0..C-1")
    sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64).index_add_(0, labels, x)
    return F.normalize(sums / counts[:, None], dim=1).float().to(feats.device)


@torch.no_grad()
def update_memory(memory: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, momentum: float) -> None:
    """In place: the row of each class in ``labels`` moves toward that class's hardest sample in
    the batch, the one with the lowest dot product with the row (the first on a tie), then is
    renormalised: ``m <- momentum m + (1 - momentum) x`` (the public code's ``CM_Hard.backward``).
    ``feats`` are the batch's L2-normalised features.

    >>> memory = torch.tensor([[1., 0.], [0., 1.]])
    >>> update_memory(memory, torch.tensor([[1., 0.], [0., 1.]]), torch.tensor([1, 1]), 0.5)
    >>> memory
    tensor([[1.0000, 0.0000],
            [0.7071, 0.7071]])
    """
    feats = feats.to(memory.dtype)
    classes, inverse = labels.unique(return_inverse=True)        # sorted; no class twice
    sims = (feats * memory[labels]).sum(1).nan_to_num(nan=-float("inf"))   # NaN is the hardest, as np.argmin
    lowest = torch.full((len(classes),), float("inf"), dtype=sims.dtype, device=sims.device)
    lowest = lowest.scatter_reduce(0, inverse, sims, "amin")
    position = torch.arange(len(labels), device=labels.device)
    candidate = torch.where(sims == lowest[inverse], position, len(labels))
    first = torch.full((len(classes),), len(labels), device=labels.device).scatter_reduce(0, inverse, candidate, "amin")
    moved = momentum * memory[classes] + (1 - momentum) * feats[first]
    memory[classes] = F.normalize(moved, dim=1)


def pcl_loss(feat: torch.Tensor, memory: torch.Tensor, labels: torch.Tensor, temperature: float):
    """(prototypical contrastive loss, the L2-normalised features): cross-entropy of the cosine
    similarities to every identity's prototype over ``temperature``, against the identity.
    In fp32, also under autocast (the public code's mm runs in fp16 under its AMP).

    >>> loss, _ = pcl_loss(torch.tensor([[2., 0.]]), torch.eye(2), torch.tensor([0]), 1.0)
    >>> round(loss.item(), 4)                                   # -log(e / (e + 1))
    0.3133
    """
    with torch.autocast(device_type=feat.device.type, enabled=False):
        x = F.normalize(feat.float(), dim=1)
        return F.cross_entropy(x @ memory.t() / temperature, labels), x.detach()


@torch.no_grad()
def train_set_features(model: PCLModel, items, cfg, runtime: Runtime, image_cache=None):
    """The memory's input: ``model.features`` (eval mode, no gradient, the run's autocast) of every
    training item under the test transform, and their labels, in item order on the device. Each
    rank encodes a contiguous shard (of the device image cache when it was resized with the test
    interpolation, else read with a DataLoader); the shards are gathered in rank order."""
    indices = list(shard(len(items), runtime))
    feats, labels = [], []
    was_training = model.training
    model.eval()
    try:
        if image_cache is not None and cfg.data.interpolation == cfg.data.test_interpolation:
            index = torch.tensor(indices, dtype=torch.long, device=image_cache.images.device)
            for batch in index.split(cfg.test.batch_size):
                with runtime.autocast():
                    feats.append(model.features(test_tensor_transform(image_cache.images[batch], cfg.data)).float())
                labels.append(image_cache.pids[batch])
        else:
            images = ImageDataset(items, build_transforms(cfg.data, cfg.model.image_size, train=False))
            loader = DataLoader(Subset(images, indices), batch_size=cfg.test.batch_size, shuffle=False,
                                num_workers=cfg.data.num_workers, generator=torch.Generator(),
                                pin_memory=runtime.device.type == "cuda")
            for batch, pids, _, _ in loader:
                with runtime.autocast():
                    feats.append(model.features(batch.to(runtime.device, non_blocking=True)).float())
                labels.append(pids.to(runtime.device))
    finally:
        model.train(was_training)
    dim = model.feature_dim
    local_feats = torch.cat(feats) if feats else torch.zeros(0, dim, device=runtime.device)
    local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=runtime.device)
    return gather_tensor(local_feats, runtime), gather_tensor(local_labels, runtime)


# --------------------------------------------------------------------------- the stage


@dataclass
class PCLOptions:
    pcl_weight: float = field(default=1.0, metadata={"help": "weight of the prototypical contrastive loss"})
    id_weight: float = field(default=0.25, metadata={"help": "weight of the label-smoothed ID loss (0: off)"})
    temperature: float = field(default=0.05, metadata={"help": "temperature of the contrastive loss"})
    momentum: float = field(default=0.2, metadata={
        "help": "memory momentum mu: a prototype keeps mu of itself at each update"})
    sgd_momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    iters_per_epoch: int = field(default=0, metadata={
        "help": "P x K batches per epoch (the public code's 200; 0 = one pass of the sampler)"})


# Pass k > 0 of an epoch draws the sampler and augmentation of "epoch" epoch + k * PASS_STRIDE: no
# run has that many epochs, so no two passes of a run share their draws.
PASS_STRIDE = 1_000_003


class FixedLengthBatches:
    """``iters`` P x K batches per epoch, as the public code's IterLoader: each epoch starts a new
    pass of the sampler and starts another whenever one runs out. Pass 0 of epoch e is
    ``batches``' epoch e (so a one-pass epoch is the usual one), pass k is its ``e + k * PASS_STRIDE``:
    each epoch depends on its number only, as resuming needs."""

    def __init__(self, batches, iters: int):
        self.batches, self.iters = batches, iters

    def epoch(self, epoch: int):
        left, number = self.iters, epoch
        while left > 0:
            before = left
            for batch in self.batches.epoch(number):
                yield batch
                left -= 1
                if left == 0:
                    return
            if left == before:
                raise ValueError("the P x K sampler gave no batch: lower stage2.ims_per_batch")
            number += PASS_STRIDE

    def num_batches(self, epoch: int) -> int:
        return self.iters

    @property
    def unreadable_indices(self) -> list[int]:
        return self.batches.unreadable_indices


class PCLStage(ImageBatchStage):
    """P x K batches; loss = pcl_weight x the memory's contrastive CE + id_weight x ID CE."""

    def __init__(self, options: PCLOptions, label_smoothing: float = 0.1):
        super().__init__(number=1, name="image encoder")
        self.opt, self.label_smoothing = options, label_smoothing
        self.memory: torch.Tensor | None = None     # [num_classes, feature_dim], rebuilt every epoch
        self.memory_seconds = 0.0

    def trainable(self, model):
        frozen = model.frozen_names()
        for name, param in model.named_parameters():
            param.requires_grad_(name not in frozen)
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def optimizer(self, params, ctx: StageContext):
        """SGD with momentum; weights and biases in the base stage's groups (the public code has
        one LR and one decay for all: ``stage2.bias_lr_factor`` 1 and ``weight_decay_bias`` =
        ``weight_decay`` in vit_pcl)."""
        base_lr = self.base_lr(ctx.cfg, ctx.model)
        groups = weight_and_bias_groups(params, base_lr, ctx.cfg.stage2)
        return torch.optim.SGD(groups, lr=base_lr, momentum=self.opt.sgd_momentum)

    def schedule(self, cfg):
        """The public code steps WarmupMultiStepLR at the end of each epoch: epoch e (from 1)
        trains at its value for e - 1 (the first at ``warmup_factor``, x gamma from the epoch
        after each step)."""
        s = cfg.stage2
        shifted = stage2_schedule(milestones=tuple(s.steps), gamma=s.gamma, warmup_epochs=s.warmup_epochs,
                                  warmup_factor=s.warmup_factor)
        return lambda epoch, base_lr: shifted(epoch - 1, base_lr)

    def prepare(self, ctx: StageContext, optimizer) -> None:
        super().prepare(ctx, optimizer)
        if self.opt.iters_per_epoch:
            self.batches = FixedLengthBatches(self.batches, self.opt.iters_per_epoch)

    def start_epoch(self, ctx: StageContext, epoch: int) -> None:
        started = time.time()
        feats, labels = train_set_features(ctx.model, ctx.dataset.train, ctx.cfg, ctx.runtime, ctx.image_cache)
        self.memory = class_centroids(feats, labels, ctx.model.num_classes)
        self.memory_seconds = time.time() - started

    def loss(self, out: dict, pids: torch.Tensor):
        contrastive, self._normalised = pcl_loss(out["feat"], self.memory, pids, self.opt.temperature)
        total = self.opt.pcl_weight * contrastive
        parts = {"pcl_loss": contrastive.detach()}
        if self.opt.id_weight > 0:
            ident = cross_entropy_ls(out["logits"], pids, self.label_smoothing)
            total = total + self.opt.id_weight * ident
            parts["id_loss"] = ident.detach()
        return total, parts

    def after_step(self, ctx: StageContext, pids: torch.Tensor) -> None:
        feats, labels = gather_tensor(self._normalised, ctx.runtime), gather_tensor(pids, ctx.runtime)
        update_memory(self.memory, feats, labels, self.opt.momentum)

    def train_epoch(self, ctx: StageContext, optimizer, epoch: int) -> dict:
        record = super().train_epoch(ctx, optimizer, epoch)
        record["memory_s"] = self.memory_seconds      # rebuilding the memory (not in img_per_s)
        return record


# --------------------------------------------------------------------------- the method


@register_method
class PCL(Method):
    name = "pcl"
    summary = "PCL-CLIP (Li & Gong, arXiv 2310.17218): image encoder vs a memory of identity prototypes, no text"
    config = "vit_pcl"
    Options = PCLOptions

    def check(self, cfg):
        opt = self.options(cfg)
        if cfg.model.sie_camera or cfg.model.sie_view:
            key = "model.sie_camera" if cfg.model.sie_camera else "model.sie_view"
            raise ValueError(f"{key}=true: method pcl has no SIE (nor has PCL-CLIP's config); set {key}=false")
        if cfg.model.lora.enabled:
            raise ValueError("model.lora.enabled=true: method pcl fine-tunes the whole image encoder; "
                             "set model.lora.enabled=false")
        if cfg.model.prompt != "clipreid":
            raise ValueError(f"model.prompt={cfg.model.prompt}: method pcl has no text tower and no prompts; "
                             "set model.prompt=clipreid (ignored) or method=thesis")
        if opt.temperature <= 0:
            raise ValueError(f"options.temperature={opt.temperature}: must be > 0 (PCL-CLIP: 0.05)")
        if not 0 <= opt.momentum < 1:
            raise ValueError(f"options.momentum={opt.momentum}: the memory momentum lies in [0, 1) (PCL-CLIP: 0.2)")
        if opt.iters_per_epoch < 0 or opt.pcl_weight < 0 or opt.id_weight < 0:
            bad = next(k for k in ("iters_per_epoch", "pcl_weight", "id_weight") if getattr(opt, k) < 0)
            raise ValueError(f"options.{bad}={getattr(opt, bad)}: must be >= 0")

    def build_model(self, cfg, num_classes: int, num_cameras: int = 0, num_views: int = 0) -> PCLModel:
        return build_pcl_model(cfg, num_classes)

    def stages(self, cfg):
        return [PCLStage(self.options(cfg), cfg.stage2.label_smoothing)]
