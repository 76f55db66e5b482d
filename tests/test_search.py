"""extract and search on the generated data with a briefly trained tiny model, and their errors."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reidlib.data import list_image_folder
from reidlib.eval.inference import extract_features
from reidlib.methods.trained import load_trained_model
from reidlib.search import extract_folder, search

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cfg(tiny_trained):
    cfg, out = tiny_trained
    cfg.test.weights = str(out / "model")
    return cfg


def test_extract_writes_features_in_file_order(cfg, synth_root, tmp_path):
    out = extract_folder(cfg, synth_root / "query", tmp_path / "q.npz")
    data = np.load(out)
    items = list_image_folder(synth_root / "query")
    assert list(data["paths"]) == [p for p, _, _ in items]
    assert data["features"].shape[0] == len(items) and data["features"].dtype == np.float32
    # the same features as encoding the items directly with the trained model
    model, _ = load_trained_model(cfg.test.weights)
    direct, pids, _ = extract_features(model, items, cfg, progress=False)
    assert torch.allclose(torch.from_numpy(data["features"]), direct, atol=1e-5)
    assert data["pids"].tolist() == pids.tolist() == [pid for _, pid, _ in items]


def test_extract_skips_unreadable_images(cfg, synth_root, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((synth_root / "query").glob("*.jpg"))[:4]:
        shutil.copy(p, folder)
    (folder / "0001_c1s1_000001_00.jpg").write_bytes(b"not a jpeg")
    good = sorted((synth_root / "query").glob("*.jpg"))[0]
    (folder / "0002_c1s1_000002_00.jpg").write_bytes(good.read_bytes()[:400])  # truncated
    data = np.load(extract_folder(cfg, folder, tmp_path / "f.npz"))
    assert len(data["paths"]) == 4
    assert not any("000001" in p or "000002" in p for p in data["paths"])


def test_search_ranks_a_gallery_and_saves_a_grid(cfg, synth_root, tmp_path):
    query = sorted((synth_root / "query").glob("*.jpg"))[0]
    feats = extract_folder(cfg, synth_root / "bounding_box_test", tmp_path / "g.npz")
    ranked = search(cfg, query, feats, top=5, grid=tmp_path / "grid.png")
    assert len(ranked) == 5
    distances = [d for _, d in ranked]
    assert distances == sorted(distances)
    assert (tmp_path / "grid.png").stat().st_size > 1000
    # a folder gallery gives the same ranking as its .npz
    again = search(cfg, query, synth_root / "bounding_box_test", top=5, grid=None)
    assert [p for p, _ in again] == [p for p, _ in ranked]
    # junk (same person, same camera) never appears
    qpid, qcam = query.name.split("_")[0], query.name.split("_")[1][:2]
    assert not any(Path(p).name.startswith(qpid) and Path(p).name.split("_")[1][:2] == qcam for p, _ in ranked)


def test_bad_inputs_are_clear(cfg, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        extract_folder(cfg, tmp_path / "empty", tmp_path / "x.npz")
    with pytest.raises(FileNotFoundError, match="images=DIR"):
        extract_folder(cfg, tmp_path / "nope", tmp_path / "x.npz")
    cfg.test.weights = str(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        extract_folder(cfg, ROOT / "tests", tmp_path / "x.npz")


@pytest.mark.slow
def test_cli_extract_and_search(cfg, synth_root, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    common = ["tiny", f"weights={cfg.test.weights}"]
    done = subprocess.run([sys.executable, "-m", "reidlib", "extract", *common,
                           f"images={synth_root / 'bounding_box_test'}", f"out={tmp_path / 'g.npz'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    query = sorted((synth_root / "query").glob("*.jpg"))[0]
    done = subprocess.run([sys.executable, "-m", "reidlib", "search", *common, f"query={query}",
                           f"gallery={tmp_path / 'g.npz'}", "top=3", f"grid={tmp_path / 'grid.png'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 3 and lines[0].split()[0] == "1"
    assert (tmp_path / "grid.png").is_file()


def test_flip_augmentation_averages_image_and_mirror(cfg, synth_root):
    import copy

    from reidlib.data import build_transforms, read_image
    model, _ = load_trained_model(cfg.test.weights)
    items = list_image_folder(synth_root / "query")[:3]
    flip_cfg = copy.deepcopy(cfg)
    flip_cfg.test.flip = True
    flipped, _, _ = extract_features(model, items, flip_cfg, progress=False)
    plain, _, _ = extract_features(model, items, cfg, progress=False)
    transform = build_transforms(cfg.data, cfg.model.image_size, train=False)
    x = torch.stack([transform(read_image(p)) for p, _, _ in items])
    with torch.no_grad():
        expected = (model.encode_image(x) + model.encode_image(x.flip(-1))) / 2
    assert torch.allclose(flipped, expected, atol=1e-5)
    assert not torch.allclose(flipped, plain, atol=1e-4)
