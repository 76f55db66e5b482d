"""Self-attention with separate q, k, v and output projections: what LoRA adapts.

open_clip keeps q, k and v fused in one ``in_proj_weight``: open_clip 3.x's ViT blocks use
``nn.MultiheadAttention`` (which also reads ``out_proj``'s weight directly inside
``F.multi_head_attention_forward``), and open_clip 4.x's use its own ``Attention`` module with
the same parameter names. With peft 0.21, targeting ``out_proj`` of ``nn.MultiheadAttention`` is a
silent no-op (the LoRA branch is never called: output unchanged, backward fails, merging changes
the output), and peft's experimental ``attn`` target puts one adapter on the fused projection
rather than the thesis's three. :class:`SplitAttention` holds four plain ``nn.Linear`` layers with
the fused weights split exactly and runs ``F.scaled_dot_product_attention``; peft wraps Linears
normally, and on a GPU it is the faster path too.

Example::

    block = clip.visual.transformer.resblocks[0]
    split_attention(block)                        # block.attn.q_proj, k_proj, v_proj, out_proj
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _plain_fused_attention(module: nn.Module) -> bool:
    """An open_clip ``Attention`` (4.x ViT blocks; 3.x custom blocks) doing plain softmax attention."""
    if getattr(module, "in_proj_weight", None) is None or getattr(module, "in_proj_bias", None) is None:
        return False
    if not isinstance(getattr(module, "out_proj", None), nn.Linear) or not hasattr(module, "num_heads"):
        return False
    extras = [getattr(module, name, None) for name in ("logit_scale", "head_scale")]
    norms = [getattr(module, name, nn.Identity()) for name in ("ln_q", "ln_k", "ln_inner")]
    drops = [getattr(module, name, None) for name in ("attn_drop", "out_drop")]
    return (all(e is None for e in extras) and all(isinstance(n, nn.Identity) for n in norms)
            and all(d is None or d.p == 0 for d in drops))


class SplitAttention(nn.Module):
    """Self-attention as four Linear layers, built from ``nn.MultiheadAttention`` (batch first) or
    open_clip 4.x's ``Attention``; same maths, same call signature and return value as the module
    it replaces, so open_clip's ``ResidualAttentionBlock`` uses it unchanged."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        if isinstance(attn, nn.MultiheadAttention):
            if not attn.batch_first or attn.dropout or not attn._qkv_same_embed_dim or attn.bias_k is not None:
                raise ValueError("SplitAttention needs a batch-first MultiheadAttention without dropout or k/v bias")
        elif not _plain_fused_attention(attn):
            raise TypeError(f"cannot split {type(attn).__module__}.{type(attn).__name__} into q/k/v/out "
                            "projections: LoRA supports open_clip's nn.MultiheadAttention (3.x) and plain "
                            "Attention (4.x) blocks")
        # nn.MultiheadAttention returns (output, weights); open_clip's Attention the output alone
        self.returns_weights = isinstance(attn, nn.MultiheadAttention)
        self.num_heads = attn.num_heads
        dim = attn.out_proj.in_features
        like = dict(device=attn.in_proj_weight.device, dtype=attn.in_proj_weight.dtype)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim, **like) for _ in range(4))
        with torch.no_grad():
            for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                proj.weight.copy_(attn.in_proj_weight[i * dim:(i + 1) * dim])
                proj.bias.copy_(attn.in_proj_bias[i * dim:(i + 1) * dim])
            self.out_proj.weight.copy_(attn.out_proj.weight)
            self.out_proj.bias.copy_(attn.out_proj.bias)

    def forward(self, query, key=None, value=None, need_weights: bool = False, attn_mask=None,
                k_x=None, v_x=None):
        # open_clip 3.x calls attn(q, k, v, need_weights=False, attn_mask=m)[0]; 4.x calls
        # attn(q, k_x=k, v_x=v, attn_mask=m). Both pass the query itself as key and value.
        for other in (key, value, k_x, v_x):
            if other is not None and other is not query:
                raise ValueError("SplitAttention computes self-attention only (key and value must be the query)")
        q, k, v = (self._heads(proj(query)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if attn_mask is not None and attn_mask.dim() == 3:   # (N * heads, L, L) -> (N, heads, L, L)
            attn_mask = attn_mask.reshape(q.shape[0], self.num_heads, *attn_mask.shape[-2:])
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.out_proj(x.transpose(1, 2).flatten(2))
        return (out, None) if self.returns_weights else out

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)      # [B, L, D] -> [B, h, L, D/h]


def split_attention(block: nn.Module) -> None:
    """Replace ``block.attn`` by :class:`SplitAttention`, in place; raises TypeError for an
    attention module it cannot split (rather than leaving LoRA without its targets)."""
    if not isinstance(block.attn, SplitAttention):
        block.attn = SplitAttention(block.attn)
