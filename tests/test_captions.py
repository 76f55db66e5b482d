"""Captions of generated people: the CSV beside the images, colour names that match the palettes,
every attribute in every phrasing, and the "web" set's people and cameras apart from re-ID sets'."""
import csv

import numpy as np
import pytest

from reidlib.data import load_dataset
from reidlib.demo import captions as cap
from reidlib.demo.synth import (
    CAPTIONS_CSV,
    CLOTHES,
    HAIR,
    LOWER,
    SHOES,
    WEB_OFFSET,
    generate_market,
    generate_web,
    make_identity,
    plan_images,
    plan_web_images,
    read_captions,
)

SMALL = dict(ids=8, cams=3, images_per_id=6, distractors=3, junk=2)


@pytest.fixture(scope="module")
def small(small_generated):
    return small_generated


def test_one_caption_per_person_image_beside_the_images(small, tmp_path):
    captions = read_captions(small)
    images = {p.relative_to(small).as_posix() for p in small.rglob("*.jpg")}
    junk = {name for name in images if name.split("/")[1].startswith("-1_")}
    assert len(junk) == SMALL["junk"]
    assert set(captions) == images - junk            # every image that shows a person, no other path
    assert all(len(text.split()) >= 8 for text in captions.values())
    again = generate_market(tmp_path / "again", seed=3, **SMALL)
    assert (again / CAPTIONS_CSV).read_bytes() == (small / CAPTIONS_CSV).read_bytes()


def test_a_caption_names_the_drawn_colours(small):
    """Each caption of a training image carries the colour names of its person's palette entries."""
    captions = read_captions(small)
    for rel, key, _, _, _ in plan_images(seed=3, **SMALL)[:20]:
        who = make_identity(3, key)
        text, index = captions[rel], who["colour_index"]
        assert cap.CLOTHES_NAMES[index["upper"]] in text, text
        assert f"{cap.LOWER_NAMES[index['lower']]} {cap.LOWER_GARMENTS[who['lower_style']]}" in text, text
        assert f"{cap.SHOES_NAMES[index['shoes']]} shoes" in text, text
        hair = (f"{cap.CLOTHES_NAMES[index['hat']]} cap" if who["hair_style"] == 2
                else f"{cap.HAIR_NAMES[index['hair']]} hair")
        assert hair in text, text


def test_every_phrasing_names_every_attribute():
    who = {"hair_style": 0, "pattern": 2, "short_sleeves": False, "lower_style": 2, "bag": 2,
           "colour_index": {"hair": 3, "hat": 0, "upper": 5, "upper2": 6, "lower": 3, "shoes": 3, "bag_colour": 9}}
    seen = set()
    for seed in range(40):
        text = cap.describe(who, np.random.default_rng(seed))
        seen.add(" ".join(text.split()[:2]))
        for part in ("short blond hair", "green and yellow checked long-sleeved", "a beige skirt", "red shoes",
                     "purple shoulder bag"):
            assert part in text, (part, text)
    assert len(seen) == cap.PHRASINGS  # each phrasing starts in its own words


@pytest.mark.parametrize("palette, names", [(HAIR, cap.HAIR_NAMES), (CLOTHES, cap.CLOTHES_NAMES),
                                            (LOWER, cap.LOWER_NAMES), (SHOES, cap.SHOES_NAMES)])
def test_colour_names_fit_the_palettes(palette, names):
    """One name per entry; a name means the same colour in every palette; greys are grey and the
    named hues are the strongest channel."""
    assert len(palette) == len(names)
    every = [(n, np.array(c, float)) for p, ns in [(HAIR, cap.HAIR_NAMES), (CLOTHES, cap.CLOTHES_NAMES),
                                                  (LOWER, cap.LOWER_NAMES), (SHOES, cap.SHOES_NAMES)]
             for n, c in zip(ns, p)]
    for name, rgb in zip(names, np.array(palette, float)):
        same = [c for n, c in every if n == name]
        assert max(np.abs(c - rgb).max() for c in same) <= 60, name
        if name in ("black", "grey", "white"):
            assert np.ptp(rgb) <= 20, name
        channel = {"red": 0, "green": 1, "blue": 2, "navy": 2}.get(name)
        if channel is not None:
            assert rgb.argmax() == channel, name


def test_web_set_people_and_cameras_are_not_a_reid_sets(tmp_path):
    jobs = plan_web_images(50, seed=0, max_per_identity=2)
    people = [key for _, key, _, _, _ in jobs]
    cameras = [cam for _, _, cam, _, _ in jobs]
    assert min(people) >= WEB_OFFSET and min(cameras) >= WEB_OFFSET
    assert len(set(cameras)) == len(jobs)                       # a camera of its own for every image
    counts = np.bincount(np.array(people) - WEB_OFFSET)
    assert len(counts) == 50 and counts.min() == 1 and counts.max() == 2
    reid = plan_images(ids=60, cams=4, seed=0)                  # the demo's data set
    assert max(key for _, key, _, _, _ in reid) < WEB_OFFSET and max(cam for _, _, cam, _, _ in reid) < 4
    root = generate_web(tmp_path / "web", identities=50, seed=0)
    with open(root / CAPTIONS_CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == [rel for rel, *_ in jobs]
    assert all((root / r["path"]).is_file() for r in rows)


def test_missing_captions_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions.csv"):
        read_captions(tmp_path)


def test_synth_data_set_name(small):
    ds = load_dataset("synth", small)
    assert ds.name == "synth" and ds.stats() == load_dataset("market1501", small).stats()
