"""Methods as plug-ins: the registry, the built-in methods' variants, and a method defined outside
the package (tests/plugins/plain_method.py) that trains, resumes, evaluates and sweeps through the
public API like the built-in ones."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import untrained_metrics

import reidlib
from reidlib.config import config_from_dict, load_config, to_dict
from reidlib.data import load_dataset
from reidlib.experiments import run_dir, run_sweep
from reidlib.methods import (
    get_method,
    load_plugins,
    method_config,
    method_names,
    run_label,
    variant_names,
)
from reidlib.storage import load_checkpoint

PLUGIN = Path(__file__).parent / "plugins" / "plain_method.py"
ROOT = Path(__file__).resolve().parents[1]


def plain_cfg(root, out, *extra):
    return method_config("plain", [f"plugins=[{PLUGIN}]", f"data.root={root}", f"output_dir={out}", "device=cpu",
                                   "stage2.epochs=4", "stage2.steps=[3]", "stage2.ims_per_batch=16",
                                   "stage2.checkpoint_period=1", *extra], base="tiny")


# --------------------------------------------------------------------------- registry and variants

def test_builtin_variants_are_the_thesis_table():
    assert method_names()[:2] == ["clipreid", "thesis"]
    assert {"baseline", "proposed", "deep_only", "lora_only", "clipreid", "thesis"} <= set(variant_names())
    settings = {}
    for variant in ["baseline", "proposed", "deep_only", "lora_only"]:
        cfg = method_config(variant, base="tiny")
        settings[variant] = (cfg.method, cfg.model.prompt, cfg.model.lora.enabled, run_label(cfg))
    assert settings == {"baseline": ("clipreid", "clipreid", False, "baseline"),
                        "proposed": ("thesis", "deep", True, "proposed"),
                        "deep_only": ("thesis", "deep", False, "deep_only"),
                        "lora_only": ("thesis", "clipreid", True, "lora_only")}
    # at full scale each variant starts from its own YAML: LoRA alone keeps CLIP-ReID's stage-1 LR
    assert method_config("lora_only").stage1.lr == 3.5e-4 and method_config("proposed").stage1.lr == 5e-4


def test_clipreid_refuses_the_thesis_settings_before_writing_anything(tmp_path):
    cfg = load_config("tiny", ["model.prompt=deep", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="model.prompt=deep is the thesis's addition.*method=thesis"):
        reidlib.train(cfg)
    assert not (tmp_path / "run").exists()


def test_an_unknown_method_or_option_is_one_line_with_a_hint(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'thesys': did you mean 'thesis'"):
        reidlib.train(load_config("tiny", ["method=thesys", f"output_dir={tmp_path}"]))
    load_plugins([PLUGIN])
    cfg = load_config("tiny", ["method=plain", "options.margn=0.5"])
    with pytest.raises(ValueError, match="options.margn is not a setting of method plain; did you mean options.margin"):
        get_method("plain").check(cfg)
    cfg = load_config("tiny", ["method=plain", "options.margin=abc"])
    with pytest.raises(ValueError, match="options.margin' wants a number"):
        get_method("plain").check(cfg)
    assert get_method("plain").options(load_config("tiny", ["method=plain", "options.margin=0.5"])).margin == 0.5


def test_configs_saved_before_methods_existed_name_their_method():
    proposed = to_dict(method_config("proposed", base="tiny"))
    del proposed["method"]
    assert config_from_dict(proposed).method == "thesis"
    baseline = to_dict(method_config("baseline", base="tiny"))
    del baseline["method"], baseline["plugins"], baseline["options"]
    assert config_from_dict(baseline).method == "clipreid"


@pytest.mark.slow
def test_methods_command_lists_one_line_each():
    out = subprocess.run([sys.executable, "-m", "reidlib", "methods", "--plugins", str(PLUGIN)],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout.splitlines()
    assert [line.split()[0] for line in out] == ["clipreid", "thesis", "pcl", "promptsg", "plain"]
    assert "[proposed, deep_only, lora_only]" in out[1]
    detail = subprocess.run([sys.executable, "-m", "reidlib", "methods", "plain", "--plugins", str(PLUGIN)],
                            capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "stage 1: image encoder" in detail and "options.margin = 0.3" in detail


# --------------------------------------------------------------------------- a plug-in, end to end


def test_a_plugin_method_learns_resumes_bit_identically_and_reloads(synth_root, tmp_path, train_killed_in_epoch,
                                                                    one_thread):
    straight_cfg = plain_cfg(synth_root, tmp_path / "straight")
    dataset = load_dataset("market1501", synth_root)
    before = untrained_metrics(straight_cfg, dataset)
    straight = reidlib.train(straight_cfg)
    assert straight["mAP"] > before["mAP"] + 0.05, (before["mAP"], straight["mAP"])

    summary = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert summary["method"] == "plain"
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "loss" in r]
    assert [(r["stage"], r["epoch"]) for r in epochs] == [(1, 1), (1, 2), (1, 3), (1, 4)]
    assert {"id_loss", "tri_loss"} <= set(epochs[0])

    stage_class = type(get_method("plain").stages(straight_cfg)[0])
    resumed_cfg = plain_cfg(synth_root, tmp_path / "resumed")
    train_killed_in_epoch(resumed_cfg, stage_class, 2)
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint_*.pt")) == ["checkpoint_stage1_e002.pt"]
    assert reidlib.train(resumed_cfg) == straight
    a = load_checkpoint(tmp_path / "straight" / "checkpoint_stage1_e004.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint_stage1_e004.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # the trained model comes back through the registry and tests to the same numbers
    tested = reidlib.test(plain_cfg(synth_root, tmp_path / "tested"), weights=str(final_model(tmp_path / "straight")))
    assert tested["mAP"] == pytest.approx(straight["mAP"], abs=1e-6)


def final_model(run: Path) -> Path:
    """The run's trained model: the model folder, or model_final.pt as reidlib 0.2 wrote it."""
    return run / "model" if (run / "model").is_dir() else run / "model_final.pt"


