"""A generated person re-ID data set in Market-1501's format, for tests, the CPU demo and benchmarks.

Each identity is a rough human silhouette whose parts (hair or hat, upper-body colour and pattern,
sleeves, trousers/shorts/skirt, shoes, bag) come from small palettes, so that several identities
share some parts and only the combination identifies a person. Each camera has its own background,
colour cast, brightness, blur, noise, person scale and JPEG quality; each image its own view (front,
back, side), walking pose, position, scale and sometimes an occluder. A model must therefore learn
which cues survive a change of camera, which a randomly initialised one does poorly.

Layout and names as Market-1501: ``OUT/{bounding_box_train,query,bounding_box_test}/`` with
``PPPP_cCsS_FFFFFF_II.jpg`` JPEGs of 128x64 (height x width). Train and test identities are
disjoint (half each by default); the query holds one image per test identity for some of the cameras
it was seen in, the gallery the rest, plus distractors (pid 0) and a few junk boxes (pid -1). The
bytes depend only on the arguments: each image is drawn from its own seed.

Beside the images, ``OUT/captions.csv`` (``path,caption``) describes the person in every image from
the attributes it was drawn with (:mod:`reidlib.demo.captions`). :func:`generate_web` writes an
image-caption set of other people, one or two images each from cameras of their own, to pretrain a
miniature CLIP on (:mod:`reidlib.demo.pretrain`).

The same people can be written in the vehicle sets' formats (only the format matters for a
loader's tests): :func:`generate_veri` (VeRi-776: ``image_*`` folders and keypoint files whose
last field is each image's view, :func:`view_id`) and :func:`generate_vehicleid` (VehicleID:
``image/`` and ``train_test_split/`` lists, no cameras).

Command line (prints the stats table and the time taken)::

    python -m reidlib.demo.synth data/synth                          # demo: 60 ids, 4 cameras
    python -m reidlib.demo.synth data/synth --ids 100 --cams 6 --seed 1
    python -m reidlib.demo.synth data/market_size --market-size      # 751 ids, 12,936 train images only
    python -m reidlib.demo.synth data/veri_synth --format veri --ids 40
    python -m reidlib.demo.synth data/vehicleid_synth --format vehicleid --ids 50

Example::

    from reidlib.demo.synth import generate_market
    root = generate_market("data/synth", ids=60, cams=4, seed=0)
    ds = load_dataset("market1501", root)
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import functools
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ..data.vehicles import VEHICLEID_TEST_SIZES, VERI_KEYPOINT_FILES
from ..data.vehicles import VERI_FOLDERS as VERI_IMAGE_FOLDERS
from .captions import CLOTHES_NAMES, HAIR_NAMES, LOWER_NAMES, SHOES_NAMES, describe

HEIGHT, WIDTH = 128, 64
SPLIT_FOLDERS = ("bounding_box_train", "query", "bounding_box_test")

# Small palettes (RGB): identities drawn from them share parts, as real pedestrians share clothes.
SKIN = [(241, 194, 160), (224, 172, 130), (198, 134, 96), (141, 85, 54)]
HAIR = [(25, 20, 18), (70, 45, 30), (125, 85, 45), (205, 175, 115), (150, 150, 150)]
CLOTHES = [(200, 30, 35), (30, 60, 170), (235, 235, 230), (25, 25, 28), (128, 128, 128), (40, 130, 60),
           (230, 200, 40), (25, 35, 80), (230, 130, 170), (120, 60, 140), (210, 110, 40), (120, 90, 60)]
LOWER = [(25, 25, 28), (50, 70, 120), (110, 110, 115), (200, 180, 140), (235, 235, 230), (90, 60, 40),
         (30, 40, 70)]
SHOES = [(20, 20, 20), (235, 235, 235), (110, 70, 40), (150, 30, 30)]
# Every palette entry has its name in the captions.
assert [len(p) for p in (HAIR, CLOTHES, LOWER, SHOES)] == [
    len(n) for n in (HAIR_NAMES, CLOTHES_NAMES, LOWER_NAMES, SHOES_NAMES)], "a palette entry has no name"

CAPTIONS_CSV = "captions.csv"
WEB_FOLDER = "images"
# Identity and camera keys of the "web" set start here: far above a re-ID set's (pids, distractors
# at 1,000,000 + j, junk at 2,000,000 + j), so the web set shares no person and no camera with one.
WEB_OFFSET = 10_000_000

# Body layout in units of the person's height, from the top of the head (v = 0) to the soles (v = 1).
HEAD_V, HEAD_RADII = 0.085, (0.052, 0.068)
SHOULDER_V, HIP_V, ANKLE_V = 0.19, 0.52, 0.93

_Y, _X = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)


# --------------------------------------------------------------------------- identities and cameras

@functools.lru_cache(maxsize=4096)
def make_identity(seed: int, key: int) -> dict:
    """The appearance of one person: part colours (palette entry + a small personal shift) and styles."""
    rng = np.random.default_rng([seed, 1, key])
    picked = {}  # part -> palette index, for the captions (the drawn colour has a personal shift)

    def colour(part, palette, index=None):
        index = int(rng.integers(len(palette))) if index is None else index
        picked[part] = index
        return np.clip(np.asarray(palette[index], np.float32) + rng.normal(0, 10, 3), 0, 255).astype(np.float32)

    upper_index = int(rng.integers(len(CLOTHES)))
    second_index = (upper_index + int(rng.integers(1, len(CLOTHES)))) % len(CLOTHES)
    return {  # the draws' order fixes every image's bytes: add new draws at the end only
        "skin": colour("skin", SKIN), "hair": colour("hair", HAIR), "hat": colour("hat", CLOTHES),
        "hair_style": int(rng.choice(3, p=[0.55, 0.3, 0.15])),          # short, long, hat
        "upper": colour("upper", CLOTHES, upper_index), "upper2": colour("upper2", CLOTHES, second_index),
        "pattern": int(rng.choice(5, p=[0.4, 0.15, 0.1, 0.2, 0.15])),   # plain, stripes, checks, open jacket, band
        "short_sleeves": bool(rng.random() < 0.35),
        "lower": colour("lower", LOWER),
        "lower_style": int(rng.choice(3, p=[0.65, 0.2, 0.15])),         # trousers, shorts, skirt
        "shoes": colour("shoes", SHOES),
        "bag": int(rng.choice(3, p=[0.5, 0.25, 0.25])),                  # none, backpack, shoulder bag
        "bag_colour": colour("bag_colour", CLOTHES), "bag_side": int(rng.choice([-1, 1])),
        "width": float(rng.uniform(0.85, 1.15)), "height": float(rng.uniform(0.93, 1.05)),
        "colour_index": picked,
    }


@functools.lru_cache(maxsize=64)
def make_camera(seed: int, cam: int) -> dict:
    """What a camera does to every image: background, colour cast, light, blur, noise, scale."""
    rng = np.random.default_rng([seed, 2, cam])
    coarse = Image.fromarray(rng.uniform(0, 255, (HEIGHT // 8, WIDTH // 8)).astype(np.uint8))
    texture = np.asarray(coarse.resize((WIDTH, HEIGHT), Image.BICUBIC), np.float32)[..., None]
    texture = (texture - 128) * rng.uniform(0.05, 0.2)             # smooth blotches, camera's own strength
    texture = texture + rng.uniform(-20, 20) * (_Y[..., None] / HEIGHT - 0.5)  # and a vertical gradient
    return {
        "wall": (rng.uniform(90, 170) + rng.normal(0, 12, 3)).astype(np.float32),   # greyish, tinted
        "floor": (rng.uniform(70, 150) + rng.normal(0, 12, 3)).astype(np.float32),
        "horizon": float(rng.uniform(0.55, 0.85)),
        "texture": texture,
        "gain": rng.uniform(0.93, 1.07, 3).astype(np.float32),                      # colour cast
        "brightness": float(rng.uniform(0.88, 1.06)),
        "light": float(rng.uniform(-1, 1)),
        "blur": float(rng.choice([0.0, 0.4, 0.7])),
        "noise": float(rng.uniform(2, 7)),
        "scale": float(rng.uniform(0.8, 0.95)),
        "quality": int(rng.integers(70, 96)),
    }


# --------------------------------------------------------------------------- drawing

def _ellipse(u, v, cu, cv, ru, rv):
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1


def _box(u, v, u0, u1, v0, v1):
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _segment(u, v, start, end, radius):
    """Pixels within ``radius`` of the segment start-end (a limb)."""
    du, dv = end[0] - start[0], end[1] - start[1]
    t = np.clip(((u - start[0]) * du + (v - start[1]) * dv) / (du * du + dv * dv), 0, 1)
    return (u - start[0] - t * du) ** 2 + (v - start[1] - t * dv) ** 2 <= radius * radius


def _background(camera: dict, rng: np.random.Generator) -> np.ndarray:
    horizon = (camera["horizon"] + rng.normal(0, 0.05)) * HEIGHT
    # the scene's colours drift a little from frame to frame
    wall, floor = camera["wall"] + rng.normal(0, 15, 3), camera["floor"] + rng.normal(0, 15, 3)
    image = np.where((_Y < horizon)[..., None], wall, floor).astype(np.float32)
    image += np.roll(camera["texture"], int(rng.integers(WIDTH)), axis=1)
    if rng.random() < 0.4:  # a pole, a door, another pedestrian far behind
        x0 = rng.uniform(-5, WIDTH)
        thing = _box(_X, _Y, x0, x0 + rng.uniform(3, 14), rng.uniform(0, HEIGHT / 2), HEIGHT)
        image[thing] = rng.uniform(30, 220, 3)
    return image * rng.uniform(0.9, 1.1)


class _Canvas:
    """An image being painted, and the mask of the person painted so far (for shading)."""

    def __init__(self, image: np.ndarray):
        self.image, self.person = image, np.zeros(image.shape[:2], bool)

    def paint(self, mask: np.ndarray, colour) -> None:
        self.image[mask] = colour
        self.person[mask] = True


def _draw_person(canvas: _Canvas, who: dict, u: np.ndarray, v: np.ndarray, view: str, facing: int,
                 phase: float) -> None:
    """Paint a person in body coordinates: u across, v down, the person's height = 1, back to front."""
    half = 0.15 * who["width"] * (0.7 if view == "side" else 1.0)   # torso half-width at the shoulders
    if who["bag"] == 1 and view == "side":                          # a backpack behind the torso
        lo, hi = sorted((-facing * 0.09, -facing * 0.2))
        canvas.paint(_box(u, v, lo, hi, 0.19, 0.42), who["bag_colour"])
    _draw_legs(canvas, who, u, v, view, facing, phase, half)
    _draw_torso_and_arms(canvas, who, u, v, view, facing, phase, half)
    _draw_head(canvas, who, u, v, view, facing)
    _draw_bag(canvas, who, u, v, view, half)


