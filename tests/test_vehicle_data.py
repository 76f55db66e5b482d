"""Vehicle data sets: VeRi-776 (cameras, view labels) and VehicleID (no cameras, drawn query/gallery
trials), read from generated folders, plus the data set options and the trial API."""
import hashlib
import logging
import random
import re
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from reidlib.config import load_config
from reidlib.data import ReIDDataset, dataset_from_config, load_dataset
from reidlib.demo.synth import generate_vehicleid, generate_veri, main, plan_veri_images, render_job

VERI_ARGS = dict(ids=12, cams=3, seed=2, images_per_id=6)
VEHICLEID_ARGS = dict(train_ids=12, test_ids=12, seed=1, cams=3, images_per_id=6)
VERI_FILE = re.compile(r"^(\d{4})_c(\d{3})_(\d{8})_0\.jpg$")
FOLDERS = {"train": "image_train", "query": "image_query", "gallery": "image_test"}


@pytest.fixture(scope="module")
def veri_root(tmp_path_factory) -> Path:
    return generate_veri(tmp_path_factory.mktemp("veri"), **VERI_ARGS)


@pytest.fixture(scope="module")
def vehicleid_root(tmp_path_factory) -> Path:
    return generate_vehicleid(tmp_path_factory.mktemp("vehicleid"), **VEHICLEID_ARGS)


def copy_set(root: Path, to: Path) -> Path:
    shutil.copytree(root, to)
    return to


def names_in(folder: Path) -> list[tuple[int, int]]:
    """(vehicle id, camera number) of every file in a VeRi folder, read from the names here."""
    parsed = [VERI_FILE.match(p.name) for p in sorted(folder.iterdir())]
    assert all(parsed), folder
    return [(int(m.group(1)), int(m.group(2))) for m in parsed]


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- the generators

def test_generated_vehicle_sets_depend_only_on_the_arguments(veri_root, vehicleid_root, tmp_path):
    assert digest(generate_veri(tmp_path / "veri", workers=2, **VERI_ARGS)) == digest(veri_root)
    assert digest(generate_vehicleid(tmp_path / "vid", **VEHICLEID_ARGS)) == digest(vehicleid_root)
    other = generate_veri(tmp_path / "other", **{**VERI_ARGS, "seed": 3})
    assert digest(other) != digest(veri_root)


def test_generated_veri_format(veri_root):
    names = {folder: sorted(p.name for p in (veri_root / folder).iterdir()) for folder in FOLDERS.values()}
    assert all(VERI_FILE.match(n) for ns in names.values() for n in ns)
    assert not set(names["image_query"]) & set(names["image_test"])
    for file_name, folders in [("keypoint_train.txt", ["image_train"]),
                               ("keypoint_test.txt", ["image_query", "image_test"])]:
        rows = [line.split() for line in (veri_root / file_name).read_text().splitlines()]
        assert {len(row) for row in rows} == {42} and {row[1] for row in rows} == {"-1"}
        assert sorted(row[0] for row in rows) == sorted(f"VeRi/{f}/{n}" for f in folders for n in names[f])
        assert {int(row[-1]) for row in rows} <= {0, 1, 2, 3}


def test_generated_vehicleid_format(vehicleid_root):
    images = sorted(p.name for p in (vehicleid_root / "image").iterdir())
    assert images == [f"{n:07d}.jpg" for n in range(1, len(images) + 1)]
    split = vehicleid_root / "train_test_split"
    train = read_list(split / "train_list.txt")
    tests = {size: read_list(split / f"test_list_{size}.txt") for size in (800, 1600, 2400)}
    test_ids = {size: {pid for _, pid in rows} for size, rows in tests.items()}
    assert [len(test_ids[s]) for s in (800, 1600, 2400)] == [4, 8, 12]  # ceil(12 * size / 2400)
    assert test_ids[800] < test_ids[1600] < test_ids[2400]
    assert not {pid for _, pid in train} & test_ids[2400]
    assert sorted(name for name, _ in train + tests[2400]) == [Path(n).stem for n in images]
    assert min(sum(p == pid for _, p in tests[2400]) for pid in test_ids[2400]) >= 2


