"""open_clip loading (tag / file / none) and the re-ID image towers (grid, pos-embed, SIE, RN50)."""
import copy
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import nn

from reidlib.config import load_config
from reidlib.model import ReIDModel, resize_grid_embedding
from reidlib.model.backbone import ReIDResNet, ReIDViT
from reidlib.weights import clip as clip_weights
from reidlib.weights.clip import load_clip

pytestmark = pytest.mark.usefixtures("one_thread")


def _openai_format(clip):
    """A state dict as OpenAI's files hold it: fp16 weights plus three bookkeeping entries."""
    sd = {k: v.half() if v.is_floating_point() else v for k, v in clip.state_dict().items()}
    sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    return sd


def _uses_quick_gelu(clip):
    return isinstance(clip.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


# --------------------------------------------------------------------------- tiny configs

def test_tiny_configs_are_open_clip_models_with_clip_text_geometry():
    for name in ("vit-tiny", "rn-tiny"):
        cfg = open_clip.get_model_config(name)
        assert cfg["text_cfg"]["vocab_size"] == 49408 and cfg["text_cfg"]["context_length"] == 77
        assert cfg["text_cfg"]["layers"] == 12          # deep prompts at depth 9 run unchanged
    clip = open_clip.create_model("vit-tiny")
    assert clip.visual.conv1.kernel_size == (16, 16) and len(clip.visual.transformer.resblocks) == 3


# --------------------------------------------------------------------------- positional embedding

def test_resize_is_bilinear_no_antialias_like_open_clip_with_those_arguments():
    pos = torch.randn(1 + 14 * 14, 8)

    class Visual:
        grid_size = (16, 8)

    class Model:
        visual = Visual()

    sd = {"visual.positional_embedding": pos}
    open_clip.model.resize_pos_embed(sd, Model(), interpolation="bilinear", antialias=False)
    ours = resize_grid_embedding(pos, (14, 14), (16, 8))
    assert torch.equal(ours, sd["visual.positional_embedding"])
    default = {"visual.positional_embedding": pos}
    open_clip.model.resize_pos_embed(default, Model())   # open_clip's default: bicubic + antialias
    assert not torch.allclose(ours, default["visual.positional_embedding"], atol=1e-4)


@pytest.mark.parametrize("stride, grid", [(16, (16, 8)), (12, (21, 10))])
def test_vit_grid_and_resized_positional_embedding(stride, grid):
    clip = load_clip("vit-tiny", "none")
    native = clip.visual.positional_embedding.detach().clone()            # 1 + 14*14 rows
    vit = ReIDViT(clip.visual, image_size=(256, 128), stride=stride)
    assert vit.grid == grid and vit.vit.conv1.stride == (stride, stride)
    pos = vit.vit.positional_embedding
    assert pos.shape == (1 + grid[0] * grid[1], 64)
    assert torch.equal(pos[0], native[0])                                  # CLS row kept
    expected = F.interpolate(native[1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2), size=grid,
                             mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(-1, 64)
    assert torch.allclose(pos[1:], expected, atol=0, rtol=0)
    f_last, f, f_proj = vit(torch.randn(2, 3, 256, 128))
    assert f_last.shape == f.shape == (2, 64) and f_proj.shape == (2, 32)


def test_vit_tower_equals_open_clip_at_native_size():
    clip = load_clip("vit-tiny", "none").eval()
    reference = copy.deepcopy(clip.visual)
    vit = ReIDViT(clip.visual, image_size=(224, 224), stride=16)           # no resize, split attention
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        f_last, f, f_proj = vit(x)
        assert torch.allclose(f_proj, reference(x), atol=1e-5)
        tokens = reference._embeds(x)
        for block in reference.transformer.resblocks[:-1]:
            tokens = block(tokens)
        assert torch.allclose(f_last, tokens[:, 0], atol=1e-5)             # CLS before the last block
        last = reference.transformer.resblocks[-1](tokens)
        assert torch.allclose(f, reference.ln_post(last)[:, 0], atol=1e-5)


def test_sie_is_added_to_the_cls_token_only_before_the_positional_embedding():
    vit = ReIDViT(load_clip("vit-tiny", "none").visual, image_size=(128, 64)).eval()
    seen = []
    vit.vit.ln_pre.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    x, bias = torch.randn(2, 3, 128, 64), torch.randn(2, 64)
    with torch.no_grad():
        vit(x)
        vit(x, cls_bias=bias)
    delta = seen[1] - seen[0]
    assert torch.allclose(delta[:, 0], bias, atol=1e-6)
    assert delta[:, 1:].abs().max() == 0


# --------------------------------------------------------------------------- RN50

def test_resnet_layer4_stride_1_attnpool_grid_and_three_features():
    clip = load_clip("rn-tiny", "none")
    native = clip.visual.attnpool.positional_embedding.detach().clone()   # 1 + 7*7 rows
    net = ReIDResNet(clip.visual, image_size=(128, 64)).eval()
    assert net.grid == (8, 4)
    pos = net.resnet.attnpool.positional_embedding
    assert pos.shape == (1 + 8 * 4, 256) and torch.equal(pos[0], native[0])
    assert torch.equal(pos, resize_grid_embedding(native, (7, 7), (8, 4)))
    x = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        x3 = net.resnet.layer3(net.resnet.layer2(net.resnet.layer1(net.resnet.stem(x))))
        assert net.resnet.layer4(x3).shape[-2:] == x3.shape[-2:] == (8, 4)  # layer4 keeps the map
        f_last, f, f_proj = net(x)
    assert f_last.shape == (2, 128) and f.shape == (2, 256) and f_proj.shape == (2, 32)
    assert torch.allclose(f, net.resnet.layer4(x3).mean(dim=(2, 3)), atol=1e-6)


def test_full_size_towers_shapes_on_meta():
    """ViT-B/16 and RN50 at 256x128 (meta device: shapes without the cost of weights)."""
    cases = [("ViT-B-16", 16, (16, 8), 1280), ("ViT-B-16", 12, (21, 10), 1280), ("RN50", 16, (16, 8), 3072)]
    for name, stride, grid, dim in cases:
        clip = clip_weights._build(open_clip.get_model_config(name), quick_gelu=True, device="meta")
        cfg = load_config(None, [f"model.name={name}", f"model.stride={stride}"]).model
        model = ReIDModel(clip, cfg, num_classes=751)
        assert model.visual.grid == grid and model.feature_dim == dim
        features = model.encode_image(torch.empty(2, 3, 256, 128, device="meta"))
        assert features.shape == (2, dim)
        if name == "ViT-B-16":
            assert model.visual.vit.positional_embedding.shape == (grid[0] * grid[1] + 1, 768)   # 129 at stride 16
        else:
            assert model.visual.resnet.attnpool.positional_embedding.shape == (16 * 8 + 1, 2048)


# --------------------------------------------------------------------------- weights from files

def test_openai_state_dict_file_loads_exactly_with_quick_gelu(tmp_path):
    source = load_clip("vit-tiny", "none", quick_gelu="false")
    sd = _openai_format(source)
    torch.save(sd, tmp_path / "ViT-tiny.pt")
    clip = load_clip("vit-tiny", str(tmp_path / "ViT-tiny.pt"))
    assert _uses_quick_gelu(clip)
    loaded = clip.state_dict()
    for key, value in sd.items():
        if key not in ("input_resolution", "context_length", "vocab_size"):
            assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], value.float()), key
    assert torch.equal(clip.attn_mask, source.attn_mask)
    assert load_clip("vit-tiny", str(tmp_path / "ViT-tiny.pt"), quick_gelu="false").visual is not None


