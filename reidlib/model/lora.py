"""LoRA on the image encoder, through peft (Hu et al., ICLR 2022), as the thesis applies it in
CLIP-ReID's stage 2: rank-r adapters on the vision blocks' attention projections q, k, v and out
(optionally the MLP's two Linears), B zero-initialised, scaling alpha/sqrt(r) (rank-stabilised
LoRA, Kalajdzievski 2023; peft ``use_rslora``). The attention projections are the separate Linears
of :class:`~reidlib.model.attention.SplitAttention`.

Example::

    model = build_model(cfg.model, num_classes=751, num_cameras=6)   # cfg.model.lora.enabled
    model = merge_lora(model)                   # for export: plain Linears, loads without peft
    model.uses_lora                             # False
"""
from __future__ import annotations

import open_clip
from torch import nn

# pure state-dict maths, kept with the weights formats (fine-tuning folds a checkpoint's LoRA)
from ..weights.lora import fold_lora_state, lora_scaling  # noqa: F401

# config target name -> module names inside one open_clip residual block (after split_attention)
_TARGETS = {"q": ["attn.q_proj"], "k": ["attn.k_proj"], "v": ["attn.v_proj"], "out": ["attn.out_proj"],
            "mlp": ["mlp.c_fc", "mlp.c_proj"]}


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


def _require_linear_targets(vit: nn.Module, targets: list[str]) -> None:
    """Every configured target must be an ``nn.Linear`` that its module calls: peft skips a missing
    target silently, and ``nn.MultiheadAttention`` reads its ``out_proj`` weight without calling it."""
    modules = dict(vit.named_modules())

    def usable(name: str) -> bool:
        parent = modules.get(name.rpartition(".")[0])
        return isinstance(modules.get(name), nn.Linear) and not isinstance(parent, nn.MultiheadAttention)

    missing = [name for name in targets if not usable(name)]
    if missing:
        raise ValueError(f"model.lora.targets: {len(missing)} target module(s) missing from the image encoder "
                         f"(open_clip {open_clip.__version__}), e.g. {missing[0]}; LoRA needs the split q/k/v/out "
                         "attention of reidlib.model.attention")


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
    targets = lora_target_names(lora_cfg, len(vit.transformer.resblocks))
    _require_linear_targets(vit, targets)
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        use_rslora=lora_cfg.rslora, bias="none", init_lora_weights=True,
                        target_modules=targets)
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
