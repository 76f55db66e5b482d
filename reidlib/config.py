"""Typed configuration: dataclasses, YAML loading, ``key.sub=value`` overrides.

Every key is declared once, here, with its default and a one-line help text (the ``help``
metadata); ``python -m reidlib --help`` prints them all. YAML files in ``reidlib/configs/`` set
only what differs from these defaults, and may start from another file with ``base: NAME``.

Example::

    from reidlib import load_config
    cfg = load_config("vit_proposed", ["data.root=/data", "stage2.epochs=30"])
    cfg.model.prompt            # 'deep'
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import fnmatch
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_origin, get_type_hints

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


def opt(default: Any, help: str):  # noqa: A002 - "help" reads best at the call sites
    """A dataclass field with a default (copied for lists/dicts) and a help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class LoraConfig:
    enabled: bool = opt(False, "apply LoRA (peft) to the vision tower in stage 2; stage 2 then trains LoRA, LayerNorms, BNNeck and classifiers only")
    r: int = opt(16, "LoRA rank")
    alpha: float = opt(4.0, "LoRA alpha; scaling is alpha/sqrt(r) with rslora, alpha/r without")
    dropout: float = opt(0.05, "dropout on the LoRA branch input")
    rslora: bool = opt(True, "rank-stabilised scaling alpha/sqrt(r) (peft use_rslora), as the thesis")
    targets: list = opt(["q", "k", "v", "out"], "projections to adapt: any of q, k, v, out, mlp (mlp = both MLP Linears)")
    blocks: str = opt("all", "vision blocks to adapt: all | top | bottom | half-up | half-bottom | comma list of indices, e.g. '8,9,10,11'")
    lr: float = opt(5.0e-6, "stage-2 base LR when LoRA is on; 5e-6 is the thesis's (its full fine-tuning LR); LoRA usually wants far more, e.g. 1e-4")


@dataclass
class ModelConfig:
    name: str = opt("ViT-B-16", "open_clip architecture (ViT-B-16, RN50) or a reidlib test config (vit-tiny, vit-tiny8, rn-tiny)")
    pretrained: str = opt("openai", "weights: 'openai' (open_clip tag, needs network once), a local file (OpenAI .pt JIT/state dict, open_clip checkpoint), 'none' (random init), or a trained re-ID checkpoint (reidlib's or the CLIP-ReID reference's) to fine-tune from: its encoders are taken, classifiers and per-identity prompts start afresh")
    quick_gelu: str = opt("auto", "QuickGELU activations: auto (on for OpenAI weights, which were trained with it) | true | false")
    image_size: list = opt([256, 128], "input height, width")
    stride: int = opt(0, "patch-embedding stride; 0 = the patch size (16 for ViT-B/16); 12 gives overlapping patches (OLP)")
    sie_camera: bool = opt(False, "side information embedding (SIE): a learnable per-camera vector added to the CLS token")
    sie_view: bool = opt(False, "SIE over viewpoints (VeRi-776's view labels); with sie_camera one vector per (camera, view) pair, row camera * num_views + view, as the reference")
    sie_coe: float = opt(3.0, "SIE coefficient (1.0 in the SIE+OLP setting)")
    neck_feat: str = opt("before", "test feature taken before or after the BNNeck: before | after")
    prompt: str = opt("clipreid", "prompt learner: clipreid (per-ID tokens at the input) | deep (shared + per-ID tokens in intermediate text layers)")
    n_shared: int = opt(0, "shared learnable prompt tokens")
    n_per_id: int = opt(4, "identity-specific learnable prompt tokens")
    depth: int = opt(1, "layers that receive prompts: 1 = input only; 9 = input + text blocks 1..8")
    deep_per_id: bool = opt(True, "with depth > 1, also replace the per-ID tokens in deep layers (false: per-ID only at the input, shared deep)")
    class_token: str = opt("person", "the word after the prompt tokens in the template ('vehicle' for vehicle data)")
    text_chunk: int = opt(64, "identities per chunk when computing all text features for stage 2")
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    dataset: str = opt("market1501", "market1501 | dukemtmc | msmt17 | iust | occ_duke | veri | vehicleid | folder | synth (the generated set)")
    root: str = opt("data", "folder that holds the data set (its usual nesting is found automatically)")
    num_workers: int = opt(4, "DataLoader worker processes (0 = main process)")
    padding: int = opt(10, "zero padding before the random crop")
    flip_prob: float = opt(0.5, "horizontal flip probability")
    erase_prob: float = opt(0.5, "random erasing probability (random-normal fill)")
    pixel_mean: list = opt([0.5, 0.5, 0.5], "normalisation mean (CLIP ViT as the reference: 0.5; RN50: ImageNet)")
    pixel_std: list = opt([0.5, 0.5, 0.5], "normalisation std")
    interpolation: str = opt("bicubic", "resize interpolation, train and test alike (the reference tests with bilinear: set test_interpolation)")
    test_interpolation: str = opt("bicubic", "resize interpolation at test time")
    gpu_augment: bool = opt(True, "on CUDA: decode the train set once to a uint8 cache and augment on the GPU")
    test_size: int = opt(800, "VehicleID only: test list to evaluate on, 800 | 1600 | 2400 identities (train_test_split/test_list_N.txt)")


