"""Data set loaders in each layout, bad input, image reading and the image Dataset."""
import copy
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from reidlib.data import (
    ImageDataset,
    TrainImageCache,
    UnreadableImageError,
    dataset_names,
    list_image_folder,
    load_dataset,
    read_image,
)

# A tiny Market-style set: train pids 7 and 3 (relabelled 3->0, 7->1), a distractor (0) and junk (-1).
TRAIN = ["0007_c1s1_000001_01.jpg", "0007_c2s1_000002_01.jpg", "0003_c3s1_000003_01.jpg",
         "0003_c1s1_000004_01.jpg"]
QUERY = ["0010_c1s1_000005_00.jpg", "0011_c2s1_000006_00.jpg"]
GALLERY = ["0010_c2s1_000007_01.jpg", "0011_c3s1_000008_01.jpg", "0000_c1s1_000009_01.jpg",
           "-1_c1s1_000010_01.jpg", "-1_c2s1_000011_01.jpg"]


def touch(folder: Path, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).touch()


def write_market(base: Path, train=TRAIN, query=QUERY, gallery=GALLERY) -> Path:
    touch(base / "bounding_box_train", train)
    touch(base / "query", query)
    touch(base / "bounding_box_test", gallery)
    return base


def write_jpeg(path: Path, colour=(200, 30, 40), size=(16, 32), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).convert(mode).save(path, quality=95)
    return path


def check_tiny_market(ds):
    assert ds.train == sorted(ds.train)
    assert [(Path(p).name[:4], pid, cam) for p, pid, cam in ds.train] == [
        ("0003", 0, 0), ("0003", 0, 2), ("0007", 1, 0), ("0007", 1, 1)]
    assert [(pid, cam) for _, pid, cam in ds.query] == [(10, 0), (11, 1)]
    assert sorted(pid for _, pid, _ in ds.gallery) == [0, 10, 11]  # distractor kept, junk dropped
    assert ds.num_train_pids == 2 and ds.num_train_cams == 3
    assert ds.stats()["gallery"] == {"ids": 3, "images": 3, "cameras": 3}


# --------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("name,nest", [
    ("market1501", ""), ("market1501", "Market-1501-v15.09.15"),
    ("market1501", "market1501/Market-1501-v15.09.15"),
    ("dukemtmc", ""), ("dukemtmc", "DukeMTMC-reID"), ("dukemtmc", "dukemtmcreid/DukeMTMC-reID"),
    ("dukemtmc", "dukemtmc-reid/DukeMTMC-reID"),
    ("occ_duke", "Occluded_Duke"), ("occ_duke", "dukemtmcreid/Occluded_Duke"),
    ("iust", ""), ("iust", "IUST_PersonReId"), ("folder", ""),
])
def test_market_style_layouts(tmp_path, name, nest):
    base = write_market(tmp_path / nest if nest else tmp_path)
    ds = load_dataset(name, tmp_path)
    check_tiny_market(ds)
    assert ds.name == name and Path(ds.root) == base


def test_registry_lists_every_data_set():
    assert set(dataset_names()) >= {"market1501", "dukemtmc", "msmt17", "iust", "occ_duke", "folder"}
    with pytest.raises(KeyError, match="registered"):
        load_dataset("market", "/nowhere")


def test_iust_cameras_that_are_not_contiguous_are_mapped_and_logged(tmp_path, caplog):
    write_market(tmp_path, train=["0001_c2s1_0_01.jpg", "0002_c5s1_0_01.jpg"],
                 query=["0003_c9s1_0_01.jpg"], gallery=["0003_c2s1_0_01.jpg"])
    with caplog.at_level(logging.INFO, logger="reidlib.data"):
        ds = load_dataset("iust", tmp_path)
    assert [cam for _, _, cam in ds.train] == [0, 1] and ds.query[0][2] == 2 and ds.gallery[0][2] == 0
    assert ds.num_train_cams == 3
    assert "camera numbers [2, 5, 9] are not 1..3; mapped to 0..2" in caplog.text


def test_train_only_reads_no_test_folders(tmp_path):
    touch(tmp_path / "bounding_box_train", TRAIN)
    ds = load_dataset("market1501", tmp_path, train_only=True)
    assert len(ds.train) == 4 and ds.query == [] and ds.gallery == []


