"""Vehicle re-ID data sets: VeRi-776 and VehicleID, registered as ``veri`` and ``vehicleid``.

Both return a :class:`~reidlib.data.datasets.ReIDDataset` like the person loaders, with what
vehicles add:

* VeRi-776 has 20 cameras and, from a separate annotation file, a view label (one of 8 orientations)
  per image: ``ds.views`` maps each image path to its 0-based view id, for SIE over views;
* VehicleID has no camera ids (camid -1 everywhere) and no fixed query/gallery split: each trial
  draws one gallery image per test identity from ``ds.test_pool`` (``ds.trial(k)``), and the
  metrics are averaged over ``ds.num_trials`` trials.

Example::

    from reidlib.data import load_dataset
    ds = load_dataset("veri", "data")                    # data/VeRi/image_train, ...
    ds.num_train_cams, ds.num_views                      # (20, 8) with the keypoint files
    ds = load_dataset("vehicleid", "data", test_size=800, trials=10)
    query, gallery = ds.trial(3)
"""
from __future__ import annotations

import logging
from pathlib import Path

from .datasets import (
    SHOW_AT_MOST,
    Item,
    ReIDDataset,
    _checked_list,
    _drop_junk,
    _find_dir,
    _finish,
    _parse_market_folder,
    _relabel,
    _require_images,
    register_dataset,
)

log = logging.getLogger("reidlib.data")

# --------------------------------------------------------------------------- VeRi-776

VERI_FOLDERS = ("image_train", "image_query", "image_test")
VERI_NESTS = ["", "VeRi", "VeRi-776", "veri"]
VERI_NAME = "VVVV_cCCC_FFFFFFFF_0.jpg"
VERI_LAYOUT = f"ROOT/[VeRi|VeRi-776|veri/]{{{','.join(VERI_FOLDERS)}}}/*.jpg named {VERI_NAME}"
VERI_KEYPOINT_FILES = ("keypoint_train.txt", "keypoint_test.txt")
KEYPOINT_FIELDS = 42  # the image path, 20 keypoints as x y, the orientation
VERI_VIEWS = 8        # orientations 0..7


@register_dataset("veri")
def veri(root: Path, train_only: bool = False) -> ReIDDataset:
    """VeRi-776 (Liu et al., "Large-scale vehicle re-identification in urban surveillance videos",
    ICME 2016): 576 train ids with 37,778 images; 200 test ids with 1,678 query and 11,579 gallery
    images; 20 cameras.

    ``ROOT/``, ``ROOT/VeRi/``, ``ROOT/VeRi-776/`` or ``ROOT/veri/``, holding ``image_train``,
    ``image_query`` and ``image_test`` with names ``VVVV_cCCC_FFFFFFFF_0.jpg`` (vehicle id, camera
    1..20, frame). camid = camera - 1, as the reference; pid -1 is dropped as junk; train pids are
    relabelled 0..C-1 in sorted order.

    View labels: VeRi ships none. The reference (CLIP-ReID, from TransReID) reads the keypoint and
    orientation annotations of Wang et al., "Orientation Invariant Feature Embedding and Spatial
    Temporal Regularization for Vehicle Re-identification" (ICCV 2017), which TransReID and
    CLIP-ReID ship as ``datasets/keypoint_train.txt`` and ``datasets/keypoint_test.txt``: lines
    ``<path> x1 y1 ... x20 y20 <orientation>`` (42 fields; the orientation, 0..7, is the view id),
    matched to images by file name. Put the two files in the VeRi folder (or ``ROOT``). Images
    without a label stay in the data set with view -1 (the reference drops them); without the files
    ``ds.views`` is empty.

    Example::

        ds = load_dataset("veri", "/data")       # /data/VeRi/image_train, /data/VeRi/keypoint_train.txt
        ds.view_ids(ds.query)[:3]                # e.g. [2, 2, 5]
    """
    base = _find_dir("veri", root, VERI_NESTS, VERI_FOLDERS[0], VERI_LAYOUT)
    folders = VERI_FOLDERS[:1] if train_only else VERI_FOLDERS
    _require_folders("veri", base, folders, VERI_LAYOUT)
    train, *test = [_parse_market_folder("veri", base / f, expected=VERI_NAME) for f in folders]
    query, gallery = test if test else ([], [])
    views = _veri_views(base, root, train + query + gallery)
    return _finish("veri", base, train, query, gallery, views=views)


