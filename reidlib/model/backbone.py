"""CLIP from open_clip, loaded from a tag, a local file or nothing, and the re-ID image towers.

CLIP-ReID (Li, Sun, Li, AAAI 2023, arXiv 2211.13977) fine-tunes CLIP's image encoder for re-ID.
Everything CLIP is open_clip's (``open_clip.CLIP``: modules, weights, tokenizer); this file only

* loads weights: the ``openai`` tag, a local file (OpenAI's JIT ``.pt`` or state dict, an open_clip
  checkpoint) or ``none`` (random, for tests), with QuickGELU whenever the weights are OpenAI's;
* registers tiny test architectures, ``vit-tiny``, ``vit-tiny8`` (patch 8) and ``rn-tiny``, with CLIP's tokenizer;
* adapts the image tower to re-ID: non-square input, positional embedding resized the reference's
  way, overlapping patches (OLP), the SIE bias on the CLS token, and three features per image.

Example::

    clip = load_clip("vit-tiny", "none")
    vit = ReIDViT(clip.visual, image_size=(128, 64), stride=16)
    f_last, f, f_proj = vit(torch.randn(2, 3, 128, 64))
    vit.grid                                     # (8, 4)
    f.shape, f_proj.shape                        # (2, 64), (2, 32)
"""
from __future__ import annotations

import logging
import os
import socket
import warnings
import zipfile
from pathlib import Path

import open_clip
import open_clip.factory
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn

from .attention import split_attention

log = logging.getLogger(__name__)

# Tiny CLIPs for tests and the CPU demo. Same tokenizer, vocabulary (49408) and context (77) as
# ViT-B-16, so every prompt template tokenises identically. The text tower keeps CLIP's 12 blocks
# (thin: width 64) so the thesis's deep prompts (depth 9) run unchanged.
_TINY_TEXT = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=12)
TINY_CONFIGS = {
    "vit-tiny": dict(embed_dim=32, text_cfg=_TINY_TEXT,
                     vision_cfg=dict(image_size=224, layers=3, width=64, head_width=32, patch_size=16)),
    # Patch 8: at the demo's 128x64 input a 16x8 token grid, the one ViT-B/16 has at 256x128.
    # Native input 128x64, the re-ID crop: the miniature is pretrained at that size
    # (reidlib.engine.pretrain), so its positional embedding is used as learned, not resized.
    "vit-tiny8": dict(embed_dim=32, text_cfg=_TINY_TEXT,
                      vision_cfg=dict(image_size=(128, 64), layers=3, width=64, head_width=32, patch_size=8)),
    "rn-tiny": dict(embed_dim=32, text_cfg=_TINY_TEXT,
                    vision_cfg=dict(image_size=224, layers=[1, 1, 1, 1], width=8, head_width=32)),
}
# open_clip keeps its architectures in a module-level dict filled from JSON files; adding ours
# there lets open_clip.create_model("vit-tiny") work too (handy when comparing with open_clip).
for _name, _cfg in TINY_CONFIGS.items():
    open_clip.factory._MODEL_CONFIGS.setdefault(_name, _cfg)

# Keys OpenAI's JIT archives carry besides the weights (openai/CLIP's build_model drops them too).
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


# --------------------------------------------------------------------------- loading

