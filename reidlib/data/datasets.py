"""Re-ID data sets: one small loader per data set, in a registry keyed by name.

Every loader returns a :class:`ReIDDataset` with three lists of ``(path, pid, camid)`` items:

* ``train``: pids relabelled ``0..C-1`` in sorted order of the original pids (the classifier's classes);
* ``query`` and ``gallery``: the original pids, so that they can be compared with each other; pid 0
  (Market's distractors) is kept as a gallery negative;
* pid -1 (Market's junk boxes) is dropped everywhere, and counted in a log line;
* camera ids are 0-based, one mapping for all three splits: ``number - 1`` for Market, Duke and
  MSMT17 (as the reference); ``0..K-1`` in sorted order of the camera numbers for IUST and your own
  data, whose numbering may have holes; files are sorted, so every run sees the same order;
* camid -1 means "no camera id" (VehicleID, your own data without cameras): a data set has camera
  ids for all its images or for none.

Vehicle data sets (VeRi-776, VehicleID) are in :mod:`reidlib.data.vehicles`. VeRi adds view labels
(``ds.views``); VehicleID draws its query and gallery from a test pool, one draw per trial
(``ds.trial(k)``).

The reference loaders (CLIP-ReID and its thesis fork) differ from this in places that matter: the
thesis's IUST and MSMT17 loaders keep 1-based cameras and pid -1 entries, and the Duke glob is unsorted.

Example::

    from reidlib.data import load_dataset
    ds = load_dataset("market1501", "data")     # also finds data/Market-1501-v15.09.15/...
    print(ds.stats_table())
    path, pid, camid = ds.train[0]
"""
from __future__ import annotations

import csv
import inspect
import logging
import numbers
import os
import random
import re
from pathlib import Path
from typing import Callable

log = logging.getLogger("reidlib.data")

Item = tuple[str, int, int]  # (image path, person id, camera id)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # what any image listing takes
MARKET_FOLDERS = ("bounding_box_train", "query", "bounding_box_test")
# 0002_c1s1_000451_03.jpg -> pid 2, camera 1 (Market); 0002_000451_03.jpg -> pid 2, no camera
IDENTITY_NAME = re.compile(r"^(-?\d+)_(?:c(\d+))?")
NO_CAMERA = -1  # the camid of an image whose camera is not known
SHOW_AT_MOST = 5  # how many offending names a warning lists


