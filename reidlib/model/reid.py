"""The re-ID model users hold: CLIP's towers, prompts, SIE, BNNeck and the identity classifiers.

CLIP-ReID (Li, Sun, Li, AAAI 2023, arXiv 2211.13977), with the thesis's deep prompts and LoRA.
Per image the image encoder gives ``f_last`` (CLS before the last block), ``f`` (CLS after
``ln_post``) and ``f_proj`` (``f @ proj``, in the text space); RN50 gives pooled layer3, pooled
layer4 and the attention pool's token. BNNeck (Luo et al., CVPR-W 2019): a BatchNorm1d on ``f`` and
on ``f_proj`` (bias frozen at 0), each feeding a bias-free Linear classifier over the identities.
The test feature is concat(f, f_proj): 1280-d for ViT-B/16, 3072-d for RN50, before the BNNeck by
default (``neck_feat: before``).

Example::

    cfg = load_config("tiny").model                      # vit-tiny, random weights
    model = build_model(cfg, num_classes=10, num_cameras=6).eval()
    feats = model.encode_image(torch.randn(2, 3, 128, 64))   # [2, feature_dim]
    text = model.encode_text(torch.tensor([0, 7]))           # [2, 32] through the prompts
    out = model.train()(torch.randn(4, 3, 128, 64))          # logits, feats, f_proj
"""
from __future__ import annotations

import torch
from torch import nn

from ..weights.clip import load_clip
from ..weights.finetune import check_source, read_trained_source, take_trained_weights
from .backbone import ReIDViT, reid_image_tower
from .lora import apply_lora
from .prompts import TextEncoder, build_prompt_learner


class WeightsMismatch(ValueError, RuntimeError):
    """Weights that do not fit the model (keys missing or extra, shapes different), said in one
    line; a RuntimeError too, as torch's own load_state_dict error is."""


