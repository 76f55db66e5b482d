"""Fine-tuning from a trained re-ID model: ``model.pretrained=`` naming a reidlib model (folder or
checkpoint) or a reference state dict.

The image and text encoders, the BNNeck and the shared prompt vectors are taken from the trained
model; what belongs to its identities (the two classifiers, the per-identity prompts) and to its
cameras (the SIE table) is re-initialised for the new data set, whose identity count may differ.
LoRA adapters of the trained model are folded into its weights first, so the new model starts
from exactly the trained encoder, with or without LoRA of its own. Only tensors are read here;
:func:`take_trained_weights` copies them into any model with ``state_dict`` / ``load_state_dict``
(the model package builds it and calls this).

Example::

    cfg = load_config("vit_clipreid", ["model.pretrained=runs/market/model"])
    source = read_trained_source(cfg.model)          # None for CLIP weights, a tag or none
    model = build_model(cfg.model, num_classes=120, num_cameras=4)   # calls take_trained_weights
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import config_from_dict
from .lora import fold_lora_state
from .reference import convert_reference, is_reference_state
from .trained import read_trained, trained_folder

log = logging.getLogger("reidlib")

# Tensors tied to the trained data set's identities or cameras: never carried over.
IDENTITY_KEYS = ("classifier.weight", "classifier_proj.weight", "prompts.per_id", "prompts.deep_per_id")
CAMERA_KEYS = ("sie_embed",)
_GROUPS = (("visual.", "image encoder"), ("text.", "text encoder"), ("bottleneck", "BNNeck"),
           ("prompts.", "shared prompts"))


@dataclass
class TrainedSource:
    """The trained model a new one starts from."""
    path: str
    kind: str                 # "reidlib model folder" | "reidlib checkpoint" | "CLIP-ReID reference state dict"
    name: str                 # its architecture (model.name)
    quick_gelu: bool
    state: dict               # plain reidlib keys, LoRA folded
    has_text: bool = True


def _peek(path: Path):
    """The file's top-level object, loaded without running code; None when it is not a torch pickle."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy format (no mmap), JIT archives, safetensors, junk
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - not ours to judge: load_clip reports what it cannot read
            return None


def read_trained_source(model_cfg) -> TrainedSource | None:
    """The trained re-ID model ``model_cfg.pretrained`` names, or None (CLIP weights, a tag, none)."""
    choice = str(model_cfg.pretrained).strip()
    if choice.lower() in ("", "none", "openai"):
        return None
    path = Path(choice).expanduser()
    folder = trained_folder(path) is not None
    if folder:
        blob = read_trained(path)
    elif path.is_file():
        blob = _peek(path)
    else:
        return None
    if isinstance(blob, dict) and "model" in blob and "config" in blob:
        saved = config_from_dict(blob["config"]).model
        state = fold_lora_state(dict(blob["model"]), saved.lora.alpha, saved.lora.rslora)
        kind = "reidlib model folder" if folder else "reidlib checkpoint"
        return TrainedSource(str(path), kind, saved.name, bool(blob["quick_gelu"]), state)
    if is_reference_state(blob):
        ref = convert_reference(blob, model_cfg, source=f"model.pretrained={path}")
        state = fold_lora_state(ref.state, model_cfg.lora.alpha, ref.model_cfg.lora.rslora)
        return TrainedSource(str(path), "CLIP-ReID reference state dict", ref.model_cfg.name, True, state,
                             has_text=ref.has_text)
    return None


def check_source(model_cfg, source: TrainedSource, needs_text: bool = True) -> None:
    """The new model must have the trained model's architecture and, when ``needs_text`` (a method
    that learns prompts), a text encoder to learn them with."""
    if source.name != model_cfg.name.replace("/", "-"):
        raise ValueError(f"model.pretrained={source.path} holds a {source.name} model but model.name is "
                         f"{model_cfg.name}; set model.name={source.name}")
    if needs_text and not source.has_text:
        raise ValueError(f"model.pretrained={source.path} has no text encoder (the reference's make_model "
                         "baseline); fine-tune from a CLIP-ReID checkpoint, or start from CLIP's weights")


def take_trained_weights(model, source: TrainedSource) -> dict[str, list[str]]:
    """Copy the encoders (and shared parts) of ``source`` into ``model``, re-initialising the rest.

    Returns ``{"taken": [...], "reinitialised": [...], "not taken": [...]}`` (tensor names) and logs
    a summary. An encoder tensor whose shape differs is an error (another input size or stride), not
    a silent re-initialisation.
    """
    own = model.state_dict()
    taken, skipped = {}, []
    for key, value in source.state.items():
        if key.startswith(IDENTITY_KEYS + CAMERA_KEYS):
            continue
        if key in own and own[key].shape == value.shape:
            taken[key] = value.to(own[key].dtype)
        elif key in own and key.startswith(("visual.", "text.")):
            raise ValueError(f"model.pretrained={source.path}: {key} is {list(value.shape)} there and "
                             f"{list(own[key].shape)} here; use the trained model's input size and stride "
                             "(model.image_size, model.stride)")
        else:
            skipped.append(key)
    model.load_state_dict(taken, strict=False)
    fresh = [k for k in IDENTITY_KEYS + CAMERA_KEYS if k in own]      # always new: this data set's own
    _log_transfer(source, model, taken, fresh, skipped)
    return {"taken": sorted(taken), "reinitialised": fresh, "not taken": sorted(skipped)}


def _log_transfer(source: TrainedSource, model, taken: dict, fresh: list, skipped: list) -> None:
    counts = []
    for prefix, label in _GROUPS:
        n = sum(1 for k in taken if k.startswith(prefix))
        if n:
            counts.append(f"{label} ({n} tensors)")
    message = (f"model.pretrained={source.path} ({source.kind}): took {', '.join(counts)}; re-initialised for "
               f"{model.num_classes} identities: {', '.join(fresh) or 'nothing'}")
    if skipped:
        message += f"; not taken (absent here or another shape): {', '.join(skipped[:6])}"
    log.info(message)