class _Holder(nn.Module):
    """A module tree that only carries tensors, to write a TorchScript archive cheaply."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _torchscript_archive(state_dict, path):
    """Save ``state_dict`` as a TorchScript archive whose ``state_dict()`` gives it back (OpenAI's format)."""
    root = _Holder()
    for key, value in state_dict.items():
        *path_parts, leaf = key.split(".")
        module = root
        for part in path_parts:
            if not hasattr(module, part):
                module.add_module(part, _Holder())
            module = getattr(module, part)
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
        else:
            module.register_buffer(leaf, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)          # torch.jit.script is deprecated
        torch.jit.save(torch.jit.script(root), str(path))


def test_openai_jit_archive_loads(tmp_path):
    source = load_clip("vit-tiny", "none").eval()
    _torchscript_archive(_openai_format(source), tmp_path / "tiny-jit.pt")
    clip = load_clip("vit-tiny", str(tmp_path / "tiny-jit.pt")).eval()
    assert _uses_quick_gelu(clip)
    for key, value in source.state_dict().items():
        assert torch.equal(clip.state_dict()[key], value.half().float()), key
    tokens = open_clip.tokenize(["a person walking"])
    source.load_state_dict({k: v.half().float() for k, v in source.state_dict().items()})
    assert torch.allclose(clip.encode_text(tokens), source.encode_text(tokens), atol=1e-6)


def test_open_clip_training_checkpoint_loads_with_gelu_in_auto(tmp_path):
    source = load_clip("rn-tiny", "none", quick_gelu="false")
    blob = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    torch.save(blob, tmp_path / "epoch_3.pt")
    clip = load_clip("rn-tiny", str(tmp_path / "epoch_3.pt"))
    assert not isinstance(clip.transformer.resblocks[0].mlp.gelu, QuickGELU)
    for key, value in source.state_dict().items():
        assert torch.equal(clip.state_dict()[key], value), key


def test_wrong_architecture_and_missing_file_messages(tmp_path):
    torch.save(load_clip("rn-tiny", "none").state_dict(), tmp_path / "rn.pt")
    with pytest.raises(RuntimeError, match="do not fit vit-tiny"):
        load_clip("vit-tiny", str(tmp_path / "rn.pt"))
    with pytest.raises(FileNotFoundError, match="no file at '.*missing.pt'"):
        load_clip("vit-tiny", str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="unknown architecture"):
        load_clip("ViT-Q-99", "none")


def test_openai_tag_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(clip_weights, "_cached_hub_file", lambda hf_hub: None)   # whatever this machine caches
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"not cached .* model.pretrained=/path/to/ViT-B-16.pt"):
        load_clip("ViT-B-16", "openai")
    assert time.perf_counter() - start < 2.0
    with pytest.raises(ValueError, match="no OpenAI weights for 'vit-tiny'"):
        load_clip("vit-tiny", "openai")


def test_quick_gelu_settings():
    assert _uses_quick_gelu(load_clip("vit-tiny", "none"))                  # auto + random: as OpenAI
    assert not _uses_quick_gelu(load_clip("vit-tiny", "none", quick_gelu="false"))
    assert _uses_quick_gelu(load_clip("vit-tiny", "none", quick_gelu="true"))
