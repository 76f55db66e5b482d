"""Split attention, LoRA through peft: counts, zero init, merge, round trip, eval() purity."""
import open_clip
import pytest
import torch
from torch import nn

from reidlib.config import load_config
from reidlib.model import ReIDModel, apply_lora, backbone, build_model, merge_lora
from reidlib.model.attention import SplitAttention
from reidlib.model.lora import lora_blocks
from reidlib.model.trainable import trainable_parameters
from reidlib.weights import clip as clip_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(*overrides, lora=True):
    cfg = load_config("tiny", [f"model.lora.enabled={str(lora).lower()}", *overrides]).model
    torch.manual_seed(0)
    return build_model(cfg, num_classes=7, num_cameras=3)


def _train_lora(model, scale=0.05):
    """Stand-in for training: give every LoRA matrix random values (B is zero at init)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn_like(param) * scale)


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


IMAGES = torch.randn(3, 3, 128, 64)


# --------------------------------------------------------------------------- attention

@pytest.mark.parametrize("causal", [False, True])
def test_split_attention_equals_multihead_attention(causal):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    nn.init.normal_(mha.in_proj_bias)
    nn.init.normal_(mha.out_proj.bias)
    split = SplitAttention(mha)
    x = torch.randn(2, 10, 64)
    mask = torch.full((10, 10), float("-inf")).triu_(1) if causal else None
    with torch.no_grad():
        expected = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        assert torch.allclose(split(x, x, x, need_weights=False, attn_mask=mask)[0], expected, atol=1e-6)
    fused = torch.cat([split.q_proj.weight, split.k_proj.weight, split.v_proj.weight])
    assert torch.equal(fused, mha.in_proj_weight)                 # split exactly, no re-init


def _open_clip_attention(**kwargs):
    """open_clip's own ``Attention`` module: what open_clip 4.x's ViT blocks hold (3.x has it too)."""
    from open_clip.transformer import Attention
    torch.manual_seed(1)
    attn = Attention(64, num_heads=4, **kwargs)
    nn.init.normal_(attn.in_proj_bias)
    nn.init.normal_(attn.out_proj.bias)
    return attn


def test_split_attention_equals_open_clip_attention():
    attn = _open_clip_attention()
    split = SplitAttention(attn)
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        expected = attn(x)
        # open_clip 4.x's block calls attn(q_x, k_x=q_x, v_x=q_x, attn_mask=...) and uses the tensor
        out = split(x, k_x=x, v_x=x, attn_mask=None)
    assert isinstance(out, torch.Tensor) and torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(torch.cat([split.q_proj.weight, split.k_proj.weight, split.v_proj.weight]),
                       attn.in_proj_weight)


def test_split_attention_refuses_what_it_cannot_split():
    with pytest.raises(TypeError, match="cannot split .*Attention"):
        SplitAttention(_open_clip_attention(scaled_cosine=True))     # not plain softmax attention
    with pytest.raises(TypeError, match="cannot split .*Linear"):
        SplitAttention(nn.Linear(4, 4))
    split = SplitAttention(_open_clip_attention())
    x = torch.randn(1, 3, 64)
    with pytest.raises(ValueError, match="self-attention only"):
        split(x, k_x=torch.randn(1, 3, 64))


def test_lora_fails_when_a_target_is_missing(monkeypatch):
    """Were the attention left fused (e.g. an open_clip whose blocks reidlib cannot split), LoRA's
    q/k/v/out targets would not exist: apply_lora must say so instead of adapting fewer modules."""
    monkeypatch.setattr(backbone, "split_attention", lambda block: None)
    fused = open_clip.create_model("vit-tiny8").visual.transformer.resblocks[0].attn
    # q, k, v of 3 blocks; out too under open_clip 3.x, whose nn.MultiheadAttention never calls out_proj
    missing = 12 if isinstance(fused, nn.MultiheadAttention) else 9
    message = rf"model.lora.targets: {missing} target module\(s\) missing .*resblocks.0.attn.q_proj"
    with pytest.raises(ValueError, match=message):
        _tiny()
    _tiny("model.lora.targets=[mlp]")     # the MLP Linears exist either way


# --------------------------------------------------------------------------- counts and layout

def test_lora_count_vit_b16_formula():
    """12 blocks x 4 projections x r x (768 + 768) at r 16 = 1,179,648 (meta device: no weights)."""
    clip = clip_weights._build(open_clip.get_model_config("ViT-B-16"), quick_gelu=True, device="meta")
    cfg = load_config("vit_proposed").model
    model = apply_lora(ReIDModel(clip, cfg, num_classes=751), cfg.lora)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert lora == 12 * 4 * 16 * (768 + 768) == 1_179_648


def test_lora_layout_scaling_and_targets():
    model = _tiny()
    layers = _lora_layers(model)
    assert len(layers) == 3 * 4                                       # 3 blocks x q, k, v, out
    assert sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) == 3 * 4 * 16 * (64 + 64)
    assert all(m.scaling["default"] == pytest.approx(4 / 16 ** 0.5) for m in layers.values())   # rsLoRA: 1.0
    plain = _tiny("model.lora.rslora=false", "model.lora.r=8", "model.lora.alpha=16")
    assert all(m.scaling["default"] == pytest.approx(16 / 8) for m in _lora_layers(plain).values())
    mlp = _tiny("model.lora.targets=[q,mlp]", "model.lora.blocks=1,2")
    assert sorted(_lora_layers(mlp)) == sorted(
        f"visual.vit.transformer.resblocks.{b}.{m}" for b in (1, 2) for m in ("attn.q_proj", "mlp.c_fc", "mlp.c_proj"))
    assert all(p.requires_grad is False for n, p in model.text.named_parameters())


def test_block_subsets():
    assert lora_blocks("all", 12) == list(range(12))
    assert lora_blocks("top", 12) == [11] and lora_blocks("top3", 12) == [9, 10, 11]
    assert lora_blocks("bottom", 12) == [0, 1, 2, 3] and lora_blocks("mid", 12) == [4, 5, 6, 7]
    assert lora_blocks("up", 12) == [8, 9, 10, 11]
    assert lora_blocks("half-up", 12) == list(range(6, 12)) and lora_blocks("half-bottom", 12) == list(range(6))
    assert lora_blocks("8, 9,11", 12) == [8, 9, 11]
    with pytest.raises(ValueError, match="indices must lie in 0..11"):
        lora_blocks("12", 12)
    with pytest.raises(ValueError, match="model.lora.blocks"):
        lora_blocks("middle", 12)


def test_lora_needs_a_vit():
    with pytest.raises(ValueError, match="needs a ViT"):
        build_model(load_config("tiny", ["model.name=rn-tiny", "model.lora.enabled=true"]).model, 5)


# --------------------------------------------------------------------------- behaviour

def test_zero_init_b_leaves_outputs_unchanged():
    plain, lora = _tiny(lora=False), _tiny()
    assert all(torch.count_nonzero(p) == 0 for n, p in lora.named_parameters() if ".lora_B." in n)
    for mode in (False, True):                                        # eval, and train with LoRA dropout
        plain.train(mode), lora.train(mode)
        with torch.no_grad():
            torch.manual_seed(1)
            a = plain(IMAGES)["feats"]
            torch.manual_seed(1)
            b = lora(IMAGES)["feats"]
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_every_adapter_is_on_the_path_and_gets_gradients():
    """The nn.MultiheadAttention trap: an out_proj adapter that is never called. Not here."""
    model = _tiny("model.lora.dropout=0")
    _train_lora(model)
    model.eval()
    base = model.encode_image(IMAGES).detach()
    for name, layer in _lora_layers(model).items():
        weight = layer.lora_B["default"].weight.data
        saved = weight.clone()
        weight.add_(torch.randn_like(weight))       # random, not constant: LayerNorm hides constant shifts
        assert (model.encode_image(IMAGES) - base).abs().max() > 1e-3, name
        weight.copy_(saved)
    model.train()
    sum(t.sum() for t in model(IMAGES)["feats"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_" in n)


def test_merged_equals_unmerged_and_loads_without_lora():
    model = _tiny()
    _train_lora(model)
    model.eval()
    with torch.no_grad():
        before = model.encode_image(IMAGES)
        merged = merge_lora(model)
        after = merged.encode_image(IMAGES)
    assert (after - before).abs().max() <= 1e-5
    assert not merged.uses_lora and not _lora_layers(merged)
    plain = _tiny(lora=False).eval()
    plain.load_state_dict(merged.state_dict(), strict=True)           # same keys as a LoRA-free model
    with torch.no_grad():
        assert torch.equal(plain.encode_image(IMAGES), after)


@pytest.mark.parametrize("dropout", [0.05, 0.0])
def test_state_dict_round_trip_is_exact(dropout):
    model = _tiny(f"model.lora.dropout={dropout}")
    _train_lora(model)
    state = model.state_dict()
    assert any(k.endswith("q_proj.base_layer.weight") for k in state)   # base weights kept even at dropout 0
    fresh = _tiny(f"model.lora.dropout={dropout}")
    fresh.load_state_dict(state, strict=True)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(IMAGES), fresh.encode_image(IMAGES))


def test_eval_never_mutates_weights():
    model = _tiny()
    _train_lora(model)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        first = model.encode_image(IMAGES)
    model.train()
    model.eval()
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in snapshot.items() if "running_" not in k and "num_batches" not in k)
    with torch.no_grad():
        assert torch.equal(model.encode_image(IMAGES), first)


def test_lora_stage2_trainable_set():
    model = _tiny()
    names = {n for n, _ in trainable_parameters(model, "stage2")}
    lora = {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    norms = {n for n, _ in model.named_parameters() if n.startswith("visual.") and (".ln_" in n)}
    heads = {"bottleneck.weight", "bottleneck_proj.weight", "classifier.weight", "classifier_proj.weight"}
    assert len(norms) == 2 * (1 + 2 * 3 + 1)                           # ln_pre, ln_1/ln_2 per block, ln_post
    assert names == lora | norms | heads