@pytest.mark.slow
def test_a_plugin_method_runs_in_a_sweep(synth_root, tmp_path):
    """train_eval.ipynb in its own kernel imports the plug-in from the run's config."""
    root = tmp_path / "results"
    report = run_sweep(["market1501"], ["plain"], [0], data_roots=str(synth_root), results_root=root,
                       base_config="tiny", device="cpu", compare_notebook=None, echo=lambda text: None,
                       overrides=[f"plugins=[{PLUGIN}]", "stage2.epochs=1", "stage2.steps=[1]",
                                  "stage2.ims_per_batch=16"])
    assert report.ok and len(report.ran) == 1
    metrics = json.loads((run_dir(root, "market1501", "plain", 0) / "metrics.json").read_text())
    assert metrics["method"] == "plain" and 0 < metrics["mAP"] <= 1


def test_runs_saved_before_the_new_keys_resume_and_are_reused(tmp_path):
    """A 0.2 checkpoint or finished run has no method, plugins, options, tf32 or deterministic key:
    those take their defaults (and the method is inferred), so it resumes and is reused."""
    import yaml

    from reidlib.engine.checkpoint import check_config_match
    from reidlib.experiments.sweep import finished_run_diff
    current = to_dict(method_config("proposed", base="tiny"))
    old = {k: v for k, v in current.items() if k not in ("method", "plugins", "options", "tf32", "deterministic")}
    old["test"] = {k: v for k, v in current["test"].items() if k != "tf32"}
    check_config_match(old, current)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert finished_run_diff(tmp_path, current) == []
    changed = {**old, "seed": 99}
    with pytest.raises(ValueError, match="seed"):
        check_config_match(changed, current)


def test_a_model_folder_gives_stage1_prompts_and_converts_with_its_card(tiny_trained, tmp_path):
    """stage1_weights= takes a run's model folder; convert keeps the source's metrics, statistics
    and method, and refuses weights that are not finite."""
    from reidlib.methods.clipreid import load_stage1_prompts
    from reidlib.methods.trained import convert_weights, load_trained_model
    from reidlib.weights import read_trained
    cfg, out = tiny_trained
    model, _ = load_trained_model(out / "model")
    source = read_trained(out / "model")["model"]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("prompts."):
                param.zero_()
    load_stage1_prompts(model, str(out / "model"))
    assert all(torch.equal(p, source[n]) for n, p in model.named_parameters() if n.startswith("prompts."))

    card = read_trained(convert_weights(out / "model", tmp_path / "copy"))
    original = read_trained(out / "model")
    assert card["metrics"] == original["metrics"] and card["dataset_stats"] == original["dataset_stats"]
    assert card["method"] == "baseline"
    broken = read_trained(out / "model")
    next(v for v in broken["model"].values() if v.is_floating_point()).fill_(float("nan"))
    from reidlib.optim import NonFiniteError
    from reidlib.storage import save_checkpoint
    save_checkpoint(tmp_path / "nan.pt", broken)
    with pytest.raises(NonFiniteError, match="not finite|non-finite|NaN|nan"):
        convert_weights(tmp_path / "nan.pt", tmp_path / "nan_copy.pt")
    assert not (tmp_path / "nan_copy.pt").exists()