def _draw_legs(canvas, who, u, v, view, facing, phase, half) -> None:
    side = view == "side"
    swing = phase * (0.09 if side else 0.02)                        # walking: legs apart, more seen from the side
    for s in (-1, 1):
        hip = (s * 0.05 * who["width"] * (0.4 if side else 1.0), HIP_V)
        ankle = (hip[0] + s * swing, ANKLE_V)
        leg = _segment(u, v, hip, ankle, 0.045 * who["width"])
        canvas.paint(leg, who["lower"])
        if who["lower_style"] != 0:                                 # shorts or skirt: bare lower legs
            canvas.paint(leg & (v > 0.7), who["skin"])
        canvas.paint(_ellipse(u, v, ankle[0] + facing * 0.015 * side, 0.955, 0.045, 0.024), who["shoes"])
    if who["lower_style"] == 2:                                     # a skirt flares out
        flare = half * (0.9 + 0.5 * (v - 0.48) / 0.24)
        canvas.paint((np.abs(u) <= flare) & (v >= 0.48) & (v <= 0.72), who["lower"])


def _draw_torso_and_arms(canvas, who, u, v, view, facing, phase, half) -> None:
    taper = half * (1 - 0.15 * np.clip((v - 0.2) / 0.33, 0, 1))     # shoulders, then a slight taper
    torso = ((np.abs(u) <= taper) & (v >= 0.2) & (v <= 0.54)) | _ellipse(u, v, 0, 0.21, half, 0.05)
    canvas.paint(torso, who["upper"])
    canvas.paint(torso & _pattern(who["pattern"], u, v, view, facing), who["upper2"])
    side = view == "side"
    arms = [(0.0, facing)] if side else [(-half - 0.01, -1), (half + 0.01, 1)]
    for root, s in arms:                                            # sleeve, then skin
        hand = (root + s * 0.02 + (phase * 0.08 * facing if side else -phase * 0.015 * s), 0.48)
        arm = _segment(u, v, (root, SHOULDER_V), hand, 0.03 * who["width"])
        canvas.paint(arm, who["upper"])
        if who["short_sleeves"]:
            canvas.paint(arm & (v > 0.31), who["skin"])
        canvas.paint(_ellipse(u, v, hand[0], hand[1] + 0.01, 0.024, 0.024), who["skin"])


