"""PromptSG (reidlib/methods/promptsg.py, reidlib/model/promptsg.py): the contrastive loss worked by
hand, gradients through the frozen text tower, the trainable set and its size, the cached
simplified prompt, learning, bit-identical resume, the extractor and ONNX, vehicle data."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch
from conftest import untrained_metrics

import reidlib
from reidlib.config import CONFIG_DIR
from reidlib.data import load_dataset
from reidlib.methods import get_method, method_config, variant_names
from reidlib.methods.promptsg import PromptSGLoss, PromptSGStage, symmetric_supcon
from reidlib.model.promptsg import new_module_parameters, vit_tokens
from reidlib.storage import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
METHOD = get_method("promptsg")
# tiny's schedule, shortened: 8 epochs on the 12 training identities of synth_root take ~7 s
SHORT = ["device=cpu", "stage2.epochs=8", "stage2.steps=[7]", "stage2.ims_per_batch=16", "stage2.checkpoint_period=1"]


def tiny_model(*overrides, num_classes=5, seed=0):
    cfg = method_config("promptsg", ["device=cpu", *overrides], base="tiny")
    METHOD.check(cfg)
    torch.manual_seed(seed)
    return METHOD.build_model(cfg, num_classes), cfg


def images(n=8, seed=1):
    return torch.randn(n, 3, 128, 64, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- (a) the loss

@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_symmetric_supcon_against_a_hand_computed_case(tau):
    """Images v = (3,0), (0,1), (2,2) with labels 0, 0, 1; prompts t = (1,0), (1,0), (0,1).
    After L2 normalisation the cosines are v1: [1, 1, 0], v2: [0, 0, 1], v3: [c, c, c] with
    c = 1/sqrt(2); logits are cosines x k, k = 1/tau.

    image -> text (positives: the texts of the row's label)
      v1: positives t1, t2 (both cosine 1):  -(k - log(2e^k + 1))
      v2: positives t1, t2 (both cosine 0):  -(0 - log(2 + e^k))
      v3: positive t3, all cosines equal:    -(ck - log(3e^ck)) = log 3
    text -> image (columns: v1, v2, v3)
      t1, t2: cosines [1, 0, c], positives v1, v2: -((k + 0)/2 - log(e^k + 1 + e^ck)), twice
      t3: cosines [0, 1, c], positive v3:          -(ck - log(1 + e^k + e^ck))
    Each loss is the mean over its three rows; the two differ."""
    k, c = 1 / tau, 1 / math.sqrt(2)
    i2t = ((math.log(2 * math.exp(k) + 1) - k) + math.log(2 + math.exp(k)) + math.log(3)) / 3
    lse = math.log(math.exp(k) + 1 + math.exp(c * k))
    t2i = (2 * (lse - k / 2) + (lse - c * k)) / 3
    v = torch.tensor([[3.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    got_i2t, got_t2i = symmetric_supcon(v, t, labels, temperature=tau)
    assert got_i2t.item() == pytest.approx(i2t, abs=1e-6) and got_t2i.item() == pytest.approx(t2i, abs=1e-6)
    assert abs(i2t - t2i) > 0.008         # the directions differ here (by 0.0089 at tau 1), far beyond 1e-6
    # swapping the sides swaps the directions
    back_t2i, back_i2t = symmetric_supcon(t, v, labels, temperature=tau)
    assert back_i2t.item() == pytest.approx(i2t, abs=1e-6) and back_t2i.item() == pytest.approx(t2i, abs=1e-6)


def test_total_loss_is_eq_10():
    """tri_weight x TRI + id_weight x ID + supcon_weight x (i2t + t2i), with the parts it logs."""
    model, cfg = tiny_model("stage2.id_weight=0.7", "stage2.tri_weight=0.2", "options.supcon_weight=0.5")
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = model(images())
    loss = PromptSGLoss(cfg, METHOD.options(cfg))
    total, parts = loss(out, pids)
    assert set(parts) == {"id", "tri", "i2t", "t2i"}
    expected = 0.7 * parts["id"] + 0.2 * parts["tri"] + 0.5 * (parts["i2t"] + parts["t2i"])
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    i2t, t2i = symmetric_supcon(out["f_proj"], out["text"], pids, temperature=cfg.options["temperature"])
    assert parts["i2t"].item() == pytest.approx(i2t.item()) and parts["t2i"].item() == pytest.approx(t2i.item())


# --------------------------------------------------------------------------- (b) gradients

def test_gradients_reach_the_inversion_network_through_the_frozen_text_tower():
    model, cfg = tiny_model()
    params = dict(PromptSGStage(METHOD.options(cfg)).trainable(model))
    assert not any(n.startswith("text.") for n in params)
    out = model.train()(images())
    # the contrastive loss alone: it reaches the inversion network only through the text tower
    i2t, t2i = symmetric_supcon(out["f_proj"], out["text"], torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    (i2t + t2i).backward()
    inversion = {n: p.grad for n, p in model.named_parameters() if n.startswith("inversion.")}
    assert inversion and all(g is not None and g.abs().sum() > 0 for g in inversion.values())
    text = [(n, p) for n, p in model.named_parameters() if n.startswith("text.")]
    assert text and all(not p.requires_grad and p.grad is None for _, p in text)
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("mim."))   # not on this path


# --------------------------------------------------------------------------- (c) trainable set, sizes

def test_trainable_set_parameter_counts_and_learning_rates():
    model, cfg = tiny_model()
    stage = PromptSGStage(METHOD.options(cfg))
    params = stage.trainable(model)
    names = {n for n, _ in params}
    count = lambda prefix: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))  # noqa: E731
    heads = {"bottleneck.weight", "bottleneck_proj.weight", "classifier.weight", "classifier_proj.weight"}
    expected = {n for n, _ in model.named_parameters() if n.startswith(("visual.", "inversion.", "mim."))} | heads
    assert names == expected                       # never the text tower, never the BNNeck biases
    width, embed, token_width, classes = 64, 32, 64, 5       # vit-tiny8: ViT width, joint space, text width
    new = count("inversion.") + count("mim.")
    assert new == new_module_parameters(embed, token_width) == 342_144
    assert sum(p.numel() for _, p in params) == count("visual.") + new + (width + embed) * (1 + classes)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("text."))
    # ViT-B/16 (joint space 512, token width 512): the paper's 94M - CLIP-ReID's 89M puts them at ~5-8M
    assert new_module_parameters(512, 512) == 8_144_384
    optimizer = stage.optimizer(params, SimpleNamespace(cfg=cfg))
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    lr, factor = cfg.stage2.lr, cfg.stage2.bias_lr_factor
    assert lrs == pytest.approx(sorted({lr, lr * factor, 10 * lr, 10 * lr * factor}))
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert grouped == {id(p) for _, p in params}


def test_shipped_config_is_the_papers_schedule_and_sweeps():
    cfg = method_config("promptsg")
    s, o = cfg.stage2, cfg.options
    assert (cfg.method, cfg.model.name, list(cfg.model.image_size)) == ("promptsg", "ViT-B-16", [256, 128])
    assert (s.epochs, s.steps, s.gamma, s.ims_per_batch, s.num_instance) == (60, [20, 40], 0.1, 64, 4)
    assert s.lr == 5e-6 and s.lr * o["new_lr_factor"] == pytest.approx(5e-5) and o["supcon_weight"] == 0.5
    lines = [line for line in (CONFIG_DIR / "vit_promptsg.yaml").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":")]
    assert all("#" in line for line in lines if not line.startswith(("method", "output_dir"))), lines
    assert "promptsg" in variant_names()
    from reidlib.experiments.sweep import run_config
    tiny = run_config("market1501", "promptsg", 0, base_config="tiny")
    assert tiny.method == "promptsg" and tiny.model.name == "vit-tiny8" and tiny.options["blocks"] == 2
    METHOD.check(tiny)


@pytest.mark.parametrize("override, message", [
    ("options.reweight=sum", "options.reweight=sum: use scale or none"),
    ("options.temperature=0", "options.temperature=0.0 is out of range"),
    ("model.sie_camera=true", "model.sie_camera=true: PromptSG .* set model.sie_camera=false"),
    ("model.lora.enabled=true", "model.lora.enabled=true: PromptSG"),
    ("model.prompt=deep", "model.prompt=deep: PromptSG learns no prompt vectors"),
    ("options.tempreature=1", "did you mean options.temperature"),
])
def test_settings_it_cannot_train_with_are_one_line(override, message):
    cfg = method_config("promptsg", [override], base="tiny")
    with pytest.raises(ValueError, match=message) as err:
        METHOD.check(cfg)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- (d) the cached prompt

def test_simplified_prompt_feature_equals_a_recomputation_and_composed_differs():
    model, cfg = tiny_model()
    model.eval()
    x = images(4)
    with torch.no_grad():
        feats = model.encode_image(x)
        # from scratch: CLIP's own text path (no injections, open_clip's tokenizer), then the MIM
        tokens = open_clip.tokenize(["A photo of a person."])
        text = model.text(tokens, cut_after_eot=False)
        _, f, _, patches = vit_tokens(model.visual, x)
        mim = model.mim(text.expand(4, -1), patches)[-1]
        assert torch.allclose(feats, torch.cat([f, mim], dim=1), atol=1e-6)
        # ReIDViT's own outputs are untouched and are what the PromptSG model reads
        assert all(torch.equal(a, b) for a, b in zip(model.visual(x), vit_tokens(model.visual, x)[:3]))
        # the cache follows the weights: a model built from another seed takes these weights and their prompt
        other, _ = tiny_model(seed=1)
        assert not torch.allclose(other.prompt_text, model.prompt_text)
        other.load_state_dict(model.state_dict())
        assert torch.equal(other.prompt_text, model.prompt_text)
        assert "prompt_text" not in model.state_dict()
        assert torch.equal(other.eval().encode_image(x), feats)
        model.test_prompt = "composed"
        composed = model.encode_image(x)
    assert composed.shape == feats.shape and not torch.allclose(composed, feats, atol=1e-3)
    with pytest.raises(ValueError, match="do not fit this PromptSG model: 1 unexpected key"):
        other.load_state_dict({**model.state_dict(), "extra": torch.zeros(1)})


def test_rn50_gives_patch_tokens_through_the_attention_pool():
    model, cfg = tiny_model("model.name=rn-tiny")
    out = model.train()(images())
    total, _ = PromptSGLoss(cfg, METHOD.options(cfg))(out, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    total.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("inversion."))
    assert model.eval().encode_image(images(2)).shape == (2, model.feature_dim) and model.feature_dim == 256 + 32


# --------------------------------------------------------------------------- (e, f) learning and resume

@pytest.fixture(scope="module")
def straight(synth_root, tmp_path_factory):
    """(cfg, run folder, mAP before training, final metrics) of tiny PromptSG, 8 epochs."""
    out = tmp_path_factory.mktemp("promptsg_straight")
    cfg = method_config("promptsg", [f"data.root={synth_root}", f"output_dir={out}", *SHORT], base="tiny")
    dataset = load_dataset("market1501", synth_root)
    before = untrained_metrics(cfg, dataset)["mAP"]
    return cfg, out, before, reidlib.train(cfg)


@pytest.mark.slow
def test_promptsg_learns_on_the_generated_data(straight):
    cfg, out, before, metrics = straight
    # measured: 0.115 -> 0.27 (random-init tiny CLIP, 12 identities, 8 epochs)
    assert metrics["mAP"] > before + 0.08, (before, metrics["mAP"])
    assert reidlib.methods.run_label(cfg) == "promptsg"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "loss" in r]
    assert len(epochs) == 8 and {"id", "tri", "i2t", "t2i"} <= set(epochs[0])


@pytest.mark.slow
def test_promptsg_resumes_bit_identically(straight, synth_root, tmp_path, train_killed_in_epoch):
    cfg, out, _, metrics = straight
    resumed = method_config("promptsg", [f"data.root={synth_root}", f"output_dir={tmp_path}", *SHORT], base="tiny")
    train_killed_in_epoch(resumed, PromptSGStage, 3)
    assert [p.name for p in tmp_path.glob("checkpoint_*.pt")] == ["checkpoint_stage1_e003.pt"]
    assert reidlib.train(resumed) == metrics
    a = load_checkpoint(out / "checkpoint_stage1_e008.pt")
    b = load_checkpoint(tmp_path / "checkpoint_stage1_e008.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])


# --------------------------------------------------------------------------- (g) extractor and ONNX

@pytest.mark.slow
def test_trained_model_loads_in_the_extractor_and_exports_image_only(straight, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="install the export extra: pip install 'reidlib[export]'")
    import onnx
    from test_export import _relative

    from reidlib.export import export_model
    _, out, _, _ = straight
    x = images(5, seed=3)
    model, _ = reidlib.load_trained_model(out / "model")
    with torch.no_grad():
        expected = model.encode_image(x)
    extracted = reidlib.FeatureExtractor(out / "model", device="cpu")(x)
    assert torch.allclose(extracted, expected, atol=1e-5)
    path = export_model(out / "model", tmp_path / "promptsg.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    features = session.run(["features"], {"images": x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(features), expected, atol=1e-5), _relative(features, expected)
    # the simplified prompt is a constant of the graph: no text tower (its 49408-token table) inside
    shapes = [tuple(i.dims) for i in onnx.load(str(path)).graph.initializer]
    assert not any(49408 in s for s in shapes)


# --------------------------------------------------------------------------- vehicles

@pytest.mark.slow
def test_camera_less_vehicle_data_trains_with_the_vehicle_prompt(tmp_path):
    from reidlib.demo.synth import generate_vehicleid
    root = generate_vehicleid(tmp_path / "VehicleID_V1.0", train_ids=12, test_ids=10, seed=3)
    cfg = method_config("promptsg", [f"data.root={root}", f"output_dir={tmp_path / 'run'}", "device=cpu",
                                     "data.dataset=vehicleid", "test.trials=2", "model.class_token=vehicle",
                                     "stage2.epochs=1", "stage2.ims_per_batch=16"], base="tiny")
    metrics = reidlib.train(cfg)
    assert metrics["num_trials"] == 2 and 0 < metrics["mAP"] <= 1
    model, _ = reidlib.load_trained_model(tmp_path / "run" / "model")
    vehicle = open_clip.tokenize(["A photo of a vehicle."])[0, :model.simple_eot + 1]
    assert torch.equal(model.simple_tokens[0], vehicle) and model.uses_sie is False
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_tiny_config_differs_from_the_full_scale_one_in_the_temperature_alone():
    """tiny_promptsg.yaml (what base="tiny" reads for this method) keeps vit_promptsg's options but
    the contrastive temperature, which it states why it changes."""
    full, small = method_config("promptsg").options, method_config("promptsg", base="tiny").options
    assert {k: v for k, v in small.items() if full.get(k) != v} == {"temperature": 0.5}
    assert set(small) == set(full)


@pytest.mark.slow
def test_torchrun_two_processes_train_promptsg(synth_root, tmp_path):
    """Under torchrun (2 CPU processes, gloo) PromptSG's one stage trains through DDP: the frozen text
    tower inside the model must not break DDP's gradient bookkeeping, and rank 0 writes the run."""
    out = tmp_path / "ddp"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "reidlib", "train", "tiny_promptsg", f"data.root={synth_root}", f"output_dir={out}",
         "device=cpu", "stage2.epochs=1", "stage2.ims_per_batch=16"],
        cwd=Path(__file__).resolve().parents[1], env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records if "loss" in r] == [1] and records[0]["steps"] > 0
    assert json.loads((out / "metrics.json").read_text())["method"] == "promptsg"
