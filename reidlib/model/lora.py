"""What trains when: LoRA on the image encoder (through peft) and the trainable set of each stage.

LoRA (Hu et al., ICLR 2022) as the thesis applies it in CLIP-ReID's stage 2: rank-r adapters on the
vision blocks' attention projections q, k, v and out (optionally the MLP's two Linears), B
zero-initialised, scaling alpha/sqrt(r) (rank-stabilised LoRA, Kalajdzievski 2023; peft
``use_rslora``). Trainable sets (spec §3-4):

* stage 1: every prompt-learner parameter;
* stage 2, full fine-tuning: every image-side parameter (image encoder, SIE table, BNNeck weights,
  classifiers); never the text encoder, the prompts or the BNNeck biases;
* stage 2 with LoRA: LoRA A/B, every LayerNorm of the image encoder, BNNeck weights, classifiers.

Why a separate q/k/v/out attention module: open_clip's ViT blocks use ``nn.MultiheadAttention``,
which keeps q, k and v fused in one ``in_proj_weight`` and reads ``out_proj``'s weight directly
inside ``F.multi_head_attention_forward``. With peft 0.21, targeting ``out_proj`` is then a silent
no-op (the LoRA branch is never called: output unchanged, backward fails, merging changes the
output), and peft's experimental ``attn`` target puts one adapter on the fused projection rather
than the thesis's three. :class:`SplitAttention` holds four plain ``nn.Linear`` layers with the
fused weights split exactly, and runs ``F.scaled_dot_product_attention``; peft wraps Linears
normally, and on GPU it is the faster path too.

Example::

    model = build_model(cfg.model, num_classes=751, num_cameras=6)   # cfg.model.lora.enabled
    params = set_trainable(model, "stage2")     # LoRA A/B, vision LayerNorms, BNNeck, classifiers
    print(parameter_table(model))
    model = merge_lora(model)                   # for export: plain Linears, loads without peft
    model.uses_lora                             # False
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# config target name -> module names inside one open_clip residual block (after split_attention)
_TARGETS = {"q": ["attn.q_proj"], "k": ["attn.k_proj"], "v": ["attn.v_proj"], "out": ["attn.out_proj"],
            "mlp": ["mlp.c_fc", "mlp.c_proj"]}
STAGES = ("stage1", "stage2")


# --------------------------------------------------------------------------- attention

class SplitAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch first, self-attention) as four Linear layers, same maths."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha.batch_first or mha.dropout or not mha._qkv_same_embed_dim or mha.bias_k is not None:
            raise ValueError("SplitAttention needs a batch-first MultiheadAttention without dropout or k/v bias")
        dim, self.num_heads = mha.embed_dim, mha.num_heads
        like = dict(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim, **like) for _ in range(4))
        with torch.no_grad():
            for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[i * dim:(i + 1) * dim])
                proj.bias.copy_(mha.in_proj_bias[i * dim:(i + 1) * dim])
            self.out_proj.weight.copy_(mha.out_proj.weight)
            self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, query, key=None, value=None, need_weights: bool = False, attn_mask=None):
        # Same call signature and (output, weights) return as nn.MultiheadAttention, so open_clip's
        # ResidualAttentionBlock uses it unchanged. Self-attention only (key/value are the query).
        q, k, v = (self._heads(proj(query)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(x.transpose(1, 2).flatten(2)), None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)      # [B, L, D] -> [B, h, L, D/h]


def split_attention(block: nn.Module) -> None:
    """Replace ``block.attn`` (an ``nn.MultiheadAttention``) by :class:`SplitAttention`, in place."""
    if isinstance(block.attn, nn.MultiheadAttention):
        block.attn = SplitAttention(block.attn)


# --------------------------------------------------------------------------- LoRA

def lora_blocks(spec: str, n_layers: int) -> list[int]:
    """Block indices from ``model.lora.blocks``: all | top | top3 | bottom | mid | up | half-up |
    half-bottom | a comma list. Thirds and halves follow the thesis's ViT-B/16 sets (bottom 0-3,
    mid 4-7, up 8-11, half-up 6-11, half-bottom 0-5) for any depth."""
    third, half = n_layers // 3, n_layers // 2
    named = {"all": range(n_layers), "top": [n_layers - 1], "top3": range(n_layers - 3, n_layers),
             "bottom": range(third), "mid": range(third, n_layers - third), "up": range(n_layers - third, n_layers),
             "half-up": range(half, n_layers), "half-bottom": range(half)}
    spec = str(spec).strip().lower()
    if spec in named:
        return sorted(set(named[spec]) & set(range(n_layers)))
    try:
        blocks = sorted({int(i) for i in spec.split(",") if i.strip()})
    except ValueError:
        raise ValueError(f"model.lora.blocks '{spec}': use {' | '.join(named)} or indices like '8,9,10,11'") from None
    if not blocks or blocks[0] < 0 or blocks[-1] >= n_layers:
        raise ValueError(f"model.lora.blocks '{spec}': indices must lie in 0..{n_layers - 1}")
    return blocks


def lora_target_names(lora_cfg, n_layers: int) -> list[str]:
    """Full module names (relative to the ViT) that receive adapters."""
    unknown = set(lora_cfg.targets) - set(_TARGETS)
    if unknown or not lora_cfg.targets:
        raise ValueError(f"model.lora.targets {lora_cfg.targets}: choose from {list(_TARGETS)}")
    return [f"transformer.resblocks.{i}.{module}" for i in lora_blocks(lora_cfg.blocks, n_layers)
            for t in lora_cfg.targets for module in _TARGETS[t]]


def apply_lora(model: nn.Module, lora_cfg) -> nn.Module:
    """Inject peft LoRA layers into ``model.visual`` (a ViT) in place; B = 0, so outputs are unchanged.

    peft's ``inject_adapter_in_model`` mutates the module instead of wrapping the whole model, so
    the model stays a ``ReIDModel`` and its state-dict keys stay stable
    (``…attn.q_proj.base_layer.weight``, ``…attn.q_proj.lora_A.default.weight``).
    """
    from peft import LoraConfig, inject_adapter_in_model
    vit = getattr(model.visual, "vit", None)
    if vit is None:
        raise ValueError("model.lora needs a ViT image encoder (the reference has no LoRA for ResNets)")
    if getattr(model, "uses_lora", False):
        raise ValueError("LoRA is already applied to this model")
    n_layers = len(vit.transformer.resblocks)
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        use_rslora=lora_cfg.rslora, bias="none", init_lora_weights=True,
                        target_modules=lora_target_names(lora_cfg, n_layers))
    inject_adapter_in_model(config, vit)   # also freezes the ViT's base weights; set_trainable decides
    model.uses_lora = True
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base Linear and drop the adapters, in place (for export).

    The merged model has the same state-dict keys as a model built without LoRA, so it loads with
    ``model.lora.enabled=false`` and no peft. Merging is explicit: ``eval()`` never touches weights.
    """
    from peft.tuners.lora import LoraLayer
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name, module in targets:
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    model.uses_lora = False
    return model