def describe_mismatch(own: dict, given: dict, strict: bool = True) -> str | None:
    """One line on how the state dict ``given`` misfits ``own`` (a model's ``state_dict()``): keys
    missing or unexpected (when ``strict``) and shapes that differ; None when it fits. torch lists
    every key over many lines, which hides the cause (another config or data set).

    >>> describe_mismatch({"w": torch.zeros(2)}, {"w": torch.zeros(3), "b": torch.zeros(1)})
    '1 unexpected key(s) (e.g. b); w is [3] in the weights but [2] in the model'
    """
    parts = []
    if strict:
        missing = [k for k in own if k not in given]
        unexpected = [k for k in given if k not in own]
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[0]})")
    shapes = [k for k, v in given.items() if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        k = shapes[0]
        more = f" (and {len(shapes) - 1} more shape(s))" if len(shapes) > 1 else ""
        parts.append(f"{k} is {list(given[k].shape)} in the weights but {list(own[k].shape)} in the model{more}")
    return "; ".join(parts) or None


def _bnneck(dim: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(dim)          # weight 1, bias 0 by default
    bn.bias.requires_grad_(False)     # the BNNeck bias stays 0 (the reference freezes it)
    return bn


def _classifier(dim: int, num_classes: int) -> nn.Linear:
    linear = nn.Linear(dim, num_classes, bias=False)
    nn.init.normal_(linear.weight, std=0.001)
    return linear


class ReIDModel(nn.Module):
    """CLIP-ReID around an open_clip CLIP (usually made by :func:`build_model`).

    Example::

        clip = load_clip("rn-tiny", "none")
        model = ReIDModel(clip, load_config("tiny", ["model.name=rn-tiny"]).model, num_classes=5)
        model.feature_dim                                        # 288 = 256 (layer4) + 32
        out = model(torch.randn(4, 3, 128, 64))                  # dict: logits, feats, f_proj
        text = model.all_text_features()                         # [5, 32]
    """

    def __init__(self, clip, cfg, num_classes: int, num_cameras: int = 0, num_views: int = 0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.visual = reid_image_tower(clip.visual, tuple(cfg.image_size), cfg.stride)
        self.text = TextEncoder(clip)
        self.prompts = build_prompt_learner(cfg, num_classes, self.text)
        width, embed = self.visual.width, self.visual.embed_dim
        self.sie_cameras = num_cameras if cfg.sie_camera else 0   # 0: SIE ignores cameras
        self.sie_views = num_views if cfg.sie_view else 0           # 0: SIE ignores views
        self.sie_embed = self._sie_table(cfg, width)
        self.sie_coe = cfg.sie_coe
        self.bottleneck, self.bottleneck_proj = _bnneck(width), _bnneck(embed)
        self.classifier, self.classifier_proj = _classifier(width, num_classes), _classifier(embed, num_classes)
        self.neck_feat = cfg.neck_feat
        self.text_chunk = cfg.text_chunk
        self.num_classes = num_classes
        self.feature_dim = width + embed
        self.embed_dim = embed
        self.uses_lora = False

    @property
    def uses_sie(self) -> bool:
        """Whether image features need side information (``cams=`` and/or ``views=``): SIE is on."""
        return self.sie_embed is not None

    def _sie_table(self, cfg, width: int) -> nn.Parameter | None:
        """SIE (He et al., TransReID, ICCV 2021): a learnable vector per camera, per view, or per
        (camera, view) pair, trunc-normal std 0.02, as the reference's ``cv_embed``."""
        if not (cfg.sie_camera or cfg.sie_view):
            return None
        which = "model.sie_camera" if cfg.sie_camera else "model.sie_view"
        if not isinstance(self.visual, ReIDViT):
            raise ValueError(f"{which} applies to ViT image encoders only")
        if cfg.sie_camera and self.sie_cameras < 1:
            raise ValueError("model.sie_camera needs camera ids, and this data set has none: "
                             "set model.sie_camera=false")
        if cfg.sie_view and self.sie_views < 1:
            raise ValueError("model.sie_view needs view labels, and this data set has none: "
                             "set model.sie_view=false")
        rows = max(self.sie_cameras, 1) * max(self.sie_views, 1)
        return nn.Parameter(nn.init.trunc_normal_(torch.zeros(rows, width), std=0.02))

    def sie_rows(self, cams: torch.Tensor | None, views: torch.Tensor | None) -> torch.Tensor:
        """The SIE table row of each image: ``camera * num_views + view`` with both (the
        reference's ``cv_embed[cam_label * view_num + view_label]``), else the camera or the view.

        Example (20 cameras x 8 views, as VeRi-776)::

            model.sie_rows(torch.tensor([0, 2]), torch.tensor([1, 7]))    # tensor([ 1, 23])
        """
        if self.sie_cameras and cams is None:
            raise ValueError("model.sie_camera is on: pass the camera ids (cams=...)")
        if self.sie_views and views is None:
            raise ValueError("model.sie_view is on: pass the view ids (views=...)")
        if self.sie_cameras and self.sie_views:
            return cams * self.sie_views + views
        return cams if self.sie_cameras else views

    def _image_features(self, x: torch.Tensor, cams: torch.Tensor | None, views: torch.Tensor | None = None):
        cls_bias = None
        if self.sie_embed is not None:
            cls_bias = self.sie_coe * self.sie_embed[self.sie_rows(cams, views)]
        return self.visual(x, cls_bias)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, cams: torch.Tensor | None = None,
                views: torch.Tensor | None = None) -> dict:
        """Training outputs for images [B, 3, H, W].

        Returns ``logits`` = [cls_score, cls_score_proj] (classifiers on the BNNeck outputs),
        ``feats`` = [f_last, f, f_proj] (pre-BN, for the triplet losses) and ``f_proj`` (for the
        image-to-text loss). ``labels`` is unused (the classifiers are plain Linears); it is
        accepted so training loops may pass it as the reference does.
        """
        f_last, f, f_proj = self._image_features(x, cams, views)
        logits = [self.classifier(self.bottleneck(f)), self.classifier_proj(self.bottleneck_proj(f_proj))]
        return {"logits": logits, "feats": [f_last, f, f_proj], "f_proj": f_proj}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, with a one-line :class:`WeightsMismatch` for weights that
        do not fit (:func:`describe_mismatch`) instead of torch's list of every key."""
        problem = describe_mismatch(self.state_dict(), state_dict, strict)
        if problem:
            raise WeightsMismatch(f"the weights do not fit this model: {problem}; were they trained with another "
                                  "config (model.*), data set (identities, cameras) or method?")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def encode_image(self, x: torch.Tensor, cams: torch.Tensor | None = None,
                     views: torch.Tensor | None = None) -> torch.Tensor:
        """The test feature [B, feature_dim]: concat(f, f_proj), before or after the BNNeck."""
        _, f, f_proj = self._image_features(x, cams, views)
        if self.neck_feat == "after":
            f, f_proj = self.bottleneck(f), self.bottleneck_proj(f_proj)
        return torch.cat([f, f_proj], dim=1)

    def image_proj_features(self, x: torch.Tensor) -> torch.Tensor:
        """``f_proj`` [B, embed_dim] without SIE: what stage 1 caches and pairs with text features."""
        return self.visual(x)[2]

    def encode_text(self, labels: torch.Tensor) -> torch.Tensor:
        """Text features [B, embed_dim] of identities ``labels`` through the prompt learner."""
        # the template's EOT position, a Python int: no host sync per step (stage 1 calls this each step)
        return self.text(self.prompts.tokens, self.prompts(labels), eot=self.prompts.eot)

    @torch.no_grad()
    def all_text_features(self, chunk: int | None = None) -> torch.Tensor:
        """Text features [num_classes, embed_dim] of every identity, ``chunk`` identities at a time."""
        labels = torch.arange(self.num_classes, device=self.prompts.tokens.device)
        return torch.cat([self.encode_text(part) for part in labels.split(chunk or self.text_chunk)])


def load_start_clip(cfg, needs_text: bool = True):
    """(CLIP, trained source or None) a re-ID model of ``cfg`` (a ``ModelConfig``) starts from:
    ``cfg.pretrained``'s CLIP weights, or, when it names a trained re-ID model (reidlib's folder or
    checkpoint, the reference's state dict), CLIP's architecture with that model's activation, whose
    encoders the caller then takes with :func:`~reidlib.weights.finetune.take_trained_weights`
    (``needs_text``: the source must have a text encoder)."""
    source = read_trained_source(cfg)
    if source is None:
        return load_clip(cfg.name, cfg.pretrained, cfg.quick_gelu), None
    check_source(cfg, source, needs_text)
    return load_clip(cfg.name, "none", "true" if source.quick_gelu else "false"), source


def build_model(cfg, num_classes: int, num_cameras: int = 0, num_views: int = 0) -> ReIDModel:
    """The re-ID model that ``cfg`` (a ``reidlib.config.ModelConfig``) describes.

    Loads CLIP (``cfg.name``, ``cfg.pretrained``), adapts it and, when ``cfg.lora.enabled``,
    injects LoRA right away (B = 0: outputs are unchanged until stage 2 trains it; the state-dict
    keys are then the same at every stage, for resuming). When ``cfg.pretrained`` is a trained
    re-ID model (reidlib's folder or checkpoint, or the reference's), its encoders are taken and the
    identity-specific parts start afresh (see :mod:`reidlib.weights.finetune`).

    Example::

        cfg = load_config("vit_proposed", ["model.pretrained=/models/ViT-B-16.pt"]).model
        model = build_model(cfg, num_classes=751, num_cameras=6)
        set_trainable(model, "stage1")                       # prompts only
        text = model.all_text_features()                     # [751, 512]
        feats = model.eval().encode_image(images)            # [B, 1280]
    """
    clip, source = load_start_clip(cfg)
    model = ReIDModel(clip, cfg, num_classes, num_cameras, num_views)
    if source is not None:       # before LoRA: the trained weights are plain Linears
        take_trained_weights(model, source)
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora)
    return model
