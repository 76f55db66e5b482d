"""Export a trained model: ONNX or TorchScript for serving without reidlib (or tracking with
BoxMOT), or the model folder itself for sharing (``format=hf``, :func:`push_to_hub`).

The exported graph is the test feature: images [N, 3, H, W] (resized and normalised as in
training; the ONNX file's metadata says how) and, for a model trained with SIE, camera ids [N]
and/or view ids [N] (int64, 0-based; inputs ``cameras``, ``views``) in; features [N, D] float32
out. An id outside the model's range (-1 for "unknown", say) gives that image a NaN feature row:
the graph cannot raise, and SIE's table must not be read at a wrong row. The batch size is free.
LoRA is merged into the weights first (no peft at run time); the text encoder and classifiers are
left out. ``half=True`` stores weights and inputs in fp16 (for GPUs and TensorRT; the output
stays fp32). Files get the umask's mode (0644 under the usual 022), as every file reidlib saves.

``target="boxmot"``: a graph that takes what BoxMOT 25 feeds its re-ID model (RGB crops resized
to the model's size with OpenCV, scaled to [0, 1] and normalised with ImageNet's mean and std) and
turns them into the model's normalisation inside the graph (one per-channel affine, so CLIP's
0.5/0.5 models give reidlib's features), with images as its only input: BoxMOT feeds nothing else,
so a model trained with SIE is exported with a camera (and view) fixed into the graph
(``camera=K``), or refused. The file's suffix picks BoxMOT's back-end (``.onnx`` or
``.torchscript``), and a sidecar ``<file>.metadata.json`` tells it the input size.

Example::

    from reidlib.export import export_model, push_to_hub
    export_model("run/model", "model.onnx")                             # fp32 ONNX, dynamic batch
    export_model("run/model", "model.torchscript")                      # torch.jit.load("model.torchscript")
    export_model("ViT-B-16_60.pth", "reid_fp16.onnx", half=True)       # a reference state dict, fp16
    export_model("run/model", "reid.onnx", target="boxmot")            # BotSort(reid_weights=Path("reid.onnx"))
    export_model("run/model", "share/reid-market", format="hf")        # model.safetensors, config.json, README.md
    push_to_hub("share/reid-market", "someone/reid-market")            # FeatureExtractor.from_pretrained(...)
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .eval.extractor import HUB_FILES
from .methods.trained import convert_weights, load_trained_model
from .model import merge_lora
from .storage import _umask, check_writable, disk_full_as_such
from .weights import reidlib_version
from .weights.trained import CARD_FILE, README_FILE, check_trained, copy_trained, model_card, trained_folder

log = logging.getLogger("reidlib")

FORMATS = ("onnx", "torchscript", "hf")
TARGETS = ("reidlib", "boxmot")
ONNX_OPSET = 18
# What BoxMOT 25 feeds a re-ID model: RGB in [0, 1], normalised with ImageNet's mean and std
# (boxmot/reid/backends/base_backend.py, core/crops.py), and the suffixes that pick its back-ends.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BOXMOT_SUFFIXES = {".onnx": "onnx", ".torchscript": "torchscript"}
# Loggers of the ONNX exporter (~60 lines of progress per export): shown at DEBUG only
_EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir")


class FeatureGraph(nn.Module):
    """``model.encode_image`` as a module with a fixed signature: (images), and the SIE ids the
    model needs: (images, cameras), (images, views) or (images, cameras, views)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images).float()


def _refuse_unknown(feats: torch.Tensor, ids: torch.Tensor, count: int) -> torch.Tensor:
    """NaN rows for ids outside 0..count-1. A graph cannot raise, and indexing the SIE table with -1
    would silently take its last row (another camera's): a NaN feature cannot be mistaken for a
    match. Valid rows get + 0.0, which leaves every value as it was."""
    bad = (ids < 0) | (ids >= count)
    return feats + torch.where(bad, float("nan"), 0.0).to(feats.dtype)[:, None]


