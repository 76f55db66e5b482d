"""The generated Market-format data set: determinism, names, sizes, splits, the command line."""
import hashlib
import re
from pathlib import Path

import pytest
from PIL import Image

from reidlib.data import load_dataset
from reidlib.demo.synth import SPLIT_FOLDERS, generate_market, main

SMALL = dict(ids=8, cams=3, images_per_id=6, distractors=3, junk=2)
MARKET_FILE = re.compile(r"^(-1|\d{4})_c(\d)s([1-6])_(\d{6})_(\d{2})\.jpg$")


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def small(small_generated):
    return small_generated


def test_same_seed_same_bytes_other_seed_differs(small, tmp_path):
    again = generate_market(tmp_path / "again", seed=3, **SMALL)
    other = generate_market(tmp_path / "other", seed=4, **SMALL)
    assert digest(again) == digest(small)
    assert digest(other) != digest(small)


def test_parallel_workers_write_the_same_bytes(small, tmp_path):
    assert digest(generate_market(tmp_path / "par", seed=3, workers=2, **SMALL)) == digest(small)


def test_market_names_jpeg_128x64(small):
    files = list(small.rglob("*.jpg"))
    assert {p.parent.name for p in files} == set(SPLIT_FOLDERS)
    for path in files:
        match = MARKET_FILE.match(path.name)
        assert match, path.name
        assert 1 <= int(match.group(2)) <= SMALL["cams"]
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (64, 128)  # width, height


def test_splits_like_market(small):
    ds = load_dataset("market1501", small)
    raw_train = {int(p.name.split("_")[0]) for p in (small / "bounding_box_train").glob("*.jpg")}
    test_pids = {pid for _, pid, _ in ds.query + ds.gallery} - {0}
    assert len(raw_train) == len(test_pids) == SMALL["ids"] // 2
    assert raw_train.isdisjoint(test_pids)
    gallery_names = [p.name for p in (small / "bounding_box_test").glob("*.jpg")]
    assert sum(n.startswith("0000_") for n in gallery_names) == SMALL["distractors"]
    assert sum(n.startswith("-1_") for n in gallery_names) == SMALL["junk"]
    assert all(pid != -1 for _, pid, _ in ds.gallery)  # the loader drops junk


def test_every_query_has_one_image_per_camera_and_a_cross_camera_match(small):
    ds = load_dataset("market1501", small)
    pairs = [(pid, cam) for _, pid, cam in ds.query]
    assert len(pairs) == len(set(pairs))
    for pid, cam in pairs:
        assert any(g_pid == pid and g_cam != cam for _, g_pid, g_cam in ds.gallery)


def test_train_only_with_an_exact_image_count(tmp_path):
    out = generate_market(tmp_path, ids=5, cams=2, train_only=True, train_images=23, seed=0)
    assert not (out / "query").exists()
    ds = load_dataset("market1501", out, train_only=True)
    assert len(ds.train) == 23 and ds.num_train_pids == 5 and ds.query == [] == ds.gallery


def test_refuses_to_mix_with_existing_images(small, tmp_path):
    out = generate_market(tmp_path, seed=1, **SMALL)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_market(out, seed=2, **SMALL)
    generate_market(out, seed=3, overwrite=True, **SMALL)
    assert digest(out) == digest(small)


def test_bad_arguments():
    with pytest.raises(ValueError, match="cams >= 2"):
        generate_market("unused", ids=4, cams=1)
    with pytest.raises(ValueError, match="no test"):
        generate_market("unused", ids=4, cams=2, train_frac=1.0)


def test_command_line_prints_the_stats_table(tmp_path, capsys):
    assert main([str(tmp_path), "--ids", "6", "--cams", "2", "--images-per-id", "4", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "split" in out and "train" in out and "gallery" in out and "written in" in out
    assert main([str(tmp_path), "--ids", "6"]) == 2  # refuses to overwrite