def _draw_head(canvas, who, u, v, view, facing) -> None:
    side = view == "side"
    canvas.paint(_box(u, v, -0.028, 0.028, 0.12, 0.18), who["skin"])       # neck
    head_u = facing * 0.01 if side else 0.0
    head = _ellipse(u, v, head_u, HEAD_V, *HEAD_RADII)
    canvas.paint(head, who["skin"])
    canvas.paint(head & _hair_cover(u, v, head_u, view, facing), who["hair"])
    if who["hair_style"] == 1:                                      # long hair over the shoulders
        reach = (np.abs(u) <= 0.065) & (v >= 0.06) & (v <= 0.26)
        if view == "front":
            reach &= np.abs(u) >= 0.04
        elif side:
            reach &= u * facing <= 0
        canvas.paint(reach, who["hair"])
    elif who["hair_style"] == 2:                                    # a cap with a brim
        canvas.paint(head & (v < 0.055), who["hat"])
        brim = (head_u - 0.06 + 0.02 * facing * side, head_u + 0.06 + 0.03 * facing * side)
        canvas.paint(_box(u, v, *brim, 0.05, 0.064), who["hat"])


def _pattern(pattern: int, u, v, view: str, facing: int) -> np.ndarray:
    """Where the upper body shows its second colour."""
    if pattern == 1:                                                # horizontal stripes
        return np.floor((v - 0.16) / 0.045) % 2 == 1
    if pattern == 2:                                                # checks
        return (np.floor(v / 0.05) + np.floor((u + 1) / 0.05)) % 2 == 1
    if pattern == 3:                                                # open jacket: the shirt shows in front
        if view == "front":
            return np.abs(u) < 0.035
        if view == "side":
            return u * facing > 0.05
    if pattern == 4:                                                # a chest band, front and back
        return (v > 0.27) & (v < 0.33)
    return np.zeros(u.shape, bool)


