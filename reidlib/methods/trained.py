"""Trained models rebuilt from their weights: reidlib's own, or the CLIP-ReID reference's.

The files themselves are :mod:`reidlib.weights`' (a model folder of safetensors + a JSON card,
``model_final.pt``, a resumable ``checkpoint_stage*_e*.pt``, a reference state dict); this file
builds the model they describe, through the method that trained it (``cfg.method``, after
importing ``cfg.plugins``), so a method of a user's own loads like the built-in ones. A reidlib model
records everything :func:`load_trained_model` needs (config, identities, cameras, activation), so
CLIP's original weights are not needed. A
reference state dict's format is read from its keys (:mod:`reidlib.weights.reference`).

Example::

    model, cfg = load_trained_model("results/runs/tiny/model")        # a model folder
    model, cfg = load_trained_model("results/runs/old/model_final.pt")  # as reidlib 0.2 saved it
    model, cfg = load_trained_model("MSMT17_clipreid_12x12sie_ViT-B-16_60.pth")   # reference file
    feats = model.encode_image(images)
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..config import Config, config_diff, config_from_dict, load_config, to_dict
from ..model import build_model
from ..optim import check_finite_weights
from ..storage import save_checkpoint

# the reading side moved to reidlib.weights; these names stay importable from here
from ..weights.card import describe_weights, model_record, reidlib_version, uses_quick_gelu  # noqa: F401
from ..weights.detect import read_weights, reference_config, weights_config  # noqa: F401
from ..weights.reference import convert_reference
from ..weights.trained import save_trained
from .registry import method_for

log = logging.getLogger("reidlib")

# Model keys a trained model may be tested under with other values, without a warning: the
# weights source (the checkpoint holds every weight), the test feature, and training-only keys.
_TEST_TIME_MODEL_KEYS = ("model.pretrained", "model.neck_feat", "model.text_chunk", "model.lora.lr")


def convert_weights(src: str | Path, dst: str | Path, cfg: Config | None = None, dataset: str | None = None) -> Path:
    """Write the weights ``src`` (a reference state dict, or a reidlib model) as a reidlib model at
    ``dst`` (atomically), with its config and model card: a model folder (safetensors + config.json,
    :func:`reidlib.weights.save_trained`), or a torch file when ``dst`` ends in ``.pt``/``.pth``.
    ``dataset`` names the data set it was trained on when known (a reference file does not say)."""
    kind, state = read_weights(src)
    model, used = load_trained_model(src, cfg)
    num_cameras = model.sie_cameras or int(state.get("num_cameras", 0))
    record = model_record(model, used, model.num_classes, num_cameras,
                          num_views=model.sie_views or int(state.get("num_views", 0)))
    record["dataset"] = dataset or (state.get("dataset", used.data.dataset) if kind == "reidlib" else "not recorded")
    record["converted_from"] = str(src)
    if kind == "reference":
        record["detected"] = describe_weights(src, used)
    else:   # what the source's card says about its training survives the conversion
        record.update({k: state[k] for k in ("metrics", "dataset_stats", "method") if k in state})
    check_finite_weights(record["model"], f"the weights of {src}")   # NaN is never written, in either format
    if Path(dst).suffix in (".pt", ".pth"):
        save_checkpoint(dst, record)
    else:
        save_trained(dst, record.pop("model"), record)
    log.info("wrote %s (%s, %d identities) from %s", dst, used.model.name, model.num_classes, src)
    return Path(dst)


def load_trained_model(path: str | Path, cfg: Config | None = None, device="cpu"):
    """Rebuild a trained model from a model folder, ``model_final.pt``, a checkpoint or a reference
    state dict; returns (model, cfg) where ``cfg.model`` is what the model was built with.

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
    built = dataclasses.replace(saved, model=build_cfg)
    model = method_for(built).build_model(built, num_classes=state["num_classes"], num_cameras=state["num_cameras"],
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
