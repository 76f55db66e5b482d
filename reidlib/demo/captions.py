"""Captions of generated people: a sentence from a person's drawn attributes, in several phrasings.

The generator (:mod:`reidlib.demo.synth`) knows what it drew: hair style and colour or a cap, the
upper body's colour, pattern, second colour and sleeves, the lower garment and its colour, shoes
and a bag. :func:`describe` turns those into one sentence, with a colour name for each palette
entry (the names below are index-aligned with synth's palettes) and one of several phrasings, as
alt texts on the web describe the same kind of picture in different words. They are the text half
of the image-caption pairs a miniature CLIP is pretrained on (:mod:`reidlib.demo.pretrain`).

Example::

    who = make_identity(0, 7)                       # reidlib.demo.synth
    describe(who, np.random.default_rng(1))
    # 'a pedestrian wearing a pink long-sleeved shirt with a white chest band and navy shorts, with
    #  short brown hair, white shoes and a blue backpack'
"""
from __future__ import annotations

import numpy as np

# Names of synth's palette entries, in the palettes' order (synth.py checks the lengths at import).
HAIR_NAMES = ["black", "dark brown", "brown", "blond", "grey"]
CLOTHES_NAMES = ["red", "blue", "white", "black", "grey", "green", "yellow", "navy", "pink", "purple",
                 "orange", "brown"]
LOWER_NAMES = ["black", "blue", "grey", "beige", "white", "brown", "navy"]
SHOES_NAMES = ["black", "white", "brown", "red"]

LOWER_GARMENTS = ("trousers", "shorts", "skirt")
BAGS = (None, "backpack", "shoulder bag")
PHRASINGS = 4


def _hair(who: dict) -> str:
    """'short black hair', 'long blond hair' or 'a red cap'."""
    names = who["colour_index"]
    if who["hair_style"] == 2:
        return f"a {CLOTHES_NAMES[names['hat']]} cap"
    return f"{('short', 'long')[who['hair_style']]} {HAIR_NAMES[names['hair']]} hair"


def _upper(who: dict, noun: str) -> str:
    """The upper body: colour, pattern with its second colour, sleeves; e.g. 'a red and white
    striped short-sleeved top', 'an open green long-sleeved jacket over a white shirt'."""
    names = who["colour_index"]
    first, second = CLOTHES_NAMES[names["upper"]], CLOTHES_NAMES[names["upper2"]]
    sleeves = "short-sleeved" if who["short_sleeves"] else "long-sleeved"
    pattern = who["pattern"]
    if pattern == 1:
        return f"a {first} and {second} striped {sleeves} {noun}"
    if pattern == 2:
        return f"a {first} and {second} checked {sleeves} {noun}"
    if pattern == 3:
        return f"an open {first} {sleeves} jacket over a {second} shirt"
    if pattern == 4:
        return f"a {first} {sleeves} {noun} with a {second} chest band"
    return f"{'an' if first[0] in 'aeiou' else 'a'} {first} {sleeves} {noun}"


def _lower(who: dict) -> str:
    """'black trousers', 'beige shorts' or 'a navy skirt'."""
    colour = LOWER_NAMES[who["colour_index"]["lower"]]
    garment = LOWER_GARMENTS[who["lower_style"]]
    return f"a {colour} skirt" if garment == "skirt" else f"{colour} {garment}"


def _bag(who: dict) -> str | None:
    """'a blue backpack', 'a red shoulder bag', or None."""
    kind = BAGS[who["bag"]]
    return None if kind is None else f"a {CLOTHES_NAMES[who['colour_index']['bag_colour']]} {kind}"


def describe(who: dict, rng: np.random.Generator) -> str:
    """One caption of person ``who`` (a :func:`~reidlib.demo.synth.make_identity` dict), in a
    phrasing drawn from ``rng``; every phrasing names every attribute.

    >>> who = {"hair_style": 1, "pattern": 1, "short_sleeves": True, "lower_style": 1, "bag": 1,
    ...        "colour_index": {"hair": 2, "hat": 0, "upper": 0, "upper2": 2, "lower": 0, "shoes": 1,
    ...                         "bag_colour": 1}}
    >>> describe(who, np.random.default_rng(0))  # doctest: +NORMALIZE_WHITESPACE
    'a photo of someone in black shorts and a red and white striped short-sleeved shirt, carrying a
     blue backpack; long brown hair and white shoes'
    """
    phrasing = int(rng.integers(PHRASINGS))
    noun = ("top", "shirt")[int(rng.integers(2))]
    hair, upper, lower, bag = _hair(who), _upper(who, noun), _lower(who), _bag(who)
    shoes = f"{SHOES_NAMES[who['colour_index']['shoes']]} shoes"
    if phrasing == 0:
        return f"a person with {hair} in {upper}, {lower} and {shoes}" + (f", carrying {bag}" if bag else "")
    if phrasing == 1:
        return (f"a pedestrian wearing {upper} and {lower}, with {hair}, {shoes}"
                + (f" and {bag}" if bag else " and no bag"))
    if phrasing == 2:
        return ", ".join([hair, upper, lower, shoes] + ([bag] if bag else []))
    return (f"a photo of someone in {lower} and {upper}" + (f", carrying {bag}" if bag else "")
            + f"; {hair} and {shoes}")
