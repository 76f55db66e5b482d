"""LoRA as tensors: the scaling of ``B @ A`` and folding peft's LoRA triples of a state dict into
plain weights, without building a model (fine-tuning from a checkpoint that was trained with LoRA).

The modules (injecting adapters, merging them in a model) are :mod:`reidlib.model.lora`'s.

Example::

    state = fold_lora_state(checkpoint["model"], alpha=4.0, rslora=True)
    state["visual.vit.transformer.resblocks.0.attn.q_proj.weight"]     # W + alpha/sqrt(r) * B @ A
"""
from __future__ import annotations


def lora_scaling(alpha: float, r: int, rslora: bool = True) -> float:
    """The factor on ``B @ A``: alpha/sqrt(r) with rank-stabilised LoRA, alpha/r without.

    >>> lora_scaling(4.0, 16), lora_scaling(4.0, 16, rslora=False)
    (1.0, 0.25)
    """
    return alpha / r ** 0.5 if rslora else alpha / r


def fold_lora_state(state: dict, alpha: float, rslora: bool = True) -> dict:
    """A state dict with every peft LoRA triple folded into a plain Linear's weight, W + s·B·A.

    ``{p}.base_layer.weight``, ``{p}.lora_A.default.weight`` [r, in] and ``{p}.lora_B.default.weight``
    [out, r] become ``{p}.weight`` (and ``{p}.base_layer.bias`` becomes ``{p}.bias``): the keys of a
    model built without LoRA. Works on tensors alone, so a checkpoint's encoder can be taken without
    building its model (fine-tuning from it).

    >>> import torch
    >>> state = {"l.base_layer.weight": torch.eye(2), "l.lora_A.default.weight": torch.ones(1, 2),
    ...          "l.lora_B.default.weight": torch.ones(2, 1)}
    >>> fold_lora_state(state, alpha=1.0)["l.weight"].tolist()
    [[2.0, 1.0], [1.0, 2.0]]
    """
    out = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." not in key:
            out[key] = value
            continue
        prefix, _, leaf = key.partition(".base_layer.")
        out[f"{prefix}.{leaf}"] = value
        lora_a, lora_b = state.get(f"{prefix}.lora_A.default.weight"), state.get(f"{prefix}.lora_B.default.weight")
        if leaf == "weight" and lora_a is not None and lora_b is not None:
            scale = lora_scaling(alpha, lora_a.shape[0], rslora)
            out[f"{prefix}.weight"] = value + scale * (lora_b.float() @ lora_a.float()).to(value.dtype)
    return out
