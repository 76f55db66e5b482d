"""The pretrained miniature CLIP: built once per recipe, deterministic, loaded like any CLIP file,
and pretrained in fact: it matches captions to people it never saw, its features re-identify people
before any re-ID training, and CLIP-ReID's two stages end higher from it than from random weights.

The figures in the comments were measured with the session's ``miniature`` recipe (conftest.py).
"""
import dataclasses
import json

import open_clip
import pytest
import torch

import reidlib
from reidlib.__main__ import main as cli
from reidlib.config import load_config
from reidlib.data import load_dataset
from reidlib.data.cache import decode_images
from reidlib.demo.pretrain import PretrainRecipe, build_miniature, miniature_path, pretrain_clip
from reidlib.demo.synth import generate_web, read_captions
from reidlib.demo.zeroshot import PIXEL_MEAN, PIXEL_STD, caption_retrieval
from reidlib.eval.inference import evaluate_model
from reidlib.methods import method_config
from reidlib.model import build_model, load_clip
from reidlib.storage import load_checkpoint, save_checkpoint
from reidlib.weights import uses_quick_gelu

pytestmark = pytest.mark.slow  # pretraining, notebooks, whole runs: `make test-fast` leaves them out

# A few steps on a few people: for the mechanics (cache, determinism, command line), not for quality.
TINY = PretrainRecipe(identities=40, steps=3, batch_size=16, warmup_steps=1)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    return build_miniature(TINY, tmp_path_factory.mktemp("tiny_cache"), echo=lambda text: None)


@pytest.fixture(scope="module")
def demo_split(demo_root):
    """The demo's generated data set (the session's ``demo_root``), read as ``synth``."""
    return load_dataset("synth", demo_root)


def _tiny_config(pretrained, *extra):
    return load_config("tiny", [f"model.pretrained={pretrained}", "model.quick_gelu=false", "device=cpu", *extra])


def test_the_recipe_names_the_file():
    base = PretrainRecipe()
    assert miniature_path(base, "c") == miniature_path(PretrainRecipe(), "c")
    assert miniature_path(base, "c").name.startswith("clip-vit-tiny8-")
    paths = {miniature_path(dataclasses.replace(base, **{f.name: _other(getattr(base, f.name))}), "c")
             for f in dataclasses.fields(PretrainRecipe) if f.name != "name"}
    assert len(paths) == len(dataclasses.fields(PretrainRecipe)) - 1 and miniature_path(base, "c") not in paths
    # the web set depends on its own fields only: a longer training reuses it
    assert dataclasses.replace(base, steps=900).web_key() == base.web_key() != \
        dataclasses.replace(base, identities=9).web_key()


def _other(value):
    return value + 1 if not isinstance(value, str) else value + "x"


