"""Attention maps of the ViT image encoder: attention rollout and last-layer CLS attention.

The attention weights are not kept by the forward pass (it runs scaled_dot_product_attention), so
they are rebuilt from forward hooks on each vision block's q and k projections: the hooked
outputs are exactly what the block attends with (LoRA included, when the model has it), and
``softmax(q k^T / sqrt(d))`` per head gives the weights.

* **Attention rollout** (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020):
  per block, average the heads, add the identity for the residual path
  (``0.5 A + 0.5 I``, rows renormalised), multiply the blocks' matrices from the first to the last,
  and read the CLS token's row over the patch tokens. The re-ID feature is the CLS token after
  the last block, which through the residual connections depends on the mixing done by every
  block, so rollout is the default.
* **Last-layer CLS attention**: the last block's head-averaged attention from CLS to the patches.
  Cheaper and sharper but it ignores what the earlier blocks mixed into each token, and in CLIP
  ViTs a few background tokens often take much of it (Darcet et al., "Vision Transformers Need
  Registers", ICLR 2024).

The token grid is not square for re-ID inputs (16 x 8 at 256 x 128, 8 x 4 at 128 x 64); it is read
from the model (``model.visual.grid``) and upsampled to the image for display.

Example::

    model, cfg = reidlib.load_trained_model("results/market1501/proposed/seed0/model")
    maps = attention_maps(model, images)                  # [B, 16, 8], each map's max = 1
    attention_figure({"proposed": (model, cfg)}, dataset.query[:4], "attention.png")
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import Normalize

from ..eval.modes import eval_mode
from .figures import save_figure
from .tables import method_label


def vision_blocks(model) -> list:
    """The residual blocks of the model's ViT image encoder."""
    vit = getattr(getattr(model, "visual", None), "vit", None)
    if vit is None:
        raise ValueError("attention maps need a ViT image encoder (model.visual.vit); this model has "
                         f"{type(getattr(model, 'visual', model)).__name__}")
    return list(vit.transformer.resblocks)


def token_grid(model) -> tuple[int, int]:
    """(rows, columns) of the patch tokens, e.g. (16, 8) for 256 x 128 input with stride 16."""
    return tuple(model.visual.grid)