def test_command_line_formats(tmp_path, capsys):
    args = ["--ids", "6", "--cams", "2", "--images-per-id", "4"]
    assert main([str(tmp_path / "veri"), "--format", "veri", *args]) == 0
    out = capsys.readouterr().out
    assert out.startswith("veri (") and "views" in out and (tmp_path / "veri" / "keypoint_test.txt").is_file()
    assert main([str(tmp_path / "vid"), "--format", "vehicleid", *args]) == 0
    out = capsys.readouterr().out
    assert out.startswith("vehicleid (") and "protocol: VehicleID test_list_800" in out
    assert len(read_list(tmp_path / "vid" / "train_test_split" / "train_list.txt")) > 0
    assert main([str(tmp_path / "x"), "--format", "veri", "--junk", "2", *args]) == 2
    assert "--junk only with --format market" in capsys.readouterr().err


# --------------------------------------------------------------------------- VeRi-776

def test_veri_stats_match_the_file_names(veri_root):
    ds = load_dataset("veri", veri_root)
    stats = ds.stats()
    for split, folder in FOLDERS.items():
        names = names_in(veri_root / folder)
        assert stats[split]["images"] == len(names) > 0
        assert stats[split]["ids"] == len({pid for pid, _ in names})
        assert stats[split]["cameras"] == len({cam for _, cam in names})
    assert stats["train"]["ids"] == stats["query"]["ids"] == VERI_ARGS["ids"] // 2
    assert ds.num_train_pids == VERI_ARGS["ids"] // 2 and ds.has_cameras
    assert ds.num_train_cams == max(cam for f in FOLDERS.values() for _, cam in names_in(veri_root / f))
    assert ds.protocol == "" and ds.test_pool is None and ds.num_trials == 1


def test_veri_relabels_train_ids_and_cameras_are_number_minus_one(veri_root):
    ds = load_dataset("veri", veri_root)
    originals = sorted({pid for pid, _ in names_in(veri_root / "image_train")})
    for path, pid, camid in ds.train:
        number, camera = map(int, VERI_FILE.match(Path(path).name).groups()[:2])
        assert pid == originals.index(number) and camid == camera - 1
    assert sorted({pid for _, pid, _ in ds.train}) == list(range(len(originals)))
    for path, pid, camid in ds.query + ds.gallery:  # original ids, so query and gallery compare
        number, camera = map(int, VERI_FILE.match(Path(path).name).groups()[:2])
        assert (pid, camid) == (number, camera - 1)


def test_veri_views_are_the_generated_views(veri_root):
    ds = load_dataset("veri", veri_root)
    expected = {str(veri_root / job[0]): render_job(job, VERI_ARGS["seed"])[1]
                for job in plan_veri_images(VERI_ARGS["ids"], VERI_ARGS["cams"], VERI_ARGS["seed"],
                                            images_per_id=VERI_ARGS["images_per_id"])}
    assert ds.views == expected
    assert len(expected) == sum(len(s) for s in ds.splits().values())
    assert len(set(expected.values())) == 4  # front, back, side facing left, side facing right
    assert ds.num_views == max(expected.values()) + 1 == 4
    assert ds.view_ids(ds.query) == [expected[path] for path, _, _ in ds.query]
    assert ds.stats()["train"]["views"] == len({expected[p] for p, _, _ in ds.train})
    assert "views" in ds.stats_table().splitlines()[1]


def test_veri_without_keypoint_files_has_no_views(veri_root, tmp_path, caplog):
    root = copy_set(veri_root, tmp_path / "VeRi")
    for name in ("keypoint_train.txt", "keypoint_test.txt"):
        (root / name).unlink()
    with caplog.at_level(logging.INFO, logger="reidlib.data"):
        ds = load_dataset("veri", tmp_path)  # found under ROOT/VeRi/
    assert Path(ds.root) == root and len(ds.train) == len(names_in(root / "image_train"))
    assert ds.views == {} and ds.num_views == 0 and set(ds.view_ids(ds.gallery)) == {-1}
    assert "views" not in ds.stats()["train"]
    assert "veri: no view labels" in caplog.text