def test_stats_table_is_aligned(tmp_path):
    table = load_dataset("market1501", write_market(tmp_path)).stats_table()
    lines = table.splitlines()
    assert lines[0].startswith("market1501 (") and "ids" in lines[1] and "cameras" in lines[1]
    assert len({len(line) for line in lines[1:]}) == 1
    assert lines[3].split("|")[0].strip() == "train" and lines[5].split()[-1] == "3"


# --------------------------------------------------------------------------- MSMT17

def write_msmt(base: Path, train_dir="train", test_dir="test", prefix=""):
    train = {"0000/0000_000_01_0303morning_0015_0.jpg": 0, "0000/0000_001_03_0303morning_0020_0.jpg": 0,
             "0001/0001_000_15_0303noon_0001_0.jpg": 1}
    val = {"0002/0002_000_02_0303noon_0002_0.jpg": 2}
    query = {"0000/0000_000_04_0113morning_0001_0.jpg": 0}
    gallery = {"0000/0000_001_05_0113morning_0002_0.jpg": 0, "0001/0001_000_04_0113noon_0003_0.jpg": 1}
    for list_name, folder, entries in [("list_train.txt", train_dir, train), ("list_val.txt", train_dir, val),
                                       ("list_query.txt", test_dir, query),
                                       ("list_gallery.txt", test_dir, gallery)]:
        for rel in entries:
            touch(base / folder / Path(rel).parent, [Path(rel).name])
        lines = [f"{prefix + folder + '/' if prefix else ''}{rel} {pid}" for rel, pid in entries.items()]
        (base / list_name).write_text("\n".join(lines) + "\n")
    return base


@pytest.mark.parametrize("nest,train_dir,test_dir", [
    ("", "train", "test"), ("MSMT17", "train", "test"), ("MSMT17_V1", "train", "test"),
    ("MSMT17_V2", "mask_train_v2", "mask_test_v2"), ("msmt17/MSMT17_V2", "mask_train_v2", "mask_test_v2"),
])
def test_msmt17_lists(tmp_path, nest, train_dir, test_dir):
    base = write_msmt(tmp_path / nest if nest else tmp_path, train_dir, test_dir)
    ds = load_dataset("msmt17", tmp_path)
    assert Path(ds.root) == base
    # train = train + val lists; cameras from the 3rd underscore field, 1-based -> 0-based (0..14)
    assert [(pid, cam) for _, pid, cam in ds.train] == [(0, 0), (0, 2), (1, 14), (2, 1)]
    assert [(pid, cam) for _, pid, cam in ds.query] == [(0, 3)]
    assert [(pid, cam) for _, pid, cam in ds.gallery] == [(0, 4), (1, 3)]
    assert all(Path(p).is_file() and train_dir in p for p, _, _ in ds.train)
    assert ds.num_train_pids == 3 and ds.num_train_cams == 15


def test_msmt17_list_paths_relative_to_the_data_set_folder(tmp_path):
    write_msmt(tmp_path, prefix="./")
    ds = load_dataset("msmt17", tmp_path)
    assert all(Path(p).is_file() for p, _, _ in ds.train + ds.query + ds.gallery)


def test_msmt17_converted_to_market_style(tmp_path):
    write_market(tmp_path / "MSMT17")
    check_tiny_market(load_dataset("msmt17", tmp_path))


def test_msmt17_missing_lists(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"msmt17: no list_train.txt under .*; expected ROOT/"):
        load_dataset("msmt17", tmp_path)


# --------------------------------------------------------------------------- folder (CSV)

