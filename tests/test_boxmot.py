"""Tracking with BoxMOT 25: a ``target=boxmot`` export loads through BoxMOT's own re-ID back-ends
(chosen by the file's suffix, input size from the sidecar) and its BoT-SORT, and gives
FeatureExtractor's features on the same crops, and the model card's retrieval numbers."""
import json
import os
import re
import shlex
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reidlib
from reidlib.config import load_config
from reidlib.data import dataset_from_config, read_image
from reidlib.eval import evaluate
from reidlib.eval.protocol import exclusion_labels
from reidlib.export import IMAGENET_MEAN, IMAGENET_STD, boxmot_metadata_path, export_model
from reidlib.model import build_model
from reidlib.weights import model_record, read_card, save_trained

boxmot = pytest.importorskip("boxmot", reason="BoxMOT is not installed (pip install 'reidlib[track]')")
cv2 = pytest.importorskip("cv2", reason="BoxMOT needs OpenCV (opencv-python-headless)")

pytestmark = [pytest.mark.usefixtures("one_thread"),   # BoxMOT's TorchScript back-end calls torch.jit.load
              pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")]
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript"}
BACKENDS = {"onnx": "ONNXBackend", "torchscript": "TorchscriptBackend"}


@pytest.fixture(autouse=True)
def no_installs(monkeypatch):
    """BoxMOT 25's ONNX back-end pip-installs ``onnxruntime==1.24.3`` into the running environment
    whenever another version is installed (boxmot/reid/backends/dependencies.py): never from the
    tests. Any other install it tries fails the test."""
    from boxmot.reid.backends.dependencies import reid_backend_requirements
    from boxmot.reid.backends.onnx_backend import ONNXBackend
    from boxmot.utils.checks import RequirementsChecker, requirement_satisfied

    def refuse(self, args, **kwargs):
        raise AssertionError(f"BoxMOT tried to install {list(args)}")

    monkeypatch.setattr(RequirementsChecker, "_run_install", refuse)
    if not any(requirement_satisfied(r) for r in reid_backend_requirements("onnx", device="cpu")):
        import onnxruntime  # noqa: F401  (installed: any version >= 1.18 runs these graphs)
        monkeypatch.setattr(ONNXBackend, "_ensure_onnxruntime_installed", lambda self: None)


@pytest.fixture(scope="module")
def trained(tiny_trained):
    """(model folder, cfg, card) of the tiny trained baseline (no SIE: BoxMOT feeds images only)."""
    cfg, out = tiny_trained
    return out / "model", cfg, read_card(out / "model")


@pytest.fixture(scope="module")
def exports(trained, tmp_path_factory):
    folder = trained[0]
    root = tmp_path_factory.mktemp("boxmot")
    return {fmt: export_model(folder, root / f"reid{suffix}", target="boxmot") for fmt, suffix in SUFFIXES.items()}


def _backend(path):
    """The model inside BoxMOT's own ReID runtime (what its trackers build from ``reid_weights``)."""
    from boxmot.reid.core import ReID
    return ReID(weights=Path(path), device="cpu", half=False).model


def _frame(crops, height=300):
    """The RGB crops side by side on a grey BGR frame, as a detector's frame; (frame, boxes xyxy)."""
    width = sum(c.shape[1] for c in crops) + 10 * (len(crops) + 1)
    frame = np.full((max(height, max(c.shape[0] for c in crops) + 20), width, 3), 114, np.uint8)
    boxes, x = [], 10
    for crop in crops:
        h, w = crop.shape[:2]
        frame[10:10 + h, x:x + w] = crop[:, :, ::-1]          # RGB -> BGR, as OpenCV frames are
        boxes.append([x, 10, x + w, 10 + h])
        x += w + 10
    return frame, np.array(boxes, np.float32)


def _crops(paths, sizes=None):
    """RGB arrays of the images (decoded by PIL, as reidlib reads them), optionally resized first
    to other sizes (a detector's boxes are seldom the model's size)."""
    crops = [np.asarray(read_image(p)) for p in paths]
    if sizes:
        crops = [np.asarray(Image.fromarray(c).resize((w, h), Image.BILINEAR)) for c, (h, w) in zip(crops, sizes)]
    return crops


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("fmt", list(SUFFIXES))
def test_boxmot_back_end_gives_the_extractor_features(fmt, exports, trained, synth_root):
    folder, cfg, _ = trained
    sidecar = json.loads(boxmot_metadata_path(exports[fmt]).read_text())
    assert sidecar["model_kwargs"]["img_size"] == [128, 64] and sidecar["format"] == fmt
    backend = _backend(exports[fmt])
    assert type(backend).__name__ == BACKENDS[fmt] and tuple(backend.input_shape) == (128, 64)
    paths = sorted(str(p) for p in (synth_root / "query").glob("*.jpg"))[:6]
    # the model's size, larger, smaller and another aspect: BoxMOT resizes each with OpenCV
    crops = _crops(paths, [(128, 64), (256, 128), (96, 40), (200, 70), (128, 64), (150, 90)])
    frame, boxes = _frame(crops)
    got = backend.get_features(boxes, frame)                  # L2-normalised, as trackers get them
    resized = [cv2.resize(frame[int(y0):int(y1), int(x0):int(x1)], (64, 128), interpolation=cv2.INTER_LINEAR)
               for x0, y0, x1, y1 in boxes]                   # the same resize, then reidlib's path
    expected = _unit(reidlib.FeatureExtractor(folder, device="cpu")(resized, bgr=True))
    cosine = (_unit(got) * expected).sum(axis=1)
    print(f"{fmt}: min cosine {cosine.min():.8f}, max |diff| {np.abs(got - expected).max():.2e}")
    assert got.shape == expected.shape and cosine.min() > 0.9999
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_botsort_tracks_with_the_export(exports, trained, synth_root):
    """BoT-SORT (BoxMOT's defaults) builds its re-ID model from ``reid_weights`` and tracks two
    people over a few frames; the embeddings it computes have the model's width."""
    from boxmot import BotSort
    tracker = BotSort(reid_weights=Path(exports["onnx"]), device="cpu", half=False)
    paths = sorted(str(p) for p in (synth_root / "query").glob("*.jpg"))[:2]
    crops = _crops(paths, [(256, 128), (240, 110)])
    ids = []
    for step in range(4):
        frame = np.full((480, 640, 3), 90, np.uint8)
        dets = []
        for i, crop in enumerate(crops):
            x, y = 60 + 300 * i + 6 * step, 100 + 2 * step
            frame[y:y + crop.shape[0], x:x + crop.shape[1]] = crop[:, :, ::-1]
            dets.append([x, y, x + crop.shape[1], y + crop.shape[0], 0.9, 0])
        tracks = tracker.update(np.array(dets, np.float32), frame)      # rows: x1 y1 x2 y2 id conf cls det
        ids.append(sorted(tracks[:, 4].astype(int).tolist()))
    assert len(ids[-1]) == 2 and ids[-1] == ids[-2] == ids[0]      # two tracks, the same ids throughout
    assert type(tracker._reid_model).__name__ == "ONNXBackend"
    model, _ = reidlib.load_trained_model(trained[0])
    assert tracker.last_emb_size == model.feature_dim


def test_retrieval_through_boxmot_equals_the_model_card(exports, trained):
    """Every query and gallery image of the generated test split, as crops in frames through
    BoxMOT's ONNX back-end: the same mAP and Rank-1 as the card records (FeatureExtractor's)."""
    folder, cfg, card = trained
    dataset = dataset_from_config(cfg)
    backend = _backend(exports["onnx"])
    start = time.perf_counter()

    def features(items):
        out = []
        for i in range(0, len(items), 16):
            frame, boxes = _frame(_crops([p for p, _, _ in items[i:i + 16]]))
            out.append(backend.get_features(boxes, frame))
        return torch.from_numpy(np.concatenate(out))

    qf, gf = features(dataset.query), features(dataset.gallery)
    q_labels, g_labels, _ = exclusion_labels(dataset.query, dataset.gallery)
    metrics = evaluate(qf, gf, [p for _, p, _ in dataset.query], [p for _, p, _ in dataset.gallery], q_labels,
                       g_labels, metric=cfg.test.metric, normalize=cfg.test.feat_norm, max_rank=cfg.test.max_rank)
    print(f"{len(qf)} queries, {len(gf)} gallery in {time.perf_counter() - start:.1f} s: BoxMOT mAP "
          f"{metrics['mAP']:.6f} R1 {metrics['rank1']:.6f}; card mAP {card['metrics']['mAP']:.6f} "
          f"R1 {card['metrics']['rank1']:.6f}")
    assert abs(metrics["mAP"] - card["metrics"]["mAP"]) <= 1e-3
    assert abs(metrics["rank1"] - card["metrics"]["rank1"]) <= 1e-3


def _sie_folder(tmp_path):
    """A tiny model trained with SIE over 3 cameras (random weights, moved BN statistics)."""
    cfg = load_config("tiny", ["device=cpu", "model.sie_camera=true"])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=5, num_cameras=3).eval()
    with torch.no_grad():
        model.bottleneck.running_mean.normal_()
    record = model_record(model, cfg, 5, 3)
    return save_trained(tmp_path / "sie_model", record.pop("model"), record)