def test_veri_keypoint_files_in_root_are_found(veri_root, tmp_path):
    root = copy_set(veri_root, tmp_path / "VeRi-776")
    for name in ("keypoint_train.txt", "keypoint_test.txt"):
        (root / name).rename(tmp_path / name)
    with_files = load_dataset("veri", veri_root)
    ds = load_dataset("veri", tmp_path)
    assert Path(ds.root) == root
    assert ds.views == {path.replace(str(veri_root), str(root)): v for path, v in with_files.views.items()}


def test_veri_malformed_keypoint_lines_are_skipped_and_counted(veri_root, tmp_path, caplog):
    root = copy_set(veri_root, tmp_path / "veri")
    path = root / "keypoint_test.txt"
    lines = path.read_text().splitlines()
    damaged_name = lines[0].split()[0].rsplit("/", 1)[1]
    lines[0] = " ".join(lines[0].split()[:-2] + ["3"])                              # 41 fields
    lines += ["VeRi/image_test/x.jpg " + "-1 " * 40 + "front", "VeRi/image_test/y.jpg " + "-1 " * 40 + "9", ""]
    path.write_text("\n".join(lines))
    with caplog.at_level(logging.INFO, logger="reidlib.data"):
        ds = load_dataset("veri", tmp_path)
    assert "veri: skipped 3 malformed line(s)" in caplog.text and "line 1:" in caplog.text
    total = sum(len(s) for s in ds.splits().values())
    assert f"view labels for {total - 1} of {total} images (1 without)" in caplog.text
    assert [v for (p, _, _), v in zip(ds.query + ds.gallery, ds.view_ids(ds.query + ds.gallery))
            if Path(p).name == damaged_name] == [-1]


def test_veri_junk_and_unparsable_names_are_counted(veri_root, tmp_path, caplog):
    root = copy_set(veri_root, tmp_path / "veri")
    (root / "image_test" / "-1_c002_00000001_0.jpg").touch()
    (root / "image_test" / "car.jpg").touch()
    with caplog.at_level(logging.INFO, logger="reidlib.data"):
        ds = load_dataset("veri", root)
    assert len(ds.gallery) == len(names_in(veri_root / "image_test"))
    assert "dropped 1 junk image(s) (pid -1)" in caplog.text
    assert "skipped 1 file name(s)" in caplog.text and "VVVV_cCCC_FFFFFFFF_0.jpg" in caplog.text


def test_veri_missing_folders(veri_root, tmp_path):
    root = copy_set(veri_root, tmp_path / "VeRi")
    shutil.rmtree(root / "image_query")
    with pytest.raises(FileNotFoundError, match=r"veri: missing folder .*image_query; expected ROOT/") as err:
        load_dataset("veri", tmp_path)
    assert "\n" not in str(err.value)
    assert len(load_dataset("veri", tmp_path, train_only=True).train) > 0
    with pytest.raises(FileNotFoundError, match=r"veri: no image_train under .*VeRi-776"):
        load_dataset("veri", tmp_path / "elsewhere")


# --------------------------------------------------------------------------- VehicleID

def read_list(path: Path) -> list[tuple[str, int]]:
    return [(name, int(pid)) for name, pid in (line.split() for line in path.read_text().splitlines())]


def expected_draw(pool, k):
    """The documented draw, written out again: seed k; ids ascending; images by path; randrange."""
    rng = random.Random(k)
    by_pid = defaultdict(list)
    for item in pool:
        by_pid[item[1]].append(item)
    query, gallery = [], []
    for pid in sorted(by_pid):
        images = sorted(by_pid[pid])
        pick = rng.randrange(len(images))
        gallery.append(images[pick])
        query += images[:pick] + images[pick + 1:]
    return sorted(query), sorted(gallery)