def test_a_cached_miniature_is_reused_and_a_corrupt_one_rebuilt(tiny_build):
    lines = []
    before = tiny_build.stat().st_mtime_ns
    assert build_miniature(TINY, tiny_build.parent, echo=lines.append) == tiny_build
    assert tiny_build.stat().st_mtime_ns == before and "cached" in lines[0]
    saved = tiny_build.read_bytes()
    tiny_build.write_bytes(saved[: len(saved) // 2])               # a half-written file, as after a crash
    lines.clear()
    assert build_miniature(TINY, tiny_build.parent, echo=lines.append) == tiny_build
    assert "corrupt" in lines[0] and "building it again" in lines[0]
    assert load_checkpoint(tiny_build)["state_dict"].keys() == torch.load(tiny_build)["state_dict"].keys()
    record = json.loads(tiny_build.with_suffix(".json").read_text())
    assert record["recipe"] == dataclasses.asdict(TINY) and len(record["loss"]) == len(record["step"]) == 2
    state = load_checkpoint(tiny_build)
    save_checkpoint(tiny_build, {**state, "recipe": {**state["recipe"], "seed": 7}})   # not what the name says
    lines.clear()
    assert build_miniature(TINY, tiny_build.parent, echo=lines.append) == tiny_build
    assert "holds another recipe" in lines[0] and load_checkpoint(tiny_build)["recipe"]["seed"] == TINY.seed


def test_same_recipe_same_weights_other_seed_other_weights(tiny_build):
    web = next(tiny_build.parent.glob("web-*"))
    first, history = pretrain_clip(web, TINY, echo=lambda text: None)
    again, _ = pretrain_clip(web, TINY, echo=lambda text: None)
    other, _ = pretrain_clip(web, dataclasses.replace(TINY, seed=1), echo=lambda text: None)
    a, b, c = first.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.conv1.weight"], c["visual.conv1.weight"])
    assert history["pairs"] == len(read_captions(web)) and history["epochs"] == 1
    saved = load_checkpoint(tiny_build)["state_dict"]                # the cached file holds these weights too
    assert all(torch.equal(a[k], saved[k]) for k in a)


def test_command_line_builds_then_finds_the_file(tmp_path, capsys):
    args = ["--cache", str(tmp_path), "--identities", "40", "--steps", "2", "--batch-size", "16",
            "--warmup-steps", "1"]
    assert cli(["pretrain", *args]) == 0
    first = capsys.readouterr().out
    path = miniature_path(dataclasses.replace(TINY, steps=2), tmp_path)
    assert f"model.pretrained={path}" in first and "written to" in first and path.is_file()
    assert cli(["pretrain", *args]) == 0
    assert "cached" in capsys.readouterr().out


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", 1), ("warmup_steps", 9), ("lr", -1.0)])
def test_a_bad_recipe_is_a_one_line_error(field, value, capsys):
    with pytest.raises(ValueError, match=f"pretraining recipe: .*{field}"):
        dataclasses.replace(TINY, **{field: value})
    shorter = ["--steps", "3"] if field != "steps" else []
    assert cli(["pretrain", "--" + field.replace("_", "-"), str(value), *shorter]) == 2   # before any work
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and field in error


def test_a_too_small_web_set_is_a_clear_error(tmp_path):
    web = generate_web(tmp_path, identities=3, seed=0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        pretrain_clip(web, TINY)


def test_loads_as_an_open_clip_checkpoint_with_the_activation_it_was_trained_with(miniature):
    path, recipe = miniature
    saved = load_checkpoint(path)
    assert saved["name"] == recipe.name == load_config("tiny").model.name
    ours = load_clip(recipe.name, str(path))                       # model.pretrained=PATH's own loader
    assert not uses_quick_gelu(ours)                               # GELU, as pretrain_clip trained it
    theirs = open_clip.create_model(recipe.name, pretrained=str(path))   # open_clip's loader reads it too
    images = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        assert torch.allclose(ours.eval().encode_image(images), theirs.eval().encode_image(images), atol=1e-6)
    cfg = _tiny_config(path)
    assert (cfg.data.pixel_mean, cfg.data.pixel_std) == (list(PIXEL_MEAN), list(PIXEL_STD))
    model = build_model(cfg.model, num_classes=5)
    # pretrained at the re-ID input size: the positional embedding is taken as learned, not resized
    assert torch.equal(model.visual.vit.positional_embedding, saved["state_dict"]["visual.positional_embedding"])
    assert not uses_quick_gelu(model)


def test_ranks_the_right_caption_first_for_people_it_never_saw(miniature, tmp_path):
    path, recipe = miniature
    # Other people than the web set's (another seed draws other identities), one image each.
    held_out = generate_web(tmp_path, identities=200, seed=recipe.data_seed + 1, max_per_identity=1)
    captions = read_captions(held_out)
    images, _ = decode_images([held_out / p for p in captions], (128, 64))
    result = caption_retrieval(load_clip(recipe.name, str(path)), images, list(captions.values()))
    torch.manual_seed(0)
    untrained = caption_retrieval(load_clip(recipe.name, "none", quick_gelu="false"), images, list(captions.values()))
    # Measured: image->text rank-1 0.250 (text->image 0.220) among 200 captions, chance 0.005;
    # random weights 0.005 (0.000). The demo's recipe (500 steps): 0.460 (0.470).
    assert result["chance"] == 1 / 200
    assert result["image_to_text_rank1"] >= 8 * result["chance"], result
    assert result["text_to_image_rank1"] >= 8 * result["chance"], result
    assert untrained["image_to_text_rank1"] <= 3 * result["chance"], untrained


def test_zero_shot_reid_map_well_above_random_init(miniature, demo_split, one_thread):
    path, _ = miniature
    maps = {}
    for weights in (path, "none"):
        cfg = _tiny_config(weights)
        torch.manual_seed(0)
        model = build_model(cfg.model, num_classes=demo_split.num_train_pids)
        maps[str(weights)] = evaluate_model(model, demo_split, cfg, progress=False)["mAP"]
    # Measured on the demo's test split (30 ids, 4 cameras): zero-shot mAP 0.490 from the miniature,
    # 0.043 from random weights. The demo's recipe (500 steps): 0.746.
    assert maps[str(path)] > max(3 * maps["none"], maps["none"] + 0.15), maps


def test_two_stages_end_higher_from_the_miniature_than_from_random_weights(miniature, synth_root, tmp_path,
                                                                           one_thread):
    path, _ = miniature
    final = {}
    for weights in (path, "none"):
        cfg = method_config("baseline", [f"data.root={synth_root}", f"output_dir={tmp_path / str(weights)[-6:]}",
                                         f"model.pretrained={weights}", "model.quick_gelu=false", "device=cpu",
                                         "stage1.epochs=2", "stage2.epochs=4", "stage2.steps=[3]",
                                         "stage2.ims_per_batch=16"], base="tiny")
        final[str(weights)] = reidlib.train(cfg)["mAP"]
    # Measured (24 ids, 2 + 4 epochs, the tiny config's LRs): mAP 0.326 from the miniature, 0.145 from
    # random weights.
    assert final[str(path)] > final["none"] + 0.1, final

