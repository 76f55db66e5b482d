"""State dicts of the reference code, read into reidlib's layout.

The CLIP-ReID reference (Syliz517/CLIP-ReID, ``model/make_model_clipreid.py`` and the baseline
``model/make_model.py``) saves ``torch.save(model.state_dict())``; the thesis fork
(MohammadaliFakhari/CLIP-ReID-Finetuning) saves the same model with deep prompts and LoRA. What each
key holds, learnt from those repositories (the conversion below is written from this description):

* ``image_encoder.*``: OpenAI's CLIP image tower. ViT: ``conv1``, ``class_embedding``,
  ``positional_embedding`` (already resized to the re-ID grid: h*w + 1 rows), ``ln_pre``,
  ``transformer.resblocks.i.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_post``, ``proj``;
  attention fused as ``attn.in_proj_weight`` [3w, w] (q, k, v stacked) and ``attn.out_proj``. The
  thesis's LoRA blocks hold four Linears instead, ``attn.{q,k,v}_proj`` and ``attn.proj`` (the output
  projection), each with ``w_lora_A`` [r, in] and ``w_lora_B`` [out, r] (update
  alpha/sqrt(r)·B·A; also on ``mlp.c_fc``/``mlp.c_proj`` when the MLP was adapted). RN50: the
  ModifiedResNet's ``conv1..3``, ``bn1..3``, ``layer1..4`` (layer4 at stride 1), ``attnpool``.
* ``text_encoder.{transformer, positional_embedding, ln_final, text_projection}``: CLIP's text
  tower without its token table; ``prompt_learner.token_prefix`` / ``token_suffix`` hold the token
  embeddings of the template around the learnable slots.
* ``prompt_learner.cls_ctx`` [C, 4, w] (CLIP-ReID: "A photo of a X X X X person."), or the thesis's
  ``cls_vector`` [2, w], ``cls_ctx_per_id`` [C, 1, w], ``compound_prompts_text.k`` [2, w] and
  ``compound_per_id_prompts_text.k`` [C, 1, w] for k = 0..7 ("A photo of a Y Y X person.").
* ``cv_embed`` [cameras, w] (SIE; [cameras x views, w], row camera * views + view, with
  ``SIE_CAMERA`` and ``SIE_VIEW``; [views, w] with ``SIE_VIEW`` alone), ``bottleneck``,
  ``bottleneck_proj``, ``classifier``, ``classifier_proj``; the thesis also keeps CLIP's ``logit_scale`` (unused).

The file does not record the input size, the SIE coefficient, the test feature (before/after the
BNNeck), the LoRA alpha, or whether the SIE table is over cameras, views or both (camera-only is
assumed unless ``model.sie_view`` is set); those come from the config and :func:`convert_reference`
names them.

Example::

    ref = convert_reference(torch.load("ViT-B-16_60.pth", weights_only=True), load_config("vit_clipreid").model)
    ref.model_cfg.prompt, ref.num_classes, ref.detected["architecture"]   # 'clipreid', 751, 'ViT-B-16'
    model = build_model(ref.model_cfg, ref.num_classes, ref.num_cameras)
    model.load_state_dict(ref.state)
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import open_clip
import torch

from ..data.vehicles import VERI_VIEWS  # VeRi-776's 8 orientations: the only views the reference reads
from .clip import TINY_CONFIGS  # importing it registers the tiny architectures with open_clip

# The thesis computes its LoRA update as alpha/sqrt(r)·B·A (loralib/layers.py), i.e. rsLoRA.
_THESIS_RSLORA = True
_HEAD_KEYS = ("bottleneck.", "bottleneck_proj.", "classifier.", "classifier_proj.")
_PREFIX_TOKENS = 5   # "<SOS> a photo of a": the slots start at position 5 in both repositories
_ARCH_ORDER = ("ViT-B-16", "RN50", *TINY_CONFIGS)
# reidlib's LoRA target names -> the Linears they adapt in a block (as reidlib.model.lora)
_LORA_MODULES = {"q": ["attn.q_proj"], "k": ["attn.k_proj"], "v": ["attn.v_proj"], "out": ["attn.out_proj"],
                 "mlp": ["mlp.c_fc", "mlp.c_proj"]}


@dataclass
class ReferenceWeights:
    """A reference state dict in reidlib's layout, and what was read and what was assumed."""
    model_cfg: object                 # reidlib.config.ModelConfig to build the model with
    num_classes: int
    num_cameras: int
    state: dict                       # reidlib keys -> tensors
    detected: dict = field(default_factory=dict)   # what the file says
    assumed: dict = field(default_factory=dict)    # what the config supplied (the file cannot tell)
    has_text: bool = True             # False for make_model (baseline) files: no text tower, no prompts
    num_views: int = 0

    def summary(self) -> str:
        """One line: what was detected, and what came from the config."""
        found = ", ".join(f"{k} {v}" for k, v in self.detected.items())
        taken = ", ".join(f"{k}={v}" for k, v in self.assumed.items())
        return f"detected {found}; from the config: {taken}"


