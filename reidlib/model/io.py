"""Trained models on disk: what a checkpoint records about a model, and rebuilding one from it.

A reidlib checkpoint (``model_final.pt`` or a resumable ``checkpoint_stage*_e*.pt``) holds the
state dict, the resolved config, the number of training identities and cameras, whether CLIP
ran with QuickGELU, and a model card (reidlib version, creation time, data set and its statistics;
``model_final.pt`` also its final metrics), which is all :func:`load_trained_model` needs to
rebuild the model without CLIP's original weights. A state dict saved by the CLIP-ReID reference
code (or the thesis fork) loads too: its format is read from the keys
(:mod:`reidlib.model.reference`). Files are loaded with ``weights_only=True``: no pickled code runs.

Example::

    model, cfg = load_trained_model("results/runs/tiny/model_final.pt")
    model, cfg = load_trained_model("MSMT17_clipreid_12x12sie_ViT-B-16_60.pth")   # reference file
    feats = model.encode_image(images)
    describe_weights("results/runs/tiny/model_final.pt")["metrics"]["mAP"]
"""
from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from open_clip.transformer import QuickGELU

from ..config import Config, config_diff, config_from_dict, flatten, load_config, method_of, to_dict, validate
from ..files import load_checkpoint, save_checkpoint
from .reference import convert_reference, is_reference_state
from .reid import build_model

log = logging.getLogger("reidlib")

# Model keys a trained model may be tested under with other values, without a warning: the
# weights source (the checkpoint holds every weight), the test feature, and training-only keys.
_TEST_TIME_MODEL_KEYS = ("model.pretrained", "model.neck_feat", "model.text_chunk", "model.lora.lr")


def uses_quick_gelu(model) -> bool:
    """Whether the CLIP inside was built with QuickGELU (OpenAI weights) rather than GELU."""
    return any(isinstance(m, QuickGELU) for m in model.modules())


def reidlib_version() -> str:
    """The installed reidlib's version (``0+unknown`` when run from a source tree never installed)."""
    try:
        return metadata.version("reidlib")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def model_record(model, cfg: Config, num_classes: int, num_cameras: int, *, num_views: int = 0,
                 dataset=None) -> dict:
    """The checkpoint entries that rebuild ``model`` (weights, config, identities, cameras, views,
    activation) and its model card: reidlib version, UTC creation time, data set name and, given the
    loaded ``dataset``, its statistics (ids, images, cameras per split)."""
    record = {"model": model.state_dict(), "config": to_dict(cfg), "num_classes": num_classes,
              "num_cameras": num_cameras, "num_views": num_views, "quick_gelu": uses_quick_gelu(model),
              "reidlib_version": reidlib_version(),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "dataset": cfg.data.dataset}
    if dataset is not None:
        record["dataset_stats"] = dataset.stats()
    return record


