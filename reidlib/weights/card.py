"""The model card: what reidlib records with a trained model, and what ``reidlib info`` shows.

Recorded (:func:`model_record`): the weights, the resolved config, the numbers of training
identities, cameras and views, whether CLIP ran with QuickGELU (the activation is not in the
weights), reidlib's version, the UTC creation time, the data set and its statistics; the trainer
adds the final metrics. Shown (:func:`describe_weights`): the same for a reidlib model, or for a
reference state dict what was read from its keys and what the config supplies.

Example::

    record = model_record(model, cfg, num_classes=751, num_cameras=6, dataset=market)
    describe_weights("results/runs/tiny/model_final.pt")["metrics"]["mAP"]
"""
from __future__ import annotations

from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from open_clip.transformer import QuickGELU

from ..config import Config, config_from_dict, method_of, to_dict
from .detect import read_weights, reference_config
from .reference import convert_reference
from .trained import preprocessing, trained_folder


def uses_quick_gelu(model) -> bool:
    """Whether the CLIP inside ``model`` (any module tree) was built with QuickGELU (OpenAI
    weights) rather than GELU."""
    return any(isinstance(m, QuickGELU) for m in model.modules())


def reidlib_version() -> str:
    """The installed reidlib's version (``0+unknown`` when run from a source tree never installed)."""
    try:
        return metadata.version("reidlib")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def model_record(model, cfg: Config, num_classes: int, num_cameras: int, *, num_views: int = 0,
                 dataset=None) -> dict:
    """The entries that rebuild ``model`` (weights, config, identities, cameras, views, activation)
    and its model card: reidlib version, UTC creation time, data set name and, given the loaded
    ``dataset``, its statistics (ids, images, cameras per split). ``model`` is any module with a
    ``state_dict()``; save with ``save_trained(folder, record.pop("model"), record)`` or
    ``save_checkpoint(path, record)``."""
    record = {"model": model.state_dict(), "config": to_dict(cfg), "num_classes": num_classes,
              "num_cameras": num_cameras, "num_views": num_views, "quick_gelu": uses_quick_gelu(model),
              "reidlib_version": reidlib_version(),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "dataset": cfg.data.dataset}
    if dataset is not None:
        record["dataset_stats"] = dataset.stats()
    return record


def describe_weights(path: str | Path, cfg: Config | None = None) -> dict:
    """The model card of a weights file, as a plain dict (what ``python -m reidlib info`` prints).

    reidlib models: method, architecture, identities, cameras, data set and its statistics, final
    metrics, preprocessing, reidlib version and creation time, as recorded. Reference state dicts:
    what was detected from the keys and what would be taken from the config.
    """
    kind, state = read_weights(path)
    if kind == "reference":
        base = cfg or reference_config(state)
        ref = convert_reference(state, base.model, source=f"weights {path}")
        return {"weights": str(path), **ref.detected, "from the config": ref.assumed}
    saved = config_from_dict(state["config"])
    model = saved.model
    folder = trained_folder(path) is not None
    card = {"weights": str(path),
            "format": "reidlib model folder (safetensors + config.json)" if folder else "reidlib checkpoint",
            "method": state.get("method") or method_of(saved),
            "architecture": model.name, "image_size": list(model.image_size),
            "prompts": f"{model.prompt} ({model.n_shared} shared + {model.n_per_id} per-ID, depth {model.depth})",
            "LoRA": f"r {model.lora.r}, alpha {model.lora.alpha} on {','.join(model.lora.targets)}"
                    if model.lora.enabled else "off",
            "SIE": _sie_card(model, state),
            "identities": state["num_classes"], "dataset": state.get("dataset", saved.data.dataset)}
    for key in ("dataset_stats", "metrics", "reidlib_version", "created"):
        if key in state:
            card[key] = state[key]
    if folder:
        card["preprocessing"] = preprocessing(state)
    if "stage" in state:
        card["resumable"] = f"stage {state['stage']}, {state['epoch']} epochs done"
    return card


def _sie_card(model_cfg, state: dict) -> str:
    """What the SIE table is indexed by, for the model card."""
    parts = ([f"{state['num_cameras']} cameras"] if model_cfg.sie_camera else []) + \
        ([f"{state.get('num_views', 0)} views"] if model_cfg.sie_view else [])
    return f"{' x '.join(parts)}, coefficient {model_cfg.sie_coe}" if parts else "off"
