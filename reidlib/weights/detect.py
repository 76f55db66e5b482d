"""Which kind of trained re-ID weights a path holds, and the config they imply.

reidlib's own (a model folder, ``model_final.pt``, a ``checkpoint_stage*_e*.pt``) or a state dict
saved by the CLIP-ReID reference code or the thesis fork (:mod:`reidlib.weights.reference`); CLIP's
own weights are :mod:`reidlib.weights.clip`'s.

Example::

    kind, state = read_weights("runs/market/model")     # ("reidlib", {"model": ..., "config": ...})
    kind, state = read_weights("MSMT17_clipreid_12x12sie_ViT-B-16_60.pth")   # ("reference", {...})
    cfg = weights_config("runs/market/model", ["model.neck_feat=after"])
"""
from __future__ import annotations

from pathlib import Path

from ..config import Config, config_from_dict, flatten, load_config, to_dict, validate
from ..storage import load_checkpoint
from .reference import is_reference_state
from .trained import read_trained, trained_folder


def read_weights(path: str | Path) -> tuple[str, dict]:
    """``("reidlib" | "reference", the loaded dict)``; a clear error for anything else.

    A reidlib model folder (or its ``config.json`` / ``model.safetensors``) is read without
    pickle; torch files with ``weights_only=True``.
    """
    if Path(path).is_dir() or trained_folder(path) is not None:
        return "reidlib", read_trained(path)
    state = load_checkpoint(path, map_location="cpu")
    if isinstance(state, dict) and "model" in state and "config" in state:
        return "reidlib", state
    if is_reference_state(state):
        return "reference", state
    raise ValueError(f"weights {path}: neither a reidlib checkpoint (no 'model' and 'config' entries) nor a "
                     "CLIP-ReID reference state dict (no image_encoder.* keys); CLIP's own weights go to "
                     "model.pretrained=")


def reference_config(state: dict) -> Config:
    """The shipped config a reference state dict starts from: rn50_clipreid or vit_clipreid."""
    resnet = any(k.endswith("image_encoder.attnpool.c_proj.weight") for k in state)
    return load_config("rn50_clipreid" if resnet else "vit_clipreid")


def weights_config(path: str | Path, overrides=()) -> Config:
    """The config a weights file implies, with ``key=value`` overrides: a reidlib model's own,
    or for a reference state dict the shipped config of its architecture (what the CLI uses when
    no CONFIG is given)."""
    kind, state = read_weights(path)
    base = config_from_dict(state["config"]) if kind == "reidlib" else reference_config(state)
    if not overrides:
        return base
    pairs = dict(item.split("=", 1) if "=" in item else (item, None) for item in overrides)
    bad = [k for k, v in pairs.items() if v is None]
    if bad:
        raise ValueError(f"override '{bad[0]}' is not key=value (e.g. model.neck_feat=after)")
    cfg = config_from_dict({**flatten(to_dict(base)), **pairs})
    validate(cfg)
    return cfg