def test_vehicleid_train_is_relabelled_and_has_no_cameras(vehicleid_root):
    ds = load_dataset("vehicleid", vehicleid_root)
    listed = read_list(vehicleid_root / "train_test_split" / "train_list.txt")
    originals = sorted({pid for _, pid in listed})
    assert len(originals) == VEHICLEID_ARGS["train_ids"] and len(ds.train) == len(listed)
    assert sorted((Path(p).stem, pid) for p, pid, _ in ds.train) == sorted(
        (name, originals.index(pid)) for name, pid in listed)
    assert all(Path(p).is_file() for p, _, _ in ds.train)
    items = ds.train + ds.test_pool + ds.query + ds.gallery
    assert {camid for _, _, camid in items} == {-1}
    assert not ds.has_cameras and ds.num_train_cams == 0 and ds.stats()["query"]["cameras"] == 0
    assert ds.views == {} and ds.num_views == 0
    assert [line.split()[-1] for line in ds.stats_table().splitlines()[3:6]] == ["-"] * 3  # cameras


def test_vehicleid_test_pool_is_the_test_list(vehicleid_root):
    ds = load_dataset("vehicleid", vehicleid_root)
    listed = read_list(vehicleid_root / "train_test_split" / "test_list_800.txt")
    assert sorted((Path(p).stem, pid) for p, pid, _ in ds.test_pool) == sorted(listed)
    assert len({pid for _, pid in listed}) == 4  # ceil(12 / 3) for the generated 800 list
    assert ds.num_trials == 10 and ds.protocol.startswith("VehicleID test_list_800: one random image")
    assert "10 trials (seeds 0..9)" in ds.protocol and ds.protocol in ds.stats_table()


def test_vehicleid_trials_follow_the_documented_draw(vehicleid_root):
    ds = load_dataset("vehicleid", vehicleid_root, test_size=2400)
    pool = ds.test_pool
    counts = defaultdict(int)
    for _, pid, _ in pool:
        counts[pid] += 1
    assert min(counts.values()) >= 2 and len(counts) == VEHICLEID_ARGS["test_ids"]
    for k in range(ds.num_trials):
        query, gallery = ds.trial(k)
        assert (query, gallery) == expected_draw(pool, k)
        assert sorted(query + gallery) == sorted(pool) and not set(query) & set(gallery)
        assert sorted(pid for _, pid, _ in gallery) == sorted(counts)  # one gallery image per identity
        assert all(sum(p == pid for _, p, _ in query) == n - 1 for pid, n in counts.items())
        q_idx, g_idx = ds.trial_indices(k)
        assert ([pool[i] for i in q_idx], [pool[i] for i in g_idx]) == (query, gallery)
    assert ds.trial(0) == (ds.query, ds.gallery)
    assert ds.trial(0) != ds.trial(1) and ds.trial(1) != ds.trial(2)
    again = load_dataset("vehicleid", vehicleid_root, test_size=2400)
    assert again.trial(3) == ds.trial(3) and again.query == ds.query


def test_vehicleid_one_image_identity_is_a_gallery_distractor(tmp_path, caplog):
    write_vehicleid(tmp_path, train={"0000001": 7}, test={"0000002": 5, "0000003": 5, "0000004": 9})
    with caplog.at_level(logging.INFO, logger="reidlib.data"):
        ds = load_dataset("vehicleid", tmp_path, trials=4)
    for k in range(4):
        query, gallery = ds.trial(k)
        assert [pid for _, pid, _ in query] == [5] and sorted(pid for _, pid, _ in gallery) == [5, 9]
    assert "1 identities in test_list_800.txt have one image" in caplog.text
    assert "test_list_800.txt lists 2 identities (the official list has 800)" in caplog.text


