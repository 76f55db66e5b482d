"""Trained models on disk: what a checkpoint records about a model, and rebuilding one from it.

A reidlib checkpoint (``model_final.pt`` or a resumable ``checkpoint_stage*_e*.pt``) holds the
state dict, the resolved config, the number of training identities and cameras, and whether CLIP
ran with QuickGELU, which is all :func:`load_trained_model` needs to rebuild the model without
CLIP's original weights.

Example::

    model, cfg = load_trained_model("results/runs/tiny/model_final.pt")
    feats = model.encode_image(images)
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from open_clip.transformer import QuickGELU

from ..config import Config, config_diff, config_from_dict, to_dict
from ..files import load_checkpoint
from .reid import build_model

log = logging.getLogger("reidlib")

# Model keys a trained model may be tested under with other values, without a warning: the
# weights source (the checkpoint holds every weight), the test feature, and training-only keys.
_TEST_TIME_MODEL_KEYS = ("model.pretrained", "model.neck_feat", "model.text_chunk", "model.lora.lr")


def uses_quick_gelu(model) -> bool:
    """Whether the CLIP inside was built with QuickGELU (OpenAI weights) rather than GELU."""
    return any(isinstance(m, QuickGELU) for m in model.modules())


def model_record(model, cfg: Config, num_classes: int, num_cameras: int) -> dict:
    """The checkpoint entries that rebuild ``model``: weights, config, identities, cameras, activation."""
    return {"model": model.state_dict(), "config": to_dict(cfg), "num_classes": num_classes,
            "num_cameras": num_cameras, "quick_gelu": uses_quick_gelu(model)}


def load_trained_model(path: str | Path, cfg: Config | None = None, device="cpu"):
    """Rebuild a trained model from ``model_final.pt`` or a checkpoint; returns (model, cfg).

    The architecture, prompts, LoRA and the number of identities come from the checkpoint's own
    config, so any data set can be tested with any trained model (no key-for-key match as in the
    reference). Of ``cfg`` only the test-time choice ``model.neck_feat`` is used; other model keys
    that differ from the checkpoint's are listed in a warning and ignored.
    """
    state = load_checkpoint(path, map_location="cpu")
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
    model_cfg = dataclasses.replace(model_cfg, pretrained="none",
                                    quick_gelu="true" if state["quick_gelu"] else "false")
    model = build_model(model_cfg, num_classes=state["num_classes"], num_cameras=state["num_cameras"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), (cfg or saved)
