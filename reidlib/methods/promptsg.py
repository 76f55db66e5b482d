"""PromptSG (Yang et al., "A Pedestrian is Worth One Prompt: Towards Language Guidance Person
Re-Identification", CVPR 2024): language guidance from one pseudo-word per image, in one stage.

No official code is published (the repository the paper announces is empty); this is reidlib's own
reading of the paper's text. The model is :class:`reidlib.model.promptsg.PromptSGModel`:

* an **inversion network** maps the image's global embedding ``f_proj`` to a pseudo-token s*,
  spliced into "A photo of a s* person." and encoded by CLIP's **frozen** text tower (§4.1);
* a **multimodal interaction module** (MIM, §4.2): the prompt's embedding attends to the patch
  tokens (one cross-attention layer), the attention re-weights them, two transformer blocks follow;
* losses (Eq. 10): batch-hard triplet + label-smoothed ID + ``options.supcon_weight`` (0.5) x the
  symmetric supervised contrastive loss between ``f_proj`` and the composed prompt's embedding,
  positives = same identity (Eqs. 4-6);
* one stage (§5.1): Adam, ``stage2.lr`` (5e-6) for the image encoder and the heads,
  ``options.new_lr_factor`` (10: 5e-5) times it for the inversion network and the MIM, 60 epochs,
  x0.1 every 20, 16 identities x 4 images, 256 x 128;
* at test time the simplified prompt "A photo of a person." (embedding cached once) queries the MIM:
  the exported model is image-only. ``options.test_prompt=composed`` uses each image's own prompt.

What the paper leaves open is an option (``options.NAME=value``; ``python -m reidlib methods promptsg``
lists them, docs/methods/promptsg.md says why each default). The ID and triplet weights, the
margin and the label smoothing are the shared ``stage2.*`` keys. The paper's figures (Market-1501
94.6 mAP / 97.0 R1 with ViT-B/16) are the paper's; nothing here reproduces them yet.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..losses import cross_entropy_ls, supcon_loss, triplet_hard
from ..model.promptsg import CHOICES, build_promptsg_model
from .base import ImageBatchStage, Method, use_fused_adam, weight_and_bias_groups
from .registry import register_method

NEW_MODULES = ("inversion.", "mim.")
HEAD_WEIGHTS = ("bottleneck.weight", "bottleneck_proj.weight", "classifier.weight", "classifier_proj.weight")


@dataclass
class PromptSGOptions:
    supcon_weight: float = field(default=0.5, metadata={
        "help": "lambda of Eq. 10: weight of the symmetric supervised contrastive loss (the paper: 0.5)"})
    temperature: float = field(default=0.07, metadata={
        "help": "tau of the contrastive loss, on L2-normalised features (the paper names it only)"})
    new_lr_factor: float = field(default=10.0, metadata={
        "help": "LR of the inversion network and the MIM = stage2.lr x this (the paper: 5e-5 vs 5e-6)"})
    heads: int = field(default=8, metadata={"help": "attention heads of the MIM (cross-attention and blocks)"})
    blocks: int = field(default=2, metadata={
        "help": "transformer blocks after the cross-attention (the paper: 2; Table 5 ablates 0, 1, 2)"})
    kv_tokens: str = field(default="patches", metadata={
        "help": "keys and values of the cross-attention: patches (patch tokens in the joint space) | all (and f_proj)"})
    reweight: str = field(default="scale", metadata={
        "help": "the attention map re-weights the tokens entering the blocks: scale (x N x attention, mean 1) | none"})
    triplet_on: str = field(default="vit_mim", metadata={
        "help": "triplet features: vit_mim (CLS before the last block, CLS, MIM output) | mim (MIM's last 3 states)"})
    test_feature: str = field(default="f_mim", metadata={
        "help": "test feature: f_mim (concat CLS f and MIM output, as CLIP-ReID's) | mim (MIM output alone)"})
    test_prompt: str = field(default="simplified", metadata={
        "help": "MIM query at test time: simplified (cached 'A photo of a person.'; exports image-only) | composed"})


def model_options(opt: PromptSGOptions) -> dict:
    """The options the model is built with (keyword arguments of ``PromptSGModel``)."""
    return {k: getattr(opt, k) for k in ("heads", "blocks", "kv_tokens", "reweight", "triplet_on", "test_feature",
                                         "test_prompt")}


# --------------------------------------------------------------------------- the loss

def _fp32(x: torch.Tensor):
    if not torch.amp.is_autocast_available(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


def symmetric_supcon(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor,
                     temperature: float = 0.07) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_i2t, L_t2i) of Eqs. 4-6: supervised contrastive losses (Khosla et al. 2020) of the images
    against the batch's prompt embeddings and back; positives are the same identity's, the logits
    cosine similarities / ``temperature``. Each is minus the mean over rows of the mean
    log-softmax probability of the row's positives.

    >>> x = torch.eye(2)
    >>> [round(v.item(), 4) for v in symmetric_supcon(x, x, torch.tensor([0, 1]), temperature=1.0)]
    [0.3133, 0.3133]
    """
    with _fp32(image):
        a, b = F.normalize(image.float(), dim=1), F.normalize(text.float(), dim=1)
        return supcon_loss(a / temperature, b, labels, labels), supcon_loss(b / temperature, a, labels, labels)