def test_an_sie_model_is_exported_with_a_fixed_camera_or_refused(tmp_path, synth_root):
    folder = _sie_folder(tmp_path)
    with pytest.raises(ValueError, match=r"SIE over 3 cameras.*export with camera=K \(0\.\.2\)"):
        export_model(folder, tmp_path / "sie.onnx", target="boxmot")
    with pytest.raises(ValueError, match=r"camera=3: this model knows cameras 0\.\.2"):
        export_model(folder, tmp_path / "sie.onnx", target="boxmot", camera=3)
    with pytest.raises(ValueError, match="for target=boxmot"):
        export_model(folder, tmp_path / "sie.onnx", camera=1)
    assert not list(tmp_path.glob("sie.onnx*"))
    path = export_model(folder, tmp_path / "sie.onnx", target="boxmot", camera=1)
    paths = sorted(str(p) for p in (synth_root / "query").glob("*.jpg"))[:3]
    frame, boxes = _frame(_crops(paths))
    got = _backend(path).get_features(boxes, frame)
    extractor = reidlib.FeatureExtractor(folder, device="cpu")
    crops = [frame[int(y0):int(y1), int(x0):int(x1)] for x0, y0, x1, y1 in boxes]
    np.testing.assert_allclose(got, _unit(extractor(crops, cameras=1, bgr=True)), atol=1e-4)
    assert not np.allclose(got, _unit(extractor(crops, cameras=0, bgr=True)), atol=1e-3)   # the camera matters