class ReIDDataset:
    """The three splits of a re-ID data set, as lists of ``(path, pid, camid)``.

    Attributes: ``name``, ``root`` (the folder the splits were found in), ``train``, ``query``,
    ``gallery``, ``num_train_pids`` (classes), ``num_train_cams`` (cameras over all splits,
    ``max camid + 1``, the size of the SIE camera table; 0 without camera ids), ``views`` (image path
    -> 0-based view id, empty without view labels), ``protocol`` (how query and gallery are formed,
    '' for a fixed split).

    Data sets whose query and gallery are drawn (VehicleID) pass every test image as ``test_pool``
    and the number of draws as ``num_trials``; ``trial(k)`` is draw ``k`` and ``query``/``gallery``
    are draw 0, so code that reads them sees a valid split.

    Example::

        ds = load_dataset("dukemtmc", "/data")
        ds.num_train_pids, ds.num_train_cams     # (702, 8)
        ds.stats()["query"]["images"]            # 2228
        ds = load_dataset("vehicleid", "/data", test_size=800, trials=10)
        for k in range(ds.num_trials):
            query, gallery = ds.trial(k)
    """

    def __init__(self, name: str, root: str | Path, train: list[Item], query: list[Item],
                 gallery: list[Item], *, views: dict[str, int] | None = None,
                 test_pool: list[Item] | None = None, num_trials: int = 1, protocol: str = ""):
        self.name = name
        self.root = str(root)
        self.train = train
        self.views = dict(views or {})
        self.test_pool = test_pool
        self.num_trials = num_trials
        self.protocol = protocol
        if not isinstance(num_trials, int) or num_trials < 1 or (test_pool is None and num_trials != 1):
            raise ValueError(f"{name}: num_trials={num_trials!r}; a fixed query/gallery split has 1 trial, "
                             f"a test_pool 1 or more")
        if test_pool is not None and (query or gallery):
            raise ValueError(f"{name}: query and gallery are drawn from test_pool; pass [] for both")
        self.query, self.gallery = self.trial(0) if test_pool is not None else (query, gallery)
        _check_cameras(name, [train, self.query, self.gallery, test_pool or []])

    @property
    def num_train_pids(self) -> int:
        return len({pid for _, pid, _ in self.train})

    @property
    def has_cameras(self) -> bool:
        """True when there are images and every one has a camera id (camid >= 0)."""
        cams = [cam for _, _, cam in self._all_items()]
        return bool(cams) and min(cams) >= 0

    @property
    def num_train_cams(self) -> int:
        if not self.has_cameras:
            return 0
        return max(cam for _, _, cam in self._all_items()) + 1

    @property
    def num_views(self) -> int:
        """``max view id + 1`` (the size of an SIE view table), 0 without view labels."""
        return max(self.views.values()) + 1 if self.views else 0

    def view_ids(self, items: list[Item]) -> list[int]:
        """The view id of each item, -1 where it has none.

        >>> ds = ReIDDataset("v", "/d", [("a.jpg", 0, 0), ("b.jpg", 1, 0)], [], [], views={"a.jpg": 3})
        >>> ds.view_ids(ds.train), ds.num_views
        ([3, -1], 4)
        """
        return [self.views.get(path, -1) for path, _, _ in items]

    def trial_indices(self, k: int) -> tuple[list[int], list[int]]:
        """(query, gallery) indices of trial ``k``, into ``test_pool`` (without one: into
        ``query + gallery``, trial 0 only), each list ascending.

        The draw: ``rng = random.Random(k)``; for each identity in ascending pid order, its images
        sorted by path, ``rng.randrange(len(images))`` picks its one gallery image and the rest are
        queries (an identity with one image gives no query: its image is a gallery distractor).
        Extract the pool's features once, then score every trial on these subsets.

        >>> pool = [("c.jpg", 5, -1), ("a.jpg", 5, -1), ("b.jpg", 9, -1)]
        >>> ds = ReIDDataset("p", "/d", [], [], [], test_pool=pool, num_trials=2)
        >>> ds.trial_indices(0), ds.trial_indices(1)   # pid 5's images by path: a.jpg (1), c.jpg (0)
        (([1], [0, 2]), ([0], [1, 2]))
        """
        if self.test_pool is None:
            if k != 0:
                raise ValueError(f"{self.name} has a fixed query/gallery split: only trial 0, not {k}")
            return list(range(len(self.query))), list(range(len(self.query), len(self.query) + len(self.gallery)))
        if not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"{self.name}: trial {k!r}; trials are numbered 0, 1, ... (trial k draws with seed k)")
        rng = random.Random(int(k))  # int: Random takes no numpy integers
        query, gallery = [], []
        for indices in _images_by_identity(self.test_pool):
            pick = rng.randrange(len(indices))
            gallery.append(indices[pick])
            query.extend(indices[:pick] + indices[pick + 1:])
        return sorted(query), sorted(gallery)

    def trial(self, k: int) -> tuple[list[Item], list[Item]]:
        """(query, gallery) of trial ``k``: drawn from ``test_pool`` as :meth:`trial_indices` says, or
        the fixed split for ``k = 0`` when there is no pool."""
        if self.test_pool is None:
            self.trial_indices(k)  # checks k
            return self.query, self.gallery
        q_idx, g_idx = self.trial_indices(k)
        return [self.test_pool[i] for i in q_idx], [self.test_pool[i] for i in g_idx]

    def _all_items(self) -> list[Item]:
        return self.train + self.query + self.gallery + (self.test_pool or [])

    def stats(self) -> dict:
        """``{split: {"ids": int, "images": int, "cameras": int}}`` for train, query, gallery, plus
        ``"views"`` (distinct view ids) when the data set has view labels; ``cameras`` counts only
        known cameras (0 without camera ids)."""
        out = {}
        for split, items in self.splits().items():
            out[split] = {"ids": len({pid for _, pid, _ in items}), "images": len(items),
                          "cameras": len({cam for _, _, cam in items if cam >= 0})}
            if self.views:
                out[split]["views"] = len({v for v in self.view_ids(items) if v >= 0})
        return out

    def splits(self) -> dict[str, list[Item]]:
        return {"train": self.train, "query": self.query, "gallery": self.gallery}

    def stats_table(self) -> str:
        """A small aligned text table: ids, images, cameras ("-" without camera ids) and, with view
        labels, views per split; then the protocol, if the query/gallery split is drawn."""
        stats = self.stats()
        header = ("split", "ids", "images", "cameras", *(("views",) if self.views else ()))
        rows = [(split, *(str(s[key]) if key != "cameras" or self.has_cameras else "-" for key in header[1:]))
                for split, s in stats.items()]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(cells):
            return "  " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                     for i, (c, w) in enumerate(zip(cells, widths)))
        rule = "  " + "-+-".join("-" * w for w in widths)
        protocol = [f"  protocol: {self.protocol}"] if self.protocol else []
        return "\n".join([f"{self.name} ({self.root})", line(header), rule, *map(line, rows), *protocol])

    def __repr__(self) -> str:
        return self.stats_table()


