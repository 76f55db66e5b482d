"""reidlib's trained model as a folder (model.safetensors + config.json): exact round trip, the same
features as the legacy torch file, damage found by the hashes, atomic writes, and no pickle."""
import json
import os
import pickle

import pytest
import torch

from reidlib.config import load_config
from reidlib.methods.trained import convert_weights, load_trained_model
from reidlib.model import build_model
from reidlib.storage import CheckpointError, save_checkpoint
from reidlib.weights import (
    describe_weights,
    model_record,
    preprocessing,
    read_trained,
    read_weights,
    save_trained,
    trained_folder,
    weights_config,
)
from reidlib.weights import trained as trained_format

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGES = torch.randn(3, 3, 128, 64, generator=torch.Generator().manual_seed(3))
CAMS = torch.tensor([0, 2, 1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny model (LoRA, SIE, moved BN statistics) saved both ways: (folder, .pt, record, model)."""
    cfg = load_config("tiny", ["device=cpu", "model.lora.enabled=true", "model.sie_camera=true",
                               "data.test_interpolation=bilinear"])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=5, num_cameras=3).eval()
    with torch.no_grad():
        model.bottleneck.running_mean.normal_()
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()            # B = 0 at init: give LoRA an effect to lose
    record = model_record(model, cfg, 5, 3)
    record["metrics"] = {"mAP": 0.5, "rank1": 0.75}
    record["dataset_stats"] = {"train": {"ids": 5, "images": 20, "cameras": 3}}
    out = tmp_path_factory.mktemp("weights")
    legacy = save_checkpoint(out / "model_final.pt", record)
    card = {k: v for k, v in record.items() if k != "model"}
    folder = save_trained(out / "model", record["model"], card)
    return folder, legacy, record, model


def _features(path):
    model, _ = load_trained_model(path)
    with torch.no_grad():
        return model.encode_image(IMAGES, CAMS)


def test_round_trip_gives_equal_tensors_and_card(saved):
    folder, _, record, _ = saved
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    for path in (folder, folder / "config.json", folder / "model.safetensors"):
        state = read_trained(path)
        assert state["model"].keys() == record["model"].keys()
        for key, value in record["model"].items():
            assert torch.equal(state["model"][key], value) and state["model"][key].dtype == value.dtype, key
        card = json.loads(json.dumps({k: v for k, v in record.items() if k != "model"}))   # tuples -> lists
        assert {k: state[k] for k in card} == card
    written = json.loads((folder / "config.json").read_text())
    assert written["sha256"] == trained_format.file_sha256(folder / "model.safetensors")
    assert written["preprocessing"] == {"image_size": [128, 64], "pixel_mean": [0.5, 0.5, 0.5],
                                        "pixel_std": [0.5, 0.5, 0.5], "interpolation": "bilinear"}


def test_preprocessing_is_the_same_from_the_card_and_from_a_legacy_record(saved):
    folder, legacy, record, _ = saved
    assert preprocessing(read_trained(folder)) == preprocessing(read_trained(legacy)) == preprocessing(record)


def test_a_folder_gives_the_features_of_the_legacy_file(saved):
    folder, legacy, _, model = saved
    with torch.no_grad():
        expected = model.encode_image(IMAGES, CAMS)
    assert torch.equal(_features(folder), _features(legacy))
    assert torch.equal(_features(folder), expected)


def test_the_other_readers_accept_a_folder(saved, tmp_path):
    folder, legacy, _, _ = saved
    assert read_weights(folder)[0] == "reidlib" and trained_folder(folder / "config.json") == folder
    card = describe_weights(folder)
    assert card["format"].startswith("reidlib model folder") and card["identities"] == 5
    assert card["metrics"]["mAP"] == 0.5 and card["preprocessing"]["interpolation"] == "bilinear"
    assert weights_config(folder, ["model.neck_feat=after"]).model.neck_feat == "after"
    converted = convert_weights(legacy, tmp_path / "converted")          # no .pt suffix: a folder
    assert trained_folder(converted) == converted and torch.equal(_features(converted), _features(legacy))


def test_fine_tuning_starts_from_a_folder(saved):
    folder, _, record, _ = saved
    cfg = load_config("tiny", [f"model.pretrained={folder}", "model.sie_camera=true"])
    model = build_model(cfg.model, num_classes=2, num_cameras=3)
    key = "visual.vit.conv1.weight"
    assert torch.equal(model.state_dict()[key], record["model"][key])


def test_a_flipped_byte_in_the_weights_is_found(saved, tmp_path):
    folder = save_trained(tmp_path / "model", *_parts(saved))
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is damaged: its sha256 differs"):
        read_trained(folder)
    with pytest.raises(CheckpointError, match="is damaged"):
        load_trained_model(folder)


def test_an_edited_card_is_found(saved, tmp_path):
    folder = save_trained(tmp_path / "model", *_parts(saved))
    card = json.loads((folder / "config.json").read_text())
    card["num_classes"] = 6
    (folder / "config.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"config\.json is damaged"):
        read_trained(folder)
    (folder / "config.json").write_text("{\"format\": \"reidlib trained model\", ")
    with pytest.raises(CheckpointError, match=r"config\.json is damaged \(not JSON"):
        read_trained(folder)


def test_the_readme_is_the_card_and_a_folder_without_one_loads(saved, tmp_path):
    """README.md (the model card for hubs) is generated from config.json; nothing reads it, so a
    folder written before it existed loads the same."""
    from reidlib.weights.trained import model_card
    folder = save_trained(tmp_path / "model", *_parts(saved))
    assert (folder / "README.md").read_text() == model_card(json.loads((folder / "config.json").read_text()))
    assert "SIE: the features depend on a camera id (0..2)" in (folder / "README.md").read_text()
    before = _features(folder)
    (folder / "README.md").unlink()
    assert torch.equal(_features(folder), before) and read_trained(folder)["num_classes"] == 5


def test_a_legacy_file_still_loads(saved):
    _, legacy, record, _ = saved
    kind, state = read_weights(legacy)
    assert kind == "reidlib" and state["num_classes"] == 5 and trained_folder(legacy) is None
    assert all(torch.equal(state["model"][k], v) for k, v in record["model"].items())
    assert describe_weights(legacy)["format"] == "reidlib checkpoint"


def test_reading_a_folder_runs_no_pickle(saved, monkeypatch):
    folder, _, record, _ = saved

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used to read a model folder")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    state = read_trained(folder)
    assert torch.equal(state["model"]["classifier.weight"], record["model"]["classifier.weight"])
    model, _ = load_trained_model(folder)
    assert model.num_classes == 5


def test_a_failed_save_leaves_the_old_folder_whole(saved, tmp_path, monkeypatch):
    state_dict, card = _parts(saved)
    folder = save_trained(tmp_path / "model", state_dict, card)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(TypeError, match=r"card value card\.metrics\.mAP \(Tensor\) is not JSON"):
        save_trained(folder, state_dict, {**card, "metrics": {"mAP": torch.tensor(0.5)}})

    rename = os.rename

    def crash(src, dst):      # the old folder goes aside, then the new one fails to take its place
        if str(src).endswith(".tmp"):
            raise OSError("disk full")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="disk full"):
        save_trained(folder, state_dict, {**card, "num_classes": 5})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]        # no temp folder left behind
    again = save_trained(folder, state_dict, {**card, "dataset": "dukemtmc"})   # replacing works
    assert read_trained(again)["dataset"] == "dukemtmc" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_the_card_must_be_a_card(saved, tmp_path):
    state_dict, card = _parts(saved)
    with pytest.raises(ValueError, match="pass the state dict on its own"):
        save_trained(tmp_path / "m", state_dict, {**card, "model": state_dict})
    with pytest.raises(ValueError, match=r"lacks \['config'\]"):
        save_trained(tmp_path / "m", state_dict, {k: v for k, v in card.items() if k != "config"})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match="not a reidlib model folder"):
        read_trained(tmp_path / "other")


def _parts(saved):
    record = saved[2]
    return record["model"], {k: v for k, v in record.items() if k != "model"}
