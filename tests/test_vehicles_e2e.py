"""Vehicle data and data without cameras, end to end on generated folders: train, test, search."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reidlib
from reidlib.data import load_dataset
from reidlib.demo.synth import generate_vehicleid, generate_veri
from reidlib.eval.inference import MARKET_PROTOCOL, SAME_IMAGE_PROTOCOL
from reidlib.methods import method_config
from reidlib.weights import read_trained

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
SHORT = ["device=cpu", "stage1.epochs=1", "stage2.epochs=1", "stage2.ims_per_batch=16", "test.batch_size=32"]


def _cfg(root, out, *extra, method="baseline"):
    return method_config(method, [f"data.root={root}", f"output_dir={out}", *SHORT, *extra], base="tiny")


@pytest.fixture(scope="module")
def veri_root(tmp_path_factory):
    return generate_veri(tmp_path_factory.mktemp("veri") / "VeRi", ids=16, cams=3, seed=2)


def test_veri_with_camera_and_view_sie_trains_and_tests(veri_root, tmp_path):
    cfg = _cfg(veri_root, tmp_path / "run", "data.dataset=veri", "model.sie_camera=true", "model.sie_view=true",
               "model.sie_coe=1.0", "model.class_token=vehicle")
    data = load_dataset("veri", veri_root)
    assert data.num_views >= 2 and data.num_train_cams == 3
    metrics = reidlib.train(cfg)
    assert metrics["protocol"] == MARKET_PROTOCOL and 0 < metrics["mAP"] <= 1
    state = read_trained(tmp_path / "run" / "model")
    assert (state["num_cameras"], state["num_views"]) == (3, data.num_views)
    assert state["model"]["sie_embed"].shape[0] == 3 * data.num_views
    # the saved model tests to the same numbers: views reach the extractor from the data set
    again = reidlib.test(cfg, weights=str(tmp_path / "run" / "model"))
    assert again["mAP"] == pytest.approx(metrics["mAP"], abs=1e-6)
    # the view table matters: testing with every view id replaced by 0 changes the features
    model, _ = reidlib.load_trained_model(tmp_path / "run" / "model")
    extractor = reidlib.FeatureExtractor.from_model(model, cfg)
    items = data.query[:4]
    real = extractor.extract_items(items, progress=False, views=data.view_ids(items))[0]
    zero = extractor.extract_items(items, progress=False, views=[0] * 4)[0]
    assert not torch.allclose(real, zero)


def test_view_sie_without_view_labels_fails_before_training(synth_root, tmp_path):
    cfg = _cfg(synth_root, tmp_path / "run", "data.dataset=synth", "model.sie_view=true")
    with pytest.raises(ValueError, match="sie_view=true, but .* no view label .*sie_view=false"):
        reidlib.train(cfg)
    assert not list((tmp_path / "run").glob("*.pt"))


def test_vehicleid_trains_and_averages_its_draws(tmp_path):
    root = generate_vehicleid(tmp_path / "VehicleID_V1.0", train_ids=12, test_ids=10, seed=3)
    cfg = _cfg(root, tmp_path / "run", "data.dataset=vehicleid", "test.trials=3", "model.class_token=vehicle")
    with pytest.raises(ValueError, match="no camera ids.*sie_camera=false"):
        reidlib.train(_cfg(root, tmp_path / "sie", "data.dataset=vehicleid", "model.sie_camera=true"))
    metrics = reidlib.train(cfg)
    assert metrics["num_trials"] == 3 and len(metrics["trial_rank1"]) == 3
    assert "VehicleID" in metrics["protocol"] and SAME_IMAGE_PROTOCOL in metrics["protocol"]
    assert metrics["mAP"] == pytest.approx(sum(metrics["trial_mAP"]) / 3)


def _camera_less_folder(market_root: Path, out: Path) -> Path:
    """The generated Market set as CSV files without a camid column (paths relative to ``out``)."""
    out.mkdir(parents=True)
    market = load_dataset("synth", market_root)
    for name, items in (("train", market.train), ("query", market.query), ("gallery", market.gallery)):
        with open(out / f"{name}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "pid"])
            for path, pid, _ in items:        # train pids relabelled 0..C-1 already: as good as any
                writer.writerow([os.path.relpath(path, out), pid])
    return out


def test_folder_without_cameras_trains_tests_and_searches(synth_root, tmp_path):
    root = _camera_less_folder(Path(synth_root), tmp_path / "own")
    data = load_dataset("folder", root)
    assert not data.has_cameras and data.num_train_cams == 0 and data.num_train_pids == 12
    cfg = _cfg(root, tmp_path / "run", "data.dataset=folder")
    metrics = reidlib.train(cfg)
    assert metrics["protocol"] == SAME_IMAGE_PROTOCOL and 0 < metrics["mAP"] <= 1
    weights = tmp_path / "run" / "model"
    tested = reidlib.test(cfg, weights=str(weights))
    assert tested["protocol"] == SAME_IMAGE_PROTOCOL and tested["mAP"] == pytest.approx(metrics["mAP"], abs=1e-6)
    # search: a query that is also in the gallery folder never finds itself; its identity's other
    # images count although their cameras are unknown
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    query_item = data.query[0]
    renamed = []
    for i, (path, pid, _) in enumerate(data.gallery + [query_item]):
        target = gallery / f"{pid:04d}_{i:05d}.jpg"          # identity first, no camera: 0007_00012.jpg
        target.write_bytes(Path(path).read_bytes())
        renamed.append(target)
    query = renamed[-1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "reidlib", "search", str(tmp_path / "run" / "config.yaml"),
                           f"test.weights={weights}", f"query={query}", f"gallery={gallery}", "top=1000",
                           f"grid={tmp_path / 'grid.png'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ranked = [line.split()[-1] for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert str(query) not in ranked and len(ranked) == len(renamed) - 1
    same_identity = [p for p in ranked if Path(p).name.startswith(f"{query_item[1]:04d}_")]
    assert len(same_identity) == sum(1 for _, pid, _ in data.gallery if pid == query_item[1]) > 0