def test_vehicleid_test_size_picks_the_list(vehicleid_root):
    ds = load_dataset("vehicleid", vehicleid_root, test_size=1600)
    listed = read_list(vehicleid_root / "train_test_split" / "test_list_1600.txt")
    assert sorted((Path(p).stem, pid) for p, pid, _ in ds.test_pool) == sorted(listed)
    assert len({pid for _, pid in listed}) == 8 and "test_list_1600" in ds.protocol
    with pytest.raises(ValueError, match="vehicleid: test_size 123 is not one of 800, 1600, 2400"):
        load_dataset("vehicleid", vehicleid_root, test_size=123)


def test_vehicleid_trials_option(vehicleid_root):
    ds = load_dataset("vehicleid", vehicleid_root, trials=3)
    assert ds.num_trials == 3 and "3 trials (seeds 0..2)" in ds.protocol
    assert "1 trial (seed 0)" in load_dataset("vehicleid", vehicleid_root, trials=1).protocol
    with pytest.raises(ValueError, match="vehicleid: trials 0"):
        load_dataset("vehicleid", vehicleid_root, trials=0)
    train_only = load_dataset("vehicleid", vehicleid_root, train_only=True)
    assert train_only.test_pool is None and train_only.query == [] and len(train_only.train) > 0


def write_vehicleid(base: Path, train: dict[str, int], test: dict[str, int], touch=True) -> Path:
    split = base / "train_test_split"
    split.mkdir(parents=True)
    (base / "image").mkdir()
    for name in {**train, **test}:
        if touch:
            (base / "image" / f"{name}.jpg").touch()
    (split / "train_list.txt").write_text("".join(f"{n} {p}\n" for n, p in train.items()))
    for size in (800, 1600, 2400):
        (split / f"test_list_{size}.txt").write_text("".join(f"{n} {p}\n" for n, p in test.items()))
    return base


def test_vehicleid_nested_folder_is_found(tmp_path):
    base = write_vehicleid(tmp_path / "VehicleID_V1.0", train={"0000001": 30, "0000002": 10},
                           test={"0000003": 5, "0000004": 5})
    ds = load_dataset("vehicleid", tmp_path)
    assert Path(ds.root) == base and [(Path(p).name, pid) for p, pid, _ in ds.train] == [
        ("0000001.jpg", 1), ("0000002.jpg", 0)]


