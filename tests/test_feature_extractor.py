"""FeatureExtractor: every input kind gives the same features, input order, cameras, safe loading."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reidlib
from reidlib.config import load_config
from reidlib.data import UnreadableImageError, build_transforms, list_image_folder, read_image
from reidlib.eval.inference import extract_features
from reidlib.model import build_model
from reidlib.storage import CheckpointError, save_checkpoint
from reidlib.weights import model_record

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _saved(tmp_path, *overrides, name="model.pt"):
    """A tiny model with moved BN statistics, saved as a reidlib checkpoint: (path, cfg, model)."""
    cfg = load_config("tiny", ["device=cpu", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=5, num_cameras=3).eval()
    with torch.no_grad():
        model.bottleneck.running_mean.normal_()
    path = save_checkpoint(tmp_path / name, model_record(model, cfg, 5, 3))
    return path, cfg, model


@pytest.fixture(scope="module")
def images(synth_root):
    return [p for p, _, _ in list_image_folder(synth_root / "query")][:5]


def _reference_features(model, cfg, paths, cams=None):
    transform = build_transforms(cfg.data, cfg.model.image_size, train=False)
    with torch.no_grad():
        return model.encode_image(torch.stack([transform(read_image(p)) for p in paths]), cams)


def test_every_input_kind_gives_the_same_features(tmp_path, images):
    path, cfg, model = _saved(tmp_path)
    extractor = reidlib.FeatureExtractor(path, device="cpu", batch_size=2)
    expected = _reference_features(model, cfg, images)
    pil = [Image.open(p) for p in images]
    rgb = [np.asarray(read_image(p)) for p in images]
    bgr = [a[:, :, ::-1].copy() for a in rgb]
    batch = torch.stack([extractor.transform(read_image(p)) for p in images])
    kinds = {"paths": extractor(images), "path objects": extractor([Path(p) for p in images]),
             "PIL": extractor(pil), "RGB arrays": extractor(rgb), "BGR arrays": extractor(bgr, bgr=True),
             "one HxWx3 array": torch.cat([extractor(a) for a in rgb]),
             "NxHxWx3 array": extractor(np.stack(rgb)), "float batch": extractor(batch),
             "numpy float batch": extractor(batch.numpy())}
    for kind, feats in kinds.items():
        assert feats.dtype == torch.float32 and feats.shape == (5, model.feature_dim), kind
        assert torch.allclose(feats, expected, rtol=1e-5, atol=1e-6), kind
    assert not torch.allclose(extractor(bgr), expected, atol=1e-3)         # BGR read as RGB differs
    # input order: rows follow the input (batches group other images, so equal up to GEMM rounding)
    assert torch.allclose(extractor(images[::-1]), kinds["paths"].flip(0), rtol=1e-5, atol=1e-6)
    items = list_image_folder(Path(images[0]).parent)[:5]
    direct, _, _ = extract_features(model, items, cfg, progress=False)    # the DataLoader path
    assert torch.allclose(direct, expected, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_clear(tmp_path, images):
    path, _, _ = _saved(tmp_path)
    extractor = reidlib.FeatureExtractor(path, device="cpu")
    with pytest.raises(ValueError, match=r"must be \[N, 3, 128, 64\]"):
        extractor(torch.zeros(2, 3, 64, 32))
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        extractor(np.zeros((128, 64, 3), np.int32))
    with pytest.raises(UnreadableImageError, match="missing.jpg"):   # never a skipped row in __call__
        extractor([str(tmp_path / "missing.jpg")])
    with pytest.raises(ValueError, match="precision 'fp8'"):
        reidlib.FeatureExtractor(path, device="cpu", precision="fp8")
    assert extractor([]).shape == (0, extractor.feature_dim)
    fp32 = extractor(images)
    bf16 = reidlib.FeatureExtractor(path, device="cpu", precision="bf16")(images)   # autocast: close, not equal
    assert bf16.dtype == torch.float32 and 0 < float((bf16 - fp32).norm() / fp32.norm()) < 3e-2


def test_sie_without_cameras_errs_unless_a_default_is_chosen(tmp_path, images, synth_root):
    path, cfg, model = _saved(tmp_path, "model.sie_camera=true")
    extractor = reidlib.FeatureExtractor(path, device="cpu")
    with pytest.raises(ValueError, match="trained with SIE .*cameras="):
        extractor(images)
    cams = torch.tensor([0, 2, 1, 1, 0])
    assert torch.allclose(extractor(images, cameras=cams), _reference_features(model, cfg, images, cams),
                          rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="2 camera ids for 5 images"):
        extractor(images, cameras=[0, 1])
    with pytest.raises(ValueError, match=r"0\.\.2"):
        extractor(images, cameras=3)
    default = reidlib.FeatureExtractor(path, device="cpu", default_camera=2)
    assert torch.equal(default(images), extractor(images, cameras=2))
    assert not torch.allclose(default(images), extractor(images, cameras=0))
    # folders: Market names carry the camera; other names need test.default_camera
    plain = tmp_path / "crops"
    plain.mkdir()
    for i, p in enumerate(images):
        (plain / f"crop{i}.jpg").write_bytes(Path(p).read_bytes())
    items = list_image_folder(plain)
    with pytest.raises(ValueError, match="have no camera id .*test.default_camera"):
        extract_features(model, items, cfg, progress=False)
    cfg.test.default_camera = 2
    feats, _, _ = extract_features(model, items, cfg, progress=False)
    assert torch.allclose(feats, default(images), rtol=1e-5, atol=1e-6)


class _RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_that_runs_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _RunsCode(marker), "config": {}}, evil)
    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump(_RunsCode(marker), fh, protocol=2)
    for path in (evil, tmp_path / "evil.pkl"):
        with pytest.raises(CheckpointError, match="weights_only"):
            reidlib.FeatureExtractor(path, device="cpu")
        with pytest.raises(CheckpointError):
            reidlib.load_trained_model(path)
        with pytest.raises(RuntimeError, match="cannot read weights"):   # fine-tuning from it
            build_model(load_config("tiny", [f"model.pretrained={path}"]).model, num_classes=3)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "reidlib", "info", f"weights={evil}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "weights_only" in done.stderr
    assert not marker.exists()