def _images_by_identity(items: list[Item]) -> list[list[int]]:
    """Indices of ``items`` grouped by pid, groups in ascending pid order, each sorted by path."""
    groups: dict[int, list[int]] = {}
    for index, (_, pid, _) in enumerate(items):
        groups.setdefault(pid, []).append(index)
    return [sorted(groups[pid], key=lambda i: (items[i][0], i)) for pid in sorted(groups)]


def _check_cameras(name: str, splits: list[list[Item]]) -> None:
    """All items have a camera id or none do: a mix would make SIE and the same-camera filter wrong."""
    items = [it for split in splits for it in split]
    with_camera = next((path for path, _, cam in items if cam >= 0), None)
    without = next((path for path, _, cam in items if cam < 0), None)
    if with_camera is not None and without is not None:
        raise ValueError(f"{name}: {with_camera} has a camera id and {without} has none; give every image "
                         f"a camera id (Market names PPPP_cC..., a camid column) or none")


# --------------------------------------------------------------------------- registry

_LOADERS: dict[str, Callable[..., ReIDDataset]] = {}


def register_dataset(name: str):
    """Decorator adding a loader ``fn(root, **kw) -> ReIDDataset`` to the registry under ``name``.

    Example::

        @register_dataset("my_set")
        def my_set(root, train_only=False):
            return load_dataset("folder", root, train_only=train_only)
    """
    def add(fn):
        _LOADERS[name] = fn
        return fn
    return add


def dataset_names() -> list[str]:
    """The registered data set names."""
    return sorted(_LOADERS)


def load_dataset(name: str, root: str | Path, **options) -> ReIDDataset:
    """Load a registered data set from ``root``; its usual nesting under ``root`` is found by itself.

    Names: ``market1501``, ``dukemtmc``, ``msmt17``, ``iust``, ``occ_duke``, ``veri``, ``vehicleid``,
    ``folder`` (your own data, see :func:`folder`), ``synth`` (the generated set). Options go to the
    loader, each only where the loader takes it, so that one call fits every data set: all take
    ``train_only=True`` (reads only the training split; ``query`` and ``gallery`` are then empty),
    VehicleID also ``test_size`` and ``trials``. An option no loader takes is an error (a typo).

    Example::

        ds = load_dataset("msmt17", "/data")     # /data/MSMT17_V1, /data/msmt17/MSMT17_V2, ...
        ds = load_dataset("market1501", "/data", test_size=800, trials=10)   # both ignored
    """
    if name not in _LOADERS:
        raise KeyError(f"unknown data set '{name}'; registered: {', '.join(dataset_names())}")
    loader, accepted = _LOADERS[name], _option_names(_LOADERS[name])
    if "**" not in accepted:
        unknown = sorted(set(options) - set().union(*(_option_names(fn) for fn in _LOADERS.values())))
        if unknown:
            raise TypeError(f"load_dataset: no data set takes the option(s) {', '.join(unknown)}; "
                            f"{name} takes {', '.join(sorted(accepted)) or 'none'}")
        options = {key: value for key, value in options.items() if key in accepted}
    return loader(Path(root).expanduser().absolute(), **options)


def _option_names(loader: Callable[..., ReIDDataset]) -> set[str]:
    """The keyword options a loader takes (after ``root``); ``"**"`` when it takes any."""
    params = list(inspect.signature(loader).parameters.values())[1:]
    return {"**" if p.kind is p.VAR_KEYWORD else p.name for p in params if p.kind is not p.VAR_POSITIONAL}


