"""Export a trained model's feature path to ONNX or TorchScript, for serving without reidlib.

The exported graph is the test feature: images [N, 3, H, W] (resized and normalised as in
training; the ONNX file's metadata says how) and, for a model trained with SIE, camera ids [N]
and/or view ids [N] (int64, 0-based; inputs ``cameras``, ``views``) in; features [N, D] float32
out. An id outside the model's range (-1 for "unknown", say) gives that image a NaN feature row:
the graph cannot raise, and SIE's table must not be read at a wrong row. The batch size is free.
LoRA is merged into the weights first (no peft at run time); the text encoder and classifiers are
left out. ``half=True`` stores weights and inputs in fp16 (for
GPUs and TensorRT; the output stays fp32).

Example::

    from reidlib.export import export_model
    export_model("run/model", "model.onnx")                             # fp32 ONNX, dynamic batch
    export_model("run/model", "model.pt", format="torchscript")          # torch.jit.load("model.pt")
    export_model("ViT-B-16_60.pth", "reid_fp16.onnx", half=True)       # a reference state dict, fp16
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .methods.trained import load_trained_model
from .model import merge_lora
from .storage import check_writable, disk_full_as_such
from .weights import reidlib_version

log = logging.getLogger("reidlib")

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 18


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


def input_names(model) -> list[str]:
    """The exported graph's inputs for ``model``: images, then the SIE ids it uses."""
    return ["images"] + ["cameras"] * bool(model.sie_cameras) + ["views"] * bool(model.sie_views)


_GRAPHS = {("images",): FeatureGraph, ("images", "cameras"): FeatureGraphWithCameras,
           ("images", "views"): FeatureGraphWithViews,
           ("images", "cameras", "views"): FeatureGraphWithCamerasAndViews}


def export_model(weights, out, format: str = "onnx", half: bool = False, cfg=None) -> Path:  # noqa: A002
    """Write ``weights`` (a reidlib checkpoint or a reference state dict) as ONNX or TorchScript at
    ``out``, atomically; returns the path. ``cfg`` supplies what a reference file cannot tell."""
    if format not in FORMATS:
        raise ValueError(f"format={format}: use {' or '.join(FORMATS)}")
    out = Path(out)
    check_writable(out.parent, "out")    # before minutes of loading and tracing
    _remove_killed_exports(out)
    model, cfg = load_trained_model(weights, cfg)
    if model.uses_lora:
        merge_lora(model)
    names = input_names(model)
    graph = _GRAPHS[tuple(names)](model).eval()
    dtype = torch.float16 if half else torch.float32
    graph.to(dtype)
    example = _example_inputs(model, cfg, dtype)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with disk_full_as_such(out):
            _write(format, graph, example, names, tmp, weights, model, cfg, half)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("exported %s to %s (%s%s, inputs %s, %d-d features)", weights, out, format, ", fp16" if half else "",
             ", ".join(names), model.feature_dim)
    return out


def _write(format, graph, example, names, tmp, weights, model, cfg, half) -> None:  # noqa: A002
    if format == "onnx":
        _write_onnx(graph, example, names, tmp, _metadata(weights, model, cfg, half))
    else:
        _write_torchscript(graph, example, tmp)


def _remove_killed_exports(out: Path) -> None:
    """The temp files of exports to ``out`` that were killed before their rename (a kill -9 runs no
    cleanup): mkstemp's ``.<name>.XXXXXXXX.tmp``, this name only."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.[a-z0-9_]{{8}}\.tmp$")
    for stale in out.parent.iterdir():
        if pattern.match(stale.name) and stale.is_file():
            stale.unlink(missing_ok=True)


def _example_inputs(model, cfg, dtype) -> tuple:
    height, width = cfg.model.image_size
    images = torch.randn(2, 3, height, width, dtype=dtype)
    # one tensor per id input: the exporter would treat a tensor passed twice as one input
    return (images, *[torch.zeros(2, dtype=torch.long) for _ in input_names(model)[1:]])


def _metadata(weights, model, cfg, half: bool) -> dict[str, str]:
    """What a consumer needs to feed the graph: input size, normalisation, resize, feature size."""
    return {"image_size": json.dumps(list(cfg.model.image_size)), "pixel_mean": json.dumps(list(cfg.data.pixel_mean)),
            "pixel_std": json.dumps(list(cfg.data.pixel_std)), "interpolation": cfg.data.test_interpolation,
            "feature_dim": str(model.feature_dim), "neck_feat": cfg.model.neck_feat,
            "num_cameras": str(model.sie_cameras), "num_views": str(model.sie_views),
            "dtype": "float16" if half else "float32", "source": Path(str(weights)).name,
            "reidlib_version": reidlib_version()}


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
        traced = torch.jit.trace(graph, example, check_trace=False)
        torch.jit.save(traced, path)