def read_weights(path: str | Path) -> tuple[str, dict]:
    """``("reidlib" | "reference", the loaded dict)``; a clear error for anything else."""
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
    """The config a weights file implies, with ``key=value`` overrides: a reidlib checkpoint's own,
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


def convert_weights(src: str | Path, dst: str | Path, cfg: Config | None = None, dataset: str | None = None) -> Path:
    """Write the weights ``src`` (a reference state dict, or a reidlib checkpoint) as a reidlib
    checkpoint at ``dst`` (atomically), with its config and model card; ``dataset`` names the data
    set it was trained on when known (a reference file does not say)."""
    kind, state = read_weights(src)
    model, used = load_trained_model(src, cfg)
    num_cameras = model.sie_cameras or int(state.get("num_cameras", 0))
    record = model_record(model, used, model.num_classes, num_cameras,
                          num_views=model.sie_views or int(state.get("num_views", 0)))
    record["dataset"] = dataset or (state.get("dataset", used.data.dataset) if kind == "reidlib" else "not recorded")
    record["converted_from"] = str(src)
    if kind == "reference":
        record["detected"] = describe_weights(src, used)
    save_checkpoint(dst, record)
    log.info("wrote %s (%s, %d identities) from %s", dst, used.model.name, model.num_classes, src)
    return Path(dst)


def load_trained_model(path: str | Path, cfg: Config | None = None, device="cpu"):
    """Rebuild a trained model from ``model_final.pt``, a checkpoint or a reference state dict;
    returns (model, cfg) where ``cfg.model`` is what the model was built with.

    reidlib checkpoints: the architecture, prompts, LoRA and the number of identities come from the
    checkpoint's own config, so any data set can be tested with any trained model (no key-for-key
    match as in the reference). Of ``cfg`` only the test-time choice ``model.neck_feat`` is used;
    other model keys that differ from the checkpoint's are listed in a warning and ignored.

    Reference state dicts: what the keys tell is used, and ``cfg`` (default: the shipped
    vit_clipreid or rn50_clipreid) supplies the rest; one log line names both.
    """
    kind, state = read_weights(path)
    if kind == "reference":
        return _load_reference(path, state, cfg, device)
    saved = config_from_dict(state["config"])
    model_cfg = saved.model
    if cfg is not None:
        model_cfg = dataclasses.replace(model_cfg, neck_feat=cfg.model.neck_feat)
        differ = config_diff({"model": state["config"]["model"]}, {"model": to_dict(cfg)["model"]},
                             ignore=_TEST_TIME_MODEL_KEYS)
        if differ:
            log.warning("%s: using the checkpoint's model settings, not the config's: %s", path,
                        "; ".join(differ))
    # The checkpoint holds every weight: build without loading CLIP weights, with the activation
    # the trained model used (QuickGELU for OpenAI weights).
    build_cfg = dataclasses.replace(model_cfg, pretrained="none",
                                    quick_gelu="true" if state["quick_gelu"] else "false")
    model = build_model(build_cfg, num_classes=state["num_classes"], num_cameras=state["num_cameras"],
                        num_views=state.get("num_views", 0))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), dataclasses.replace(cfg or saved, model=model_cfg)


def _load_reference(path, state: dict, cfg: Config | None, device):
    base = cfg or reference_config(state)
    ref = convert_reference(state, base.model, source=f"weights {path}")
    log.info("%s: %s", path, ref.summary())
    if "visual.resnet.conv1.weight" in ref.state:
        resnet_mean = load_config("rn50_clipreid").data.pixel_mean
        if list(base.data.pixel_mean) != list(resnet_mean):
            log.warning("%s: a ResNet model read with data.pixel_mean=%s; the reference normalised RN50 input with "
                        "%s (the rn50_clipreid config)", path, list(base.data.pixel_mean), list(resnet_mean))
    model = build_model(ref.model_cfg, num_classes=ref.num_classes, num_cameras=ref.num_cameras,
                        num_views=ref.num_views)
    result = model.load_state_dict(ref.state, strict=ref.has_text)
    # A make_model (baseline) file has no text tower and no prompts; they stay random, unused for images.
    leftover = [k for k in result.missing_keys if not k.startswith(("text.", "prompts."))]
    if leftover or result.unexpected_keys:
        raise ValueError(f"weights {path}: converted keys do not fit the model: missing {leftover[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")
    return model.to(device).eval(), dataclasses.replace(base, model=ref.model_cfg)


def describe_weights(path: str | Path, cfg: Config | None = None) -> dict:
    """The model card of a weights file, as a plain dict (what ``python -m reidlib info`` prints).

    reidlib checkpoints: method, architecture, identities, cameras, data set and its statistics,
    final metrics, reidlib version and creation time, as recorded. Reference state dicts: what was
    detected from the keys and what would be taken from the config.
    """
    kind, state = read_weights(path)
    if kind == "reference":
        base = cfg or reference_config(state)
        ref = convert_reference(state, base.model, source=f"weights {path}")
        return {"weights": str(path), **ref.detected, "from the config": ref.assumed}
    saved = config_from_dict(state["config"])
    model = saved.model
    card = {"weights": str(path), "format": "reidlib checkpoint", "method": method_of(saved),
            "architecture": model.name, "image_size": list(model.image_size),
            "prompts": f"{model.prompt} ({model.n_shared} shared + {model.n_per_id} per-ID, depth {model.depth})",
            "LoRA": f"r {model.lora.r}, alpha {model.lora.alpha} on {','.join(model.lora.targets)}"
                    if model.lora.enabled else "off",
            "SIE": _sie_card(model, state),
            "identities": state["num_classes"], "dataset": state.get("dataset", saved.data.dataset)}
    for key in ("dataset_stats", "metrics", "reidlib_version", "created"):
        if key in state:
            card[key] = state[key]
    if "stage" in state:
        card["resumable"] = f"stage {state['stage']}, {state['epoch']} epochs done"
    return card


def _sie_card(model_cfg, state: dict) -> str:
    """What the SIE table is indexed by, for the model card."""
    parts = ([f"{state['num_cameras']} cameras"] if model_cfg.sie_camera else []) + \
        ([f"{state.get('num_views', 0)} views"] if model_cfg.sie_view else [])
    return f"{' x '.join(parts)}, coefficient {model_cfg.sie_coe}" if parts else "off"