def test_a_model_without_sie_refuses_a_camera(trained, tmp_path):
    with pytest.raises(ValueError, match="not trained with camera SIE; leave camera= out"):
        export_model(trained[0], tmp_path / "x.onnx", target="boxmot", camera=0)


@pytest.mark.parametrize(("out", "fmt", "message"), [
    ("model_ts.pt", None, r"end it in \.onnx .* or \.torchscript"),
    ("reid.torchscript", "onnx", r"name it reid\.onnx"),
    ("reid.onnx", "torchscript", r"name it reid\.torchscript"),
])
def test_the_suffix_must_pick_the_back_end(trained, tmp_path, out, fmt, message):
    with pytest.raises(ValueError, match=message):
        export_model(trained[0], tmp_path / out, format=fmt, target="boxmot")


def test_the_graph_converts_imagenet_input_to_the_model_normalisation(trained):
    """One per-channel affine: ImageNet-normalised RGB in, the model's 0.5/0.5 normalisation out."""
    from reidlib.export import BoxMOTGraph
    model, cfg = reidlib.load_trained_model(trained[0])
    graph = BoxMOTGraph(model, cfg.data.pixel_mean, cfg.data.pixel_std).eval()
    pixels = torch.rand(2, 3, 128, 64)
    mean_in, std_in = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        got = graph((pixels - mean_in) / std_in)
        expected = model.encode_image((pixels - 0.5) / 0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_export_files_get_the_umask_mode(trained, tmp_path):
    old = os.umask(0o022)
    try:
        path = export_model(trained[0], tmp_path / "reid.torchscript", target="boxmot")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert boxmot_metadata_path(path).stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("page", ["README.md", "docs/sharing.md"])
def test_the_docs_five_lines_track(trained, tmp_path, monkeypatch, synth_root, page):
    """"Track with your model" in the README and docs/sharing.md: the export command and the BoxMOT
    lines, as written (RUN/model standing for the trained folder), on a frame with two people."""
    from reidlib.__main__ import main
    text = (Path(__file__).resolve().parents[1] / page).read_text()
    section = text[text.index("Track with your model"):]
    command = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip()
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(command.splitlines()) + len(code.strip().splitlines()) == 5
    args = shlex.split(command.replace("RUN/model", str(trained[0])), comments=True)
    assert args[:3] == ["python", "-m", "reidlib"]
    monkeypatch.chdir(tmp_path)
    assert main(args[3:]) == 0
    crops = _crops(sorted(str(p) for p in (synth_root / "query").glob("*.jpg"))[:2])
    frame, boxes = _frame(crops)
    dets = np.concatenate([boxes, np.full((2, 1), 0.9, np.float32), np.zeros((2, 1), np.float32)], axis=1)
    namespace = {"video": [(frame, dets), (frame, dets + np.float32([[2, 1, 2, 1, 0, 0]]))]}
    exec(compile(code, page, "exec"), namespace)
    assert len(namespace["tracks"]) == 2 and namespace["tracker"].last_emb_size == 96