def _require_folders(name: str, base: Path, folders: tuple[str, ...], layout: str) -> None:
    for folder in folders:
        if not (base / folder).is_dir():
            raise FileNotFoundError(f"{name}: missing folder {base / folder}; expected {layout}")


def _veri_views(base: Path, root: Path, items: list[Item]) -> dict[str, int]:
    """Image path -> view id, from the keypoint files found in ``base`` or else ``root``."""
    found = {f: next((d / f for d in (base, root) if (d / f).is_file()), None) for f in VERI_KEYPOINT_FILES}
    missing = [f for f, path in found.items() if path is None]
    if len(missing) == len(found):
        log.info("veri: no view labels (no %s in %s or %s; TransReID and CLIP-ReID ship them as "
                 "datasets/keypoint_{train,test}.txt)", " or ".join(VERI_KEYPOINT_FILES), base, root)
        return {}
    by_name: dict[str, int] = {}
    for path in reversed([p for p in found.values() if p is not None]):
        by_name.update(read_keypoint_views(path))  # train labels read last: they win, as the reference
    views = {path: by_name[Path(path).name] for path, _, _ in items if Path(path).name in by_name}
    log.info("veri: view labels for %d of %d images (%d without)%s", len(views), len(items),
             len(items) - len(views), f"; {', '.join(missing)} not found" if missing else "")
    return views


def read_keypoint_views(path: str | Path) -> dict[str, int]:
    """{image file name: view id} from a VeRi keypoint file; malformed lines are skipped and counted.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "keypoint_test.txt"
    >>> _ = path.write_text("VeRi/image_test/0030_c008_00049745_0.jpg " + "-1 " * 40 + "5\\nbad line\\n")
    >>> read_keypoint_views(path)
    {'0030_c008_00049745_0.jpg': 5}
    """
    path = Path(path)
    views, bad = {}, []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        view = _view_field(fields)
        if view is None:
            bad.append((number, line.strip()))
            continue
        views[fields[0].replace("\\", "/").rsplit("/", 1)[-1]] = view
    _warn_bad_lines("veri", path, bad, f"<path> x1 y1 ... x20 y20 <view 0..{VERI_VIEWS - 1}>")
    return views


def _view_field(fields: list[str]) -> int | None:
    view = _integer(fields[-1]) if len(fields) == KEYPOINT_FIELDS else None
    return view if view is not None and 0 <= view < VERI_VIEWS else None


def _integer(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _warn_bad_lines(name: str, path: Path, bad: list[tuple[int, str]], expected: str) -> None:
    if bad:
        shown = "; ".join(f"line {n}: {text[:60]!r}" for n, text in bad[:SHOW_AT_MOST])
        log.warning("%s: skipped %d malformed line(s) in %s (expected %s), e.g. %s",
                    name, len(bad), path, expected, shown)


# --------------------------------------------------------------------------- VehicleID

VEHICLEID_NESTS = ["", "VehicleID_V1.0", "VehicleID"]
VEHICLEID_TEST_SIZES = (800, 1600, 2400)
SPLIT_FOLDER = "train_test_split"
VEHICLEID_LAYOUT = (f"ROOT/[VehicleID_V1.0|VehicleID/]{{image/*.jpg,{SPLIT_FOLDER}/{{train_list.txt,"
                    f"{','.join(f'test_list_{n}.txt' for n in VEHICLEID_TEST_SIZES)}}}}}")


@register_dataset("vehicleid")
def vehicleid(root: Path, train_only: bool = False, test_size: int = 800, trials: int = 10) -> ReIDDataset:
    """VehicleID (Liu et al., "Deep Relative Distance Learning: Tell the Difference Between Similar
    Vehicles", CVPR 2016): 13,164 train ids with 113,346 images; test lists of 800, 1,600 and 2,400
    ids with 6,532, 11,395 and 17,638 images. No camera ids: camid is -1 everywhere.

    ``ROOT/``, ``ROOT/VehicleID_V1.0/`` or ``ROOT/VehicleID/``, holding ``image/*.jpg`` and
    ``train_test_split/{train_list.txt,test_list_800.txt,test_list_1600.txt,test_list_2400.txt}``
    with lines ``<image name without .jpg> <vehicle id>``. Train: every image of ``train_list.txt``,
    pids relabelled 0..C-1 in sorted order of the vehicle ids. Test: ``ds.test_pool`` holds every
    image of ``test_list_{test_size}.txt`` (vehicle ids as given).

    Query and gallery are drawn, as in the protocol of Liu et al. 2016 that TransReID and CLIP-ReID
    use: one randomly chosen image per test identity forms the gallery, its other images are
    queries, and the metrics are averaged over repetitions (10 by default). The exact draw of trial
    ``k`` (see :meth:`ReIDDataset.trial_indices`): ``random.Random(k)``; identities in ascending id
    order, each one's images sorted by path; ``rng.randrange(len(images))`` picks its gallery image.
    The reference draws once, unseeded, and its own VehicleID test branch crashes, so its numbers
    cannot be redrawn; seeding trial k with k makes every trial reproducible. The reference also
    labels all queries camera 0 and all gallery images camera 1 so that its same-camera filter keeps
    every match; here the images have no camera (-1) instead.

    Example::

        ds = load_dataset("vehicleid", "/data", test_size=1600, trials=10)
        len(ds.test_pool), ds.num_trials         # (11395, 10)
    """
    if test_size not in VEHICLEID_TEST_SIZES:
        raise ValueError(f"vehicleid: test_size {test_size!r} is not one of "
                         f"{', '.join(map(str, VEHICLEID_TEST_SIZES))} (data.test_size picks test_list_N.txt)")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"vehicleid: trials {trials!r}; give 1 or more draws (test.trials)")
    base = _find_dir("vehicleid", root, VEHICLEID_NESTS, SPLIT_FOLDER, VEHICLEID_LAYOUT)
    image_dir = base / "image"
    _require_folders("vehicleid", base, ("image",), VEHICLEID_LAYOUT)
    train = sorted(_relabel(read_vehicle_list(base / SPLIT_FOLDER / "train_list.txt", image_dir)))
    if train_only:
        return ReIDDataset("vehicleid", base, train, [], [])
    list_path = base / SPLIT_FOLDER / f"test_list_{test_size}.txt"
    pool = sorted(read_vehicle_list(list_path, image_dir))
    _log_test_pool(list_path, pool, test_size)
    return ReIDDataset("vehicleid", base, train, [], [], test_pool=pool, num_trials=trials,
                       protocol=vehicleid_protocol(test_size, trials))


