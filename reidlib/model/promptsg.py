"""PromptSG's model: CLIP's image tower, an inversion network, CLIP's frozen text tower and a
multimodal interaction module (Yang et al., "A Pedestrian is Worth One Prompt: Towards Language
Guidance Person Re-Identification", CVPR 2024). No official code is published; this is built from
the paper's text (§4, §5.1, Fig. 2-3) and the method's choices are in :mod:`reidlib.methods.promptsg`.

Per image the image tower gives ``f_last``, ``f`` and ``f_proj`` exactly as the shared re-ID model
does (:class:`~reidlib.model.backbone.ReIDViT`, untouched) plus the patch tokens in CLIP's joint
space: for a ViT ``ln_post(patch) @ proj`` (CLIP-ReID's convention), for RN50 the attention pool's
value and output projections applied to every layer4 position (the dense trick of MaskCLIP, Zhou
et al., ECCV 2022; no new parameters). Then:

* the **inversion network** (§5.1: a 3-layer MLP, hidden 512, BatchNorm after the last layer) maps
  ``f_proj`` to a pseudo-token s* in the token-embedding space;
* s* replaces X in "A photo of a X person." and the **frozen** text tower encodes it (gradients
  pass through it to the inversion network; its parameters never train): the composed prompt's
  embedding l_p;
* the **MIM** (§4.2, Eq. 7): cross-attention with the text embedding as the one query and the
  patch tokens as keys and values; its head-averaged attention map re-weights the patches, the
  attended vector goes in front of them and two transformer blocks follow; the first token is
  the output.

At test time the simplified prompt "A photo of a person." is the query by default: its embedding
is computed once from the text tower and kept as a buffer (recomputed after every
``load_state_dict``), so ``encode_image`` runs the image tower and the MIM only and the model exports
like an image-only one. ``test_prompt = "composed"`` runs the inversion and text tower per image.

Example::

    clip = load_clip("vit-tiny8", "none")
    model = PromptSGModel(clip, load_config("tiny").model, num_classes=5)
    out = model(torch.randn(4, 3, 128, 64))       # logits, feats, f_proj, text, mim
    model.eval().encode_image(torch.randn(2, 3, 128, 64)).shape     # [2, 96] = f (64) + MIM (32)
"""
from __future__ import annotations

import open_clip
import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from ..weights.finetune import take_trained_weights
from .attention import split_attention
from .backbone import ReIDResNet, ReIDViT, reid_image_tower
from .prompts import TextEncoder
from .reid import WeightsMismatch, _bnneck, _classifier, describe_mismatch, load_start_clip

CHOICES = {"kv_tokens": ("patches", "all"), "reweight": ("scale", "none"), "triplet_on": ("vit_mim", "mim"),
           "test_feature": ("f_mim", "mim"), "test_prompt": ("simplified", "composed")}


# --------------------------------------------------------------------------- image tokens

def vit_tokens(tower: ReIDViT, x: torch.Tensor):
    """(f_last, f, f_proj, patches [B, N, embed]) of a ReIDViT; the first three are computed as
    ``ReIDViT.forward`` computes them (no SIE: PromptSG does not use it)."""
    vit = tower.vit
    x = vit.conv1(x).flatten(2).transpose(1, 2)
    cls = vit.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = vit.ln_pre(torch.cat([cls, x], dim=1) + vit.positional_embedding.to(x.dtype))
    blocks = vit.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    f_last = x[:, 0]
    x = blocks[-1](x)
    f = vit.ln_post(x[:, 0])
    return f_last, f, f @ vit.proj, vit.ln_post(x[:, 1:]) @ vit.proj


