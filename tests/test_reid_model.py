"""ReIDModel: outputs, BNNeck, SIE, text features, trainable sets, and a full-size ViT-B/16 build."""
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU

from reidlib.config import load_config
from reidlib.model import apply_lora, build_model, parameter_table, set_trainable, trainable_parameters

HEADS = {"bottleneck.weight", "bottleneck_proj.weight", "classifier.weight", "classifier_proj.weight"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(*overrides, classes=7, cameras=3):
    torch.manual_seed(0)
    return build_model(load_config("tiny", list(overrides)).model, num_classes=classes, num_cameras=cameras)


# --------------------------------------------------------------------------- outputs

@pytest.mark.parametrize("name, dims", [("vit-tiny", (64, 64, 32)), ("rn-tiny", (128, 256, 32))])
def test_training_and_test_outputs(name, dims):
    model = _tiny(f"model.name={name}")
    images = torch.randn(4, 3, 128, 64)
    out = model.train()(images)
    assert [t.shape for t in out["logits"]] == [(4, 7), (4, 7)]
    assert [t.shape[1] for t in out["feats"]] == list(dims)
    assert out["f_proj"] is out["feats"][2]
    assert model.feature_dim == dims[1] + dims[2]
    model.eval()
    with torch.no_grad():
        assert model.encode_image(images).shape == (4, model.feature_dim)
        assert model.image_proj_features(images).shape == (4, 32)
        assert model.encode_text(torch.tensor([0, 6])).shape == (2, 32)


def test_bnneck_before_and_after():
    model = _tiny().eval()
    after = _tiny("model.neck_feat=after").eval()
    images = torch.randn(3, 3, 128, 64)
    with torch.no_grad():
        _, f, f_proj = model(images)["feats"]
        assert torch.equal(model.encode_image(images), torch.cat([f, f_proj], 1))
        with_bn = after.encode_image(images)
    bn = model.bottleneck
    expected = (f - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)   # fresh BN: weight 1, bias 0
    assert torch.allclose(with_bn[:, :64], expected, atol=1e-5)
    for bn in (model.bottleneck, model.bottleneck_proj):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
        assert not bn.bias.requires_grad
    for linear in (model.classifier, model.classifier_proj):
        assert linear.bias is None and 0.0005 < linear.weight.std() < 0.0015


def test_sie_camera_bias():
    model = _tiny("model.sie_camera=true", "model.sie_coe=3.0", cameras=4).eval()
    assert model.uses_sie and not _tiny().uses_sie
    assert model.sie_embed.shape == (4, 64) and model.sie_embed.abs().max() <= 2.0
    images, cams = torch.randn(2, 3, 128, 64), torch.tensor([0, 3])
    with pytest.raises(ValueError, match="pass the camera ids"):
        model.encode_image(images)
    with torch.no_grad():
        with_sie = model.encode_image(images, cams)
        no_sie = model.visual(images)
        expected = model.visual(images, 3.0 * model.sie_embed[cams])
        assert torch.equal(with_sie, torch.cat([expected[1], expected[2]], 1))
        assert not torch.allclose(with_sie[:, :64], no_sie[1])
        assert torch.equal(model.image_proj_features(images), no_sie[2])      # stage 1 never uses SIE
    with pytest.raises(ValueError, match="ViT image encoders only"):
        _tiny("model.name=rn-tiny", "model.sie_camera=true")
    with pytest.raises(ValueError, match="ViT image encoders only"):
        _tiny("model.name=rn-tiny", "model.stride=12")


def test_all_text_features_in_chunks_equal_encode_text():
    model = _tiny("model.prompt=deep", "model.n_shared=2", "model.n_per_id=1", "model.depth=9", classes=11)
    with torch.no_grad():
        direct = model.encode_text(torch.arange(11))
    chunked = model.all_text_features(chunk=4)
    assert chunked.shape == (11, 32) and not chunked.requires_grad
    assert torch.allclose(chunked, direct, atol=1e-6)
    assert torch.allclose(model.all_text_features(), direct, atol=1e-6)       # cfg.text_chunk


# --------------------------------------------------------------------------- trainable sets

def test_trainable_sets_per_stage():
    model = _tiny("model.sie_camera=true")
    names = [n for n, _ in model.named_parameters()]
    stage1 = {n for n, _ in set_trainable(model, "stage1")}
    assert stage1 == {"prompts.per_id"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == stage1
    stage2 = {n for n, _ in set_trainable(model, "stage2")}
    vision = {n for n in names if n.startswith("visual.")}
    assert stage2 == vision | HEADS | {"sie_embed"}
    assert not any(n.startswith(("text.", "prompts.")) or n.endswith(".bias") and "bottleneck" in n for n in stage2)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == \
        sum(p.numel() for n, p in trainable_parameters(model, "stage2"))
    table = parameter_table(model)
    for group in ("prompts", "text encoder", "vision: attention", "bnneck", "classifiers", "sie"):
        assert group in table
    with pytest.raises(ValueError, match="stage must be one of"):
        set_trainable(model, "stage3")


def test_proposed_method_on_tiny_config_trains_the_right_sets():
    model = _tiny("model.prompt=deep", "model.n_shared=2", "model.n_per_id=1", "model.depth=9",
                  "model.lora.enabled=true")
    stage1 = {n for n, _ in set_trainable(model, "stage1")}
    assert stage1 == {"prompts.shared", "prompts.per_id", "prompts.deep_shared", "prompts.deep_per_id"}
    stage2 = {n for n, _ in set_trainable(model, "stage2")}
    assert {n for n in stage2 if ".lora_" not in n and ".ln_" not in n} == HEADS
    out = model.train()(torch.randn(4, 3, 128, 64))
    loss = sum(F.cross_entropy(s, torch.tensor([0, 1, 2, 3])) for s in out["logits"]) + out["f_proj"].square().mean()
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in stage2)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in stage2)