def vehicleid_protocol(test_size: int, trials: int) -> str:
    """The sentence that says how VehicleID's query and gallery are formed.

    >>> vehicleid_protocol(800, 10)
    'VehicleID test_list_800: one random image per identity forms the gallery, the other images are \
queries; 10 trials (seeds 0..9), metrics averaged'
    """
    draws = "1 trial (seed 0)" if trials == 1 else f"{trials} trials (seeds 0..{trials - 1})"
    return (f"VehicleID test_list_{test_size}: one random image per identity forms the gallery, "
            f"the other images are queries; {draws}, metrics averaged")


def read_vehicle_list(list_path: Path, image_dir: Path) -> list[Item]:
    """Items of a VehicleID list file (lines ``<image name without .jpg> <vehicle id>``), camid -1.

    Malformed lines are skipped and counted, repeated lines dropped with a log line; an image under
    two vehicle ids, or an id below -1, is an error; the first entry's image must exist in ``image_dir``.
    """
    if not list_path.is_file():
        raise FileNotFoundError(f"vehicleid: missing {list_path}; expected {VEHICLEID_LAYOUT}")
    items, bad = [], []
    for number, line in enumerate(list_path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        pid = _integer(fields[1]) if len(fields) == 2 else None
        if pid is None:
            bad.append((number, line.strip()))
            continue
        items.append((str(image_dir / f"{fields[0]}.jpg"), pid, -1))
    _warn_bad_lines("vehicleid", list_path, bad, "<image name without .jpg> <vehicle id>")
    items = _checked_list("vehicleid", list_path, _drop_junk("vehicleid", list_path, items))
    items = _require_images("vehicleid", list_path, items)
    if not Path(items[0][0]).is_file():
        raise FileNotFoundError(f"vehicleid: {list_path} names {Path(items[0][0]).name}, which is not in "
                                f"{image_dir} (names are image files without .jpg)")
    return items


def _log_test_pool(list_path: Path, pool: list[Item], test_size: int) -> None:
    counts: dict[int, int] = {}
    for _, pid, _ in pool:
        counts[pid] = counts.get(pid, 0) + 1
    if len(counts) != test_size:
        log.info("vehicleid: %s lists %d identities (the official list has %d)", list_path.name,
                 len(counts), test_size)
    single = sum(n == 1 for n in counts.values())
    if single:
        log.info("vehicleid: %d identities in %s have one image: gallery distractors, never a query",
                 single, list_path.name)
