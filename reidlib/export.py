"""Export a trained model's feature path to ONNX or TorchScript, for serving without reidlib.

The exported graph is the test feature: images [N, 3, H, W] (resized and normalised as in
training; the ONNX file's metadata says how) and, for a model trained with SIE, camera ids [N]
and/or view ids [N] (int64, 0-based; inputs ``cameras``, ``views``) in; features [N, D] float32
out. The batch size is free. LoRA is merged into the weights first (no peft at run time); the
text encoder and classifiers are left out. ``half=True`` stores weights and inputs in fp16 (for
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
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .methods.trained import load_trained_model
from .model import merge_lora
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


class FeatureGraphWithCameras(FeatureGraph):
    def forward(self, images: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, cameras).float()


class FeatureGraphWithViews(FeatureGraph):
    def forward(self, images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, views=views).float()


class FeatureGraphWithCamerasAndViews(FeatureGraph):
    def forward(self, images: torch.Tensor, cameras: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, cameras, views).float()


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
    model, cfg = load_trained_model(weights, cfg)
    if model.uses_lora:
        merge_lora(model)
    names = input_names(model)
    graph = _GRAPHS[tuple(names)](model).eval()
    dtype = torch.float16 if half else torch.float32
    graph.to(dtype)
    example = _example_inputs(model, cfg, dtype)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        if format == "onnx":
            _write_onnx(graph, example, names, tmp, _metadata(weights, model, cfg, half))
        else:
            _write_torchscript(graph, example, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("exported %s to %s (%s%s, inputs %s, %d-d features)", weights, out, format, ", fp16" if half else "",
             ", ".join(names), model.feature_dim)
    return out


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