@dataclass
class Stage1Config:
    epochs: int = opt(120, "prompt-learning epochs")
    batch_size: int = opt(64, "cached image features per step")
    lr: float = opt(3.5e-4, "Adam base LR (thesis 5e-4)")
    weight_decay: float = opt(1e-4, "Adam L2 weight decay")
    warmup_epochs: int = opt(5, "linear warm-up epochs")
    warmup_lr: float = opt(1e-5, "LR at the start of warm-up")
    min_lr: float = opt(1e-6, "cosine floor")
    checkpoint_period: int = opt(0, "save a resumable checkpoint every N epochs (0 = at the end only)")
    log_period: int = opt(50, "steps between log lines")


@dataclass
class Stage2Config:
    epochs: int = opt(60, "image-encoder fine-tuning epochs")
    ims_per_batch: int = opt(64, "images per batch (P identities x K instances)")
    num_instance: int = opt(4, "K: images per identity in a batch")
    lr: float = opt(5e-6, "Adam base LR (full fine-tuning; LoRA uses model.lora.lr)")
    bias_lr_factor: float = opt(2.0, "LR multiplier for bias parameters")
    weight_decay: float = opt(1e-4, "Adam L2 weight decay")
    weight_decay_bias: float = opt(1e-4, "weight decay for biases")
    warmup_epochs: int = opt(10, "linear warm-up epochs")
    warmup_factor: float = opt(0.1, "LR factor at the start of warm-up")
    steps: list = opt([30, 50], "epochs at which the LR is multiplied by gamma")
    gamma: float = opt(0.1, "LR decay factor")
    id_weight: float = opt(0.25, "weight of the ID (label-smoothed CE) loss (RN50: 1.0)")
    tri_weight: float = opt(1.0, "weight of the batch-hard triplet loss")
    i2t_weight: float = opt(1.0, "weight of the image-to-text CE loss")
    margin: float = opt(0.3, "triplet margin")
    label_smoothing: float = opt(0.1, "epsilon of the label-smoothed CE losses")
    checkpoint_period: int = opt(0, "save a resumable checkpoint every N epochs (0 = at the end only)")
    eval_period: int = opt(0, "evaluate on query/gallery every N epochs (0 = at the end only); logged, never used to pick a model")
    log_period: int = opt(50, "steps between log lines")