class FeatureGraphWithCameras(FeatureGraph):
    def forward(self, images: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
        feats = self.model.encode_image(images, cameras.clamp(0, self.model.sie_cameras - 1)).float()
        return _refuse_unknown(feats, cameras, self.model.sie_cameras)


class FeatureGraphWithViews(FeatureGraph):
    def forward(self, images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        feats = self.model.encode_image(images, views=views.clamp(0, self.model.sie_views - 1)).float()
        return _refuse_unknown(feats, views, self.model.sie_views)


class FeatureGraphWithCamerasAndViews(FeatureGraph):
    def forward(self, images: torch.Tensor, cameras: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        feats = self.model.encode_image(images, cameras.clamp(0, self.model.sie_cameras - 1),
                                        views.clamp(0, self.model.sie_views - 1)).float()
        feats = _refuse_unknown(feats, cameras, self.model.sie_cameras)
        return _refuse_unknown(feats, views, self.model.sie_views)


class BoxMOTGraph(nn.Module):
    """BoxMOT's input to the model's features: ``images`` [N, 3, H, W], RGB, ImageNet-normalised
    (as BoxMOT feeds every re-ID model) -> the model's normalisation, by one per-channel affine
    ``x * scale + shift`` with ``scale = std_in / std_model`` and ``shift = (mean_in - mean_model) /
    std_model`` -> ``encode_image``, with the SIE camera / view fixed at export (BoxMOT feeds only
    images)."""

    def __init__(self, model, pixel_mean, pixel_std, camera: int | None = None, view: int | None = None):
        super().__init__()
        self.model, self.camera, self.view = model, camera, view
        mean, std, mean_in, std_in = (torch.tensor(v, dtype=torch.float64)
                                      for v in (pixel_mean, pixel_std, IMAGENET_MEAN, IMAGENET_STD))
        self.register_buffer("scale", (std_in / std).float().view(1, 3, 1, 1))
        self.register_buffer("shift", ((mean_in - mean) / std).float().view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images * self.scale + self.shift
        side = {}
        if self.camera is not None:
            side["cams"] = torch.full((images.shape[0],), self.camera, dtype=torch.long, device=images.device)
        if self.view is not None:
            side["views"] = torch.full((images.shape[0],), self.view, dtype=torch.long, device=images.device)
        return self.model.encode_image(images, **side).float()


def input_names(model) -> list[str]:
    """The exported graph's inputs for ``model``: images, then the SIE ids it uses."""
    return ["images"] + ["cameras"] * bool(model.sie_cameras) + ["views"] * bool(model.sie_views)


_GRAPHS = {("images",): FeatureGraph, ("images", "cameras"): FeatureGraphWithCameras,
           ("images", "views"): FeatureGraphWithViews,
           ("images", "cameras", "views"): FeatureGraphWithCamerasAndViews}


def export_model(weights, out, format: str | None = None, half: bool = False, cfg=None, *,  # noqa: A002
                 target: str = "reidlib", camera: int | None = None, view: int | None = None) -> Path:
    """Write ``weights`` (a reidlib model or a reference state dict) at ``out``, atomically, with
    the umask's file mode; returns the path. ``cfg`` supplies what a reference file cannot tell.

    ``format``: ``onnx`` or ``torchscript`` (by default from ``out``'s suffix: ``.torchscript`` is
    TorchScript, anything else ONNX), or ``hf``: the model folder (``model.safetensors``,
    ``config.json``, ``README.md``) at ``out``, for :func:`push_to_hub`. ``target="boxmot"``: the
    graph BoxMOT's re-ID back-ends run (see the module's docstring); ``out`` must end in ``.onnx``
    or ``.torchscript``, and ``camera`` / ``view`` fix an SIE model's ids into the graph.
    """
    out = Path(out)
    format = _resolve_format(format, out, target)   # noqa: A001
    if format == "hf":
        if half or target != "reidlib" or camera is not None or view is not None:
            raise ValueError("format=hf writes the model folder itself: half=, target=, camera= and view= are for "
                             "onnx and torchscript files")
        return export_folder(weights, out, cfg)
    if target == "reidlib" and (camera is not None or view is not None):
        raise ValueError("camera= and view= fix an SIE id into a graph for target=boxmot; the reidlib graph takes "
                         "them as inputs (cameras, views)")
    check_writable(out.parent, "out")    # before minutes of loading and tracing
    _remove_killed_exports(out)
    model, cfg = load_trained_model(weights, cfg)
    if target == "boxmot":
        camera, view = _fixed_ids(model, camera, view)
    if model.uses_lora:
        merge_lora(model)
    if target == "boxmot":
        names = ["images"]
        graph = BoxMOTGraph(model, cfg.data.pixel_mean, cfg.data.pixel_std, camera, view).eval()
    else:
        names = input_names(model)
        graph = _GRAPHS[tuple(names)](model).eval()
    dtype = torch.float16 if half else torch.float32
    graph.to(dtype)
    example = _example_inputs(len(names), cfg, dtype)
    metadata = _metadata(weights, model, cfg, half, target, camera, view)
    sidecar = boxmot_metadata_path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with disk_full_as_such(out):
            _write(format, graph, example, names, tmp, metadata)
            os.chmod(tmp, 0o666 & ~_umask())     # mkstemp makes 0600; an export gets the usual mode
            side = _boxmot_sidecar(format, cfg, half, tmp, metadata) if target == "boxmot" else None
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if side is not None:
        with disk_full_as_such(sidecar):
            _write_json_atomically(sidecar, side)
    elif sidecar.is_file():
        sidecar.unlink()   # it described an earlier BoxMOT export to this name, not this graph
    fixed = "".join(f", {k} {v} fixed" for k, v in (("camera", camera), ("view", view)) if v is not None)
    log.info("exported %s to %s (%s%s%s, inputs %s, %d-d features)", weights, out, format, ", fp16" if half else "",
             f", for BoxMOT{fixed}" if target == "boxmot" else "", ", ".join(names), model.feature_dim)
    return out


def _resolve_format(format: str | None, out: Path, target: str) -> str:  # noqa: A002
    if target not in TARGETS:
        raise ValueError(f"target={target}: use {' or '.join(TARGETS)}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"format={format}: use onnx, torchscript or hf")
    if target != "boxmot":
        return format or ("torchscript" if out.suffix == ".torchscript" else "onnx")
    picked = BOXMOT_SUFFIXES.get(out.suffix)
    if picked is None:
        raise ValueError(f"out={out.name}: BoxMOT picks its back-end by the file's suffix; end it in .onnx (ONNX "
                         "Runtime, CPU or GPU) or .torchscript (TorchScript, CPU)")
    if format is not None and format != picked:
        raise ValueError(f"format={format} but out={out.name}: BoxMOT would read a {out.suffix} file as {picked}; "
                         f"name it {out.stem}{'.onnx' if format == 'onnx' else '.torchscript'}")
    return picked


def _fixed_ids(model, camera: int | None, view: int | None) -> tuple[int | None, int | None]:
    """The SIE ids to fix into a BoxMOT graph: one per kind of id the model uses, checked."""
    counts = {"camera": model.sie_cameras, "view": model.sie_views}
    given = {"camera": camera, "view": view}
    fixed = {}
    for what, count in counts.items():
        value = given[what]
        if count and value is None:
            raise ValueError(f"this model was trained with SIE over {count} {what}s, and BoxMOT feeds a re-ID model "
                             f"only images: export with {what}={'K' if what == 'camera' else 'V'} (0..{count - 1}) "
                             f"to fix one {what}'s embedding into the graph")
        if value is not None and not count:
            raise ValueError(f"{what}={value}: this model was not trained with {what} SIE; leave {what}= out")
        if value is not None and not (isinstance(value, int) and 0 <= value < count):
            raise ValueError(f"{what}={value}: this model knows {what}s 0..{count - 1}")
        fixed[what] = value
    return fixed["camera"], fixed["view"]


def _write(format, graph, example, names, tmp, metadata) -> None:  # noqa: A002
    with _exporter_quiet():
        if format == "onnx":
            _write_onnx(graph, example, names, tmp, metadata)
        else:
            _write_torchscript(graph, example, tmp)


@contextlib.contextmanager
def _exporter_quiet():
    """The exporters' progress lines (torch.onnx, onnxscript, onnx_ir; anything they print) held
    back, unless reidlib logs at DEBUG or REIDLIB_DEBUG is set; replayed on stderr if the export fails."""
    if log.isEnabledFor(logging.DEBUG) or os.environ.get("REIDLIB_DEBUG"):
        yield
        return
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    held = io.StringIO()
    handler = logging.StreamHandler(held)
    for logger in loggers:
        logger.setLevel(logging.WARNING)
        logger.addHandler(handler)
        logger.propagate = False
    try:
        with contextlib.redirect_stdout(held), contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue()[-20000:])
        raise
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
            logger.removeHandler(handler)
            logger.propagate = True


def export_folder(weights, out, cfg=None) -> Path:
    """The model folder for sharing at ``out``: ``model.safetensors``, ``config.json`` and a
    ``README.md`` model card generated from it. A model folder is copied (its hashes checked
    first); a legacy ``.pt`` or a reference state dict is converted."""
    out = Path(out)
    if out.suffix in (".pt", ".pth", ".onnx", ".torchscript"):
        raise ValueError(f"format=hf writes a folder; out={out} looks like a file name (drop the suffix)")
    check_writable(out.parent, "out")
    if trained_folder(weights) is not None:
        copy_trained(weights, out)
    else:
        convert_weights(weights, out, cfg)
    log.info("exported %s to %s (model folder: model.safetensors, config.json, README.md)", weights, out)
    return out


def push_to_hub(model_folder, repo_id: str, private: bool = False, token: str | None = None,
                commit_message: str | None = None) -> str:
    """Upload a model folder (``model.safetensors``, ``config.json``, ``README.md``) to the
    Hugging Face hub as the model repository ``repo_id`` (``USER/NAME``, created when missing);
    returns its URL. The hashes are checked first, and a ``README.md`` that is missing or differs
    from the card (an older folder) is written from ``config.json`` before the upload. ``token``:
    by default the one ``huggingface-cli login`` saved (or ``HF_TOKEN``).

    Example::

        push_to_hub("runs/market/model", "someone/reid-vit-market", private=True)
        FeatureExtractor.from_pretrained("someone/reid-vit-market")
    """
    from huggingface_hub import HfApi
    folder = trained_folder(model_folder)
    if folder is None:
        raise ValueError(f"{model_folder}: not a reidlib model folder (model.safetensors + {CARD_FILE}); "
                         "write one with `reidlib export weights=... format=hf out=DIR`")
    card = check_trained(folder)
    readme = folder / README_FILE
    text = model_card(card)
    if not readme.is_file() or readme.read_text() != text:
        _write_text_atomically(readme, text)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", allow_patterns=HUB_FILES,
                      commit_message=commit_message or f"reidlib model ({card.get('method', 'trained')}, "
                                                       f"{card.get('dataset', 'data set not recorded')})")
    log.info("pushed %s to %s%s", folder, url, " (private)" if private else "")
    return str(url)


def export_command(weights, args: dict[str, str], cfg=None) -> Path:
    """``reidlib export``'s arguments (strings from the command line) -> :func:`export_model`,
    then :func:`push_to_hub` with ``push=USER/NAME``."""
    flags = {key: _flag(args, key) for key in ("half", "private")}
    ids = {key: _whole(args, key) for key in ("camera", "view")}
    push = args.get("push")
    fmt = args.get("format")
    if push is not None:
        if fmt not in (None, "hf"):
            raise ValueError(f"push={push} uploads a model folder: use format=hf (not format={fmt})")
        fmt = "hf"
    elif flags["private"]:
        raise ValueError("private=true is for push=USER/NAME")
    out = export_model(weights, args["out"], format=fmt, half=flags["half"], cfg=cfg,
                       target=args.get("target", "reidlib"), **ids)
    if push is not None:
        push_to_hub(out, push, private=flags["private"])
    return out


def _flag(args: dict, key: str) -> bool:
    value = args.get(key, "false").lower()
    if value not in ("true", "false"):
        raise ValueError(f"{key}={args[key]}: use true or false")
    return value == "true"


def _whole(args: dict, key: str) -> int | None:
    if key not in args:
        return None
    try:
        return int(args[key])
    except ValueError:
        raise ValueError(f"{key}={args[key]}: a 0-based id, e.g. {key}=0") from None


def _remove_killed_exports(out: Path) -> None:
    """The temp files of exports to ``out`` that were killed before their rename (a kill -9 runs no
    cleanup): mkstemp's ``.<name>.XXXXXXXX.tmp``, this name only."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.[a-z0-9_]{{8}}\.tmp$")
    for stale in out.parent.iterdir():
        if pattern.match(stale.name) and stale.is_file():
            stale.unlink(missing_ok=True)


def _example_inputs(num_inputs: int, cfg, dtype) -> tuple:
    height, width = cfg.model.image_size
    images = torch.randn(2, 3, height, width, dtype=dtype)
    # one tensor per id input: the exporter would treat a tensor passed twice as one input
    return (images, *[torch.zeros(2, dtype=torch.long) for _ in range(num_inputs - 1)])


def _metadata(weights, model, cfg, half: bool, target: str = "reidlib", camera: int | None = None,
              view: int | None = None) -> dict[str, str]:
    """What a consumer needs to feed the graph: input size, normalisation, resize, feature size.
    A BoxMOT graph takes ImageNet-normalised input; the model's own normalisation is kept too."""
    boxmot = target == "boxmot"
    meta = {"image_size": json.dumps(list(cfg.model.image_size)),
            "pixel_mean": json.dumps(list(IMAGENET_MEAN) if boxmot else list(cfg.data.pixel_mean)),
            "pixel_std": json.dumps(list(IMAGENET_STD) if boxmot else list(cfg.data.pixel_std)),
            "interpolation": "bilinear (OpenCV)" if boxmot else cfg.data.test_interpolation,
            "feature_dim": str(model.feature_dim), "neck_feat": cfg.model.neck_feat,
            "num_cameras": str(model.sie_cameras), "num_views": str(model.sie_views),
            "dtype": "float16" if half else "float32", "source": Path(str(weights)).name,
            "reidlib_version": reidlib_version(), "target": target}
    if boxmot:
        meta.update({"model_pixel_mean": json.dumps(list(cfg.data.pixel_mean)),
                     "model_pixel_std": json.dumps(list(cfg.data.pixel_std)),
                     "fixed_camera": "" if camera is None else str(camera),
                     "fixed_view": "" if view is None else str(view)})
    return meta


def boxmot_metadata_path(out) -> Path:
    """BoxMOT's sidecar of an exported file: ``reid.onnx`` -> ``reid.onnx.metadata.json``
    (``boxmot.reid.core.artifacts.artifact_metadata_path``)."""
    out = Path(out)
    return out.with_name(out.name + ".metadata.json")


def _boxmot_sidecar(format: str, cfg, half: bool, path: str, metadata: dict[str, str]) -> dict:  # noqa: A002
    """The metadata BoxMOT 25 reads next to a re-ID file (schema 1): the input size (``img_size``,
    in ``model_kwargs`` as its registry reads it; without it a TorchScript file is fed 256x128),
    the resize it should use, and what the graph is (reidlib's own keys)."""
    from .weights.trained import file_sha256
    height, width = (int(s) for s in cfg.model.image_size)
    return {"schema_version": 1, "format": format, "model_name": "reidlib", "preprocess": "resize",
            "model_kwargs_schema_version": 1, "model_kwargs": {"img_size": [height, width]},
            "img_size": [height, width], "input_name": "images", "output_names": ["features"],
            "input_shape": [1, 3, height, width], "precision": "float16" if half else "float32",
            "dynamic_batch": True, "artifact_sha256": file_sha256(path),
            "reidlib": {k: (json.loads(v) if v.startswith("[") else v) for k, v in metadata.items()}}


def _write_json_atomically(path: Path, value: dict) -> None:
    _write_text_atomically(path, json.dumps(value, indent=2) + "\n")


def _write_text_atomically(path: Path, text: str) -> None:
    """A small file through a temp file and a rename, with the umask's mode."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_onnx(graph: nn.Module, example: tuple, names: list[str], path: str, metadata: dict[str, str]) -> None:
    batch = torch.export.Dim("batch", min=1)   # names: the forward's own argument names
    with warnings.catch_warnings():   # the exporter's notes on renamed axes and deprecations
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, example, None, input_names=names, output_names=["features"],
                                    dynamic_shapes={name: {0: batch} for name in names},
                                    opset_version=ONNX_OPSET, dynamo=True, verbose=False)
    program.model.metadata_props.update(metadata)
    program.save(path, external_data=False)


def _write_torchscript(graph: nn.Module, example: tuple, path: str) -> None:
    with warnings.catch_warnings():   # torch.jit is deprecated in favour of torch.export, but still loads everywhere
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(graph, example, check_trace=False)
        torch.jit.save(traced, path)