# --------------------------------------------------------------------------- trainable sets

def _vision_layer_norms(model: nn.Module) -> set[str]:
    return {f"visual.{m_name}.{p_name}" for m_name, m in model.visual.named_modules()
            if isinstance(m, nn.LayerNorm) for p_name, _ in m.named_parameters(recurse=False)}


def trainable_names(model: nn.Module, stage: str) -> set[str]:
    """Names of the parameters that train in ``stage`` ("stage1" | "stage2"), per the spec."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got '{stage}'")
    names = [n for n, _ in model.named_parameters()]
    if stage == "stage1":
        return {n for n in names if n.startswith("prompts.")}
    heads = {"bottleneck.weight", "bottleneck_proj.weight", "classifier.weight", "classifier_proj.weight"}
    if getattr(model, "uses_lora", False):
        lora = {n for n in names if ".lora_A." in n or ".lora_B." in n}
        return lora | _vision_layer_norms(model) | heads
    return {n for n in names if n.startswith(("visual.", "sie_embed"))} | heads


def trainable_parameters(model: nn.Module, stage: str) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs that train in ``stage``, in model order (no side effects)."""
    names = trainable_names(model, stage)
    return [(n, p) for n, p in model.named_parameters() if n in names]


def set_trainable(model: nn.Module, stage: str) -> list[tuple[str, nn.Parameter]]:
    """Set ``requires_grad`` to exactly the trainable set of ``stage`` and return that set.

    Example::

        model = build_model(cfg.model, num_classes=751, num_cameras=6)
        prompt_params = set_trainable(model, "stage1")     # prompts only
        image_params = set_trainable(model, "stage2")      # image side (or LoRA set with LoRA on)
        optimizer = torch.optim.Adam([p for _, p in image_params], lr=5e-6)
        print(parameter_table(model))
    """
    names = trainable_names(model, stage)
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# --------------------------------------------------------------------------- table

def parameter_group(name: str) -> str:
    """The table group of a parameter name."""
    if name.startswith("prompts."):
        return "prompts"
    if name.startswith("text."):
        return "text encoder"
    if ".lora_A." in name or ".lora_B." in name:
        return "lora"
    if name.startswith("bottleneck"):
        return "bnneck"
    if name.startswith("classifier"):
        return "classifiers"
    if name.startswith("sie_embed"):
        return "sie"
    part = name.split(".")
    if ".ln_" in name:
        return "vision: layernorm"
    if ".attn." in name:
        return "vision: attention"
    if ".mlp." in name:
        return "vision: mlp"
    if name.startswith("visual.resnet."):
        return "vision: attnpool" if part[2] == "attnpool" else f"vision: {part[2] if 'layer' in part[2] else 'stem'}"
    if part[-1] == "proj":
        return "vision: proj"
    return "vision: embeddings"


_TABLE_ORDER = ["prompts", "text encoder", "vision", "lora", "sie", "bnneck", "classifiers"]


def parameter_table(model: nn.Module) -> str:
    """Parameter counts by group, split into trainable and frozen (current ``requires_grad``)."""
    rows: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        row = rows.setdefault(parameter_group(name), [0, 0])
        row[0 if param.requires_grad else 1] += param.numel()
    # fixed group order; vision parts keep the model's own order (the sort is stable)
    ordered = sorted(rows.items(), key=lambda item: _TABLE_ORDER.index(item[0].split(":")[0]))
    lines = [f"{'group':<22}{'trainable':>14}{'frozen':>14}", "-" * 50]
    lines += [f"{g:<22}{t:>14,}{f:>14,}" for g, (t, f) in ordered]
    total_t, total_f = sum(r[0] for r in rows.values()), sum(r[1] for r in rows.values())
    lines += ["-" * 50, f"{'total':<22}{total_t:>14,}{total_f:>14,}"]
    return "\n".join(lines)