def _hair_cover(u, v, head_u, view: str, facing: int) -> np.ndarray:
    if view == "back":
        return v < 0.14
    if view == "side":
        return (v < 0.055) | (((u - head_u) * facing < 0) & (v < 0.12))
    return (v < 0.058) | ((np.abs(u - head_u) > 0.038) & (v < 0.1))


def _draw_bag(canvas, who, u, v, view, half) -> None:
    colour = who["bag_colour"]
    if who["bag"] == 1 and view == "back":
        canvas.paint(_box(u, v, -0.085 * who["width"], 0.085 * who["width"], 0.2, 0.42), colour)
    elif who["bag"] == 1 and view == "front":                       # only the straps show
        for s in (-1, 1):
            canvas.paint(_box(u, v, s * 0.07 - 0.012, s * 0.07 + 0.012, 0.17, 0.36), colour)
    elif who["bag"] == 2 and view == "side":
        canvas.paint(_box(u, v, -0.04, 0.04, 0.38, 0.5), colour)
    elif who["bag"] == 2:                                           # a shoulder bag: strap across, bag at the hip
        s = who["bag_side"] * (-1 if view == "back" else 1)
        canvas.paint(_segment(u, v, (-s * 0.09, 0.18), (s * 0.14, 0.39), 0.009), colour)
        lo, hi = sorted((s * half, s * (half + 0.09)))
        canvas.paint(_box(u, v, lo, hi, 0.38, 0.5), colour)


# Generated view labels: the view each image is drawn from, as a 0-based view id. A side view faces
# left or right in the image (the renderer's ``facing`` -1 / +1); front and back look the same either way.
def view_id(view: str, facing: int) -> int:
    """The 0-based view id of a drawn view: 0 front, 1 back, 2 side facing left, 3 side facing right.

    >>> [view_id("front", 1), view_id("back", -1), view_id("side", -1), view_id("side", 1)]
    [0, 1, 2, 3]
    """
    return {"front": 0, "back": 1}.get(view, 2 if facing < 0 else 3)


def render_image(who: dict, camera: dict, rng: np.random.Generator, junk: bool = False) -> Image.Image:
    """One 128x64 RGB crop of person ``who`` seen by ``camera``; ``junk``: a bad box (mostly background)."""
    return render_image_and_view(who, camera, rng, junk)[0]


def render_image_and_view(who: dict, camera: dict, rng: np.random.Generator,
                          junk: bool = False) -> tuple[Image.Image, int]:
    """:func:`render_image`, and the view id (:func:`view_id`) the person was drawn from."""
    image = _background(camera, rng)
    view = str(rng.choice(["front", "back", "side"], p=[0.4, 0.4, 0.2]))
    facing = int(rng.choice([-1, 1]))
    height = camera["scale"] * who["height"] * rng.uniform(0.94, 1.06) * HEIGHT
    if junk:  # a box that misses the person: much too large and shifted, or too small
        height *= rng.choice([rng.uniform(1.8, 3.0), rng.uniform(0.3, 0.5)])
    top = (HEIGHT - height) * rng.uniform(0.25, 0.75) + (rng.uniform(-0.6, 0.2) * height if junk else 0)
    centre = WIDTH / 2 + rng.normal(0, 2.5) + (rng.uniform(-30, 30) if junk else 0)
    u, v = (_X - centre) / height, (_Y - top) / height
    canvas = _Canvas(image)
    _draw_person(canvas, who, u, v, view, facing, float(rng.uniform(-1, 1)))
    person = canvas.person
    shade = 1 + 0.12 * camera["light"] * u / 0.15 - 0.15 * (u / 0.15) ** 2  # a round body, lit from one side
    image[person] *= np.clip(shade[person], 0.6, 1.2)[:, None]
    if rng.random() < 0.2:
        _occlude(image, rng)
    image *= camera["gain"] * np.float32(camera["brightness"] * rng.uniform(0.9, 1.1))
    noise = rng.standard_normal((HEIGHT, WIDTH, 1), dtype=np.float32)  # sensor noise, one value per pixel
    image += noise * np.float32(camera["noise"])
    out = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    out = out.filter(ImageFilter.GaussianBlur(camera["blur"])) if camera["blur"] else out
    return out, view_id(view, facing)


def _occlude(image: np.ndarray, rng: np.random.Generator) -> None:
    """Something between the camera and the person: a car or bench below, a pillar at a side."""
    colour = rng.uniform(20, 230, 3) + rng.normal(0, 8, (HEIGHT, WIDTH, 1))
    if rng.random() < 0.5:
        region = _Y >= HEIGHT * rng.uniform(0.6, 0.82)
    else:
        edge = WIDTH * rng.uniform(0.2, 0.4)
        region = (_X < edge) if rng.random() < 0.5 else (_X >= WIDTH - edge)
    image[region] = colour[region]


# --------------------------------------------------------------------------- the data set