class AttentionRecorder:
    """Forward hooks on every vision block's ``attn.q_proj`` and ``attn.k_proj``; after a forward
    pass, :meth:`attentions` gives one ``[B, heads, N, N]`` attention tensor per block.

    ::

        with AttentionRecorder(model) as rec:
            model.encode_image(images)
        weights = rec.attentions()
    """

    def __init__(self, model):
        self.blocks = vision_blocks(model)
        self.q: list = [None] * len(self.blocks)
        self.k: list = [None] * len(self.blocks)
        self.handles: list = []

    def _keep(self, store: list, index: int):
        def hook(module, inputs, output):
            store[index] = output.detach().float()
        return hook

    def __enter__(self):
        for i, block in enumerate(self.blocks):
            attn = block.attn
            if not (hasattr(attn, "q_proj") and hasattr(attn, "k_proj")):
                raise ValueError("vision blocks need separate q/k projections (reidlib's SplitAttention)")
            self.handles.append(attn.q_proj.register_forward_hook(self._keep(self.q, i)))
            self.handles.append(attn.k_proj.register_forward_hook(self._keep(self.k, i)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def attentions(self) -> list[torch.Tensor]:
        out = []
        for block, q, k in zip(self.blocks, self.q, self.k):
            if q is None or k is None:
                raise RuntimeError("no forward pass recorded")
            heads = block.attn.num_heads
            batch, length, dim = q.shape
            q = q.view(batch, length, heads, dim // heads).transpose(1, 2)
            k = k.view(batch, length, heads, dim // heads).transpose(1, 2)
            out.append(torch.softmax(q @ k.transpose(-2, -1) / (dim // heads) ** 0.5, dim=-1))
        return out


def attention_rollout(attentions: list[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Abnar & Zuidema's rollout: ``[B, N-1]`` attention of the CLS token over the patches after
    all blocks. Per block ``A' = (1 - residual) * mean_heads(A) + residual * I``, rows renormalised;
    ``rollout = A'_L ... A'_2 A'_1``."""
    first = attentions[0]
    eye = torch.eye(first.shape[-1], device=first.device).expand(first.shape[0], -1, -1)
    rollout = eye
    for attn in attentions:
        a = (1 - residual) * attn.mean(1) + residual * eye
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout
    return rollout[:, 0, 1:]


def last_layer_cls_attention(attentions: list[torch.Tensor]) -> torch.Tensor:
    """``[B, N-1]``: the last block's head-averaged attention from the CLS token to the patches."""
    return attentions[-1].mean(1)[:, 0, 1:]


@torch.no_grad()
def attention_maps(model, images: torch.Tensor, mode: str = "rollout", cams=None) -> torch.Tensor:
    """``[B, rows, cols]`` attention over the patch grid for a batch of (transformed) images; each
    map is divided by its maximum. ``mode``: ``rollout`` or ``last``."""
    if mode not in ("rollout", "last"):
        raise ValueError(f"mode must be 'rollout' or 'last', got '{mode}'")
    with eval_mode(model), AttentionRecorder(model) as recorder:
        model.encode_image(images, cams=cams if getattr(model, "uses_sie", False) else None)
    weights = recorder.attentions()
    flat = attention_rollout(weights) if mode == "rollout" else last_layer_cls_attention(weights)
    rows, cols = token_grid(model)
    maps = flat.reshape(-1, rows, cols)
    return maps / maps.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def _load_images(items, cfg, device):
    """(model input [B, 3, H, W], display images [B, H, W, 3] in [0, 1], camera ids)."""
    from ..data import build_transforms, read_image
    transform = build_transforms(cfg.data, cfg.model.image_size, train=False)
    height, width = cfg.model.image_size
    pictures = [read_image(path) for path, _, _ in items]
    batch = torch.stack([transform(p) for p in pictures]).to(device)
    shown = np.stack([np.asarray(p.convert("RGB").resize((width, height)), dtype=np.float32) / 255
                      for p in pictures])
    cams = torch.tensor([camid for _, _, camid in items], device=device)
    return batch, shown, cams


def attention_figure(models: dict, items, out_png: str | Path | None = None, mode: str = "rollout",
                     alpha: float = 0.55):
    """A row per query image: the image, then each model's attention map over it.
    ``models``: name -> (model, cfg); ``items``: (path, pid, camid) tuples."""
    names = list(models)
    fig, axes = plt.subplots(len(items), 1 + len(names), figsize=(1.7 * (1 + len(names)) + 0.9, 3.0 * len(items) + 0.6),
                             squeeze=False)
    what = "attention rollout" if mode == "rollout" else "last-layer CLS attention"
    for col, name in enumerate(names):
        model, cfg = models[name]
        device = next(model.parameters()).device
        batch, shown, cams = _load_images(items, cfg, device)
        maps = attention_maps(model, batch, mode, cams)
        maps = F.interpolate(maps[:, None], size=shown.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
        for row, (path, pid, camid) in enumerate(items):
            if col == 0:
                axes[row, 0].imshow(shown[row])
                axes[row, 0].set_title("image" if row == 0 else "", fontsize=9)
                axes[row, 0].set_ylabel(f"id {pid}, cam {camid}", fontsize=9)
            ax = axes[row, col + 1]
            ax.imshow(shown[row])
            ax.imshow(maps[row].cpu().numpy(), cmap="inferno", alpha=alpha, vmin=0, vmax=1)
            if row == 0:
                ax.set_title(method_label(name).replace(" (", "\n("), fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    rows, cols = token_grid(models[names[0]][0])
    fig.suptitle(f"{what[0].upper()}{what[1:]} of the image encoder ({rows}x{cols} tokens)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    cax = fig.add_axes((0.9, 0.15, 0.025, 0.7))
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=Normalize(0, 1), cmap="inferno"), cax=cax)
    bar.set_label(f"{what} (fraction of the image's maximum)", fontsize=8)
    save_figure(fig, out_png)      # 300 dpi PNG and its PDF
    return fig
