"""Typed config: YAML chain, overrides, did-you-mean errors, round trip through a dict."""
import pytest

from reidlib.config import (
    Config,
    all_keys,
    config_diff,
    config_from_dict,
    help_text,
    load_config,
    to_dict,
)
from reidlib.methods import method_config


def test_defaults_are_the_reference_values():
    cfg = load_config("vit_clipreid")
    assert cfg.model.name == "ViT-B-16" and cfg.model.image_size == [256, 128]
    assert (cfg.model.prompt, cfg.model.n_per_id, cfg.model.depth) == ("clipreid", 4, 1)
    assert cfg.stage1.lr == 3.5e-4 and cfg.stage1.epochs == 120 and cfg.stage1.warmup_epochs == 5
    assert cfg.stage2.lr == 5e-6 and cfg.stage2.steps == [30, 50] and cfg.stage2.epochs == 60
    assert (cfg.stage2.id_weight, cfg.stage2.tri_weight, cfg.stage2.i2t_weight) == (0.25, 1.0, 1.0)
    assert cfg.model.neck_feat == "before" and not cfg.model.lora.enabled


def test_proposed_inherits_and_overrides():
    cfg = load_config("vit_proposed")
    assert (cfg.model.prompt, cfg.model.n_shared, cfg.model.n_per_id, cfg.model.depth) == ("deep", 2, 1, 9)
    assert cfg.model.lora.enabled and cfg.model.lora.r == 16 and cfg.model.lora.alpha == 4.0
    assert cfg.model.lora.rslora and cfg.stage1.lr == 5e-4
    assert cfg.stage2.lr == 5e-6  # inherited from the base file


def test_overrides_are_typed():
    cfg = load_config("tiny", ["stage2.epochs=3", "model.lora.lr=1e-4", "model.sie_camera=true",
                               "stage2.steps=[2, 3]", "model.image_size=[64,32]"])
    assert cfg.stage2.epochs == 3 and isinstance(cfg.stage2.epochs, int)
    assert cfg.model.lora.lr == 1e-4 and cfg.model.sie_camera is True
    assert cfg.stage2.steps == [2, 3] and cfg.model.image_size == [64, 32]


def test_unknown_key_names_the_closest():
    with pytest.raises(KeyError, match="did you mean 'stage2.epochs'"):
        load_config("tiny", ["stage2.epoch=3"])
    with pytest.raises(KeyError, match="did you mean 'model.lora.rslora'"):
        load_config(None, ["model.lora.rs_lora=false"])


def test_bad_values_are_one_line_errors():
    with pytest.raises(ValueError, match="wants a number"):
        load_config(None, ["stage1.lr=fast"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["stage1.lr"])
    with pytest.raises(ValueError, match="neck_feat"):
        load_config(None, ["model.neck_feat=middle"])
    with pytest.raises(FileNotFoundError, match="vit_clipreid"):
        load_config("no_such_config")


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stage2:\n  epoch: 3\n")
    with pytest.raises(KeyError, match="bad.yaml"):
        load_config(path)


def test_round_trip_through_dict():
    cfg = method_config("proposed", ["seed=7"], base="tiny")
    assert config_from_dict(to_dict(cfg)) == cfg


def test_methods_differ_only_in_what_they_name():
    base = method_config("baseline", base="tiny")
    prop = method_config("proposed", base="tiny")
    assert base.model.name == prop.model.name == "vit-tiny8"
    assert (base.model.prompt, prop.model.prompt) == ("clipreid", "deep")
    assert (base.model.lora.enabled, prop.model.lora.enabled) == (False, True)
    assert method_config("deep_only", base="tiny").model.lora.enabled is False
    assert method_config("lora_only", base="tiny").model.prompt == "clipreid"


def test_every_key_is_documented():
    keys = all_keys()
    assert len(keys) > 50
    assert all(text for _, text, _ in keys.values())
    assert "stage2.eval_period" in help_text()
    assert isinstance(Config().model.lora.targets, list)


@pytest.mark.parametrize("dataset, method, shipped", [("veri", "baseline", "vit_clipreid_veri"),
                                                      ("veri", "proposed", "vit_proposed_veri"),
                                                      ("vehicleid", "baseline", "vit_clipreid_vehicleid")])
def test_a_vehicle_sweep_run_uses_the_shipped_vehicle_config(dataset, method, shipped):
    from reidlib.experiments.sweep import run_config
    swept = to_dict(run_config(dataset, method, 1234, device="auto"))
    differ = config_diff(swept, to_dict(load_config(shipped)))
    assert differ == [f"output_dir: 'results/{dataset}/{method}/seed1234' (checkpoint) != "
                      f"'results/runs/{shipped}' (current)"]
    assert swept["model"]["class_token"] == "vehicle" and swept["model"]["image_size"] == [256, 256]
    person = to_dict(run_config("market1501", method, 1234))
    assert person["model"]["class_token"] == "person" and person["model"]["image_size"] == [256, 128]