def test_folder_csv(tmp_path):
    touch(tmp_path / "imgs", ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"])
    (tmp_path / "train.csv").write_text("path,pid,camid,note\nimgs/b.jpg,42,10,x\nimgs/a.jpg,17,20,y\n"
                                        "imgs/c.jpg,-1,10,junk\n")
    (tmp_path / "query.csv").write_text("path,pid,camid\nimgs/d.jpg,5,10\n")
    (tmp_path / "gallery.csv").write_text("path,pid,camid\nimgs/e.jpg,5,30\nimgs/f.jpg,0,20\n")
    ds = load_dataset("folder", tmp_path)
    assert [(Path(p).name, pid, cam) for p, pid, cam in ds.train] == [("a.jpg", 0, 1), ("b.jpg", 1, 0)]
    assert [(pid, cam) for _, pid, cam in ds.query] == [(5, 0)]
    assert [(pid, cam) for _, pid, cam in ds.gallery] == [(5, 2), (0, 1)]
    assert ds.num_train_cams == 3


def test_folder_csv_bad_rows(tmp_path):
    touch(tmp_path, ["a.jpg"])
    (tmp_path / "train.csv").write_text("path,camid\na.jpg,1\n")
    with pytest.raises(ValueError, match="lacks column.*pid"):
        load_dataset("folder", tmp_path, train_only=True)
    (tmp_path / "train.csv").write_text("path,pid,camid\na.jpg,one,1\n")
    with pytest.raises(ValueError, match="line 2"):
        load_dataset("folder", tmp_path, train_only=True)
    (tmp_path / "train.csv").write_text("path,pid,camid\nmissing.jpg,1,1\n")
    with pytest.raises(FileNotFoundError, match="relative to"):
        load_dataset("folder", tmp_path, train_only=True)


def test_folder_csv_without_cameras(tmp_path, caplog):
    touch(tmp_path / "imgs", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    (tmp_path / "train.csv").write_text("path,pid\nimgs/b.jpg,42\nimgs/a.jpg,17\n")
    (tmp_path / "query.csv").write_text("path,pid,note\nimgs/c.jpg,5,x\n")
    (tmp_path / "gallery.csv").write_text("path,pid\nimgs/d.jpg,5\n")
    with caplog.at_level(logging.INFO, logger="reidlib.data"):
        ds = load_dataset("folder", tmp_path)
    assert [(Path(p).name, pid, cam) for p, pid, cam in ds.train] == [("a.jpg", 0, -1), ("b.jpg", 1, -1)]
    assert [(pid, cam) for _, pid, cam in ds.query + ds.gallery] == [(5, -1), (5, -1)]
    assert not ds.has_cameras and ds.num_train_cams == 0 and ds.stats()["train"]["cameras"] == 0
    assert caplog.text.count("no camera ids") == 1
    assert ds.stats_table().splitlines()[3].split()[-1] == "-"


def test_folder_csv_cameras_in_some_files_or_rows_only(tmp_path):
    touch(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    (tmp_path / "train.csv").write_text("path,pid,camid\na.jpg,1,0\nb.jpg,2,\n")
    with pytest.raises(ValueError, match=r"train.csv line 3: empty camid"):
        load_dataset("folder", tmp_path, train_only=True)
    (tmp_path / "train.csv").write_text("path,pid,camid\na.jpg,1,-1\n")
    with pytest.raises(ValueError, match=r"train.csv line 2: camid -1 < 0"):
        load_dataset("folder", tmp_path, train_only=True)
    (tmp_path / "train.csv").write_text("path,pid,camid\na.jpg,1,0\nb.jpg,2,1\n")
    (tmp_path / "query.csv").write_text("path,pid\nc.jpg,3\n")
    (tmp_path / "gallery.csv").write_text("path,pid\nc.jpg,3\n")
    with pytest.raises(ValueError, match=r"folder: .*a.jpg has a camera id and .*c.jpg has none") as err:
        load_dataset("folder", tmp_path)
    assert "\n" not in str(err.value)


def test_folder_market_names_without_cameras(tmp_path, caplog):
    write_market(tmp_path, train=["0007_000001_01.jpg", "0007_x.jpg", "0003_cat.jpg"],
                 query=["0010_000005_00.jpg"], gallery=["0010_000007_01.jpg", "0000_000009_01.jpg",
                                                         "-1_000010_01.jpg", "photo.jpg"])
    with caplog.at_level(logging.INFO, logger="reidlib.data"):
        ds = load_dataset("folder", tmp_path)
    assert [(Path(p).name, pid, cam) for p, pid, cam in ds.train] == [
        ("0003_cat.jpg", 0, -1), ("0007_000001_01.jpg", 1, -1), ("0007_x.jpg", 1, -1)]
    assert [(pid, cam) for _, pid, cam in ds.query] == [(10, -1)]
    assert sorted(pid for _, pid, _ in ds.gallery) == [0, 10]
    assert not ds.has_cameras and ds.num_train_cams == 0
    assert "skipped 1 file name(s)" in caplog.text and "photo.jpg" in caplog.text
    assert "no camera ids" in caplog.text


def test_folder_market_names_with_and_without_cameras_is_an_error(tmp_path):
    write_market(tmp_path, train=["0007_c1s1_000001_01.jpg", "0007_000002_01.jpg"], query=QUERY, gallery=GALLERY)
    with pytest.raises(ValueError, match=r"folder: .*0007_c1s1_000001_01.jpg has a camera id and "
                                         r".*0007_000002_01.jpg has none"):
        load_dataset("folder", tmp_path)


def test_person_loaders_still_need_camera_names(tmp_path, caplog):
    write_market(tmp_path, train=TRAIN + ["0007_000002_01.jpg"])
    with caplog.at_level(logging.WARNING, logger="reidlib.data"):
        check_tiny_market(load_dataset("market1501", tmp_path))
    assert "skipped 1 file name(s)" in caplog.text and "0007_000002_01.jpg" in caplog.text


def test_list_image_folder_reads_identities_without_cameras(tmp_path):
    touch(tmp_path, ["0002_c3s1_000451_03.jpg", "0002_x.jpg", "IMG_0042.jpg", "0005.jpg"])
    assert [(Path(p).name, pid, cam) for p, pid, cam in list_image_folder(tmp_path)] == [
        ("0002_c3s1_000451_03.jpg", 2, 2), ("0002_x.jpg", 2, -1), ("0005.jpg", -1, -1), ("IMG_0042.jpg", -1, -1)]


def test_folder_with_nothing_there(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder: neither train.csv nor bounding_box_train"):
        load_dataset("folder", tmp_path)


# --------------------------------------------------------------------------- bad input

def test_missing_folder_names_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("market1501", tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"market1501: no bounding_box_train under {tmp_path} (looked in {tmp_path}, "
                              f"{tmp_path / 'Market-1501-v15.09.15'}")
    assert "expected ROOT/[Market-1501-v15.09.15|" in message and "query,bounding_box_test}" in message


def test_missing_query_folder(tmp_path):
    touch(tmp_path / "bounding_box_train", TRAIN)
    with pytest.raises(FileNotFoundError, match="missing folder .*query"):
        load_dataset("dukemtmc", tmp_path)


def test_unparsable_names_are_skipped_listed_and_counted(tmp_path, caplog):
    bad = [f"img{i}.jpg" for i in range(7)]
    write_market(tmp_path, train=TRAIN + bad + ["notes.txt"])
    with caplog.at_level(logging.WARNING, logger="reidlib.data"):
        ds = load_dataset("market1501", tmp_path)
    assert len(ds.train) == 4
    assert "skipped 7 file name(s)" in caplog.text
    assert "img0.jpg, img1.jpg, img2.jpg, img3.jpg, img4.jpg" in caplog.text and "img5.jpg" not in caplog.text


def test_junk_is_dropped_and_counted(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="reidlib.data"):
        ds = load_dataset("market1501", write_market(tmp_path))
    assert all(pid != -1 for s in ds.splits().values() for _, pid, _ in s)
    assert "dropped 2 junk image(s) (pid -1)" in caplog.text


def test_empty_split_is_an_error_naming_the_folder(tmp_path):
    write_market(tmp_path, query=["-1_c1s1_000001_00.jpg"])
    with pytest.raises(ValueError, match=r"market1501: no usable images in .*query"):
        load_dataset("market1501", tmp_path)


# --------------------------------------------------------------------------- images

def test_read_image_converts_every_mode_to_rgb(tmp_path):
    Image.new("L", (8, 16), 77).save(tmp_path / "gray.jpg")
    Image.new("CMYK", (8, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("RGB", (8, 16), (10, 200, 30)).convert("P").save(tmp_path / "palette.png")
    Image.new("RGBA", (8, 16), (10, 20, 30, 128)).save(tmp_path / "alpha.png")
    Image.new("1", (8, 16), 1).save(tmp_path / "bits.png")
    for name in ["gray.jpg", "cmyk.jpg", "palette.png", "alpha.png", "bits.png"]:
        image = read_image(tmp_path / name)
        assert image.mode == "RGB" and image.size == (8, 16), name
    assert np.asarray(read_image(tmp_path / "gray.jpg"))[0, 0].tolist() == [77, 77, 77]
    red = np.asarray(read_image(tmp_path / "cmyk.jpg"))[0, 0]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_truncated_and_garbage_files_raise_once(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    good = write_jpeg(tmp_path / "good.jpg", size=(64, 128))
    data = good.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    for name in ["cut.jpg", "text.jpg", "absent.jpg"]:
        with pytest.raises(UnreadableImageError, match=name):
            read_image(tmp_path / name)
    assert isinstance(UnreadableImageError("x"), OSError)


def bad_set(tmp_path):
    """pid 5: a truncated image between two good ones; pid 6: one unreadable image only."""
    good_a = write_jpeg(tmp_path / "0005_c1_a.jpg", (255, 0, 0))
    data = write_jpeg(tmp_path / "0005_c2_b.jpg", (0, 255, 0), size=(64, 128)).read_bytes()
    (tmp_path / "0005_c2_b.jpg").write_bytes(data[: len(data) // 2])
    good_c = write_jpeg(tmp_path / "0005_c3_c.jpg", (0, 0, 255))
    (tmp_path / "0006_c1_a.jpg").write_text("garbage")
    return [(str(good_a), 5, 0), (str(tmp_path / "0005_c2_b.jpg"), 5, 1), (str(good_c), 5, 2),
            (str(tmp_path / "0006_c1_a.jpg"), 6, 0)]


def test_image_dataset_returns_tensor_pid_camid_index(tmp_path):
    items = [(str(write_jpeg(tmp_path / "a.jpg")), 3, 1)]
    image, pid, camid, index = ImageDataset(items, transform=lambda im: torch.tensor(im.size))[0]
    assert image.tolist() == [16, 32] and (pid, camid, index) == (3, 1, 0)


def test_image_dataset_substitutes_the_same_pid_and_counts(tmp_path, caplog):
    ds = ImageDataset(bad_set(tmp_path), transform=lambda im: np.asarray(im)[0, 0].tolist())
    with caplog.at_level(logging.WARNING, logger="reidlib.data"):
        image, pid, camid, index = ds[1]
    assert pid == 5 and index == 1 and camid == 2 and image[2] > 200  # the next image of pid 5
    assert ds.num_skipped == 1 and "0005_c2_b.jpg" in caplog.text
    ds[1]
    assert ds.num_skipped == 1  # known bad: not read again in this process
    with pytest.raises(UnreadableImageError, match="no other image of pid 6"):
        ds[3]
    assert ds.num_skipped == 2
    with pytest.raises(UnreadableImageError):
        ImageDataset(bad_set(tmp_path), substitute=False)[1]


def test_skip_count_is_shared_with_loader_workers(tmp_path):
    ds = ImageDataset(bad_set(tmp_path)[:3], transform=lambda im: torch.zeros(1))
    loader = DataLoader(ds, batch_size=1, num_workers=2, sampler=[1, 1, 0, 2])
    assert len(list(loader)) == 4
    assert ds.num_skipped >= 1


def test_image_dataset_pickles_and_copies(tmp_path):
    ds = ImageDataset(bad_set(tmp_path)[:3])
    ds[1]
    for clone in (pickle.loads(pickle.dumps(ds)), copy.deepcopy(ds)):
        assert clone.num_skipped == 1 and len(clone) == 3


def test_train_image_cache(tmp_path):
    items = bad_set(tmp_path)[:3]
    cache = TrainImageCache(items, [32, 16], "bicubic", num_threads=2)
    assert cache.images.shape == (3, 3, 32, 16) and cache.images.dtype == torch.uint8
    assert cache.num_skipped == 1 and cache.nbytes == 3 * 3 * 32 * 16
    assert torch.equal(cache.images[1], cache.images[0])  # replaced by pid 5's first readable image
    assert cache.pids.tolist() == [5, 5, 5] and cache.camids.tolist() == [0, 0, 2]
    expected = np.asarray(read_image(items[2][0]).resize((16, 32), Image.BICUBIC))
    assert torch.equal(cache.images[2], torch.from_numpy(expected.copy()).permute(2, 0, 1))
    assert cache.to("cpu") is cache
