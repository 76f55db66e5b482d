"""reidlib's trained model on disk: a folder of ``model.safetensors`` and a JSON model card.

The folder holds the tensors (``model.safetensors``: read without pickle, so loading runs no code)
and ``config.json``, the card: the resolved config, the numbers of identities, cameras and views,
whether CLIP ran with QuickGELU, reidlib's version, the UTC creation time, the data set and its
statistics, the final metrics if any, the preprocessing (input size, mean, std, interpolation) and
the sha256 of ``model.safetensors``. The safetensors header in turn records a sha256 of the card,
so a flipped bit in either file is found before a tensor is used. Both files are written into a
temp folder that then replaces the model folder whole (:func:`reidlib.storage.atomic_folder`).

``model_final.pt`` and ``checkpoint_stage*_e*.pt`` (torch files, read with ``weights_only=True``)
stay readable; resumable checkpoints (optimizer and RNG state) remain torch files.

Example::

    record = model_record(model, cfg, num_classes=751, num_cameras=6)   # reidlib.weights.card
    save_trained("runs/market/model", record.pop("model"), record)
    state = read_trained("runs/market/model")          # or .../config.json, .../model.safetensors
    state["model"], state["num_classes"]               # the state dict, 751
    preprocessing(state)                               # {'image_size': [256, 128], ...}
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..config import config_from_dict
from ..storage import CheckpointError, atomic_folder, load_checkpoint

MODEL_FOLDER = "model"              # a run folder's trained model (reidlib 0.2 wrote model_final.pt)
LEGACY_FINAL = "model_final.pt"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "config.json"
FORMAT = "reidlib trained model"       # the card's "format": what tells our folders from others
FORMAT_VERSION = 1
_CARD_HASH_KEY = "reidlib_card_sha256"  # in the safetensors header: the card without its "sha256"


# --------------------------------------------------------------------------- writing

def save_trained(folder: str | Path, state_dict: dict, card: dict) -> Path:
    """Write ``state_dict`` and its model ``card`` as the folder ``folder``, atomically; returns it.

    ``card`` is :func:`~reidlib.weights.card.model_record`'s dict without ``"model"``: it must hold
    ``config`` (the resolved config as a dict) and ``num_classes``, ``num_cameras``, ``num_views``,
    ``quick_gelu``; everything in it must be JSON (numbers, strings, lists, dicts). The format
    marker, the preprocessing and the hashes are added here.

    >>> import tempfile, pathlib, torch
    >>> from reidlib.config import Config, to_dict
    >>> card = {"config": to_dict(Config()), "num_classes": 3, "num_cameras": 0, "num_views": 0,
    ...         "quick_gelu": True}
    >>> folder = save_trained(pathlib.Path(tempfile.mkdtemp()) / "model", {"w": torch.ones(2)}, card)
    >>> sorted(p.name for p in folder.iterdir())
    ['config.json', 'model.safetensors']
    >>> read_trained(folder)["model"]["w"].tolist(), read_trained(folder)["num_classes"]
    ([1.0, 1.0], 3)
    """
    from safetensors.torch import save_file
    if "model" in card:
        raise ValueError("save_trained: the card holds 'model'; pass the state dict on its own "
                         "(record.pop('model'), record)")
    missing = [k for k in ("config", "num_classes", "num_cameras", "quick_gelu") if k not in card]
    if missing:
        raise ValueError(f"save_trained: the card lacks {missing}; build it with model_record()")
    _refuse_non_finite(state_dict, folder)
    core = _as_json({"format": FORMAT, "format_version": FORMAT_VERSION, **card, "num_views": card.get("num_views", 0),
                     "preprocessing": preprocessing(card), "weights_file": WEIGHTS_FILE})
    with atomic_folder(folder) as tmp:
        save_file(_plain_tensors(state_dict), str(tmp / WEIGHTS_FILE), metadata={_CARD_HASH_KEY: _card_hash(core)})
        text = json.dumps({**core, "sha256": file_sha256(tmp / WEIGHTS_FILE)}, indent=2)
        (tmp / CARD_FILE).write_text(text + "\n")
    return Path(folder)


def _refuse_non_finite(state_dict: dict, folder) -> None:
    """A model with NaN or inf weights gives NaN features: never saved (convert, export) as if usable."""
    bad = [k for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"not saving {folder}: {len(bad)} tensor(s) hold NaN or inf values (e.g. {bad[0]}); "
                         "the weights are broken (a diverged training, a damaged file)")


def _as_json(card: dict) -> dict:
    """The card as it reads back from JSON (tuples -> lists); a clear error naming a value that
    JSON cannot hold (a tensor, a path)."""
    try:
        return json.loads(json.dumps(card))
    except TypeError:
        raise TypeError(f"save_trained: card value {_first_non_json(card)} is not JSON; convert it to "
                        "numbers, strings, lists or dicts") from None


def _first_non_json(value, key: str = "card") -> str | None:
    if isinstance(value, dict):
        return next((bad for k, v in value.items() if (bad := _first_non_json(v, f"{key}.{k}"))), None)
    if isinstance(value, (list, tuple)):
        return next((bad for i, v in enumerate(value) if (bad := _first_non_json(v, f"{key}[{i}]"))), None)
    ok = value is None or isinstance(value, (str, int, float, bool))
    return None if ok else f"{key} ({type(value).__name__})"


def _plain_tensors(state_dict: dict) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with storage of its own: safetensors refuses shared storage
    (tied weights, views), so a tensor seen before is cloned."""
    out, seen = {}, set()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"save_trained: state_dict[{key!r}] is a {type(value).__name__}, not a tensor")
        tensor = value.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(pointer)
        out[key] = tensor
    return out


