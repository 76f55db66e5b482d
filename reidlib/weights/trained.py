"""reidlib's trained model on disk: a folder of ``model.safetensors`` and a JSON model card.

The folder holds the tensors (``model.safetensors``: read without pickle, so loading runs no code),
``config.json``, the card, and ``README.md``, the same card for people and model hubs (a Hugging
Face model card: YAML front matter, then the numbers, the preprocessing, five lines of usage and the
method's citation; :func:`model_card`), generated from ``config.json`` so the two never disagree.
``config.json`` holds the resolved config, the numbers of identities, cameras and views,
whether CLIP ran with QuickGELU, reidlib's version, the UTC creation time, the data set and its
statistics, the final metrics if any, the preprocessing (input size, mean, std, interpolation) and
the sha256 of ``model.safetensors``. The safetensors header in turn records a sha256 of the card,
so a flipped bit in either file is found before a tensor is used. The files are written into a
temp folder that then replaces the model folder whole (:func:`reidlib.storage.atomic_folder`).
Folders written before ``README.md`` existed load as they are (nothing reads it).

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
import shutil
from pathlib import Path

import torch

from ..config import config_from_dict, legacy_method
from ..storage import CheckpointError, atomic_folder, load_checkpoint

MODEL_FOLDER = "model"              # a run folder's trained model (reidlib 0.2 wrote model_final.pt)
LEGACY_FINAL = "model_final.pt"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "config.json"
README_FILE = "README.md"            # the model card for people and hubs, generated from CARD_FILE
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
    ['README.md', 'config.json', 'model.safetensors']
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
        written = {**core, "sha256": file_sha256(tmp / WEIGHTS_FILE)}
        (tmp / CARD_FILE).write_text(json.dumps(written, indent=2) + "\n")
        (tmp / README_FILE).write_text(model_card(written))
    return Path(folder)


def copy_trained(src: str | Path, dst: str | Path) -> Path:
    """Copy the model folder ``src`` to ``dst`` (atomically, the umask's modes) with a ``README.md``
    generated afresh from its card; returns ``dst``. The files are checked against their hashes
    first, so a damaged model is never passed on; a folder older than ``README.md`` gets one.

    Example::

        copy_trained("runs/market/model", "share/reid-market")   # model.safetensors, config.json, README.md
    """
    folder = trained_folder(src)
    if folder is None:
        raise ValueError(f"{src}: not a reidlib model folder (no {CARD_FILE} with format '{FORMAT}')")
    card = check_trained(folder)
    weights = folder / card.get("weights_file", WEIGHTS_FILE)
    if Path(dst).resolve() == folder.resolve():
        raise ValueError(f"copy_trained: the destination is the model folder itself ({folder}); pick another")
    with atomic_folder(dst) as tmp:
        shutil.copyfile(weights, tmp / weights.name)
        shutil.copyfile(folder / CARD_FILE, tmp / CARD_FILE)
        (tmp / README_FILE).write_text(model_card(card))
    return Path(dst)


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
    from safetensors.torch import load_file
    _check_hashes(weights, card)
    return load_file(str(weights))


def check_trained(folder: str | Path) -> dict:
    """The card of the model folder ``folder`` after checking both files against their hashes
    (the weights are hashed, not loaded); a one-line :class:`~reidlib.storage.CheckpointError` if
    either is damaged."""
    card = read_card(folder)
    _check_hashes(Path(folder) / card.get("weights_file", WEIGHTS_FILE), card)
    return card


def _check_hashes(weights: Path, card: dict) -> None:
    """The weights' sha256 against the card's, and the card's against the one in the weights' header."""
    from safetensors import safe_open
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


def _read_torch_file(path) -> dict:
    """A ``model_final.pt`` or ``checkpoint_stage*_e*.pt``: a torch file of a plain dict."""
    state = load_checkpoint(path, map_location="cpu")
    if not (isinstance(state, dict) and "model" in state and "config" in state):
        raise ValueError(f"weights {path}: not a reidlib trained model (no 'model' and 'config' entries, "
                         f"and not a folder with {CARD_FILE} and {WEIGHTS_FILE})")
    return state


# --------------------------------------------------------------------------- README.md, the model card

_DATASET_NAMES = {"market1501": "Market-1501", "dukemtmc": "DukeMTMC-reID", "msmt17": "MSMT17",
                  "occ_duke": "Occluded-Duke", "iust": "IUST_PersonReId", "veri": "VeRi-776",
                  "vehicleid": "VehicleID", "synth": "reidlib's generated data set (synth)",
                  "folder": "a folder of images"}
_VEHICLE_DATASETS = ("veri", "vehicleid")
# CLIP weights reidlib starts from -> their model on the Hugging Face hub (the card's base_model)
_BASE_MODELS = {("ViT-B-16", "openai"): "openai/clip-vit-base-patch16",
                ("ViT-B-32", "openai"): "openai/clip-vit-base-patch32",
                ("ViT-L-14", "openai"): "openai/clip-vit-large-patch14"}
_CLIP_REID = """@inproceedings{li2023clipreid,
  title     = {CLIP-ReID: Exploiting Vision-Language Model for Image Re-identification without Concrete Text Labels},
  author    = {Li, Siyuan and Sun, Li and Li, Qingli},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year      = {2023}
}"""
# the training method (config "method") -> what to cite; a card's own "citation" comes first
CITATIONS = {
    "clipreid": _CLIP_REID,
    "thesis": "CLIP-ReID extended with deep textual prompts and LoRA: the B.Sc. thesis of Fakhari, Iran "
              "University of Science and Technology; cite CLIP-ReID as well:\n\n" + _CLIP_REID,
    "pcl": """@article{li2023pcl,
  title   = {Prototypical Contrastive Learning-based CLIP Fine-tuning for Object Re-identification},
  author  = {Li, Jiachen and Gong, Xiaojin},
  journal = {arXiv preprint arXiv:2310.17218},
  year    = {2023}
}""",
    "promptsg": """@inproceedings{yang2024promptsg,
  title     = {A Pedestrian is Worth One Prompt: Towards Language Guidance Person Re-Identification},
  author    = {Yang, Zexian and others},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2024}
}""",
}


def model_card(card: dict) -> str:
    """``README.md`` of a model folder: a Hugging Face model card (YAML front matter: library,
    tags, license, data set, base model, model-index with mAP / Rank-1 when the card has metrics),
    then what the model is, its numbers and protocol, the preprocessing, five lines of usage and
    the method's citation. Everything comes from ``card`` (the folder's ``config.json``).

    >>> from reidlib.config import Config, to_dict
    >>> text = model_card({"config": to_dict(Config()), "num_classes": 751, "num_cameras": 6,
    ...                    "dataset": "market1501", "metrics": {"mAP": 0.898, "rank1": 0.957}})
    >>> text.splitlines()[0], "library_name: reidlib" in text, "| 89.80 | 95.70 |" in text
    ('---', True, True)
    """
    import yaml
    config = card.get("config", {})
    model = config.get("model", {})
    method = config.get("method") or legacy_method(config)
    label = card.get("method") or method                     # the run's name: baseline, proposed, ...
    dataset = card.get("dataset") or config.get("data", {}).get("dataset", "not recorded")
    dataset_name = _DATASET_NAMES.get(dataset, dataset)
    what = "vehicle" if dataset in _VEHICLE_DATASETS else "person"
    arch, pretrained = model.get("name", "?"), model.get("pretrained", "?")
    metrics = card.get("metrics") if isinstance(card.get("metrics"), dict) else {}
    front = {"library_name": "reidlib",
             "tags": list(dict.fromkeys([f"{what}-reid", "re-identification", "clip", method, label])),
             "license": card.get("license", "mit")}
    if dataset in _DATASET_NAMES and dataset not in ("folder", "synth"):
        front["datasets"] = [dataset]
    base = _BASE_MODELS.get((arch, pretrained))
    if base:
        front["base_model"] = base
    front["pipeline_tag"] = "image-feature-extraction"
    scores = [(key, name) for key, name in (("mAP", "mAP"), ("rank1", "Rank-1")) if _is_number(metrics.get(key))]
    if scores:
        front["metrics"] = [name for _, name in scores]
        front["model-index"] = [{"name": f"reidlib-{label}-{arch}-{dataset}", "results": [{
            "task": {"type": "image-feature-extraction", "name": f"{what.capitalize()} re-identification"},
            "dataset": {"type": dataset, "name": dataset_name, "split": "query/gallery (test)"},
            "metrics": [{"type": name, "value": _percent(metrics[key]), "name": f"{name} (re-ranking off)"}
                        for key, name in scores]}]}]
    prep = preprocessing(card)
    height, width = prep["image_size"]
    sie = _sie_line(card)
    cameras = ", cameras=[0, 1, 1]" if sie else ""
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {label} ({arch}, {dataset_name})", "",
             f"A {what} re-identification model: it maps a crop of a {what} to a feature vector, and crops of the "
             f"same {what} give features close together (compare them by cosine similarity). CLIP {arch} "
             f"(weights: {pretrained}) fine-tuned with the method `{method}`"
             + (f" (run `{label}`)" if label != method else "")
             + f" by reidlib {card.get('reidlib_version', '')}".rstrip()
             + f" on {dataset_name} ({card.get('num_classes', '?')} training identities)"
             + (f", created {card['created']}" if card.get("created") else "") + ".", ""]
    if card.get("converted_from"):
        lines += [f"Converted from `{Path(str(card['converted_from'])).name}` (weights of the CLIP-ReID "
                  "reference code or an older reidlib file).", ""]
    lines += ["## Results", ""] + _results_lines(card, metrics, dataset_name)
    lines += ["## Preprocessing", "",
              f"- RGB crop resized to {height}×{width} (height × width), {prep['interpolation']} interpolation",
              f"- scaled to [0, 1], then normalised per channel with mean {prep['pixel_mean']} and std "
              f"{prep['pixel_std']}",
              "- features: the test feature as trained (`model.neck_feat` "
              f"{model.get('neck_feat', 'before')}), not L2-normalised; normalise before comparing"]
    if sie:
        lines.append(f"- {sie}")
    lines += ["", "`FeatureExtractor` does all of this; an exported file (ONNX, TorchScript) records it in "
              "its metadata.", "", "## Usage", "", "```python",
              "from reidlib import FeatureExtractor",
              'extractor = FeatureExtractor.from_pretrained("USER/NAME")   # this repository, or the local folder',
              f'feats = extractor(["query.jpg", "gallery1.jpg", "gallery2.jpg"]{cameras})   # float32 [3, D]',
              "feats = feats / feats.norm(dim=1, keepdim=True)",
              "print(feats[0] @ feats[1:].T)                  # cosine similarity: higher = more likely the same",
              "```", "",
              "Tracking with it (BoxMOT): `reidlib export weights=FOLDER out=reid.onnx target=boxmot`, then "
              "`BotSort(reid_weights=Path(\"reid.onnx\"), ...)`.", "",
              "## Files", "",
              f"- `{card.get('weights_file', WEIGHTS_FILE)}`: the weights (safetensors: loading runs no code)",
              f"- `{CARD_FILE}`: the full card (config, data set and statistics, metrics, preprocessing, sha256 "
              "of the weights); this README is generated from it", "",
              "## Citation", "", *_citation_lines(card, method)]
    return "\n".join(lines) + "\n"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _percent(value: float) -> float:
    return round(100 * float(value), 2)


def _results_lines(card: dict, metrics: dict, dataset_name: str) -> list[str]:
    """The metrics table (percent, re-ranking off; re-ranked on a row of its own) and the protocol."""
    columns = [(k, n) for k, n in (("mAP", "mAP"), ("rank1", "Rank-1"), ("rank5", "Rank-5"), ("rank10", "Rank-10"),
                                   ("mINP", "mINP")) if _is_number(metrics.get(k))]
    if not columns:
        return ["No evaluation is recorded with this model (it was saved before its final evaluation, or "
                "converted from a file without one).", ""]
    test = card.get("config", {}).get("test", {})
    rows = [("off", "")] + ([("k-reciprocal", "rerank_")] if _is_number(metrics.get("rerank_mAP")) else [])
    lines = [f"| data set | re-ranking | {' | '.join(n for _, n in columns)} |",
             "|---|---|" + "---|" * len(columns)]
    for name, prefix in rows:
        values = [metrics.get(prefix + k) for k, _ in columns]
        lines.append(f"| {dataset_name} | {name} | "
                     + " | ".join("" if v is None else f"{_percent(v):.2f}" for v in values) + " |")
    stats = card.get("dataset_stats") or {}
    query, gallery = stats.get("query", {}), stats.get("gallery", {})
    sizes = (f" {query['images']} query and {gallery['images']} gallery images;" if
             "images" in query and "images" in gallery else "")
    lines += ["", f"Percent, single query, on the test split ({dataset_name}):{sizes} protocol: "
              f"{metrics.get('protocol', 'not recorded')}; distance {test.get('metric', 'euclidean')} on "
              f"{'L2-normalised ' if test.get('feat_norm', True) else ''}features, flip averaging "
              f"{'on' if test.get('flip') else 'off'}. The main numbers are without re-ranking.", ""]
    return lines


def _sie_line(card: dict) -> str:
    """What a model trained with SIE needs at test time; '' without SIE."""
    model = card.get("config", {}).get("model", {})
    parts = ([f"a camera id (0..{card.get('num_cameras', 0) - 1})"] if model.get("sie_camera") and
             card.get("num_cameras") else []) + \
        ([f"a view id (0..{card.get('num_views', 0) - 1})"] if model.get("sie_view") and card.get("num_views") else [])
    return (f"SIE: the features depend on {' and '.join(parts)} per image (`cameras=[...]`, `views=[...]`)"
            if parts else "")


def _citation_lines(card: dict, method: str) -> list[str]:
    cited = card.get("citation") or CITATIONS.get(method)
    if cited is None:
        return [f"The method `{method}` is not one reidlib ships; cite its authors' paper."]
    if cited.lstrip().startswith("@"):
        return ["```bibtex", cited.strip(), "```"]
    text, _, bibtex = cited.partition("\n\n")
    return [text] + (["", "```bibtex", bibtex.strip(), "```"] if bibtex else [])
