"""What trains when: the trainable parameter set of each stage, and a parameter table.

Trainable sets (spec §3-4):

* stage 1: every prompt-learner parameter;
* stage 2, full fine-tuning: every image-side parameter (image encoder, SIE table, BNNeck weights,
  classifiers); never the text encoder, the prompts or the BNNeck biases;
* stage 2 with LoRA: LoRA A/B, every LayerNorm of the image encoder, BNNeck weights, classifiers.

Example::

    params = set_trainable(model, "stage2")     # LoRA A/B, vision LayerNorms, BNNeck, classifiers
    print(parameter_table(model))
"""
from __future__ import annotations

from torch import nn

STAGES = ("stage1", "stage2")


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
    if part[0] not in ("visual", "text"):   # a method's own modules (PromptSG's inversion network, say)
        return f"method: {part[0]}"
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


_TABLE_ORDER = ["prompts", "text encoder", "vision", "lora", "method", "sie", "bnneck", "classifiers"]


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