@dataclass
class TestConfig:
    weights: str = opt("", "weights to evaluate or extract with (python -m reidlib test/extract/search): a reidlib checkpoint or a CLIP-ReID reference state dict")
    feat_norm: bool = opt(True, "L2-normalise features before the distance")
    metric: str = opt("euclidean", "euclidean (squared) | cosine")
    batch_size: int = opt(128, "images per inference batch")
    flip: bool = opt(False, "flip test-time augmentation: average the features of the image and its mirror")
    rerank: bool = opt(False, "also report k-reciprocal re-ranked metrics")
    k1: int = opt(20, "re-ranking k1")
    k2: int = opt(6, "re-ranking k2")
    lambda_value: float = opt(0.3, "re-ranking weight of the original distance")
    max_rank: int = opt(50, "length of the CMC curve")
    precision: str = opt("fp32", "feature extraction: fp32 (as the reference) | bf16 (autocast) | auto (bf16 on CUDA, fp32 on CPU); training keeps the top-level precision")
    default_camera: int = opt(-1, "with a model trained with SIE: the 0-based camera id of images that have none (names not Market-style); -1 makes such images an error")
    default_view: int = opt(-1, "with a model trained with view SIE (model.sie_view): the 0-based view id of images that have none; -1 makes such images an error")
    trials: int = opt(10, "VehicleID only: random gallery draws (one image per identity) the metrics are averaged over; trial k draws with seed k")
    tf32: bool = opt(False, "TF32 matmuls and convolutions for test features on CUDA (Ampere+): faster, ~1e-3 relative error; off by default, so features match fp32 (training's TF32 is the top-level tf32)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    test: TestConfig = field(default_factory=TestConfig)
    method: str = opt("clipreid", "the training method, a registered name: clipreid | thesis | pcl | promptsg | a plug-in's (python -m reidlib methods lists them)")
    plugins: list = opt([], "Python files (.py) or importable modules that register methods of your own (reidlib.register_method); imported before the method is looked up, here and in every process a sweep or torchrun starts")
    options: dict = opt({}, "the method's own settings, set as options.NAME=value (python -m reidlib methods NAME lists them with their defaults)")
    seed: int = opt(1234, "seed for python, numpy, torch and the samplers")
    output_dir: str = opt("results/runs/default", "run folder: resolved config, checkpoints, metrics.jsonl, metrics.json")
    tensorboard: bool = opt(True, "write TensorBoard event files of every epoch and evaluation to OUTPUT_DIR/tensorboard/ (rank 0; view with tensorboard --logdir OUTPUT_DIR/tensorboard); false: metrics.jsonl only")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    precision: str = opt("auto", "training: auto (bf16 autocast on CUDA cards with compute capability >= 8.0, fp16 with a GradScaler on older ones, fp32 on CPU) | bf16 | fp16 (autocast + GradScaler) | fp32 (test features: test.precision)")
    tf32: bool = opt(True, "TF32 for training's fp32 matmuls and convolutions on CUDA (Ampere+; a no-op elsewhere); scoped to training, test features follow test.tf32")
    deterministic: bool = opt(False, "deterministic kernels (torch.use_deterministic_algorithms(warn_only), CUBLAS_WORKSPACE_CONFIG, no cuDNN autotuning), for the rest of the process: slower, repeatable on one GPU and software stack; bit-identical resume is guaranteed on the CPU only")
    compile: bool = opt(False, "torch.compile the image encoder (CUDA)")
    resume: str = opt("auto", "auto (continue from the run folder's latest checkpoint) | none | PATH")
    stage1_weights: str = opt("", "skip stage 1 and load its prompts from this checkpoint")
    base: str = opt("", "YAML only: the config this file starts from (a file in reidlib/configs or a path)")


# Keys a method's YAML does not carry over when a base config (tiny, say) replaces it: the
# architecture, the weights and the LoRA learning rate stay the base's (reidlib.methods.method_config).
BASE_OWNED_KEYS = ("model.name", "model.pretrained", "model.lora.lr")

# Data sets whose reference settings differ from the person ones (input size, class word, schedule):
# the shipped config that holds them. A sweep applies that file's own keys to every method's config.
DATASET_CONFIGS: dict[str, str] = {"veri": "vit_clipreid_veri", "vehicleid": "vit_clipreid_vehicleid"}


def dataset_keys(dataset: str) -> list[str]:
    """``key=value`` settings of ``dataset``'s own config (:data:`DATASET_CONFIGS`): the keys its
    file sets itself, not those of its base, and not ``output_dir``; [] for the person data sets.

    >>> dataset_keys("veri")
    ['model.image_size=[256, 256]', 'model.class_token=vehicle', 'data.dataset=veri', 'stage1.epochs=60']
    """
    if dataset not in DATASET_CONFIGS:
        return []
    with open(resolve_config_path(DATASET_CONFIGS[dataset])) as fh:
        own = flatten(yaml.safe_load(fh) or {})
    return [f"{k}={v}" for k, v in own.items() if k not in ("base", "output_dir")]


def method_of(cfg: Config) -> str:
    """The name of a built-in method's variant (baseline | proposed | deep_only | lora_only), read off
    the model settings as reidlib 0.2 named runs; kept for files written before methods were plug-ins
    (their configs hold no ``method``). New code asks the method: ``reidlib.methods.run_label``."""
    deep = cfg.model.prompt == "deep"
    lora = cfg.model.lora.enabled
    return {(False, False): "baseline", (True, True): "proposed",
            (True, False): "deep_only", (False, True): "lora_only"}[(deep, lora)]


def legacy_method(tree: dict) -> str:
    """The method of a config saved before the ``method`` key existed: the thesis when it used deep
    prompts or LoRA, else CLIP-ReID.

    >>> legacy_method({"model": {"prompt": "deep", "lora": {"enabled": False}}})
    'thesis'
    """
    model = tree.get("model", {})
    deep = model.get("prompt") == "deep"
    lora = bool(model.get("lora", {}).get("enabled", False))
    return "thesis" if deep or lora else "clipreid"


# --------------------------------------------------------------------------- helpers

def to_dict(cfg) -> dict:
    """Plain nested dict of a config (what is saved next to results and in checkpoints)."""
    return dataclasses.asdict(cfg)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested config dict; only config sections are opened, other values are leaves.

    >>> flatten({"seed": 1, "model": {"lora": {"r": 16}, "prompt": "deep"}})
    {'seed': 1, 'model.lora.r': 16, 'model.prompt': 'deep'}
    """
    flat = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        section = name in {f.name for f in fields(Config)} or name == "model.lora"
        if isinstance(v, dict) and section:
            flat.update(flatten(v, name + "."))
        else:
            flat[name] = v
    return flat


def _ignored(key: str, ignore) -> bool:
    """Exact key, any key under it ("test" covers "test.k1"), or an fnmatch pattern."""
    return any(key == p or key.startswith(p + ".") or fnmatch.fnmatchcase(key, p) for p in ignore)


def _same(a, b) -> bool:
    # a config saved with tuples must equal one loaded from YAML with lists
    as_list = lambda v: [as_list(x) for x in v] if isinstance(v, (list, tuple)) else v  # noqa: E731
    return as_list(a) == as_list(b)


_ABSENT = object()


def config_diff(saved: dict, current: dict, ignore=(), names=("checkpoint", "current")) -> list[str]:
    """Dotted keys whose values differ, as ``"key: <saved> (checkpoint) != <current> (current)"``
    (``names`` replaces the two words in brackets).

    >>> config_diff({"stage1": {"lr": 1, "epochs": 2}}, {"stage1": {"lr": 1, "epochs": 3}, "seed": 0})
    ['seed: <absent> (checkpoint) != 0 (current)', 'stage1.epochs: 2 (checkpoint) != 3 (current)']
    """
    a, b = flatten(saved), flatten(current)
    show = lambda v: "<absent>" if v is _ABSENT else repr(v)  # noqa: E731
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if not _ignored(key, ignore) and (va is _ABSENT or vb is _ABSENT or not _same(va, vb)):
            out.append(f"{key}: {show(va)} ({names[0]}) != {show(vb)} ({names[1]})")
    return out


def all_keys(cls=Config, prefix: str = "") -> dict[str, tuple[Any, str, Any]]:
    """Dotted key -> (type, help, default) for every leaf key."""
    out = {}
    hints = get_type_hints(cls)
    instance = cls()
    for f in fields(cls):
        typ = hints[f.name]
        if is_dataclass(typ):
            out.update(all_keys(typ, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = (typ, f.metadata.get("help", ""), getattr(instance, f.name))
    return out


def help_text(cfg: Config | None = None) -> str:
    """Every config key with its value and meaning: the defaults, or ``cfg``'s values (a value
    that differs from the default says so).

    >>> help_text(load_config("tiny")).splitlines()[0]
    "  model.name = 'vit-tiny8'  (default: 'ViT-B-16')"
    """
    values = flatten(to_dict(cfg)) if cfg is not None else {}
    lines = []
    for key, (_, text, default) in all_keys().items():
        value = values.get(key, default)
        note = f"  (default: {default!r})" if cfg is not None and not _same(value, default) else ""
        lines.append(f"  {key} = {value!r}{note}\n      {text}")
    return "\n".join(lines)


def _unknown_key_error(key: str, valid: list[str], where: str) -> KeyError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see `python -m reidlib --help` for the keys"
    return KeyError(f"unknown config key '{key}' in {where}{hint}")


def _parse_text(text: str, origin, key: str) -> Any:
    """A command-line or YAML string as the Python value it spells (true, 3, 1e-4, [1, 2], ...)."""
    if origin is bool:
        low = text.lower()
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"config key '{key}' wants true/false, got '{text}'")
    if origin in (int, float):
        try:
            return int(text)  # exact, also beyond float's 2**53
        except ValueError:
            pass
        try:
            return float(text)  # YAML 1.1 reads '5e-06' as a string; _coerce checks ints
        except ValueError:
            wants = "an integer" if origin is int else "a number"
            raise ValueError(f"config key '{key}' wants {wants}, got '{text}'") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"config key '{key}': cannot parse '{text}'") from err


def _coerce(value: Any, typ, key: str) -> Any:
    """Convert a YAML or command-line value to the declared type, with a clear error.

    Ints stay ints (``2.0`` is 2, ``1.5`` is an error, never truncated), a bool is no number, and
    the elements of a list key are converted to its :data:`LIST_ITEMS` type one by one.

    >>> _coerce("[64, 32]", list, "model.image_size")
    [64, 32]
    >>> _coerce("1.5", int, "stage2.epochs")
    Traceback (most recent call last):
    ValueError: config key 'stage2.epochs' wants an integer, got 1.5
    """
    origin = get_origin(typ) or typ
    if isinstance(value, str) and origin is not str:
        value = _parse_text(value.strip(), origin, key)
    if origin in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"config key '{key}' wants {'an integer' if origin is int else 'a number'}, got {value!r}")
    if origin is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"config key '{key}' wants an integer, got {value!r}")
        return int(value)
    if origin is float:
        return float(value)
    if origin is str and isinstance(value, bool):
        return "true" if value else "false"
    if origin is str and value is not None and not isinstance(value, str):
        return str(value)
    if origin is list:
        items = list(value) if isinstance(value, (tuple, list)) else [value]
        item_type = LIST_ITEMS.get(key)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(items)] if item_type else items
    if origin is bool and not isinstance(value, bool):
        raise ValueError(f"config key '{key}' wants true/false, got {value!r}")
    return value


def coerce(value: Any, typ, key: str) -> Any:
    """``value`` (a YAML value or a command-line string) as type ``typ``, or a one-line error naming
    ``key``: the conversion every config key gets, for the methods' own option dataclasses."""
    return _coerce(value, typ, key)