def resnet_tokens(tower: ReIDResNet, x: torch.Tensor):
    """(f_last, f, f_proj, patches [B, h*w, embed]) of a ReIDResNet: every layer4 position through
    the attention pool's positional embedding, value and output projections (MaskCLIP's dense features)."""
    net = tower.resnet
    x3 = net.layer3(net.layer2(net.layer1(net.stem(x))))
    x4 = net.layer4(x3)
    pool = net.attnpool
    grid = x4.flatten(2).transpose(1, 2) + pool.positional_embedding[1:].to(x4.dtype)
    return x3.mean(dim=(2, 3)), x4.mean(dim=(2, 3)), pool(x4), pool.c_proj(pool.v_proj(grid))


# --------------------------------------------------------------------------- the new modules

class InversionNetwork(nn.Module):
    """f_theta (§5.1): Linear-ReLU-Linear-ReLU-Linear (hidden ``hidden``), then BatchNorm1d. The BN's
    scale starts at ``scale`` (the token-embedding table's std), so s* starts at a word's size."""

    def __init__(self, in_dim: int, token_width: int, hidden: int = 512, scale: float = 1.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, token_width))
        self.bn = nn.BatchNorm1d(token_width)
        nn.init.constant_(self.bn.weight, scale)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.bn(self.mlp(v))


