"""State dicts in the CLIP-ReID reference's layout load and give the source model's features.

The writer here maps a reidlib model to the reference's key names and tensor layout on its own
(from the reference's modules: fused ``attn.in_proj_weight``, ``cv_embed``, ``prompt_learner.*``,
the thesis's ``attn.{q,k,v}_proj``/``attn.proj`` with ``w_lora_A``/``w_lora_B``), independently of
reidlib.weights.reference, so a converter bug cannot cancel itself out.
"""
import logging

import open_clip
import pytest
import torch

from reidlib.config import load_config
from reidlib.methods.trained import load_trained_model
from reidlib.model import build_model, merge_lora
from reidlib.storage import save_checkpoint
from reidlib.weights import describe_weights
from reidlib.weights.reference import convert_reference

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGES = torch.randn(3, 3, 128, 64, generator=torch.Generator().manual_seed(1))
CAMS = torch.tensor([0, 2, 1])
VIEWS = torch.tensor([7, 0, 5])       # VeRi's 8 orientations
REF_TEMPLATE = {"clipreid": "A photo of a X X X X person.", "deep": "A photo of a Y Y X person."}


# --------------------------------------------------------------------------- the independent writer

def _linear(out: dict, key: str, linear) -> None:
    out[f"{key}.weight"] = linear.weight.detach().clone()
    if linear.bias is not None:
        out[f"{key}.bias"] = linear.bias.detach().clone()


def _ln(out: dict, key: str, norm) -> None:
    out[f"{key}.weight"], out[f"{key}.bias"] = norm.weight.detach().clone(), norm.bias.detach().clone()


def _thesis_projection(out: dict, key: str, proj) -> None:
    """A thesis LinearLoRA: the frozen weight and bias, plus w_lora_A / w_lora_B when adapted."""
    base = getattr(proj, "base_layer", proj)
    _linear(out, key, base)
    if hasattr(proj, "lora_A"):
        out[f"{key}.w_lora_A"] = proj.lora_A["default"].weight.detach().clone()
        out[f"{key}.w_lora_B"] = proj.lora_B["default"].weight.detach().clone()