def dataset_from_config(cfg) -> ReIDDataset:
    """The data set a :class:`reidlib.config.Config` names: ``data.dataset`` under ``data.root``,
    with VehicleID's ``data.test_size`` and ``test.trials`` (other data sets ignore them).

    Example::

        cfg = load_config(None, ["data.dataset=vehicleid", "data.root=/data", "test.trials=3"])
        ds = dataset_from_config(cfg)            # ds.num_trials == 3
    """
    return load_dataset(cfg.data.dataset, cfg.data.root, test_size=cfg.data.test_size, trials=cfg.test.trials)


# --------------------------------------------------------------------------- shared helpers

def _find_dir(name: str, root: Path, candidates: list[str], marker: str, layout: str) -> Path:
    """The first of ``root/candidate`` holding ``marker``; else one clear FileNotFoundError line."""
    looked = [root / c if c else root for c in candidates]
    for folder in looked:
        if (folder / marker).exists():
            return folder
    raise FileNotFoundError(f"{name}: no {marker} under {root} (looked in "
                            f"{', '.join(str(p) for p in looked)}); expected {layout}")


def parse_market_name(name: str) -> tuple[int, int] | None:
    """(identity, 1-based camera) of a Market-style file name, or None when it is not one.

    >>> parse_market_name("0002_c1s1_000451_03.jpg"), parse_market_name("-1_c3s2_000012_01.jpg")
    ((2, 1), (-1, 3))
    >>> parse_market_name("IMG_0042.jpg") is None
    True
    """
    parsed = parse_identity_name(name)
    return parsed if parsed is not None and parsed[1] is not None else None


def parse_identity_name(name: str) -> tuple[int, int | None] | None:
    """(identity, 1-based camera or None) of a file name that starts with an integer identity and
    ``_``; the camera is the ``_c<digits>`` right after it, as in Market names. None for other names.

    >>> parse_identity_name("0002_c1s1_000451_03.jpg"), parse_identity_name("0002_000451_03.jpg")
    ((2, 1), (2, None))
    >>> parse_identity_name("0002_x.jpg"), parse_identity_name("-1_cat.jpg")
    ((2, None), (-1, None))
    >>> parse_identity_name("IMG_0042.jpg") is None, parse_identity_name("0002.jpg") is None
    (True, True)
    """
    match = IDENTITY_NAME.match(name)
    if not match:
        return None
    return int(match.group(1)), (int(match.group(2)) if match.group(2) is not None else None)


def _list_images(folder: Path) -> list[Path]:
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS)]
    return [folder / n for n in sorted(names)]