class TextToPatchAttention(nn.Module):
    """Eq. 7: Softmax(QK^T / sqrt(d)) V with separate q, k, v (and output) projections; one query
    per image (the text embedding). Returns the attended vector [B, d] and the head-averaged
    attention over the tokens [B, N]."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, query: torch.Tensor, tokens: torch.Tensor):
        q = self.q_proj(query).unflatten(-1, (self.heads, -1))[:, :, None]         # [B, h, 1, d/h]
        k, v = (p(tokens).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        weights = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)   # [B, h, 1, N]
        out = self.out_proj((weights @ v).flatten(1))
        return out, weights.mean(dim=1)[:, 0]


class MultimodalInteraction(nn.Module):
    """The MIM: cross-attention, then ``blocks`` pre-norm transformer blocks (width ``dim``, MLP
    ratio 4, GELU) over [attended vector; tokens], the tokens re-weighted by N x the attention
    (mean 1) with ``reweight="scale"``. Returns the first token's states: after the
    cross-attention and after each block (the last is the MIM's output)."""

    def __init__(self, dim: int, heads: int = 8, blocks: int = 2, reweight: str = "scale"):
        super().__init__()
        self.cross = TextToPatchAttention(dim, heads)
        self.blocks = nn.ModuleList(ResidualAttentionBlock(dim, heads, 4.0, act_layer=nn.GELU, batch_first=True)
                                    for _ in range(blocks))
        for block in self.blocks:
            split_attention(block)        # plain Linears + SDPA: exports to ONNX like the image tower
        self.reweight = reweight

    def forward(self, text: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        attended, weights = self.cross(text, tokens)
        if self.reweight == "scale":
            tokens = tokens * (weights * tokens.shape[1]).unsqueeze(-1).to(tokens.dtype)
        x = torch.cat([attended[:, None].to(tokens.dtype), tokens], dim=1)
        states = [attended]
        for block in self.blocks:
            x = block(x)
            states.append(x[:, 0])
        return states


def new_module_parameters(embed: int, token_width: int, hidden: int = 512, blocks: int = 2) -> int:
    """Parameters of the inversion network and the MIM (PromptSG's new modules) at joint-space
    width ``embed`` and token width ``token_width``: ~8.1M for ViT-B/16 (512, 512).

    >>> new_module_parameters(512, 512)
    8144384
    """
    inversion = embed * hidden + hidden + hidden * hidden + hidden + hidden * token_width + token_width \
        + 2 * token_width
    cross = 4 * (embed * embed + embed)
    block = 12 * embed * embed + 13 * embed      # q, k, v, out; two LayerNorms; MLP 4x
    return inversion + cross + blocks * block


# --------------------------------------------------------------------------- the model

class PromptSGModel(nn.Module):
    """PromptSG around an open_clip CLIP (usually made by :func:`build_promptsg_model`).

    Heads as CLIP-ReID's: BNNeck + bias-free classifier on ``f`` (``bottleneck``, ``classifier``) and
    on the MIM output (``bottleneck_proj``, ``classifier_proj``; the names of CLIP-ReID's second head,
    so fine-tuning from a trained model re-initialises the classifier). The test feature is
    concat(f, MIM output) (``test_feature="f_mim"``, 1280-d for ViT-B/16) or the MIM output alone,
    before or after the BNNeck (``model.neck_feat``).
    """

    def __init__(self, clip, cfg, num_classes: int, *, heads: int = 8, blocks: int = 2, kv_tokens: str = "patches",
                 reweight: str = "scale", triplet_on: str = "vit_mim", test_feature: str = "f_mim",
                 test_prompt: str = "simplified", inversion_hidden: int = 512):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        for key, value in dict(kv_tokens=kv_tokens, reweight=reweight, triplet_on=triplet_on,
                               test_feature=test_feature, test_prompt=test_prompt).items():
            if value not in CHOICES[key]:
                raise ValueError(f"options.{key}={value}: use {' or '.join(CHOICES[key])}")
        if cfg.sie_camera or cfg.sie_view or cfg.lora.enabled:
            raise ValueError("PromptSG uses neither SIE nor LoRA: set model.sie_camera, model.sie_view and "
                             "model.lora.enabled to false")
        self.visual = reid_image_tower(clip.visual, tuple(cfg.image_size), cfg.stride)
        self.text = TextEncoder(clip)
        width, embed = self.visual.width, self.visual.embed_dim
        if heads < 1 or embed % heads:
            raise ValueError(f"options.heads={heads} must divide the joint-space width {embed} of {cfg.name}")
        length = self.text.positional_embedding.shape[0]
        composed = open_clip.tokenize([f"A photo of a X {cfg.class_token}."], context_length=length)
        simple = open_clip.tokenize([f"A photo of a {cfg.class_token}."], context_length=length)
        self.slot = int(open_clip.tokenize(["A photo of a"], context_length=length).argmax())
        if int(composed[0, self.slot]) != int(open_clip.tokenize(["X"], context_length=length)[0, 1]):
            raise RuntimeError(f"the prompt for model.class_token={cfg.class_token!r} did not tokenise as expected")
        self.composed_eot, self.simple_eot = int(composed.argmax()), int(simple.argmax())
        self.register_buffer("composed_tokens", composed[:, :self.composed_eot + 1], persistent=False)
        self.register_buffer("simple_tokens", simple[:, :self.simple_eot + 1], persistent=False)
        scale = float(self.text.token_embedding.weight.std())
        self.inversion = InversionNetwork(embed, self.text.width, inversion_hidden, scale)
        self.mim = MultimodalInteraction(embed, heads, blocks, reweight)
        self.bottleneck, self.bottleneck_proj = _bnneck(width), _bnneck(embed)
        self.classifier, self.classifier_proj = _classifier(width, num_classes), _classifier(embed, num_classes)
        self.kv_tokens, self.triplet_on = kv_tokens, triplet_on
        self.test_feature, self.test_prompt = test_feature, test_prompt
        self.neck_feat = cfg.neck_feat
        self.num_classes, self.embed_dim = num_classes, embed
        self.feature_dim = width + embed if test_feature == "f_mim" else embed
        self.sie_cameras = self.sie_views = 0       # no SIE: features never depend on camera or view ids
        self.uses_lora = False
        # the simplified prompt's text embedding [1, embed]: a constant of the frozen text tower
        self.register_buffer("prompt_text", torch.zeros(1, embed), persistent=False)
        self.refresh_text_cache()

    @property
    def uses_sie(self) -> bool:
        return False

    @torch.no_grad()
    def refresh_text_cache(self) -> None:
        """Recompute the simplified prompt's embedding from the text tower (after its weights change)."""
        self.prompt_text.copy_(self.text(self.simple_tokens, eot=self.simple_eot).to(self.prompt_text.dtype))

    def image_tokens(self, x: torch.Tensor):
        """(f_last, f, f_proj, the tokens the MIM attends to [B, N, embed])."""
        tokens = vit_tokens if isinstance(self.visual, ReIDViT) else resnet_tokens
        f_last, f, f_proj, patches = tokens(self.visual, x)
        if self.kv_tokens == "all":
            patches = torch.cat([f_proj[:, None], patches], dim=1)
        return f_last, f, f_proj, patches

    def composed_text(self, f_proj: torch.Tensor) -> torch.Tensor:
        """l_p [B, embed]: "A photo of a s* person." through the frozen text tower, s* = f_theta(f_proj)."""
        pseudo = self.inversion(f_proj)
        return self.text(self.composed_tokens, [(self.slot, pseudo[:, None])], eot=self.composed_eot)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, cams: torch.Tensor | None = None,
                views: torch.Tensor | None = None) -> dict:
        """Training outputs for images [B, 3, H, W]: ``logits`` [on BN(f), on BN(MIM out)],
        ``feats`` (pre-BN, for the triplet loss: [f_last, f, MIM out] or the MIM's states),
        ``f_proj`` and ``text`` (l_p; the pair of the contrastive loss), ``mim`` (MIM output).
        ``labels``, ``cams`` and ``views`` are unused (no SIE)."""
        f_last, f, f_proj, patches = self.image_tokens(x)
        text = self.composed_text(f_proj)
        states = self.mim(text, patches)
        out = states[-1]
        logits = [self.classifier(self.bottleneck(f)), self.classifier_proj(self.bottleneck_proj(out))]
        feats = [f_last, f, out] if self.triplet_on == "vit_mim" else states[-3:]
        return {"logits": logits, "feats": feats, "f_proj": f_proj, "text": text, "mim": out}

    def encode_image(self, x: torch.Tensor, cams: torch.Tensor | None = None,
                     views: torch.Tensor | None = None) -> torch.Tensor:
        """The test feature [B, feature_dim]; ``cams`` and ``views`` are ignored (no SIE)."""
        _, f, f_proj, patches = self.image_tokens(x)
        if self.test_prompt == "simplified":
            text = self.prompt_text.to(patches.dtype).expand(x.shape[0], -1)
        else:
            text = self.composed_text(f_proj)
        out = self.mim(text, patches)[-1]
        if self.neck_feat == "after":
            f, out = self.bottleneck(f), self.bottleneck_proj(out)
        return torch.cat([f, out], dim=1) if self.test_feature == "f_mim" else out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` with a one-line :class:`WeightsMismatch`; the cached prompt
        embedding is recomputed from the loaded text tower."""
        problem = describe_mismatch(self.state_dict(), state_dict, strict)
        if problem:
            raise WeightsMismatch(f"the weights do not fit this PromptSG model: {problem}; were they trained with "
                                  "another config (model.*, options.*), data set (identities) or method?")
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.refresh_text_cache()
        return result


def build_promptsg_model(cfg, num_classes: int, **options) -> PromptSGModel:
    """The PromptSG model ``cfg`` (a ``ModelConfig``) describes, with the method's ``options``
    (keyword arguments of :class:`PromptSGModel`). As :func:`reidlib.model.build_model`, a trained
    re-ID model in ``cfg.pretrained`` gives its encoders (the classifiers start afresh)."""
    clip, source = load_start_clip(cfg)
    model = PromptSGModel(clip, cfg, num_classes, **options)
    if source is not None:
        take_trained_weights(model, source)      # through load_state_dict: the prompt cache follows
    return model


__all__ = ["PromptSGModel", "build_promptsg_model", "InversionNetwork", "MultimodalInteraction",
           "TextToPatchAttention", "new_module_parameters", "vit_tokens", "resnet_tokens", "CHOICES"]