def _set(cfg, dotted: str, value: Any, where: str) -> None:
    if dotted.startswith("options.") and len(dotted) > len("options."):
        # a method's own key: typed and checked by the method (reidlib.methods), which config cannot see
        name = dotted[len("options."):]
        cfg.options = {**cfg.options, name: _parse_text(value.strip(), str, dotted) if isinstance(value, str) else value}
        return
    keys = all_keys()
    if dotted not in keys:
        raise _unknown_key_error(dotted, list(keys), where)
    typ = keys[dotted][0]
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = getattr(node, p)
    setattr(node, leaf, _coerce(value, typ, dotted))


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, or a shipped config by name (with or without .yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (path.name if path.suffix else f"{path.name}.yaml")
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"config '{name}' not found: pass a YAML path or one of {', '.join(names)}")


def _read_yaml_chain(path: Path, seen: tuple = ()) -> dict[str, Any]:
    if path in seen:
        raise ValueError(f"config {path}: 'base' chain loops back to itself")
    tree = _load_yaml(path)
    if not isinstance(tree, dict):
        raise ValueError(f"config {path}: expected a mapping of keys, got {type(tree).__name__}")
    flat = flatten(tree)
    base = flat.pop("base", "")
    merged = _read_yaml_chain(_base_path(base, path), seen + (path,)) if base else {}
    merged.update({k: (v, str(path)) for k, v in flat.items()})
    return merged