def list_image_folder(folder: str | Path) -> list[Item]:
    """Every image under ``folder``, recursively and sorted, as (path, pid, camid) items: pid and
    0-based camid from Market-style names (``0002_c1s1_...``); the pid and camid -1 from names that
    start with an identity but name no camera (``0002_x.jpg``); pid -1 and camid -1 for other names.

    For your own crops (``reidlib extract``, ``reidlib search``): nothing is dropped or relabelled.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}; pass images=DIR (a folder of "
                                f"{', '.join(IMAGE_EXTENSIONS)} files)")
    paths = sorted(p for p in folder.rglob("*") if p.name.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    items = []
    for path in paths:
        pid, cam = parse_identity_name(path.name) or (-1, None)
        items.append((str(path), pid, NO_CAMERA if cam is None else cam - 1))
    return items


def _warn_unparsable(name: str, where: Path | str, bad: list[str], expected: str) -> None:
    if bad:
        log.warning("%s: skipped %d file name(s) in %s that do not parse as %s, e.g. %s",
                    name, len(bad), where, expected, ", ".join(bad[:SHOW_AT_MOST]))


def _drop_junk(name: str, where: Path | str, items: list[Item]) -> list[Item]:
    """Drop pid -1 (Market's junk boxes: neither a match nor a distractor)."""
    kept = [it for it in items if it[1] != -1]
    if len(kept) < len(items):
        log.info("%s: dropped %d junk image(s) (pid -1) in %s", name, len(items) - len(kept), where)
    return kept


def _checked_list(name: str, where: Path | str, items: list[Item]) -> list[Item]:
    """A list file's or CSV's items with repeated lines dropped (counted in a log line); an image
    listed under two identities or cameras, or a pid below -1, is an error naming the file: either
    would train or score with a wrong label."""
    low = next((it for it in items if it[1] < -1), None)
    if low is not None:
        raise ValueError(f"{name}: {where} gives {low[0]} pid {low[1]}; identities are >= 0 (-1 marks junk)")
    labels: dict[str, tuple[int, int]] = {}
    kept = []
    for path, pid, camid in items:
        seen = labels.setdefault(path, (pid, camid))
        if seen != (pid, camid):
            raise ValueError(f"{name}: {where} lists {path} twice, as pid {seen[0]} camera {seen[1]} and as pid "
                             f"{pid} camera {camid}; keep one line per image")
        if len(labels) > len(kept):
            kept.append((path, pid, camid))
    if len(kept) < len(items):
        log.warning("%s: skipped %d repeated line(s) in %s (the same image and labels again)", name,
                    len(items) - len(kept), where)
    return kept


def _require_images(name: str, where: Path | str, items: list[Item]) -> list[Item]:
    if not items:
        raise ValueError(f"{name}: no usable images in {where}")
    return items


def _parse_market_folder(name: str, folder: Path, cameras_optional: bool = False,
                         expected: str = "PPPP_cC...") -> list[Item]:
    """Items of a folder of Market-named files; cameras as numbered in the names (1-based).

    ``cameras_optional`` (your own data) also takes ``PPPP_...`` names without a camera: camid -1.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{name}: missing folder {folder}")
    parse = parse_identity_name if cameras_optional else parse_market_name
    items, bad = [], []
    for path in _list_images(folder):
        parsed = parse(path.name)
        if parsed is None:
            bad.append(path.name)
            continue
        pid, cam = parsed
        items.append((str(path), pid, NO_CAMERA if cam is None else cam))
    _warn_unparsable(name, folder, bad, "PPPP_[cC]..." if cameras_optional else expected)
    return _require_images(name, folder, _drop_junk(name, folder, items))


def _relabel(items: list[Item]) -> list[Item]:
    """Train pids -> 0..C-1 in sorted order of the original pids."""
    label = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _ in items}))}
    return [(path, label[pid], cam) for path, pid, cam in items]


def _zero_based_cameras(name: str, splits: list[list[Item]], first: int, remap: bool) -> list[list[Item]]:
    """Camera numbers of all splits -> 0-based camids, one mapping for all splits.

    ``first`` is the number the data set gives its first camera (1 in Market-style names). With
    ``remap`` (data sets whose numbering is not fixed: IUST, your own), numbers are mapped to 0..K-1
    in sorted order, said in a log line unless they were ``first..first+K-1`` anyway. Without it
    (Market, Duke, MSMT17), camid = number - first, as the reference, so that a subset of cameras
    keeps the camids (and SIE rows) of the full data set. Camid -1 (no camera) stays -1.
    """
    numbers = sorted({cam for items in splits for _, _, cam in items if cam != NO_CAMERA})
    if not remap and (not numbers or numbers[0] >= first):
        index = {cam: cam - first for cam in numbers}
    else:
        index = {cam: i for i, cam in enumerate(numbers)}
        if numbers != list(range(first, first + len(numbers))):
            log.info("%s: camera numbers %s are not %d..%d; mapped to 0..%d in sorted order",
                     name, _short(numbers), first, first + len(numbers) - 1, len(numbers) - 1)
    index[NO_CAMERA] = NO_CAMERA
    return [[(path, pid, index[cam]) for path, pid, cam in items] for items in splits]


def _short(numbers: list[int]) -> str:
    return str(numbers) if len(numbers) <= 12 else f"[{numbers[0]}, ..., {numbers[-1]}]"


def _finish(name: str, root: Path, train: list[Item], query: list[Item], gallery: list[Item],
            first_camera: int = 1, remap_cameras: bool = False, **extra) -> ReIDDataset:
    """Cameras 0-based, train pids relabelled, every split sorted; ``extra`` goes to ReIDDataset."""
    train, query, gallery = _zero_based_cameras(name, [train, query, gallery], first_camera, remap_cameras)
    train, query, gallery = (sorted(s) for s in (_relabel(train), query, gallery))
    return ReIDDataset(name, root, train, query, gallery, **extra)


def _load_market_style(name: str, root: Path, candidates: list[str], train_only: bool,
                       remap_cameras: bool = False, cameras_optional: bool = False) -> ReIDDataset:
    """Three folders of Market-named images, in the first candidate folder that has them."""
    nest = "|".join(c for c in candidates if c)
    layout = f"ROOT/{f'[{nest}/]' if nest else ''}{{{','.join(MARKET_FOLDERS)}}}/*.jpg named PPPP_cC*.jpg"
    base = _find_dir(name, root, candidates, MARKET_FOLDERS[0], layout)
    train = _parse_market_folder(name, base / MARKET_FOLDERS[0], cameras_optional)
    query = [] if train_only else _parse_market_folder(name, base / MARKET_FOLDERS[1], cameras_optional)
    gallery = [] if train_only else _parse_market_folder(name, base / MARKET_FOLDERS[2], cameras_optional)
    _log_if_camera_less(name, base, train + query + gallery)
    return _finish(name, base, train, query, gallery, remap_cameras=remap_cameras)


def _log_if_camera_less(name: str, where: Path, items: list[Item]) -> None:
    if items and all(cam == NO_CAMERA for _, _, cam in items):
        log.info("%s: no camera ids in %s: every image gets camid -1", name, where)


# --------------------------------------------------------------------------- the data sets

@register_dataset("market1501")
def market1501(root: Path, train_only: bool = False) -> ReIDDataset:
    """Market-1501 (Zheng et al., ICCV 2015): 751 train ids, 3,368 query, 15,913 gallery, 6 cameras.

    ``ROOT/``, ``ROOT/Market-1501-v15.09.15/`` or torchreid's ``ROOT/market1501/Market-1501-v15.09.15/``,
    each holding ``bounding_box_train``, ``query``, ``bounding_box_test``.
    """
    return _load_market_style("market1501", root, [
        "", "Market-1501-v15.09.15", "market1501/Market-1501-v15.09.15", "market1501",
        "Market-1501"], train_only)


@register_dataset("synth")
def synth(root: Path, train_only: bool = False) -> ReIDDataset:
    """The generated data set (:mod:`reidlib.demo.synth`): Market-1501's folders and names, read
    under its own name, so that tables and run folders say what the data are.

    ``ROOT/`` or ``ROOT/synth/``, holding ``bounding_box_train``, ``query``, ``bounding_box_test``.
    """
    return _load_market_style("synth", root, ["", "synth"], train_only)


@register_dataset("dukemtmc")
def dukemtmc(root: Path, train_only: bool = False) -> ReIDDataset:
    """DukeMTMC-reID (Zheng et al., ICCV 2017): 702 train ids, 2,228 query, 17,661 gallery, 8 cameras.

    ``ROOT/``, ``ROOT/DukeMTMC-reID/``, ``ROOT/dukemtmcreid/DukeMTMC-reID/`` (CLIP-ReID) or
    ``ROOT/dukemtmc-reid/DukeMTMC-reID/`` (torchreid).
    """
    return _load_market_style("dukemtmc", root, [
        "", "DukeMTMC-reID", "dukemtmcreid/DukeMTMC-reID", "dukemtmc-reid/DukeMTMC-reID",
        "dukemtmc/DukeMTMC-reID"], train_only)


@register_dataset("occ_duke")
def occ_duke(root: Path, train_only: bool = False) -> ReIDDataset:
    """Occluded-Duke (Miao et al., ICCV 2019): Market-style folders inside ``Occluded_Duke/``.

    ``ROOT/``, ``ROOT/Occluded_Duke/`` or ``ROOT/dukemtmcreid/Occluded_Duke/`` (CLIP-ReID).
    """
    return _load_market_style("occ_duke", root, [
        "", "Occluded_Duke", "dukemtmcreid/Occluded_Duke", "occ_duke/Occluded_Duke"], train_only)


@register_dataset("iust")
def iust(root: Path, train_only: bool = False) -> ReIDDataset:
    """IUST_PersonReId (arXiv 2412.18874), converted to Market-style folders and names.

    ``ROOT/`` or ``ROOT/IUST_PersonReId/``. Camera numbers that are not 1..K are mapped to 0..K-1 in
    sorted order (logged), so that SIE's camera table has no holes.
    """
    return _load_market_style("iust", root, ["", "IUST_PersonReId", "iust"], train_only, remap_cameras=True)


# MSMT17 (Wei et al., CVPR 2018) ships list files instead of parseable folder names.
MSMT_LISTS = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")
MSMT_NESTS = ["", "MSMT17", "MSMT17_V1", "MSMT17_V2", "msmt17/MSMT17_V1", "msmt17/MSMT17_V2",
              "msmt17/MSMT17", "msmt17"]
MSMT_LAYOUT = ("ROOT/[MSMT17|MSMT17_V1|MSMT17_V2|msmt17/MSMT17_V1|msmt17/MSMT17_V2/]"
               "{train,test (V2: mask_train_v2,mask_test_v2),list_train.txt,list_val.txt,"
               "list_query.txt,list_gallery.txt}, or Market-style folders")


@register_dataset("msmt17")
def msmt17(root: Path, train_only: bool = False) -> ReIDDataset:
    """MSMT17: 1,041 train ids (train + val lists), 11,659 query, 82,161 gallery, 15 cameras.

    ``ROOT/`` or ``ROOT/{MSMT17,MSMT17_V1,MSMT17_V2}/`` or torchreid's ``ROOT/msmt17/MSMT17_V*``,
    holding ``train/`` and ``test/`` (V2: ``mask_train_v2/``, ``mask_test_v2/``) and the list files
    (lines ``rel/path pid``; train = ``list_train.txt`` + ``list_val.txt``). The camera is the third
    underscore field of the file name (``0000_000_01_0303morning_0015_0.jpg`` -> camera 1 -> camid 0).
    A copy converted to Market-style folders and names (as the thesis used) is read as such.
    """
    looked = [root / c if c else root for c in MSMT_NESTS]
    base = next((p for p in looked if (p / MSMT_LISTS[0]).is_file()), None)
    if base is None:
        if any((p / MARKET_FOLDERS[0]).is_dir() for p in looked):
            return _load_market_style("msmt17", root, MSMT_NESTS, train_only)
        raise FileNotFoundError(f"msmt17: no {MSMT_LISTS[0]} under {root} (looked in "
                                f"{', '.join(str(p) for p in looked)}); expected {MSMT_LAYOUT}")
    train_dir = _first_dir("msmt17", base, ["train", "mask_train_v2"])
    train = _read_msmt_list(base, train_dir, "list_train.txt")
    train += _read_msmt_list(base, train_dir, "list_val.txt", optional=True)
    query = gallery = []
    if not train_only:
        test_dir = _first_dir("msmt17", base, ["test", "mask_test_v2"])
        query = _read_msmt_list(base, test_dir, "list_query.txt")
        gallery = _read_msmt_list(base, test_dir, "list_gallery.txt")
    return _finish("msmt17", base, train, query, gallery)


def _first_dir(name: str, base: Path, options: list[str]) -> Path:
    for option in options:
        if (base / option).is_dir():
            return base / option
    raise FileNotFoundError(f"{name}: none of {', '.join(options)} under {base}")


def _read_msmt_list(base: Path, image_dir: Path, list_name: str, optional: bool = False) -> list[Item]:
    """Lines ``rel/path pid``; paths relative to the image folder (or to ``base``)."""
    list_path = base / list_name
    if not list_path.is_file():
        if optional:
            return []
        raise FileNotFoundError(f"msmt17: missing {list_path} (lines 'rel/path pid')")
    items, bad = [], []
    for line in list_path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rel, pid = line.split()
            items.append((rel, int(pid), int(Path(rel).name.split("_")[2])))
        except (ValueError, IndexError):
            bad.append(line.strip())
    _warn_unparsable("msmt17", list_path, bad, "'rel/path pid' with a file name PID_IDX_CAM_...")
    items = _checked_list("msmt17", list_path, _drop_junk("msmt17", list_path, items))
    items = _require_images("msmt17", list_path, items)
    prefix = _list_prefix(list_path, items[0][0], [image_dir, base])
    return [(str(prefix / rel), pid, cam) for rel, pid, cam in items]


def _list_prefix(list_path: Path, first: str, options: list[Path]) -> Path:
    """The folder the list's paths are relative to, judged from its first entry."""
    for option in options:
        if (option / first).is_file():
            return option
    raise FileNotFoundError(f"msmt17: {list_path.name} names {first}, found in none of "
                            f"{', '.join(str(p) for p in options)}")


# --------------------------------------------------------------------------- your own data

FOLDER_CSVS = ("train.csv", "query.csv", "gallery.csv")
FOLDER_LAYOUT = ("ROOT/{train,query,gallery}.csv (header path,pid[,camid]; paths relative to ROOT) or "
                 "ROOT/{bounding_box_train,query,bounding_box_test}/ with Market names PPPP_cC*.jpg or PPPP_*.jpg")


@register_dataset("folder")
def folder(root: Path, train_only: bool = False) -> ReIDDataset:
    """Your own data, in one of two forms (the CSV form wins when ``ROOT/train.csv`` exists):

    1. **CSV files** ``ROOT/train.csv``, ``ROOT/query.csv``, ``ROOT/gallery.csv``, each with a header
       row and the columns ``path,pid,camid`` (extra columns are ignored). ``path`` is relative to
       ``ROOT`` (or absolute); ``pid`` and ``camid`` are integers. Cameras may be numbered from 0 or 1
       or any way: they are mapped to 0..K-1 in sorted order. Rows with pid -1 are dropped as junk.
       Query and gallery pids must use the same numbering; train pids are relabelled to 0..C-1.
       Without cameras, leave out the ``camid`` column (in every file): every image gets camid -1.
    2. **Market-style folders** ``ROOT/{bounding_box_train,query,bounding_box_test}/`` with file
       names ``PPPP_cC*.jpg`` (pid, then ``_c`` and the 1-based camera number), or, without
       cameras, ``PPPP_*.jpg`` (pid, then ``_`` and anything but ``c<digits>``): camid -1.

    A data set has camera ids for all its images or for none; a mix is an error naming one of each.

    Example ``train.csv``::

        path,pid,camid
        images/alice_cam1_001.jpg,17,1
        images/alice_cam2_001.jpg,17,2
    """
    if (root / FOLDER_CSVS[0]).is_file():
        names = FOLDER_CSVS[:1] if train_only else FOLDER_CSVS
        train, *test = [_read_csv(root, root / n) for n in names]
        query, gallery = test if test else ([], [])
        _log_if_camera_less("folder", root, train + query + gallery)
        return _finish("folder", root, train, query, gallery, first_camera=0, remap_cameras=True)
    if (root / MARKET_FOLDERS[0]).is_dir():
        return _load_market_style("folder", root, [""], train_only, remap_cameras=True, cameras_optional=True)
    raise FileNotFoundError(f"folder: neither {FOLDER_CSVS[0]} nor {MARKET_FOLDERS[0]} under {root}; "
                            f"expected {FOLDER_LAYOUT}")


def _read_csv(root: Path, csv_path: Path) -> list[Item]:
    """Rows ``path,pid[,camid]``; without a camid column every camid is -1."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"folder: missing {csv_path} (columns path,pid[,camid])")
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:   # -sig: Excel's BOM is no part of "path"
        reader = csv.DictReader(fh)
        missing = {"path", "pid"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"folder: {csv_path} lacks column(s) {', '.join(sorted(missing))}; "
                             f"expected a header row path,pid,camid (or path,pid without cameras)")
        has_camid = "camid" in (reader.fieldnames or [])
        items = [_csv_item(root, csv_path, line, row, has_camid) for line, row in enumerate(reader, start=2)]
    items = _require_images("folder", csv_path, _checked_list("folder", csv_path, _drop_junk("folder", csv_path,
                                                                                               items)))
    if not Path(items[0][0]).is_file():
        raise FileNotFoundError(f"folder: {csv_path} names {items[0][0]}, which does not exist "
                                f"(paths are relative to {root})")
    return items


def _csv_item(root: Path, csv_path: Path, line: int, row: dict, has_camid: bool) -> Item:
    camid = (row.get("camid") or "").strip() if has_camid else str(NO_CAMERA)
    if has_camid and not camid:
        raise ValueError(f"folder: {csv_path} line {line}: empty camid; fill in every row's camid, "
                         f"or drop the camid column from every CSV file if there are no cameras")
    try:
        item = (str(root / row["path"].strip()), int(row["pid"]), int(camid))
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"folder: {csv_path} line {line}: expected path,pid,camid with "
                         f"integer pid and camid, got {row}") from None
    if has_camid and item[2] < 0:
        raise ValueError(f"folder: {csv_path} line {line}: camid {item[2]} < 0; camera ids are >= 0 "
                         f"(drop the camid column if there are no cameras)")
    return item