def _reference_vit(model, thesis_attention: bool) -> dict:
    vit, out = model.visual.vit, {}
    p = "image_encoder."
    out[p + "conv1.weight"] = vit.conv1.weight.detach().clone()
    out[p + "class_embedding"] = vit.class_embedding.detach().clone()
    out[p + "positional_embedding"] = vit.positional_embedding.detach().clone()   # already the re-ID grid
    out[p + "proj"] = vit.proj.detach().clone()
    _ln(out, p + "ln_pre", vit.ln_pre)
    _ln(out, p + "ln_post", vit.ln_post)
    any_lora = any(".lora_A." in k for k in vit.state_dict())
    for i, block in enumerate(vit.transformer.resblocks):
        b = f"{p}transformer.resblocks.{i}."
        adapted = any(hasattr(getattr(block.attn, n), "lora_A") for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
        _ln(out, b + "ln_1", block.ln_1)
        _ln(out, b + "ln_2", block.ln_2)
        for name in ("c_fc", "c_proj"):
            _thesis_projection(out, f"{b}mlp.{name}", getattr(block.mlp, name))
        attn = block.attn
        # The thesis swaps in PlainMultiheadAttentionLoRA (q_proj, k_proj, v_proj, proj) in the blocks
        # it adapts; the others keep nn.MultiheadAttention. A merged export has split Linears throughout.
        if thesis_attention and (adapted or not any_lora):
            for ours in ("q_proj", "k_proj", "v_proj", "out_proj"):
                theirs = "proj" if ours == "out_proj" else ours
                _thesis_projection(out, f"{b}attn.{theirs}", getattr(attn, ours))
        else:                       # nn.MultiheadAttention: q, k, v stacked in one matrix
            out[b + "attn.in_proj_weight"] = torch.cat([attn.q_proj.weight, attn.k_proj.weight,
                                                        attn.v_proj.weight]).detach().clone()
            out[b + "attn.in_proj_bias"] = torch.cat([attn.q_proj.bias, attn.k_proj.bias,
                                                      attn.v_proj.bias]).detach().clone()
            _linear(out, b + "attn.out_proj", attn.out_proj)
    return out


def _reference_state(model, prompt: str, thesis_attention: bool = False, sie: bool = False,
                     with_text: bool = True) -> dict:
    """``build_transformer(...).state_dict()`` of the reference holding ``model``'s weights."""
    if hasattr(model.visual, "vit"):
        out = _reference_vit(model, thesis_attention)
    else:                           # ModifiedResNet: the reference's and open_clip's names agree
        out = {f"image_encoder.{k}": v.clone() for k, v in model.visual.resnet.state_dict().items()}
    if with_text:
        text = model.text
        out["text_encoder.positional_embedding"] = text.positional_embedding.detach().clone()
        out["text_encoder.text_projection"] = text.text_projection.detach().clone()
        _ln(out, "text_encoder.ln_final", text.ln_final)
        out.update({f"text_encoder.transformer.{k}": v.clone() for k, v in text.transformer.state_dict().items()})
        tokens = open_clip.tokenize([REF_TEMPLATE[prompt]])
        with torch.no_grad():
            embedding = text.token_embedding(tokens)
        slots = 4 if prompt == "clipreid" else 3
        out["prompt_learner.token_prefix"] = embedding[:, :5].clone()
        out["prompt_learner.token_suffix"] = embedding[:, 5 + slots:].clone()
        prompts = model.prompts
        if prompt == "clipreid":
            out["prompt_learner.cls_ctx"] = prompts.per_id.detach().clone()
        else:
            out["prompt_learner.cls_vector"] = prompts.shared.detach().clone()
            out["prompt_learner.cls_ctx_per_id"] = prompts.per_id.detach().clone()
            for k in range(prompts.depth - 1):
                out[f"prompt_learner.compound_prompts_text.{k}"] = prompts.deep_shared[k].detach().clone()
                out[f"prompt_learner.compound_per_id_prompts_text.{k}"] = prompts.deep_per_id[k].detach().clone()
            out["logit_scale"] = torch.tensor(4.6052)
    for name in ("bottleneck", "bottleneck_proj"):
        out.update({f"{name}.{k}": v.clone() for k, v in getattr(model, name).state_dict().items()})
    out["classifier.weight"] = model.classifier.weight.detach().clone()
    out["classifier_proj.weight"] = model.classifier_proj.weight.detach().clone()
    if sie:
        out["cv_embed"] = model.sie_embed.detach().clone()
    return {f"module.{k}" if thesis_attention else k: v for k, v in out.items()}   # DataParallel prefix too


# --------------------------------------------------------------------------- sources

def _source(*overrides, classes=7, cameras=3, views=8):
    cfg = load_config("tiny", list(overrides))
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=classes, num_cameras=cameras, num_views=views)
    with torch.no_grad():              # trained-looking weights: LoRA B non-zero, BN statistics moved
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn_like(param) * 0.05)
        for bn in (model.bottleneck, model.bottleneck_proj):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
    return cfg, model.eval()


def _features(model, cams=None, views=None):
    with torch.no_grad():
        return model.encode_image(IMAGES, cams, views)


def _relative(a, b):
    return float((a - b).norm() / b.norm())