def test_vehicleid_bad_input(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match=r"vehicleid: no train_test_split under .*expected ROOT/") as err:
        load_dataset("vehicleid", tmp_path)
    assert "\n" not in str(err.value)
    base = write_vehicleid(tmp_path / "a", train={"0000001": 3}, test={"0000002": 4}, touch=False)
    with pytest.raises(FileNotFoundError, match=r"train_list.txt names 0000001.jpg, which is not in .*image"):
        load_dataset("vehicleid", base)
    (base / "image").rmdir()
    with pytest.raises(FileNotFoundError, match=r"vehicleid: missing folder .*image; expected ROOT/"):
        load_dataset("vehicleid", base)

    base = write_vehicleid(tmp_path / "b", train={"0000001": 3, "0000002": 4}, test={"0000003": 4})
    (base / "train_test_split" / "test_list_1600.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"vehicleid: missing .*test_list_1600.txt"):
        load_dataset("vehicleid", base, test_size=1600)
    train_list = base / "train_test_split" / "train_list.txt"
    train_list.write_text(train_list.read_text() + "0000009\n0000010 ten\n0000011 1 2\n")
    with caplog.at_level(logging.WARNING, logger="reidlib.data"):
        ds = load_dataset("vehicleid", base)
    assert len(ds.train) == 2 and "vehicleid: skipped 3 malformed line(s)" in caplog.text
    assert "line 3: '0000009'" in caplog.text
    train_list.write_text("garbage\n")
    with pytest.raises(ValueError, match=r"vehicleid: no usable images in .*train_list.txt"):
        load_dataset("vehicleid", base)


def test_dataset_from_config(vehicleid_root):
    cfg = load_config(None, ["data.dataset=vehicleid", f"data.root={vehicleid_root}", "test.trials=3",
                             "data.test_size=1600"])
    ds = dataset_from_config(cfg)
    assert ds.name == "vehicleid" and ds.num_trials == 3
    assert len({pid for _, pid, _ in ds.test_pool}) == 8  # test_list_1600.txt


# --------------------------------------------------------------------------- options and the trial API

def test_options_a_loader_does_not_take_are_ignored(veri_root, tmp_path):
    ds = load_dataset("veri", veri_root, test_size=1600, trials=3)
    assert ds.num_trials == 1 and ds.trial(0) == (ds.query, ds.gallery)
    with pytest.raises(ValueError, match="fixed query/gallery split: only trial 0, not 1"):
        ds.trial(1)
    for name in ("0001_c1s1_000001_01.jpg", "0002_c2s1_000002_01.jpg"):
        for folder in ("bounding_box_train", "query", "bounding_box_test"):
            (tmp_path / folder).mkdir(exist_ok=True)
            (tmp_path / folder / name).touch()
    market = load_dataset("market1501", tmp_path, test_size=2400, trials=5, train_only=False)
    assert market.num_trials == 1 and len(market.query) == 2
    assert market.trial_indices(0) == ([0, 1], [2, 3])
    with pytest.raises(TypeError, match="no data set takes the option.*tets_size"):
        load_dataset("market1501", tmp_path, tets_size=800)


def test_reid_dataset_checks_its_arguments():
    pool = [("a.jpg", 1, -1), ("b.jpg", 1, -1)]
    with pytest.raises(ValueError, match="num_trials=3; a fixed query/gallery split has 1 trial"):
        ReIDDataset("x", "/d", [], [], [], num_trials=3)
    with pytest.raises(ValueError, match="drawn from test_pool; pass"):
        ReIDDataset("x", "/d", [], pool[:1], [], test_pool=pool)
    with pytest.raises(ValueError, match=r"x: /q.jpg has a camera id and a.jpg has none"):
        ReIDDataset("x", "/d", [("/q.jpg", 0, 2)], [], [], test_pool=pool)
    ds = ReIDDataset("x", "/d", [], [], [], test_pool=pool, num_trials=2)
    assert ds.gallery in ([pool[0]], [pool[1]]) and len(ds.query) == 1
    with pytest.raises(ValueError, match="trial -1"):
        ds.trial(-1)


def test_the_draw_sorts_each_identity_by_path_whatever_the_pool_order():
    pool = [(f"/img/{name}.jpg", pid, -1) for name, pid in
            [("e", 3), ("a", 8), ("d", 3), ("c", 8), ("b", 3), ("f", 1), ("g", 8), ("h", 1)]]
    ds = ReIDDataset("x", "/d", [], [], [], test_pool=pool, num_trials=6)
    draws = set()
    for k in range(6):
        query, gallery = ds.trial(k)
        assert (sorted(query), sorted(gallery)) == expected_draw(pool, k)
        draws.add(tuple(gallery))
    assert len(draws) > 1


def test_vehicleid_lists_with_repeats_double_labels_or_low_ids(tmp_path, caplog):
    """A repeated line is dropped and counted; one image under two ids, or an id below -1, is an
    error naming the list (either would train or score with a wrong label)."""
    base = write_vehicleid(tmp_path / "v", train={"0000001": 3, "0000002": 4}, test={"0000003": 5, "0000004": 5})
    train_list = base / "train_test_split" / "train_list.txt"
    train_list.write_text(train_list.read_text() + "0000001 3\n")
    with caplog.at_level(logging.WARNING, logger="reidlib"):
        ds = load_dataset("vehicleid", base)
    assert len(ds.train) == 2 and "skipped 1 repeated line(s)" in caplog.text
    train_list.write_text(train_list.read_text() + "0000001 4\n")
    with pytest.raises(ValueError, match=r"vehicleid: .*train_list.txt lists .*0000001.jpg twice"):
        load_dataset("vehicleid", base)
    train_list.write_text("0000001 3\n0000002 -5\n")
    with pytest.raises(ValueError, match=r"vehicleid: .*train_list.txt gives .*0000002.jpg pid -5"):
        load_dataset("vehicleid", base)