def load_clip(name: str = "ViT-B-16", pretrained: str = "openai", quick_gelu: str = "auto") -> open_clip.CLIP:
    """An fp32 ``open_clip.CLIP`` with the requested weights, at its native input size.

    ``pretrained``: ``openai`` (open_clip's tag; downloads once, fails fast offline), a path to a
    local file, or ``none``. ``quick_gelu``: ``auto`` turns QuickGELU on unless the file is an
    open_clip training checkpoint (OpenAI trained with QuickGELU; the activation is not stored in
    the weights, so it cannot be read back from them).

    Example::

        clip = load_clip("ViT-B-16", "/models/ViT-B-16.pt")   # OpenAI's JIT archive
        clip = load_clip("RN50", "openai")                    # open_clip's tag, cached after once
        clip = load_clip("vit-tiny", "none")                  # random, for tests
        clip.visual.conv1.weight.dtype                        # torch.float32
        clip.encode_text(open_clip.tokenize(["a person"]))    # [1, 32]
    """
    name = name.replace("/", "-")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"model.name '{name}': unknown architecture; use ViT-B-16, RN50, vit-tiny, vit-tiny8, rn-tiny "
                         "or another open_clip name (open_clip.list_models())")
    _check_supported(name, cfg)
    choice = str(pretrained).strip()
    if choice.lower() in ("none", ""):
        return _build(cfg, _use_quick_gelu(quick_gelu, cfg, openai_weights=True))
    if choice.lower() == "openai":
        path, openai_weights = _openai_file(name), True
    else:
        path = Path(choice).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained: no file at '{path}'; pass an existing weights file "
                                    "(OpenAI .pt, state dict, open_clip checkpoint), 'openai' or 'none'")
        openai_weights = None
    state_dict, looks_openai = read_state_dict(path)
    openai_weights = looks_openai if openai_weights is None else openai_weights
    use_quick_gelu = _use_quick_gelu(quick_gelu, cfg, openai_weights)
    clip = _build(cfg, use_quick_gelu, device="meta")
    _load_weights(clip, state_dict, f"{name} from {path}")
    log.info("loaded %s weights from %s (%s; set model.quick_gelu to override)",
             name, path, "QuickGELU" if use_quick_gelu else "GELU")
    return clip


def _check_supported(name: str, cfg: dict) -> None:
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    unsupported = [k for k in ("timm_model_name", "attentional_pool") if vision.get(k)]
    unsupported += [k for k in ("hf_model_name",) if text.get(k)]
    if cfg.get("custom_text") or unsupported:
        raise ValueError(f"model.name '{name}': only CLIP's own ViT / ModifiedResNet image towers and "
                         f"transformer text tower are supported (found {unsupported or 'custom_text'})")


def _use_quick_gelu(setting: str, cfg: dict, openai_weights: bool) -> bool:
    setting = str(setting).lower()
    if setting in ("true", "false"):
        return setting == "true"
    # auto: the architecture's own choice (the -quickgelu configs) or the weights' origin. Random
    # weights get QuickGELU too, so a model rebuilt with pretrained=none to load a reidlib
    # checkpoint (trained from OpenAI weights) runs the activation it was trained with.
    return bool(cfg.get("quick_gelu")) or openai_weights


def _build(cfg: dict, quick_gelu: bool, device: str = "cpu") -> open_clip.CLIP:
    """open_clip's CLIP; on the meta device the random init is skipped (weights come next)."""
    kwargs = {k: v for k, v in cfg.items() if k != "quick_gelu"}
    with torch.device(device):
        return open_clip.CLIP(**kwargs, quick_gelu=quick_gelu)


def _openai_file(name: str) -> Path:
    """The local file of open_clip's ``openai`` tag, downloading it once; fails fast offline."""
    tag = open_clip.get_pretrained_cfg(name, "openai")
    if not tag:
        raise ValueError(f"model.pretrained=openai: open_clip has no OpenAI weights for '{name}'; "
                         "pass a local weights file or 'none'")
    hint = (f"pass a local copy instead, e.g. model.pretrained=/path/to/{name}.pt "
            "(OpenAI's file or open_clip's checkpoint)")
    cached = _cached_hub_file(tag.get("hf_hub", ""))
    if cached is not None:
        return cached
    if _offline():
        raise RuntimeError(f"model.pretrained=openai: '{name}' weights are not cached and HF_HUB_OFFLINE is set; "
                           f"{hint}")
    try:
        return Path(open_clip.download_pretrained(tag))
    except Exception as err:  # noqa: BLE001 - any hub/network failure gets the same advice
        raise RuntimeError(f"model.pretrained=openai: could not download '{name}' weights "
                           f"({type(err).__name__}: {str(err).splitlines()[0][:120]}); {hint}") from None


