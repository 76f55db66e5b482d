"""CLIP's weights in: the ``openai`` tag, a local file (OpenAI's JIT ``.pt`` or state dict, an
open_clip checkpoint, safetensors) or ``none`` (random init), and the tiny test architectures.

Everything CLIP is open_clip's: its architecture configs (``open_clip.get_model_config``), its
model class (``open_clip.CLIP``), its tag table and downloader (``get_pretrained_cfg``,
``download_pretrained``). Reading the file and putting the tensors in the model is done here
rather than by ``open_clip.create_model`` / ``load_checkpoint`` / ``load_openai_model``, because
those cannot do what this library needs (and the tensors end up the same):

* ``load_openai_model`` falls back to ``torch.load`` without ``weights_only`` (runs pickled code)
  and rebuilds the architecture from the tensor shapes, guessing heads 64 wide, which gets the
  tiny test configs wrong and ignores ``model.name``;
* ``load_checkpoint`` reads with ``torch.load(weights_only=True)``, which refuses OpenAI's JIT
  archives, and loads strictly, which fails on the bookkeeping entries of OpenAI's state dicts;
* both need a randomly initialised model first (about a second for ViT-B/16 on a CPU); here the
  model is built on the meta device and the tensors are assigned;
* neither tells whether a file is an open_clip training checkpoint, which decides QuickGELU.

The re-ID changes to the image tower (stride/OLP, the resized positional grid) are the model's
(:mod:`reidlib.model.backbone`), made after loading.

Example::

    clip = load_clip("ViT-B-16", "/models/ViT-B-16.pt")   # OpenAI's JIT archive, QuickGELU
    clip = load_clip("vit-tiny", "none")                  # random, for tests
    state_dict, openai_weights = read_state_dict("/models/ViT-B-16.pt")
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
from torch import nn

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
    # (reidlib.demo.pretrain), so its positional embedding is used as learned, not resized.
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