def _split_counts(total: int, parts: int, minimum: int, rng: np.random.Generator) -> list[int]:
    """``total`` split into ``parts`` random counts, each at least ``minimum``."""
    return (minimum + rng.multinomial(total - minimum * parts, np.full(parts, 1 / parts))).tolist()


def plan_images(ids: int = 60, cams: int = 4, seed: int = 0, train_frac: float = 0.5,
                images_per_id: float = 12.0, distractors: int | None = None, junk: int | None = None,
                train_only: bool = False, train_images: int | None = None) -> list[tuple]:
    """Every image to write, as ``(relative path, identity key, camera, image seed, junk)``."""
    if train_only:
        train_frac = 1.0
    elif cams < 2:
        raise ValueError("a query needs a gallery match from another camera: use cams >= 2")
    rng = np.random.default_rng([seed, 0])
    pids = np.arange(1, ids + 1)
    n_train = min(ids, int(np.floor(ids * train_frac + 0.5)))
    if not train_only and n_train in (0, ids):
        raise ValueError(f"train_frac {train_frac} leaves no {'test' if n_train else 'train'} identities")
    train_set = set(rng.choice(pids, n_train, replace=False).tolist())
    if train_images is not None:
        if train_images < 2 * n_train:
            raise ValueError(f"train_images {train_images} < 2 per identity for {n_train} identities")
        train_counts = iter(_split_counts(train_images, n_train, 2, rng))
    low, high = max(2, round(images_per_id * 2 / 3)), max(2, round(images_per_id * 4 / 3))
    jobs, serial = [], 0

    def add(folder, pid, key, cam, visit_seq, frame, box, is_junk=False):
        nonlocal serial
        person = f"{pid:04d}" if pid >= 0 else "-1"                 # Market writes junk as -1
        jobs.append((f"{folder}/{person}_c{cam + 1}s{visit_seq}_{frame:06d}_{box:02d}.jpg", key, cam, serial,
                     is_junk))
        serial += 1

    for pid in pids.tolist():
        is_train = pid in train_set
        exact = is_train and train_images is not None
        count = next(train_counts) if exact else int(rng.integers(low, high + 1))
        per_visit = 1 if is_train else 2                            # a test visit keeps >= 1 gallery image
        visits = int(rng.integers(min(2, cams), cams + 1))
        if is_train:
            visits = min(visits, count)                             # keeps an exact train_images total
        count = max(count, per_visit * visits)
        cameras = sorted(rng.choice(cams, visits, replace=False).tolist())
        queried = rng.random(visits) < 0.75
        queried[rng.integers(visits)] = True
        for cam, n, in_query in zip(cameras, _split_counts(count, visits, per_visit, rng), queried):
            seq, frame = int(rng.integers(1, 7)), int(rng.integers(0, 900_000))
            for j in range(n):
                folder = SPLIT_FOLDERS[0] if is_train else (
                    SPLIT_FOLDERS[1] if (in_query and j == 0) else SPLIT_FOLDERS[2])
                add(folder, pid, pid, cam, seq, frame + 25 * j, 1)
    if not train_only:
        n_distractors = ids // 2 if distractors is None else distractors
        n_junk = max(3, ids // 20) if junk is None else junk
        for j in range(n_distractors):                              # pid 0: people outside the set
            add(SPLIT_FOLDERS[2], 0, 1_000_000 + j, int(rng.integers(cams)), int(rng.integers(1, 7)), 10 * j,
                j % 100)
        for j in range(n_junk):
            add(SPLIT_FOLDERS[2], -1, 2_000_000 + j, int(rng.integers(cams)), int(rng.integers(1, 7)), 10 * j,
                j % 100, is_junk=True)
    return jobs


def _write(job: tuple, out: str, seed: int) -> int:
    """Draw and save one planned image; returns the view id it was drawn from."""
    rel, cam = job[0], job[2]
    image, view = render_job(job, seed)
    image.save(os.path.join(out, rel), quality=make_camera(seed, cam)["quality"])
    return view


def render_job(job: tuple, seed: int) -> tuple[Image.Image, int]:
    """The image of one planned job (a :func:`plan_images` row) and its view id, from the job's own seed."""
    _, key, cam, serial, is_junk = job
    rng = np.random.default_rng([seed, 3, serial])
    return render_image_and_view(make_identity(seed, key), make_camera(seed, cam), rng, junk=is_junk)


def generate_market(out, ids: int = 60, cams: int = 4, seed: int = 0, train_frac: float = 0.5,
                    images_per_id: float = 12.0, distractors: int | None = None, junk: int | None = None,
                    train_only: bool = False, train_images: int | None = None,
                    workers: int | None = None, overwrite: bool = False) -> Path:
    """Write a Market-format generated data set to ``out`` and return its path.

    ``ids`` identities (``train_frac`` of them for training, the rest for query/gallery), each seen
    by 2..``cams`` cameras with about ``images_per_id`` images in all (2/3x to 4/3x);
    ``distractors`` pid-0 gallery images (default ``ids // 2``) and ``junk`` pid -1 ones (default
    ``max(3, ids // 20)``). ``train_only`` writes only ``bounding_box_train`` with every identity
    (load it with ``load_dataset(..., train_only=True)``); ``train_images`` fixes the number of
    train images exactly. ``workers`` processes draw the images (default: 1 for small sets, else
    up to 8). Refuses to write into non-empty split folders unless ``overwrite`` (which deletes the
    ``*.jpg`` files there first).

    Example::

        generate_market("data/synth")                                   # ~750 images, ~2 s
        generate_market("data/big", ids=751, cams=6, train_only=True, train_images=12936)
    """
    out = Path(out)
    jobs = plan_images(ids, cams, seed, train_frac, images_per_id, distractors, junk, train_only, train_images)
    for folder in SPLIT_FOLDERS[:1] if train_only else SPLIT_FOLDERS:
        _prepare_folder(out / folder, overwrite)
    _write_all(jobs, out, seed, workers)
    write_captions(jobs, out, seed)
    return out


def _write_all(jobs: list[tuple], out: Path, seed: int, workers: int | None) -> list[int]:
    """Write every job's image; returns their view ids, in the order of ``jobs``."""
    workers = workers or (1 if len(jobs) < 2000 else min(8, os.cpu_count() or 1))
    write = functools.partial(_write, out=str(out), seed=seed)
    if workers == 1:
        return [write(job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        return list(pool.map(write, jobs, chunksize=64))


_PR_SET_PDEATHSIG = 1   # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """Pool initializer. A parent killed with SIGKILL cannot stop its pool, and the workers would
    draw images for nobody, forever: on Linux the kernel sends each worker SIGKILL when its
    parent dies (prctl PR_SET_PDEATHSIG); elsewhere a thread polls the parent's pid."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:   # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    """Exit once this process has been handed to another parent (its own died)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def write_captions(jobs: list[tuple], out: Path, seed: int) -> Path:
    """``out/captions.csv``: ``path,caption`` for every image of ``jobs`` that shows a person (junk
    boxes have no caption), the path relative to ``out``, each caption phrased by its own seed."""
    rows = [(rel, describe(make_identity(seed, key), np.random.default_rng([seed, 4, serial])))
            for rel, key, _, serial, is_junk in jobs if not is_junk]
    path = Path(out) / CAPTIONS_CSV
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:  # a temp file, then a rename: never half a CSV
        writer = csv.writer(fh)
        writer.writerow(["path", "caption"])
        writer.writerows(rows)
    tmp.replace(path)
    return path


def read_captions(root: str | Path) -> dict[str, str]:
    """``root/captions.csv`` as {path relative to root: caption}.

    >>> import tempfile
    >>> root = generate_web(tempfile.mkdtemp(), identities=2, seed=0)
    >>> sorted(read_captions(root)) == sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    True
    """
    path = Path(root) / CAPTIONS_CSV
    if not path.is_file():
        raise FileNotFoundError(f"no {CAPTIONS_CSV} in {root}: write the set with reidlib.demo.synth "
                                "(generate_market or generate_web), which writes it beside the images")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not {"path", "caption"} <= set(reader.fieldnames or []):
            raise ValueError(f"{path}: expected a header row path,caption")
        return {row["path"]: row["caption"] for row in reader}


def plan_web_images(identities: int, seed: int = 0, max_per_identity: int = 2) -> list[tuple]:
    """The "web" set's images, as :func:`plan_images` gives them: 1..``max_per_identity`` per
    person, each seen by a camera of its own (random background, light, blur, scale)."""
    rng = np.random.default_rng([seed, 5])
    jobs = []
    for person in range(identities):
        for shot in range(int(rng.integers(1, max_per_identity + 1))):
            serial = WEB_OFFSET + len(jobs)  # also the camera's key: a new camera for every image
            jobs.append((f"{WEB_FOLDER}/{person:06d}_{shot:02d}.jpg", WEB_OFFSET + person, serial, serial, False))
    return jobs


def generate_web(out, identities: int = 3000, seed: int = 0, max_per_identity: int = 2,
                 workers: int | None = None, overwrite: bool = False) -> Path:
    """Write an image-caption set for pretraining (``out/images/*.jpg`` and ``out/captions.csv``)
    and return ``out``.

    Like alt-texted photos on the web rather than a re-ID set: many people, one or a few images
    each, every image from a different camera, no identity labels. Its people and cameras are
    keyed far above any re-ID set's (``WEB_OFFSET``), so none of them is in a re-ID split.

    Example::

        generate_web("data/web", identities=3000)     # ~4,500 images, ~15 s
    """
    out = Path(out)
    jobs = plan_web_images(identities, seed, max_per_identity)
    _prepare_folder(out / WEB_FOLDER, overwrite)
    _write_all(jobs, out, seed, workers)
    write_captions(jobs, out, seed)
    return out


def _prepare_folder(folder: Path, overwrite: bool) -> None:
    existing = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(f"{folder} already holds {len(existing)} images; pass overwrite=True "
                              f"(--overwrite) to replace them")
    for path in existing:
        path.unlink()
    folder.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------- vehicle formats

# The loaders' own folder and file names (reidlib.data.vehicles), so that writer and reader agree.
VERI_FOLDERS = dict(zip(SPLIT_FOLDERS, VERI_IMAGE_FOLDERS))          # Market split -> VeRi folder
# train images are labelled in the train file, query and test images in the test file, as VeRi's
KEYPOINT_FILES = {folder: VERI_KEYPOINT_FILES[0] if folder == VERI_IMAGE_FOLDERS[0] else VERI_KEYPOINT_FILES[1]
                  for folder in VERI_IMAGE_FOLDERS}
FORMATS = {"market": "market1501", "veri": "veri", "vehicleid": "vehicleid"}  # format -> the loader that reads it


def veri_name(market_rel: str) -> str:
    """A planned Market path as VeRi's ``image_*/VVVV_cCCC_FFFFFFFF_0.jpg``; the 8-digit frame is
    visit * 10^6 + Market's frame, unique per identity and camera as Market's names are.

    >>> veri_name("query/0012_c3s2_004511_01.jpg")
    'image_query/0012_c003_02004511_0.jpg'
    """
    folder, name = market_rel.split("/")
    pid, camera_visit, frame, _ = name.split("_")
    camera, visit = camera_visit[1:].split("s")
    return f"{VERI_FOLDERS[folder]}/{int(pid):04d}_c{int(camera):03d}_{int(visit) * 10**6 + int(frame):08d}_0.jpg"


def plan_veri_images(ids: int = 40, cams: int = 4, seed: int = 0, train_frac: float = 0.5,
                     images_per_id: float = 12.0) -> list[tuple]:
    """:func:`plan_images` without distractors or junk (VeRi has none), named as VeRi."""
    jobs = plan_images(ids, cams, seed, train_frac, images_per_id, distractors=0, junk=0)
    return [(veri_name(rel), *rest) for rel, *rest in jobs]


def generate_veri(out, ids: int = 40, cams: int = 4, seed: int = 0, train_frac: float = 0.5,
                  images_per_id: float = 12.0, workers: int | None = None, overwrite: bool = False) -> Path:
    """Write a generated set in VeRi-776's format to ``out`` and return its path.

    ``OUT/{image_train,image_query,image_test}/VVVV_cCCC_FFFFFFFF_0.jpg`` (4-digit id, 1-based
    3-digit camera, 8-digit frame), the identities and splits of :func:`generate_market` (query and
    gallery disjoint; no distractors or junk), and ``OUT/keypoint_train.txt`` / ``keypoint_test.txt``
    in the format of VeRi's keypoint annotations, 42 fields a line: ``VeRi/image_*/<name>``, 40
    keypoint coordinates (all -1: none drawn) and the view id each image was drawn from
    (:func:`view_id`: 0 front, 1 back, 2 side facing left, 3 side facing right; VeRi's own 8
    orientations are numbered otherwise). Query images are listed in ``keypoint_test.txt``.

    Example::

        root = generate_veri("data/veri_synth", ids=40, cams=4)
        ds = load_dataset("veri", root)          # ds.num_views == 4
    """
    out = Path(out)
    jobs = plan_veri_images(ids, cams, seed, train_frac, images_per_id)
    for folder in VERI_FOLDERS.values():
        _prepare_folder(out / folder, overwrite)
    views = _write_all(jobs, out, seed, workers)
    write_keypoints(out, [job[0] for job in jobs], views)
    return out


def write_keypoints(out: Path, rels: list[str], views: list[int]) -> None:
    """``out/keypoint_{train,test}.txt``: one 42-field line per image, its view id last."""
    lines: dict[str, list[str]] = {name: [] for name in KEYPOINT_FILES.values()}
    for rel, view in zip(rels, views):
        lines[KEYPOINT_FILES[rel.split("/")[0]]].append(f"VeRi/{rel} {' '.join(['-1'] * 40)} {view}")
    for name, rows in lines.items():
        (out / name).write_text("".join(row + "\n" for row in rows))


def plan_vehicleid_images(train_ids: int = 30, test_ids: int = 20, cams: int = 4, seed: int = 0,
                          images_per_id: float = 8.0) -> tuple[list[tuple], set[int]]:
    """(jobs, train ids): :func:`plan_images`' identities (>= 4 images per test identity) renamed
    ``image/NNNNNNN.jpg`` in running order; the cameras vary the images but are not recorded."""
    if train_ids < 1 or test_ids < 1:
        raise ValueError(f"train_ids {train_ids} and test_ids {test_ids}: both must be >= 1")
    total = train_ids + test_ids
    jobs = plan_images(total, max(2, cams), seed, train_ids / total, images_per_id, distractors=0, junk=0)
    train = {key for rel, key, *_ in jobs if rel.startswith(SPLIT_FOLDERS[0])}
    return [(f"image/{n:07d}.jpg", *rest) for n, (_, *rest) in enumerate(jobs, start=1)], train


def generate_vehicleid(out, train_ids: int = 30, test_ids: int = 20, seed: int = 0, cams: int = 4,
                       images_per_id: float = 8.0, workers: int | None = None, overwrite: bool = False) -> Path:
    """Write a generated set in VehicleID's format to ``out`` and return its path.

    ``OUT/image/NNNNNNN.jpg`` (7-digit running number) and ``OUT/train_test_split/`` with
    ``train_list.txt`` (every train identity) and ``test_list_{800,1600,2400}.txt``, lines
    ``NNNNNNN <vehicle id>``. Here the three test lists are nested: ``test_list_2400`` lists every
    test identity, ``test_list_1600`` the first ceil(2/3) and ``test_list_800`` the first ceil(1/3)
    in ascending id order (so each size reads a different list); every test identity has >= 4 images.

    Example::

        root = generate_vehicleid("data/vehicleid_synth", train_ids=30, test_ids=24)
        ds = load_dataset("vehicleid", root, test_size=1600)     # 16 test identities
    """
    out = Path(out)
    jobs, train = plan_vehicleid_images(train_ids, test_ids, cams, seed, images_per_id)
    _prepare_folder(out / "image", overwrite)
    _write_all(jobs, out, seed, workers)
    write_vehicleid_lists(out, jobs, train)
    return out


def write_vehicleid_lists(out: Path, jobs: list[tuple], train: set[int]) -> None:
    """``out/train_test_split/*.txt`` for the jobs of :func:`plan_vehicleid_images`."""
    split = Path(out) / "train_test_split"
    split.mkdir(parents=True, exist_ok=True)
    test_ids = sorted({key for _, key, *_ in jobs} - train)
    lists = {"train_list.txt": train}
    for size in VEHICLEID_TEST_SIZES:
        lists[f"test_list_{size}.txt"] = set(test_ids[: -(-len(test_ids) * size // VEHICLEID_TEST_SIZES[-1])])
    for name, keys in lists.items():
        rows = [f"{Path(rel).stem} {key}\n" for rel, key, *_ in jobs if key in keys]
        (split / name).write_text("".join(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reidlib.demo.synth",
                                     description="Write a generated re-ID data set (Market, VeRi or VehicleID format).")
    parser.add_argument("out", help="output folder (Market format: gets bounding_box_train, query, bounding_box_test)")
    parser.add_argument("--format", choices=FORMATS, default="market",
                        help="market (default) | veri (image_*, keypoint files with view labels) | vehicleid "
                             "(image/, train_test_split/; --ids * --train-frac train identities, the rest test)")
    parser.add_argument("--ids", type=int, default=60, help="identities (default 60: 30 train, 30 test)")
    parser.add_argument("--cams", type=int, default=4, help="cameras (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed; the bytes depend only on the arguments")
    parser.add_argument("--train-frac", type=float, default=0.5, help="share of identities for training")
    parser.add_argument("--images-per-id", type=float, default=12.0, help="mean images per identity")
    parser.add_argument("--distractors", type=int, default=None, help="pid-0 gallery images (default ids/2)")
    parser.add_argument("--junk", type=int, default=None, help="pid -1 gallery images (default max(3, ids/20))")
    parser.add_argument("--train-only", action="store_true", help="write only bounding_box_train, all ids")
    parser.add_argument("--train-images", type=int, default=None, help="exact number of train images")
    parser.add_argument("--market-size", action="store_true",
                        help="Market-1501's training set size: --ids 751 --cams 6 --train-only "
                             "--train-images 12936")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: 1 if small, else <= 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace the images already in OUT")
    args = parser.parse_args(argv)
    if args.market_size:
        args.ids, args.cams, args.train_only, args.train_images = 751, 6, True, 12936
    market_only = [flag for flag, value in [("--distractors", args.distractors), ("--junk", args.junk),
                                            ("--train-only", args.train_only or None),
                                            ("--train-images", args.train_images)] if value is not None]
    if args.format != "market" and market_only:
        print(f"error: {', '.join(market_only)} only with --format market", file=sys.stderr)
        return 2
    started = time.time()
    try:
        out = _generate(args)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.time() - started
    from ..data.datasets import load_dataset  # the vehicle loaders are registered: this module imports vehicles
    print(load_dataset(FORMATS[args.format], out, train_only=args.train_only).stats_table())
    print(f"written in {seconds:.1f} s")
    return 0


def _generate(args: argparse.Namespace) -> Path:
    common = dict(seed=args.seed, images_per_id=args.images_per_id, workers=args.workers, overwrite=args.overwrite)
    if args.format == "veri":
        return generate_veri(args.out, ids=args.ids, cams=args.cams, train_frac=args.train_frac, **common)
    if args.format == "vehicleid":
        train_ids = min(args.ids, int(np.floor(args.ids * args.train_frac + 0.5)))
        return generate_vehicleid(args.out, train_ids=train_ids, test_ids=args.ids - train_ids, cams=args.cams,
                                  **common)
    return generate_market(args.out, ids=args.ids, cams=args.cams, train_frac=args.train_frac,
                           distractors=args.distractors, junk=args.junk, train_only=args.train_only,
                           train_images=args.train_images, **common)


if __name__ == "__main__":
    sys.exit(main())
