"""Export: ONNX (run with onnxruntime on the CPU) and TorchScript give PyTorch's features."""
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import reidlib
from reidlib.config import load_config
from reidlib.data import list_image_folder
from reidlib.export import export_model
from reidlib.model import build_model
from reidlib.storage import save_checkpoint
from reidlib.weights import model_record

ort = pytest.importorskip("onnxruntime", reason="install the export extra: pip install 'reidlib[export]'")
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
BATCH = torch.randn(5, 3, 128, 64, generator=torch.Generator().manual_seed(3))   # not the export's batch of 2
CAMS = torch.tensor([0, 2, 1, 1, 0])
VIEWS = torch.tensor([3, 0, 1, 3, 2])


def _saved(tmp_path, *overrides):
    """A tiny model with trained-looking LoRA and BN statistics, saved: (path, model)."""
    cfg = load_config("tiny", ["device=cpu", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=5, num_cameras=3, num_views=4).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn_like(param) * 0.05)
        model.bottleneck.running_mean.normal_()
    return save_checkpoint(tmp_path / "model.pt", model_record(model, cfg, 5, 3, num_views=4)), model


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("overrides", [["model.lora.enabled=true", "model.neck_feat=after"],
                                       ["model.sie_camera=true"],
                                       ["model.sie_camera=true", "model.sie_view=true"]],
                         ids=["lora", "sie", "sie_views"])
def test_onnx_and_torchscript_equal_pytorch(tmp_path, overrides):
    path, model = _saved(tmp_path, *overrides)
    sie, views = model.uses_sie, bool(model.sie_views)
    side = {"cams": CAMS if sie else None, "views": VIEWS if views else None}
    with torch.no_grad():
        expected = model.encode_image(BATCH, **side)
    onnx_path = export_model(path, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {"images": BATCH.numpy(), **({"cameras": CAMS.numpy()} if sie else {}),
             **({"views": VIEWS.numpy()} if views else {})}
    assert [i.name for i in session.get_inputs()] == list(feeds)
    onnx_out = session.run(["features"], feeds)[0]
    assert onnx_out.shape == (5, model.feature_dim) and onnx_out.dtype == np.float32
    assert _relative(onnx_out, expected) <= 1e-4
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["image_size"] == "[128, 64]" and meta["num_cameras"] == ("3" if sie else "0")
    assert meta["num_views"] == ("4" if views else "0")
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob("*.data"))   # one file, written atomically
    ts_path = export_model(path, tmp_path / "model.torchscript")        # the suffix picks TorchScript
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.load(str(ts_path))
    with torch.no_grad():
        ts_out = traced(*[t for t in (BATCH, side["cams"], side["views"]) if t is not None])
    assert _relative(ts_out, expected) <= 1e-4


def test_half_onnx_runs_in_fp16(tmp_path):
    path, model = _saved(tmp_path)
    with torch.no_grad():
        expected = model.encode_image(BATCH)
    session = ort.InferenceSession(str(export_model(path, tmp_path / "h.onnx", half=True)),
                                   providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float16)"
    out = session.run(None, {"images": BATCH.half().numpy()})[0]
    assert out.dtype == np.float32 and _relative(out, expected) <= 1e-2      # fp16 weights: ~1e-3
    import onnx
    sizes = {}
    for init in onnx.load(str(tmp_path / "h.onnx")).graph.initializer:    # the weights are stored in fp16
        n = int(np.prod(init.dims))
        sizes[init.data_type] = sizes.get(init.data_type, 0) + n
    assert sizes.get(onnx.TensorProto.FLOAT16, 0) > 0.95 * sum(sizes.values())


def test_usage_doc_onnxruntime_lines_give_the_extractor_features(tmp_path, synth_root):
    """docs/usage.md's ten lines, run as written on a folder of crops next to an exported model."""
    readme = (ROOT / "docs" / "usage.md").read_text()
    section = readme[readme.index("## Export"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "onnxruntime" in code and len(code.strip().splitlines()) <= 12
    path, _ = _saved(tmp_path)
    export_model(path, tmp_path / "model.onnx")
    crops = tmp_path / "crops"
    crops.mkdir()
    paths = [p for p, _, _ in list_image_folder(synth_root / "query")][:4]
    for i, p in enumerate(paths):
        (crops / f"person{i}.jpg").write_bytes(Path(p).read_bytes())
    namespace = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "docs/usage.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    expected = reidlib.FeatureExtractor(path, device="cpu")(sorted(str(p) for p in crops.glob("*.jpg")))
    expected = expected / expected.norm(dim=1, keepdim=True)
    assert _relative(namespace["feats"], expected) <= 1e-4


@pytest.mark.slow
def test_cli_export_and_info(tmp_path, capsys):
    from reidlib.__main__ import main
    path, model = _saved(tmp_path, "model.sie_camera=true")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "reidlib", "export", f"weights={path}", "format=onnx",
                           f"out={tmp_path / 'cli.onnx'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # the exporter's ~60 progress lines are held back: one line per export
    assert done.stdout == "" and done.stderr.strip().splitlines()[-1].startswith("exported ")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    session = ort.InferenceSession(str(tmp_path / "cli.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model.encode_image(BATCH, CAMS)
    assert _relative(session.run(None, {"images": BATCH.numpy(), "cameras": CAMS.numpy()})[0], expected) <= 1e-4
    assert main(["export", f"weights={path}", "format=tflite", f"out={tmp_path / 'x'}"]) == 2
    assert "format=tflite: use onnx, torchscript or hf" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="missing out="):
        main(["export", f"weights={path}", "format=onnx"])
    assert main(["export", f"weights={path}", f"out={tmp_path / 'b.onnx'}", "target=boxmot", "camera=x"]) == 2
    assert "camera=x: a 0-based id, e.g. camera=0" in capsys.readouterr().err
    assert main(["info", f"weights={path}"]) == 0
    out = capsys.readouterr().out
    assert "SIE: 3 cameras" in out and "reidlib_version:" in out and "created:" in out


def test_export_is_quiet_and_gets_the_umask_mode(tmp_path, caplog, capfd):
    """One INFO line per export (not the ONNX exporter's progress), and the mode a new file gets
    under the umask (0644 under 022), not mkstemp's 0600."""
    import logging
    path, _ = _saved(tmp_path)
    caplog.set_level(logging.INFO)
    old = os.umask(0o022)
    try:
        out = export_model(path, tmp_path / "quiet.onnx")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644
    assert [r.name for r in caplog.records] == ["reidlib"] and caplog.records[0].getMessage().startswith("exported")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