def test_bf16_autocast_keeps_parameters_fp32_and_trains():
    """What the engine does on GPU (bf16 autocast), run on CPU autocast: same dtype paths."""
    model = _tiny("model.prompt=deep", "model.n_shared=2", "model.n_per_id=1", "model.depth=9",
                  "model.lora.enabled=true", "model.sie_camera=true")
    set_trainable(model, "stage2")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train()(torch.randn(4, 3, 128, 64), cams=torch.tensor([0, 1, 2, 0]))
        text = model.all_text_features()
        loss = sum(s.float().logsumexp(1).mean() for s in out["logits"]) + (out["f_proj"] @ text.T).float().mean()
    loss.backward()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is not None for _, p in trainable_parameters(model, "stage2"))


# --------------------------------------------------------------------------- full size

def _openai_vit_b16_state_dict():
    """Random tensors under OpenAI's ViT-B/16 key names and shapes, in fp16 as OpenAI ships them."""
    shapes = {"visual.class_embedding": (768,), "visual.positional_embedding": (197, 768),
              "visual.conv1.weight": (768, 3, 16, 16), "visual.proj": (768, 512),
              "token_embedding.weight": (49408, 512), "positional_embedding": (77, 512),
              "text_projection": (512, 512), "logit_scale": ()}
    norms = ["visual.ln_pre", "visual.ln_post", "ln_final"]
    for prefix, width in (("visual.transformer", 768), ("transformer", 512)):
        for i in range(12):
            block = f"{prefix}.resblocks.{i}"
            shapes.update({f"{block}.attn.in_proj_weight": (3 * width, width),
                           f"{block}.attn.in_proj_bias": (3 * width,),
                           f"{block}.attn.out_proj.weight": (width, width), f"{block}.attn.out_proj.bias": (width,),
                           f"{block}.mlp.c_fc.weight": (4 * width, width), f"{block}.mlp.c_fc.bias": (4 * width,),
                           f"{block}.mlp.c_proj.weight": (width, 4 * width), f"{block}.mlp.c_proj.bias": (width,)})
            norms += [f"{block}.ln_1", f"{block}.ln_2"]
    generator = torch.Generator().manual_seed(0)
    sd = {k: torch.empty(s, dtype=torch.float16).normal_(0, 0.02, generator=generator) for k, s in shapes.items()}
    for norm in norms:
        width = 512 if norm == "ln_final" or norm.startswith("transformer") else 768
        sd[f"{norm}.weight"] = torch.ones(width, dtype=torch.float16)
        sd[f"{norm}.bias"] = torch.zeros(width, dtype=torch.float16)
    sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    return sd


def test_full_size_vit_b16_from_a_local_openai_state_dict(tmp_path):
    sd = _openai_vit_b16_state_dict()
    path = tmp_path / "ViT-B-16.pt"
    torch.save(sd, path)
    cfg = load_config("vit_clipreid", [f"model.pretrained={path}"]).model
    start = time.perf_counter()
    model = build_model(cfg, num_classes=751, num_cameras=6)
    assert time.perf_counter() - start < 20
    vit = model.visual.vit
    assert isinstance(vit.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert torch.equal(vit.conv1.weight, sd["visual.conv1.weight"].float())
    assert torch.equal(vit.transformer.resblocks[3].attn.k_proj.weight,
                       sd["visual.transformer.resblocks.3.attn.in_proj_weight"][768:1536].float())
    assert vit.positional_embedding.shape == (129, 768) and model.visual.grid == (16, 8)
    native = sd["visual.positional_embedding"].float()
    resized = F.interpolate(native[1:].reshape(1, 14, 14, 768).permute(0, 3, 1, 2), size=(16, 8),
                            mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(128, 768)
    assert torch.equal(vit.positional_embedding[0], native[0]) and torch.equal(vit.positional_embedding[1:], resized)
    model.eval()
    with torch.no_grad():
        feature = model.encode_image(torch.randn(1, 3, 256, 128))
        text = model.encode_text(torch.tensor([0, 750]))
    assert feature.shape == (1, 1280) and torch.isfinite(feature).all() and text.shape == (2, 512)

    count = lambda stage: sum(p.numel() for _, p in trainable_parameters(model, stage))  # noqa: E731
    assert count("stage1") == 751 * 4 * 512 == 1_538_048
    vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual."))
    assert vision == 86_140_416                                        # ViT-B/16 with a 129-token pos-embed
    assert count("stage2") == vision + 751 * (768 + 512) + (768 + 512) == 87_102_976
    apply_lora(model, load_config("vit_proposed").model.lora)
    assert sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) == 1_179_648
    norms = 2 * 768 * (2 + 2 * 12)                                     # ln_pre, ln_post, ln_1/ln_2 x 12
    assert count("stage2") == 1_179_648 + norms + 751 * (768 + 512) + (768 + 512) == 2_182_144