def _card_hash(core: dict) -> str:
    """sha256 of the card without its own "sha256" entry, in one canonical spelling."""
    text = json.dumps({k: v for k, v in core.items() if k != "sha256"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (a ViT-B/16 model is 600 MB).

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "empty")
    >>> open(path, "wb").close(); file_sha256(path)[:12]
    'e3b0c44298fc'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def preprocessing(card: dict) -> dict:
    """What an image must go through before the model: ``image_size`` [h, w], ``pixel_mean``,
    ``pixel_std`` and the test ``interpolation``, from a card (a saved folder's, a loaded
    checkpoint's or :func:`model_record`'s: anything with the resolved ``config``).

    >>> from reidlib.config import Config, to_dict
    >>> preprocessing({"config": to_dict(Config())})
    {'image_size': [256, 128], 'pixel_mean': [0.5, 0.5, 0.5], 'pixel_std': [0.5, 0.5, 0.5], 'interpolation': 'bicubic'}
    """
    if "preprocessing" in card:
        return dict(card["preprocessing"])
    cfg = config_from_dict(card["config"])   # fills keys an older config lacks with their defaults
    return {"image_size": list(cfg.model.image_size), "pixel_mean": list(cfg.data.pixel_mean),
            "pixel_std": list(cfg.data.pixel_std), "interpolation": cfg.data.test_interpolation}


# --------------------------------------------------------------------------- reading

def final_model(run_dir: str | Path) -> Path:
    """A run folder's trained model: ``RUN/model`` (a model folder), or ``RUN/model_final.pt`` for a
    run that reidlib 0.2 trained; ``RUN/model`` when there is neither yet."""
    run_dir = Path(run_dir)
    folder, legacy = run_dir / MODEL_FOLDER, run_dir / LEGACY_FINAL
    return legacy if legacy.is_file() and not (folder / CARD_FILE).is_file() else folder


def has_final_model(run_dir: str | Path) -> bool:
    """Whether a run folder holds its trained model (either format)."""
    path = final_model(run_dir)
    return path.is_file() or (path / CARD_FILE).is_file()


def trained_folder(path: str | Path) -> Path | None:
    """The model folder ``path`` names (the folder, its ``config.json`` or its ``model.safetensors``)
    when its card says it is one of ours; None for anything else (a torch file, CLIP's safetensors).

    A card that cannot be parsed still counts, so that reading it reports the damage.

    >>> trained_folder("model_final.pt") is None
    True
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent if path.name in (WEIGHTS_FILE, CARD_FILE) else None
    if folder is None or not (folder / CARD_FILE).is_file():
        return None
    try:
        card = json.loads((folder / CARD_FILE).read_text())
    except (OSError, ValueError):
        return folder
    return folder if isinstance(card, dict) and card.get("format") == FORMAT else None


def read_trained(path: str | Path) -> dict:
    """A trained reidlib model as ``{"model": state_dict, "config": ..., "num_classes": ..., ...}``:
    from a model folder (or its ``config.json`` / ``model.safetensors``), checked against its
    hashes and read without pickle, or from a ``model_final.pt`` / ``checkpoint_stage*_e*.pt``
    (``torch.load(weights_only=True)``). Damage is a one-line :class:`~reidlib.storage.CheckpointError`.

    Example::

        state = read_trained("runs/market/model")             # or .../model_final.pt
        model.load_state_dict(state["model"]); state["metrics"]["mAP"]
    """
    folder = trained_folder(path)
    if folder is None:
        if Path(path).is_dir():
            raise ValueError(f"weights {path}: a folder, but not a reidlib model folder (no {CARD_FILE} "
                             f"with format '{FORMAT}')")
        return _read_torch_file(path)
    card = read_card(folder)
    weights = folder / card.get("weights_file", WEIGHTS_FILE)
    return {"model": _read_tensors(weights, card), **card}


def read_card(folder: str | Path) -> dict:
    """The ``config.json`` of a model folder, as a dict (no tensors read).

    Example::

        read_card("runs/market/model")["metrics"]                # {'mAP': ..., 'rank1': ...}
    """
    path = Path(folder) / CARD_FILE
    try:
        card = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is damaged (not JSON: {err}); save the model again or restore the "
                              "folder from a copy") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise ValueError(f"{path}: not a reidlib model card (no format '{FORMAT}')")
    if card.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: model format version {card['format_version']} is newer than this reidlib "
                         f"reads ({FORMAT_VERSION}); upgrade reidlib")
    return card


def _read_tensors(weights: Path, card: dict) -> dict[str, torch.Tensor]:
    """The tensors, after checking the file's sha256 (flipped bits) and the card's (the card's
    own hash is kept in the safetensors header)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; the model folder is incomplete")
    if file_sha256(weights) != card.get("sha256"):
        raise CheckpointError(f"{weights} is damaged: its sha256 differs from the one {CARD_FILE} records; "
                              "save the model again or restore the folder from a copy")
    with safe_open(str(weights), framework="pt") as fh:
        recorded = (fh.metadata() or {}).get(_CARD_HASH_KEY)
    if recorded != _card_hash(card):
        raise CheckpointError(f"{weights.parent / CARD_FILE} is damaged: it differs from the card recorded "
                              f"in {weights.name}; save the model again or restore the folder from a copy")
    return load_file(str(weights))


def _read_torch_file(path) -> dict:
    """A ``model_final.pt`` or ``checkpoint_stage*_e*.pt``: a torch file of a plain dict."""
    state = load_checkpoint(path, map_location="cpu")
    if not (isinstance(state, dict) and "model" in state and "config" in state):
        raise ValueError(f"weights {path}: not a reidlib trained model (no 'model' and 'config' entries, "
                         f"and not a folder with {CARD_FILE} and {WEIGHTS_FILE})")
    return state