def is_reference_state(obj) -> bool:
    """Whether ``obj`` looks like a state dict saved by the reference code (``image_encoder.*`` keys)."""
    if not isinstance(obj, dict) or not obj or "model" in obj:
        return False
    return any(isinstance(k, str) and _strip(k).startswith("image_encoder.") for k in obj)


def convert_reference(state: dict, model_cfg, source: str = "weights") -> ReferenceWeights:
    """Read a reference state dict into reidlib's keys and the ``ModelConfig`` that fits it.

    ``model_cfg`` supplies what the file cannot tell (input size, SIE coefficient, test feature,
    LoRA alpha and dropout, class word); everything else (architecture, stride, prompts, identities,
    cameras, LoRA rank, targets and blocks) is read from the tensors. Raises ValueError naming
    ``source`` and the key for a file it does not understand.
    """
    try:
        return _convert_reference(state, model_cfg, source)
    except KeyError as err:   # a tensor every reference model has is not in the file
        raise ValueError(f"{source}: incomplete CLIP-ReID reference state dict: no {err.args[0]!r} under "
                         "image_encoder./text_encoder./prompt_learner.; the file was cut down or is another "
                         "model's") from None


def _convert_reference(state: dict, model_cfg, source: str) -> ReferenceWeights:
    state = {_strip(k): (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    parts = _split_parts(state, source)
    vit = "proj" in parts["image"]
    arch = _architecture(parts["image"], parts["text"], vit, model_cfg.name, source)
    detected = {"format": "CLIP-ReID reference state dict", "architecture": arch}
    assumed = {"model.image_size": "x".join(map(str, model_cfg.image_size))}
    image, stride, lora = _image_tower(parts["image"], vit, model_cfg, source, detected)
    prompt = _prompt_settings(parts["prompts"], model_cfg, source, detected)
    converted = {**image, **_text_tower(parts, prompt, model_cfg, arch, source, detected), **parts["heads"]}
    num_classes = _num_classes(parts["heads"], source)
    detected["identities"] = num_classes
    num_cameras = num_views = 0
    if "cv_embed" in parts["other"]:
        converted["sie_embed"] = parts["other"]["cv_embed"]
        num_cameras, num_views = _sie_shape(converted["sie_embed"].shape[0], model_cfg, source)
        detected.update({"SIE cameras": num_cameras} if not num_views else
                        {"SIE views": num_views} if not num_cameras else
                        {"SIE cameras x views": f"{num_cameras} x {num_views}"})
        assumed["model.sie_view"] = num_views > 0
        assumed["model.sie_coe"] = model_cfg.sie_coe
    assumed["model.neck_feat"] = model_cfg.neck_feat
    lora_cfg = _lora_config(lora, model_cfg, vit and _has_split_attention(parts["image"]), detected, assumed)
    cfg = dataclasses.replace(model_cfg, name=arch, pretrained="none", quick_gelu="true", stride=stride,
                              sie_camera=num_cameras > 0, sie_view=num_views > 0, lora=lora_cfg, **prompt)
    return ReferenceWeights(cfg, num_classes, num_cameras, converted, detected, assumed,
                            has_text=bool(parts["text"]), num_views=num_views)


def _sie_shape(rows: int, model_cfg, source: str) -> tuple[int, int]:
    """(cameras, views) of a ``cv_embed`` with ``rows`` rows. The file cannot tell a camera table
    from a view or a joint one; ``model.sie_view`` says views are in it (VeRi's 8), and with
    ``model.sie_camera`` too the rows are cameras x 8, as the reference indexes them."""
    if not model_cfg.sie_view:
        return rows, 0
    if not model_cfg.sie_camera:
        return 0, rows
    if rows % VERI_VIEWS:
        raise ValueError(f"{source}: cv_embed has {rows} rows, not cameras x {VERI_VIEWS} views; "
                         "with a camera-only table set model.sie_view=false")
    return rows // VERI_VIEWS, VERI_VIEWS


def _image_tower(image: dict, vit: bool, model_cfg, source: str, detected: dict) -> tuple[dict, int, dict | None]:
    """The image tower in reidlib's keys, its patch stride (0 for ResNets) and the LoRA found."""
    if vit:
        stride = _vit_stride(image, model_cfg, source, detected)
        converted, lora = _vit_tower(image, source)
        return converted, stride, lora
    _check_resnet_grid(image, model_cfg, source)
    return {f"visual.resnet.{k}": v for k, v in image.items()}, 0, None


def _text_tower(parts: dict, prompt: dict, model_cfg, arch: str, source: str, detected: dict) -> dict:
    """Text tower, rebuilt token rows and prompt vectors in reidlib's keys (empty for make_model files)."""
    if not parts["text"]:
        detected["text encoder"] = "absent (make_model baseline: image features only)"
        return {}
    out = {f"text.{k}": v for k, v in parts["text"].items()}
    out["text.token_embedding.weight"] = _token_table(parts["prompts"], prompt, model_cfg, arch, source)
    out.update(_prompt_tensors(parts["prompts"], prompt["prompt"]))
    return out


def _lora_config(lora: dict | None, model_cfg, split_attention: bool, detected: dict, assumed: dict):
    """model.lora for the file: A/B tensors give r, targets and blocks; alpha is the config's."""
    if lora is None:
        if split_attention:
            detected["LoRA"] = "merged (split q/k/v/proj without A/B)"
        return dataclasses.replace(model_cfg.lora, enabled=False)
    detected["LoRA"] = f"r {lora['r']} on {','.join(lora['targets'])} of blocks {lora['blocks']} (A/B, unmerged)"
    assumed["model.lora.alpha"] = model_cfg.lora.alpha
    return dataclasses.replace(model_cfg.lora, enabled=True, r=lora["r"], targets=lora["targets"],
                               blocks=lora["blocks"], rslora=_THESIS_RSLORA)


# --------------------------------------------------------------------------- parts of the file

def _strip(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key     # DataParallel / DDP


def _split_parts(state: dict, source: str) -> dict[str, dict]:
    parts = {"image": {}, "text": {}, "prompts": {}, "heads": {}, "other": {}}
    unknown = []
    for key, value in state.items():
        if key.startswith("image_encoder."):
            parts["image"][key[len("image_encoder."):]] = value
        elif key.startswith("text_encoder."):
            parts["text"][key[len("text_encoder."):]] = value
        elif key.startswith("prompt_learner."):
            parts["prompts"][key[len("prompt_learner."):]] = value
        elif key.startswith(_HEAD_KEYS):
            parts["heads"][key] = value
        elif key in ("cv_embed", "logit_scale"):
            parts["other"][key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: keys a CLIP-ReID reference model does not have, e.g. {unknown[:3]}; "
                         "pass a state dict saved from the reference's make_model (or a reidlib checkpoint)")
    if "conv1.weight" not in parts["image"]:
        raise ValueError(f"{source}: no image_encoder.conv1.weight; not a CLIP-ReID reference state dict")
    return parts


def _block_count(keys, prefix: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(prefix)}(\d+)(\.|$)", k))}
    return max(found) + 1 if found else 0


def _architecture(image: dict, text: dict, vit: bool, preferred: str, source: str) -> str:
    """The open_clip architecture whose shapes the tensors have (the configured one first)."""
    if vit:
        want = {"width": image["conv1.weight"].shape[0], "patch": image["conv1.weight"].shape[-1],
                "layers": _block_count(image, "transformer.resblocks."), "embed": image["proj"].shape[1]}
    else:
        want = {"width": image["layer1.0.conv1.weight"].shape[0], "embed": image["attnpool.c_proj.weight"].shape[0],
                "layers": [_block_count(image, f"layer{i}.") for i in range(1, 5)]}
    if text:
        want["text"] = (text["ln_final.weight"].shape[0], _block_count(text, "transformer.resblocks."),
                        text["positional_embedding"].shape[0])
    names = [preferred.replace("/", "-"), *_ARCH_ORDER, *open_clip.list_models()]
    for name in dict.fromkeys(names):
        cfg = open_clip.get_model_config(name)
        if cfg is not None and _fits(cfg, want, vit):
            return name
    raise ValueError(f"{source}: no known CLIP architecture has these shapes ({want}); "
                     "the reference supports ViT-B-16 and RN50")


def _fits(cfg: dict, want: dict, vit: bool) -> bool:
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if vision.get("timm_model_name") or text.get("hf_model_name") or cfg.get("embed_dim") != want["embed"]:
        return False
    if vit:
        ok = (isinstance(vision.get("layers"), int) and vision["layers"] == want["layers"]
              and vision.get("width") == want["width"] and vision.get("patch_size") == want["patch"])
    else:
        ok = (isinstance(vision.get("layers"), (list, tuple)) and list(vision["layers"]) == want["layers"]
              and vision.get("width") == want["width"])
    if ok and "text" in want:
        ok = (text.get("width"), text.get("layers"), text.get("context_length", 77)) == want["text"]
    return ok


# --------------------------------------------------------------------------- image tower

def _vit_stride(image: dict, model_cfg, source: str, detected: dict) -> int:
    """The patch stride that turns ``model.image_size`` into the stored number of positions."""
    patch = image["conv1.weight"].shape[-1]
    positions = image["positional_embedding"].shape[0] - 1
    height, width = model_cfg.image_size

    def grid(stride: int) -> int:
        return ((height - patch) // stride + 1) * ((width - patch) // stride + 1)

    if model_cfg.stride:
        if grid(model_cfg.stride) != positions:
            raise ValueError(f"{source}: the positional embedding has {positions} patch positions, but "
                             f"model.image_size={list(model_cfg.image_size)} with model.stride={model_cfg.stride} "
                             f"gives {grid(model_cfg.stride)}; set the size and stride the model was trained with")
        detected["stride"] = model_cfg.stride
        return model_cfg.stride
    fits = [s for s in range(patch, 0, -1) if grid(s) == positions]
    if not fits:
        raise ValueError(f"{source}: the positional embedding has {positions} patch positions, which no stride "
                         f"gives at model.image_size={list(model_cfg.image_size)}; set model.image_size to the "
                         "size the model was trained at (the reference's INPUT.SIZE_TEST)")
    detected["stride"] = f"{fits[0]} (read from the positional embedding)"
    return fits[0]


def _check_resnet_grid(image: dict, model_cfg, source: str) -> None:
    positions = image["attnpool.positional_embedding"].shape[0] - 1
    height, width = model_cfg.image_size
    if positions != (height // 16) * (width // 16):
        raise ValueError(f"{source}: the attention pool has {positions} positions, but "
                         f"model.image_size={list(model_cfg.image_size)} gives {(height // 16) * (width // 16)}; "
                         "set model.image_size to the size the model was trained at")


def _has_split_attention(image: dict) -> bool:
    return any(k.endswith(".attn.q_proj.weight") for k in image)


def _vit_tower(image: dict, source: str) -> tuple[dict, dict | None]:
    """ViT keys in reidlib's layout (split q/k/v/out attention) and the LoRA found, if any."""
    out, adapters = {}, {}
    for key, value in image.items():
        match = re.fullmatch(r"(transformer\.resblocks\.\d+\.)(attn|mlp)\.(\w+)\.?(.*)", key)
        if match is None:
            out[f"visual.vit.{key}"] = value
            continue
        block, part, module, leaf = match.groups()
        base = f"visual.vit.{block}{part}."
        if module == "in_proj_weight" or module == "in_proj_bias":
            leaf = "weight" if module == "in_proj_weight" else "bias"
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{base}{name}.{leaf}"] = chunk.clone()
            continue
        module = "out_proj" if (part, module) == ("attn", "proj") else module
        if leaf in ("w_lora_A", "w_lora_B"):
            adapters.setdefault(f"{base}{module}", {})[leaf[-1]] = value
        else:
            out[f"{base}{module}.{leaf}"] = value
    return (out, None) if not adapters else _with_lora(out, adapters, source)


def _with_lora(out: dict, adapters: dict, source: str) -> tuple[dict, dict]:
    """Rename adapted Linears to peft's keys and read r, targets and blocks off the adapters."""
    ranks, found = set(), set()
    for prefix, ab in adapters.items():
        if set(ab) != {"A", "B"} or f"{prefix}.weight" not in out:
            raise ValueError(f"{source}: {prefix.replace('visual.vit.', 'image_encoder.')} has LoRA tensors but "
                             "no base weight (the reference drops it when LoRA dropout is 0); this file cannot "
                             "be loaded")
        out[f"{prefix}.base_layer.weight"] = out.pop(f"{prefix}.weight")
        if f"{prefix}.bias" in out:
            out[f"{prefix}.base_layer.bias"] = out.pop(f"{prefix}.bias")
        out[f"{prefix}.lora_A.default.weight"], out[f"{prefix}.lora_B.default.weight"] = ab["A"], ab["B"]
        ranks.add(ab["A"].shape[0])
        block, module = re.fullmatch(r"visual\.vit\.transformer\.resblocks\.(\d+)\.(.+)", prefix).groups()
        found.add((int(block), module))
    blocks = {b for b, _ in found}
    modules = {m for _, m in found}
    targets = [t for t, names in _LORA_MODULES.items() if set(names) & modules]
    expected = {(b, m) for b in blocks for t in targets for m in _LORA_MODULES[t]}
    if len(ranks) != 1 or found != expected:
        raise ValueError(f"{source}: LoRA adapters of mixed ranks or on an irregular set of layers; "
                         "reidlib adapts the same projections in every chosen block")
    n_blocks = _block_count([k[len("visual.vit."):] for k in out], "transformer.resblocks.")
    spec = "all" if blocks == set(range(n_blocks)) else ",".join(map(str, sorted(blocks)))
    return out, {"r": ranks.pop(), "targets": targets, "blocks": spec}


# --------------------------------------------------------------------------- prompts and text

def _prompt_settings(prompts: dict, model_cfg, source: str, detected: dict) -> dict:
    """Prompt keys of the ModelConfig, read off the prompt learner's tensors."""
    if "cls_ctx" in prompts:
        n_per_id = prompts["cls_ctx"].shape[1]
        detected["prompts"] = f"CLIP-ReID, {n_per_id} per-ID tokens"
        return dict(prompt="clipreid", n_shared=0, n_per_id=n_per_id, depth=1, deep_per_id=True)
    if "cls_ctx_per_id" in prompts:
        depth = 1 + _block_count(prompts, "compound_prompts_text.")
        deep_per_id = depth == 1 or "compound_per_id_prompts_text.0" in prompts
        n_shared = prompts["cls_vector"].shape[0] if "cls_vector" in prompts else 0
        n_per_id = prompts["cls_ctx_per_id"].shape[1]
        detected["prompts"] = f"deep (thesis), {n_shared} shared + {n_per_id} per-ID tokens, depth {depth}"
        return dict(prompt="deep", n_shared=n_shared, n_per_id=n_per_id, depth=depth, deep_per_id=deep_per_id)
    if prompts and set(prompts) - {"token_prefix", "token_suffix"}:
        raise ValueError(f"{source}: unknown prompt learner keys {sorted(prompts)[:4]}")
    return dict(prompt=model_cfg.prompt, n_shared=model_cfg.n_shared, n_per_id=model_cfg.n_per_id,
                depth=model_cfg.depth, deep_per_id=model_cfg.deep_per_id)


def _prompt_tensors(prompts: dict, kind: str) -> dict:
    if kind == "clipreid":
        return {"prompts.per_id": prompts["cls_ctx"]}
    out = {"prompts.per_id": prompts["cls_ctx_per_id"]}
    if "cls_vector" in prompts:
        out["prompts.shared"] = prompts["cls_vector"]
    layers = _block_count(prompts, "compound_prompts_text.")
    if layers and "cls_vector" in prompts:
        out["prompts.deep_shared"] = torch.stack([prompts[f"compound_prompts_text.{k}"] for k in range(layers)])
    if layers and "compound_per_id_prompts_text.0" in prompts:
        out["prompts.deep_per_id"] = torch.stack([prompts[f"compound_per_id_prompts_text.{k}"] for k in range(layers)])
    return out


def _token_table(prompts: dict, prompt: dict, model_cfg, arch: str, source: str) -> torch.Tensor:
    """CLIP's token embedding table, rebuilt from the template's stored embeddings.

    The reference keeps no token table, only ``token_prefix`` (positions 0-4) and ``token_suffix``
    (after the slots) of its template. Those rows are all a prompt ever reads (the slots are
    replaced), so they go into an otherwise zero table at the template's token ids.
    """
    if "token_prefix" not in prompts or "token_suffix" not in prompts:
        raise ValueError(f"{source}: text_encoder.* without prompt_learner.token_prefix/token_suffix")
    prefix, suffix = prompts["token_prefix"][0], prompts["token_suffix"][0]
    if prefix.shape[0] != _PREFIX_TOKENS:
        raise ValueError(f"{source}: prompt_learner.token_prefix holds {prefix.shape[0]} tokens, not the "
                         f"{_PREFIX_TOKENS} of '<SOS> A photo of a'")
    width, context = prefix.shape[-1], prefix.shape[0] + suffix.shape[0] + prompt["n_shared"] + prompt["n_per_id"]
    slots = ["Y"] * prompt["n_shared"] + ["X"] * prompt["n_per_id"]
    template = " ".join(["A photo of a", *slots, f"{model_cfg.class_token}."])
    tokens = open_clip.tokenize([template], context_length=context)[0]
    vocab = open_clip.get_model_config(arch)["text_cfg"]["vocab_size"]
    table = torch.zeros(vocab, width)
    slot_end = _PREFIX_TOKENS + len(slots)
    rows = [*zip(tokens[:_PREFIX_TOKENS].tolist(), prefix), *zip(tokens[slot_end:].tolist(), suffix)]
    for token, vector in rows:      # a token met twice ("a", padding) has the same embedding each time
        table[token] = vector
    return table


def _num_classes(heads: dict, source: str) -> int:
    if "classifier.weight" not in heads:
        raise ValueError(f"{source}: no classifier.weight; not a complete CLIP-ReID model state dict")
    return heads["classifier.weight"].shape[0]