def _load_yaml(path: Path) -> Any:
    """A YAML file's content; a one-line ValueError naming the file, the line and the cause for one
    that does not parse (a tab in the indentation, a ``!!python/...`` tag, which safe loading refuses)."""
    try:
        with open(path) as fh:
            return yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"config {path}: not valid YAML ({problem}{where}); indent with spaces, not tabs, and "
                         "use plain values (no !!python tags)") from None


def _base_path(base: str, config: Path) -> Path:
    """Where ``base:`` points: a path relative to the YAML that names it (so that a folder of
    configs can be moved or run from anywhere), else as :func:`resolve_config_path` finds it (a
    path from the current folder, or a shipped config's name)."""
    beside = config.parent / base
    return beside if not Path(base).is_absolute() and beside.is_file() else resolve_config_path(base)


def read_config_keys(name: str | Path) -> dict[str, Any]:
    """Dotted key -> value of a YAML file with its ``base`` chain, before defaults and checks.

    >>> read_config_keys("vit_proposed")["model.prompt"]
    'deep'
    """
    return {k: v for k, (v, _) in _read_yaml_chain(resolve_config_path(name)).items()}


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Build a :class:`Config` from defaults, an optional YAML file and ``key=value`` overrides.

    Example::

        cfg = load_config("vit_clipreid", ["data.dataset=dukemtmc", "stage1.lr=5e-4"])
    """
    cfg = Config()
    if path is not None:
        for key, (value, where) in _read_yaml_chain(resolve_config_path(path)).items():
            _set(cfg, key, value, where)
    if isinstance(overrides, dict):
        overrides = [f"{k}={v}" for k, v in overrides.items()]
    if isinstance(overrides, str):   # one "key=value": iterating it would give its characters
        overrides = [overrides]
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override '{item}' is not key=value (e.g. stage2.epochs=30)")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), value, "the command line")
    validate(cfg)
    return cfg


def with_defaults(tree: dict) -> dict:
    """A saved config as this reidlib resolves it: keys added since it was written take their
    defaults, and its ``method`` is inferred when it predates methods (so that a run resumes, and
    a finished run is reused, across such an upgrade); the tree as it is if it cannot be read.

    >>> with_defaults({"model": {"prompt": "deep"}})["method"]
    'thesis'
    """
    try:
        return to_dict(config_from_dict(tree))
    except (KeyError, ValueError, TypeError):
        return tree


def config_from_dict(tree: dict) -> Config:
    """Rebuild a Config from :func:`to_dict` output (e.g. the one stored in a checkpoint)."""
    cfg = Config()
    if "method" not in tree:      # saved by reidlib 0.2, before methods were plug-ins
        tree = {**tree, "method": legacy_method(tree)}
    for key, value in flatten(tree).items():
        _set(cfg, key, value, "a saved config")
    return cfg


# --------------------------------------------------------------------------- value checks

# Element type of each list key; _coerce converts and checks the elements one by one.
LIST_ITEMS: dict[str, type] = {
    "model.image_size": int, "model.lora.targets": str, "data.pixel_mean": float,
    "data.pixel_std": float, "stage2.steps": int, "plugins": str,
}


@dataclass(frozen=True)
class Rule:
    """A range check: ``ok(value)`` must hold; ``wants`` says what a valid value is."""
    ok: Any
    wants: str


_COUNT = Rule(lambda v: v >= 1, "a positive integer")
_NON_NEGATIVE = Rule(lambda v: v >= 0, ">= 0")
_POSITIVE = Rule(lambda v: v > 0, "> 0")
_PERIOD = Rule(lambda v: v >= 0, ">= 0 (0 = at the end only)")
_PROBABILITY = Rule(lambda v: 0 <= v <= 1, "in [0, 1]")
_BELOW_ONE = Rule(lambda v: 0 <= v < 1, "in [0, 1)")

# Range of every numeric key (fnmatch patterns; the first match applies). NaN fails every rule.
RANGES: dict[str, Rule] = {
    "model.image_size": Rule(lambda v: len(v) == 2 and all(x >= 1 for x in v),
                             "two positive integers [height, width], e.g. [256, 128]"),
    "model.stride": Rule(lambda v: v >= 0, ">= 0 (0 = the patch size)"),
    "model.n_shared": _NON_NEGATIVE, "model.n_per_id": _NON_NEGATIVE, "model.depth": _COUNT,
    "model.text_chunk": _COUNT, "model.lora.r": _COUNT, "model.lora.alpha": _POSITIVE,
    "model.lora.dropout": _BELOW_ONE, "model.lora.lr": _POSITIVE,
    "data.num_workers": Rule(lambda v: v >= 0, ">= 0 (0 = the main process)"), "data.padding": _NON_NEGATIVE,
    "data.flip_prob": _PROBABILITY, "data.erase_prob": _PROBABILITY,
    "data.pixel_mean": Rule(lambda v: len(v) == 3 and all(math.isfinite(x) for x in v), "three numbers (R, G, B)"),
    "data.pixel_std": Rule(lambda v: len(v) == 3 and all(x > 0 for x in v), "three positive numbers (R, G, B)"),
    "stage1.lr": _POSITIVE, "stage1.warmup_lr": _NON_NEGATIVE, "stage1.min_lr": _NON_NEGATIVE,
    "stage2.lr": _POSITIVE, "stage2.bias_lr_factor": _POSITIVE, "stage2.gamma": _POSITIVE,
    "stage2.warmup_factor": Rule(lambda v: 0 < v <= 1, "in (0, 1]"),
    "stage2.steps": Rule(lambda v: all(x >= 1 for x in v) and v == sorted(set(v)),
                         "increasing positive epochs, e.g. [30, 50]"),
    "stage2.ims_per_batch": _COUNT, "stage2.num_instance": _COUNT,
    "stage2.label_smoothing": _BELOW_ONE, "stage2.margin": _NON_NEGATIVE, "stage2.*_weight": _NON_NEGATIVE,
    "stage*.epochs": _COUNT, "*.batch_size": _COUNT, "stage*.log_period": _COUNT,
    "stage*.checkpoint_period": _PERIOD, "stage2.eval_period": _PERIOD,
    "stage*.warmup_epochs": _NON_NEGATIVE, "stage*.weight_decay*": _NON_NEGATIVE,
    "test.k1": _COUNT, "test.k2": _COUNT, "test.lambda_value": _PROBABILITY, "test.max_rank": _COUNT,
    "test.default_camera": Rule(lambda v: v >= -1, "a 0-based camera id, or -1 for none"),
    "test.default_view": Rule(lambda v: v >= -1, "a 0-based view id, or -1 for none"),
    "test.trials": _COUNT,
    "data.test_size": Rule(lambda v: v in (800, 1600, 2400), "one of VehicleID's test sizes 800, 1600, 2400"),
    "seed": _NON_NEGATIVE,
}

# Keys that take one of a few words.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.neck_feat": ("before", "after"), "model.prompt": ("clipreid", "deep"),
    "model.quick_gelu": ("auto", "true", "false"), "test.metric": ("euclidean", "cosine"),
    "precision": ("auto", "bf16", "fp16", "fp32"), "test.precision": ("auto", "bf16", "fp32"),
}


def _value(cfg: Config, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def range_errors(cfg: Config) -> list[str]:
    """One message per key whose value is out of range or not one of its choices.

    >>> cfg = Config()
    >>> cfg.stage1.batch_size = 0
    >>> range_errors(cfg)
    ['stage1.batch_size=0 is out of range: it must be a positive integer (default 64)']
    """
    keys = all_keys()
    errors = []
    for key in keys:
        value, default = _value(cfg, key), keys[key][2]
        rule = next((r for pattern, r in RANGES.items() if fnmatch.fnmatchcase(key, pattern)), None)
        if rule is not None and not rule.ok(value):
            errors.append(f"{key}={value!r} is out of range: it must be {rule.wants} (default {default!r})")
        elif not _finite(value):   # inf passes "> 0"; no key has a use for it
            errors.append(f"{key}={value!r} is not a finite number (default {default!r})")
        if key in CHOICES and value not in CHOICES[key]:
            errors.append(f"{key}={value!r}: must be one of {', '.join(CHOICES[key])} (default {default!r})")
    return errors


def _finite(value) -> bool:
    """False for an inf or NaN number, or a list holding one."""
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def _type_wanted(value, typ, key: str) -> str | None:
    """What ``key`` wants when ``value`` is not of its declared type ``typ``; None when it is."""
    origin = get_origin(typ) or typ
    if origin is bool:
        return None if isinstance(value, bool) else "true or false"
    if origin is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if origin is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if origin is str:   # None: an empty YAML value, which load_config has always let through
        return None if value is None or isinstance(value, str) else "a string"
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return "a list"
        item = LIST_ITEMS.get(key)
        bad = [v for v in value if item is not None and _type_wanted(v, item, key)]
        return f"a list of {_type_wanted(None, item, key).removeprefix('an ').removeprefix('a ')}s" if bad else None
    if origin is dict:
        return None if isinstance(value, dict) else "a mapping"
    return None


def type_errors(cfg: Config) -> list[str]:
    """One message per key whose value is not of its declared type: load_config converts what it
    reads, but a value set in Python (``cfg.stage2.ims_per_batch = "32"``) is taken as it is.

    >>> cfg = Config()
    >>> cfg.stage2.ims_per_batch = "32"
    >>> type_errors(cfg)
    ["config key 'stage2.ims_per_batch' wants an integer, got '32' (str)"]
    """
    errors = []
    for key, (typ, _, _) in all_keys().items():
        value = _value(cfg, key)
        wanted = _type_wanted(value, typ, key)
        if wanted:
            errors.append(f"config key '{key}' wants {wanted}, got {value!r} ({type(value).__name__})")
    return errors


def validate(cfg: Config) -> None:
    """Type and range checks of every key (:data:`RANGES`, :data:`CHOICES`) and cross-key checks,
    with one-line messages that name the key; raises ValueError on the first failure. load_config
    calls it; so do train and test, for configs changed in Python after loading."""
    errors = type_errors(cfg)
    if errors:   # range checks on a value of the wrong type would fail with a TypeError
        raise ValueError(errors[0])
    if not (cfg.output_dir or "").strip():
        raise ValueError("output_dir is empty (the run would write into the current folder); name the run "
                         "folder, e.g. output_dir=results/runs/try")
    errors = range_errors(cfg)
    s = cfg.stage2
    checks = [
        (cfg.model.n_shared + cfg.model.n_per_id >= 1, "model.n_shared + model.n_per_id must be >= 1"),
        (s.num_instance < 1 or s.ims_per_batch % s.num_instance == 0,
         f"stage2.ims_per_batch={s.ims_per_batch} must be a multiple of stage2.num_instance={s.num_instance} "
         f"(P identities x K images), e.g. {max(1, round(s.ims_per_batch / max(s.num_instance, 1))) * s.num_instance}"),
        (set(cfg.model.lora.targets) <= {"q", "k", "v", "out", "mlp"},
         "model.lora.targets may hold only q, k, v, out, mlp"),
    ]
    errors += [message for ok, message in checks if not ok]
    if errors:
        raise ValueError(errors[0])


def __getattr__(name):
    # moved when methods became plug-ins; the message names the new home
    if name in ("method_config", "METHODS", "run_dir"):
        new = {"method_config": "reidlib.methods.method_config (also reidlib.method_config)",
               "METHODS": "reidlib.methods.variant_names() and find_variant()",
               "run_dir": "reidlib.experiments.run_dir"}[name]
        raise AttributeError(f"reidlib.config.{name} moved: use {new}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