class PromptSGLoss:
    """Eq. 10: tri_weight x TRI + id_weight x ID + supcon_weight x (L_i2t + L_t2i).

    ID = label-smoothed CE summed over both heads; TRI = batch-hard triplet summed over ``feats``
    (both as CLIP-ReID's). Returns ``(total, parts)`` with detached parts (no host sync)."""

    def __init__(self, cfg, opt: PromptSGOptions):
        s = cfg.stage2
        self.id_weight, self.tri_weight = s.id_weight, s.tri_weight
        self.margin, self.epsilon = s.margin, s.label_smoothing
        self.supcon_weight, self.temperature = opt.supcon_weight, opt.temperature

    def __call__(self, out: dict, pids: torch.Tensor):
        id_loss = sum(cross_entropy_ls(logits, pids, self.epsilon) for logits in out["logits"])
        tri_loss = sum(triplet_hard(f, pids, self.margin) for f in out["feats"])
        i2t, t2i = symmetric_supcon(out["f_proj"], out["text"], pids, self.temperature)
        total = self.id_weight * id_loss + self.tri_weight * tri_loss + self.supcon_weight * (i2t + t2i)
        return total, {"id": id_loss.detach(), "tri": tri_loss.detach(), "i2t": i2t.detach(), "t2i": t2i.detach()}


# --------------------------------------------------------------------------- the stage

def trainable_names(model) -> set[str]:
    """The image encoder, the inversion network, the MIM, the BNNeck weights and the classifiers;
    never the text tower (frozen in the whole framework, §4) or the BNNeck biases (kept at 0)."""
    return {n for n, _ in model.named_parameters() if n.startswith(("visual.",) + NEW_MODULES) or n in HEAD_WEIGHTS}


class PromptSGStage(ImageBatchStage):
    """The one stage: P x K batches, warm-up then x gamma at ``stage2.steps``, two LR groups."""

    def __init__(self, options: PromptSGOptions):
        super().__init__(number=1, name="image encoder + inversion network + MIM")
        self.opt = options

    def trainable(self, model):
        names = trainable_names(model)
        for name, param in model.named_parameters():
            param.requires_grad_(name in names)
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def optimizer(self, params, ctx):
        """Adam; the new modules at ``stage2.lr x new_lr_factor``, the rest at ``stage2.lr``; biases
        at ``bias_lr_factor`` x their group's LR with their own decay, as the reference's groups."""
        s = ctx.cfg.stage2
        groups = []
        for new, lr in ((False, s.lr), (True, s.lr * self.opt.new_lr_factor)):
            chosen = [(n, p) for n, p in params if n.startswith(NEW_MODULES) == new]
            groups += weight_and_bias_groups(chosen, lr, s)
        fused = use_fused_adam([p for g in groups for p in g["params"]])
        return torch.optim.Adam(groups, lr=s.lr, fused=fused or None)

    def prepare(self, ctx, optimizer):
        super().prepare(ctx, optimizer)
        self.loss_fn = PromptSGLoss(ctx.cfg, self.opt)

    def loss(self, out, pids):
        return self.loss_fn(out, pids)


# --------------------------------------------------------------------------- the method

@register_method
class PromptSG(Method):
    name = "promptsg"
    summary = "PromptSG (Yang et al., CVPR 2024; from the paper, no official code): one-stage pseudo-word prompts + MIM"
    config = "vit_promptsg"
    Options = PromptSGOptions

    def check(self, cfg):
        opt = self.options(cfg)
        for key, choices in CHOICES.items():
            if getattr(opt, key) not in choices:
                raise ValueError(f"options.{key}={getattr(opt, key)}: use {' or '.join(choices)}")
        ranges = (("temperature", opt.temperature > 0, "> 0"), ("new_lr_factor", opt.new_lr_factor > 0, "> 0"),
                  ("supcon_weight", opt.supcon_weight >= 0, ">= 0"), ("heads", opt.heads >= 1, ">= 1"),
                  ("blocks", opt.blocks >= 0, ">= 0"))
        for key, ok, wants in ranges:
            if not ok:
                raise ValueError(f"options.{key}={getattr(opt, key)} is out of range: it must be {wants}")
        if opt.triplet_on == "mim" and opt.blocks < 2:
            raise ValueError(f"options.triplet_on=mim takes the MIM's last 3 states: it needs options.blocks >= 2, "
                             f"got {opt.blocks}")
        m = cfg.model
        for key, on in (("model.sie_camera", m.sie_camera), ("model.sie_view", m.sie_view),
                        ("model.lora.enabled", m.lora.enabled)):
            if on:
                raise ValueError(f"{key}=true: PromptSG (as the paper) uses neither SIE nor LoRA; set {key}=false")
        if m.prompt != "clipreid":
            raise ValueError(f"model.prompt={m.prompt}: PromptSG learns no prompt vectors (its pseudo-word comes "
                             "from the inversion network); deep prompts are the thesis's (method=thesis)")

    def build_model(self, cfg, num_classes, num_cameras=0, num_views=0):
        """PromptSG's model; cameras and views are not used (no SIE)."""
        return build_promptsg_model(cfg.model, num_classes, **model_options(self.options(cfg)))

    def stages(self, cfg):
        return [PromptSGStage(self.options(cfg))]