DEEP = ["model.prompt=deep", "model.n_shared=2", "model.n_per_id=1", "model.depth=9"]
CASES = {
    "vit": ([], dict(prompt="clipreid")),
    "vit_sie_olp": (["model.sie_camera=true", "model.stride=6", "model.sie_coe=1.0"],
                    dict(prompt="clipreid", sie=True)),
    "vit_sie_views": (["model.sie_camera=true", "model.sie_view=true"], dict(prompt="clipreid", sie=True)),
    "rn": (["model.name=rn-tiny"], dict(prompt="clipreid")),
    "thesis_deep": (DEEP, dict(prompt="deep", thesis_attention=True)),
    "thesis_lora_ab": ([*DEEP, "model.lora.enabled=true", "model.lora.blocks=1,2"],
                       dict(prompt="deep", thesis_attention=True)),
    "thesis_lora_mlp": ([*DEEP, "model.lora.enabled=true", "model.lora.targets=[q,v,mlp]"],
                        dict(prompt="deep", thesis_attention=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reference_state_dict_gives_the_source_features(case, tmp_path, caplog):
    overrides, layout = CASES[case]
    cfg, model = _source(*overrides)
    path = tmp_path / "ref.pth"
    torch.save(_reference_state(model, **layout), path)
    # The config supplies only what the file cannot tell: here the tiny input size (stride left at 0:
    # the SIE+OLP case must read stride 6 off the positional embedding) and the SIE coefficient.
    test_cfg = load_config("tiny", ["model.sie_coe=1.0"] if case == "vit_sie_olp" else [])
    if case == "vit_sie_views":       # a joint table [cameras x 8 views] reads as cameras only unless told
        camera_only = convert_reference(_reference_state(model, **layout), test_cfg.model)
        assert (camera_only.num_cameras, camera_only.num_views) == (24, 0)
        test_cfg = load_config("tiny", ["model.sie_camera=true", "model.sie_view=true"])
    if "rn" in case:
        test_cfg = load_config("tiny", ["model.name=rn-tiny"])
    with caplog.at_level(logging.INFO, logger="reidlib"):
        loaded, used = load_trained_model(path, test_cfg)
    cams = CAMS if layout.get("sie") else None
    views = VIEWS if case == "vit_sie_views" else None
    assert _relative(_features(loaded, cams, views), _features(model, cams, views)) <= 1e-5
    labels = torch.tensor([0, 6, 3])
    with torch.no_grad():            # the text side (prompts, rebuilt token rows) too
        assert _relative(loaded.encode_text(labels), model.encode_text(labels)) <= 1e-5
    assert used.model.prompt == cfg.model.prompt and loaded.num_classes == 7
    assert used.model.lora.enabled == cfg.model.lora.enabled
    log = [r.getMessage() for r in caplog.records if "ref.pth: detected" in r.getMessage()]
    assert len(log) == 1 and "from the config" in log[0]          # one line: what was read, what assumed
    if case == "rn":                  # the tiny config normalises with 0.5, not the reference's RN50 statistics
        assert any("ref.pth: a ResNet model read with data.pixel_mean" in r.getMessage() for r in caplog.records)
    if case == "vit_sie_olp":
        assert used.model.stride == 6 and "model.sie_coe=1.0" in log[0] and "SIE cameras 3" in log[0]
    if case == "vit_sie_views":
        assert (loaded.sie_cameras, loaded.sie_views) == (3, 8) and "SIE cameras x views 3 x 8" in log[0]
    if case == "thesis_lora_ab":
        assert used.model.lora.blocks == "1,2" and used.model.lora.r == 16 and "model.lora.alpha=4.0" in log[0]
    if case == "thesis_lora_mlp":
        assert used.model.lora.targets == ["q", "v", "mlp"]


def test_merged_thesis_lora_loads_as_plain_weights(tmp_path):
    cfg, model = _source(*DEEP, "model.lora.enabled=true")
    expected = _features(model)
    merge_lora(model)
    torch.save(_reference_state(model, "deep", thesis_attention=True), tmp_path / "merged.pth")
    loaded, used = load_trained_model(tmp_path / "merged.pth", load_config("tiny"))
    assert not used.model.lora.enabled and not loaded.uses_lora
    assert _relative(_features(loaded), expected) <= 1e-5
    assert describe_weights(tmp_path / "merged.pth", load_config("tiny"))["LoRA"].startswith("merged")


def test_baseline_make_model_file_without_text_gives_image_features(tmp_path):
    cfg, model = _source("model.sie_camera=true")
    torch.save(_reference_state(model, "clipreid", sie=True, with_text=False), tmp_path / "base.pth")
    loaded, _ = load_trained_model(tmp_path / "base.pth", load_config("tiny"))
    assert _relative(_features(loaded, CAMS), _features(model, CAMS)) <= 1e-5
    card = describe_weights(tmp_path / "base.pth", load_config("tiny"))
    assert card["text encoder"].startswith("absent") and card["SIE cameras"] == 3


def test_what_the_file_cannot_tell_is_checked(tmp_path):
    _, model = _source()
    torch.save(_reference_state(model, "clipreid"), tmp_path / "ref.pth")
    with pytest.raises(ValueError, match=r"128 patch positions.*model.image_size"):
        load_trained_model(tmp_path / "ref.pth", load_config("tiny", ["model.image_size=[256,128]"]))
    with pytest.raises(ValueError, match="model.stride=4 gives"):
        load_trained_model(tmp_path / "ref.pth", load_config("tiny", ["model.stride=4"]))


def test_unknown_keys_and_lora_without_base_weight_are_refused(tmp_path):
    _, model = _source()
    state = _reference_state(model, "clipreid")
    save_checkpoint(tmp_path / "odd.pth", {**state, "head.fc.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="head.fc.weight"):
        load_trained_model(tmp_path / "odd.pth", load_config("tiny"))
    cfg, lora_model = _source(*DEEP, "model.lora.enabled=true")
    state = _reference_state(lora_model, "deep", thesis_attention=True)
    del state["module.image_encoder.transformer.resblocks.0.attn.q_proj.weight"]  # the dropout-0 bug
    torch.save(state, tmp_path / "lost.pth")
    with pytest.raises(ValueError, match="no base weight"):
        load_trained_model(tmp_path / "lost.pth", load_config("tiny"))
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="neither a reidlib checkpoint"):
        load_trained_model(tmp_path / "other.pth")


def test_convert_and_info_on_the_command_line(tmp_path, capsys):
    from reidlib.__main__ import main
    _, model = _source(*DEEP, "model.lora.enabled=true")
    torch.save(_reference_state(model, "deep", thesis_attention=True), tmp_path / "ref.pth")
    assert main(["info", f"weights={tmp_path / 'ref.pth'}", "config=tiny"]) == 0
    printed = capsys.readouterr().out
    assert "format: CLIP-ReID reference state dict" in printed and "architecture: vit-tiny8" in printed
    assert "model.lora.alpha: 4.0" in printed and "identities: 7" in printed
    assert main(["convert", str(tmp_path / "ref.pth"), str(tmp_path / "ours.pt"), "config=tiny",
                 "data.dataset=dukemtmc"]) == 0
    card = describe_weights(tmp_path / "ours.pt")
    assert card["format"] == "reidlib checkpoint" and card["dataset"] == "dukemtmc" and card["identities"] == 7
    converted, used = load_trained_model(tmp_path / "ours.pt")       # its own config now: no config needed
    assert used.model.prompt == "deep" and used.model.lora.enabled
    assert _relative(_features(converted), _features(model)) <= 1e-5


def test_fine_tuning_from_a_reference_state_dict(tmp_path):
    _, model = _source(*DEEP, "model.sie_camera=true")
    torch.save(_reference_state(model, "deep", thesis_attention=True, sie=True), tmp_path / "ref.pth")
    cfg = load_config("tiny", [f"model.pretrained={tmp_path / 'ref.pth'}"])          # a baseline on top
    torch.manual_seed(1)
    new = build_model(cfg.model, num_classes=4).eval()
    assert new.classifier.weight.shape == (4, 64) and not new.uses_sie
    with torch.no_grad():            # the same image encoder (no SIE in the new model: compare without it)
        assert _relative(new.encode_image(IMAGES), torch.cat(model.visual(IMAGES)[1:], 1)) <= 1e-5
    torch.save(_reference_state(model, "clipreid", sie=True, with_text=False), tmp_path / "base.pth")
    with pytest.raises(ValueError, match="has no text encoder"):
        build_model(load_config("tiny", [f"model.pretrained={tmp_path / 'base.pth'}"]).model, num_classes=4)