def _cached_hub_file(hf_hub: str) -> Path | None:
    """open_clip's hub file for a tag if already in the Hugging Face cache (no network)."""
    if not hf_hub:
        return None
    from huggingface_hub import try_to_load_from_cache
    repo, filename = os.path.split(hf_hub)       # "org/name/" -> open_clip's default file names
    for filename in [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
        hit = try_to_load_from_cache(repo, filename)
        if isinstance(hit, str):
            return Path(hit)
    return None


def _offline() -> bool:
    """True when the hub is switched off, or obviously unreachable (no DNS, no proxy).

    Without a network huggingface_hub retries for about a minute; one DNS lookup answers at once.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        return True
    return False


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The CLIP weights in ``path`` as an fp32 state dict, and whether they look like OpenAI's.

    Reads OpenAI's TorchScript archives, plain state dicts (``.pt``/``.pth``/``.bin``/
    ``.safetensors``) and open_clip training checkpoints (``{"state_dict": {"module.…"}}``).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state_dict, openai_weights = load_file(str(path)), True
    elif _is_torchscript(path):
        with warnings.catch_warnings():      # torch.jit.load is deprecated, and OpenAI's files are JIT
            warnings.simplefilter("ignore", FutureWarning)
            state_dict, openai_weights = torch.jit.load(str(path), map_location="cpu").state_dict(), True
    else:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - pickled objects, truncated files, other formats
            raise RuntimeError(f"model.pretrained: cannot read weights from '{path}' "
                               f"({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
        training_checkpoint = isinstance(blob, dict) and "state_dict" in blob
        state_dict = blob["state_dict"] if training_checkpoint else blob
        # open_clip's training checkpoints hold models of any activation; plain state dicts are
        # taken as OpenAI's (the weights this library is about). Set model.quick_gelu to override.
        openai_weights = not training_checkpoint
    state_dict = {_strip_prefix(k): v for k, v in state_dict.items() if k not in _OPENAI_EXTRA_KEYS}
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}, openai_weights


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in archive.namelist())


def _strip_prefix(key: str) -> str:
    # "module." from DataParallel/DDP; "text." from open_clip's CustomTextCLIP layout
    for prefix in ("module.", "text."):
        key = key[len(prefix):] if key.startswith(prefix) else key
    return key


def _load_weights(clip: nn.Module, state_dict: dict, what: str) -> None:
    """Load into a meta-device CLIP by assignment, then rebuild the non-persistent buffers."""
    for key in clip.state_dict():          # BatchNorm step counters: absent from some exports, unused
        if key.endswith("num_batches_tracked"):
            state_dict.setdefault(key, torch.tensor(0))
    try:
        clip.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[:3]
        raise RuntimeError(f"weights do not fit {what}: {' '.join(first)[:400]}; is model.name right?") from None
    clip.attn_mask = torch.full((clip.context_length, clip.context_length), float("-inf")).triu_(1)
    left = [n for n, t in [*clip.named_parameters(), *clip.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"loading {what} left tensors uninitialised: {left[:5]}")


# --------------------------------------------------------------------------- re-ID image towers

def resize_grid_embedding(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                          n_prefix: int = 1) -> torch.Tensor:
    """Resize a [prefix + h*w, C] positional embedding to a new (h, w) grid.

    As the reference: the prefix rows (CLS) are kept; the grid is resized with bilinear
    interpolation, align_corners=False and no antialiasing (open_clip's own loader uses bicubic +
    antialias, which gives different features); rows stay in row-major order.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos.clone()
    prefix, grid = pos[:n_prefix], pos[n_prefix:]
    grid = grid.reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bilinear", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1)
    return torch.cat([prefix, grid], dim=0)


class ReIDViT(nn.Module):
    """open_clip's VisionTransformer (its modules and weights) with CLIP-ReID's changes.

    Patch stride ``stride`` (12 = overlapping patches), a (h, w) token grid for a non-square
    input with the positional embedding resized to it, attention split into q/k/v/out Linears
    (same maths; LoRA targets), and three outputs: the CLS token before the last block
    (``f_last``), after the last block and ``ln_post`` (``f``), and ``f @ proj`` (``f_proj``).
    """

    def __init__(self, vit: VisionTransformer, image_size=(256, 128), stride: int = 16):
        super().__init__()
        if vit.attn_pool is not None or not isinstance(vit.patch_dropout, nn.Identity) or vit.final_ln_after_pool:
            raise ValueError("only CLIP's plain ViT (CLS pooling, no patch dropout) is supported")
        patch = vit.conv1.kernel_size[0]
        height, width = image_size
        self.grid = ((height - patch) // stride + 1, (width - patch) // stride + 1)
        self.image_size = (height, width)
        vit.conv1.stride = (stride, stride)
        vit.positional_embedding = nn.Parameter(
            resize_grid_embedding(vit.positional_embedding.data, vit.grid_size, self.grid))
        vit.grid_size, vit.image_size = self.grid, self.image_size
        for block in vit.transformer.resblocks:
            split_attention(block)
        self.vit = vit
        self.width = vit.class_embedding.shape[0]
        self.embed_dim = vit.proj.shape[1]

    def forward(self, x: torch.Tensor, cls_bias: torch.Tensor | None = None):
        """Images [B, 3, H, W] -> (f_last, f, f_proj); ``cls_bias`` [B, width] is the SIE term."""
        vit = self.vit
        x = vit.conv1(x).flatten(2).transpose(1, 2)                  # [B, h*w, width]
        cls = vit.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        if cls_bias is not None:                                      # SIE: CLS token only, before pos
            cls = cls + cls_bias.to(x.dtype).unsqueeze(1)
        x = torch.cat([cls, x], dim=1) + vit.positional_embedding.to(x.dtype)
        x = vit.ln_pre(x)
        blocks = vit.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        f_last = x[:, 0]
        f = vit.ln_post(blocks[-1](x)[:, 0])
        return f_last, f, f @ vit.proj


class ReIDResNet(nn.Module):
    """open_clip's ModifiedResNet (RN50) with CLIP-ReID's changes.

    layer4 runs at stride 1 (a 16x8 map for 256x128 input), the attention pool's positional
    embedding is resized from 7x7 to that map, and the outputs are the avg-pooled layer3
    (``f_last``), the avg-pooled layer4 (``f``) and the attention pool's global token (``f_proj``,
    already in the text embedding space).
    """

    def __init__(self, resnet: ModifiedResNet, image_size=(256, 128)):
        super().__init__()
        height, width = image_size
        if height % 16 or width % 16:
            raise ValueError(f"model.image_size {list(image_size)}: ResNet input sides must be multiples of 16")
        first = resnet.layer4[0]
        first.avgpool = nn.Identity()            # the anti-aliased stride-2 of ModifiedResNet -> 1
        if first.downsample is not None:
            first.downsample._modules["-1"] = nn.Identity()
        first.stride = 1
        pool = resnet.attnpool
        native = round((pool.positional_embedding.shape[0] - 1) ** 0.5)
        self.grid = (height // 16, width // 16)
        pool.positional_embedding = nn.Parameter(
            resize_grid_embedding(pool.positional_embedding.data, (native, native), self.grid))
        self.resnet = resnet
        self.image_size = (height, width)
        self.width = pool.k_proj.in_features
        self.embed_dim = pool.c_proj.out_features

    def forward(self, x: torch.Tensor, cls_bias: torch.Tensor | None = None):
        """Images [B, 3, H, W] -> (f_last, f, f_proj)."""
        if cls_bias is not None:
            raise ValueError("SIE applies to ViT image encoders only")
        net = self.resnet
        x3 = net.layer3(net.layer2(net.layer1(net.stem(x))))
        x4 = net.layer4(x3)
        return x3.mean(dim=(2, 3)), x4.mean(dim=(2, 3)), net.attnpool(x4)


def reid_image_tower(visual: nn.Module, image_size=(256, 128), stride: int = 0) -> nn.Module:
    """The re-ID wrapper for an open_clip image tower (ViT or ModifiedResNet).

    ``stride`` 0 means the patch size (no overlap); a smaller one gives overlapping patches."""
    if isinstance(visual, VisionTransformer):
        return ReIDViT(visual, image_size, stride or visual.conv1.kernel_size[0])
    if isinstance(visual, ModifiedResNet):
        if stride not in (0, 16):
            raise ValueError("model.stride (overlapping patches) applies to ViT image encoders only")
        return ReIDResNet(visual, image_size)
    raise ValueError(f"unsupported image tower {type(visual).__name__}")
