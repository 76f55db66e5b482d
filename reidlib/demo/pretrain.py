"""Pretraining a miniature CLIP on generated image-caption pairs, so that re-ID starts from a
model that already relates images to words, as CLIP-ReID starts from CLIP.

CLIP (Radford et al., ICML 2021) learns an image tower and a text tower from image-caption pairs
with a symmetric contrastive loss and a learnable temperature. Here the same is done, in minutes on
a CPU, for the ``tiny`` config's towers (``vit-tiny8``, built by open_clip, open_clip's tokenizer), on
a generated "web" set (:func:`reidlib.demo.synth.generate_web`): thousands of people the re-ID sets
never show, one or two images each from cameras of their own, each image with a caption of what the
person wears. The result is an open_clip training checkpoint (``{"name", "state_dict", ...}``),
which ``model.pretrained=PATH`` loads through the same code as any CLIP file, with GELU, as it was
trained (an open_clip checkpoint is not taken for OpenAI's QuickGELU weights).

It is a miniature: 4 M parameters, a few thousand pairs of one drawing style and a 50-word
vocabulary. It knows colours, garments and where they sit on a body, nothing else.

Built once, found by its recipe: the file name holds a hash of every :class:`PretrainRecipe` field
and :data:`RECIPE_VERSION`, so a changed recipe builds a new file and an unchanged one is reused::

    path = build_miniature(PretrainRecipe(), "data/miniature")    # ~2 min on 2 cores, then cached
    cfg = load_config("tiny", [f"model.pretrained={path}"])

    python -m reidlib pretrain                        # the same from the command line
    python -m reidlib pretrain --steps 200 --cache /tmp/mini
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from ..data.cache import decode_images
from ..data.transforms import normalize
from ..losses import clip_loss
from ..model.prompts import TextEncoder
from ..runtime import pick_device
from ..storage import CheckpointError, load_checkpoint, save_checkpoint, write_json
from ..weights.clip import load_clip
from .synth import CAPTIONS_CSV, generate_web, read_captions
from .zeroshot import PIXEL_MEAN, PIXEL_STD

log = logging.getLogger("reidlib")

# Part of every cache key: bump it when the generator, the captions or this training loop change
# what a recipe produces, so that files built by older code are not reused.
RECIPE_VERSION = 2
DEFAULT_CACHE = "data/miniature"
MAX_LOG_SCALE = math.log(100)  # CLIP clips the learned inverse temperature at 100


@dataclass(frozen=True)
class PretrainRecipe:
    """Everything that decides the pretrained weights; its hash names the cached file."""

    name: str = "vit-tiny8"          # the architecture: the tiny config's model.name
    identities: int = 3000           # people in the web set
    max_per_identity: int = 2        # images per person: 1..this, each from its own camera
    data_seed: int = 0               # the web set's seed
    seed: int = 0                    # initial weights, batch order, flips
    steps: int = 500
    batch_size: int = 64
    lr: float = 1e-3                 # AdamW peak, after a linear warm-up, then cosine to 0
    warmup_steps: int = 50
    weight_decay: float = 0.1        # on weight matrices only, as open_clip's training code
    temperature: float = 0.07        # CLIP's initial temperature; learned from there

    def __post_init__(self):
        # inf passes "> 0" and trains to NaN: every number must be finite first
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"pretraining recipe: {field.name} must be a finite number, got {value}")
        positive = ("identities", "max_per_identity", "steps", "lr", "temperature")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"pretraining recipe: {name} must be > 0, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"pretraining recipe: batch_size must be >= 2 (a batch holds the negatives), "
                             f"got {self.batch_size}")
        if not 0 <= self.warmup_steps <= self.steps or self.weight_decay < 0:
            raise ValueError(f"pretraining recipe: need 0 <= warmup_steps <= steps and weight_decay >= 0, got "
                             f"warmup_steps={self.warmup_steps}, steps={self.steps}, "
                             f"weight_decay={self.weight_decay}")

    def key(self) -> str:
        """12 hex digits of a hash of the fields and :data:`RECIPE_VERSION`."""
        text = json.dumps({"version": RECIPE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def web_key(self) -> str:
        """The hash of the fields the web set depends on (several recipes share one web set)."""
        fields = {"version": RECIPE_VERSION, "identities": self.identities,
                  "max_per_identity": self.max_per_identity, "data_seed": self.data_seed}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def miniature_path(recipe: PretrainRecipe, cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """Where the checkpoint of ``recipe`` lives: ``cache_dir/clip-<name>-<hash>.pt``."""
    return Path(cache_dir) / f"clip-{recipe.name}-{recipe.key()}.pt"


def start_weights(value: str | None, cache_dir: str | Path = DEFAULT_CACHE,
                  base_config: str | None = "tiny") -> list[str]:
    """The config keys that start a run from ``value``: ``"miniature"`` (the demo's pretrained
    miniature for the ``tiny`` config, from ``cache_dir``; GELU, as it was trained), ``"openai"`` or
    a weights file (``model.pretrained=``), ``"none"`` (random), or None (the config's own: no key).

    >>> start_weights("openai")
    ['model.pretrained=openai']
    >>> start_weights(None)
    []
    """
    if value is None:
        return []
    if value != "miniature":
        return [f"model.pretrained={value}"]
    if base_config != "tiny":
        raise ValueError(f"start_weights='miniature' is the tiny config's CLIP, not {base_config or 'ViT-B/16'}'s: "
                         "set base_config='tiny', or start_weights=None (the config's own weights) or a file")
    path = miniature_path(PretrainRecipe(), cache_dir)
    if not path.is_file():
        raise FileNotFoundError(f"the demo's pretrained miniature is not at {path}: run `make demo` or "
                                "`python -m reidlib pretrain` first, or start from other weights "
                                "(start_weights=None: the config's own, \"none\": random)")
    return [f"model.pretrained={path}", "model.quick_gelu=false"]


def build_miniature(recipe: PretrainRecipe = PretrainRecipe(), cache_dir: str | Path = DEFAULT_CACHE,
                    device: str = "cpu", force: bool = False, echo=log.info) -> Path:
    """The pretrained miniature's checkpoint for ``recipe``: the cached file when it is there and
    loads, otherwise the web set is generated (or reused), the model pretrained and the file
    written atomically, with a JSON of the recipe, loss curve and times beside it."""
    path = miniature_path(recipe, cache_dir)
    if path.is_file() and not force:
        try:
            saved = load_checkpoint(path).get("recipe")
        except CheckpointError as err:
            echo(f"pretrained miniature: {err}; building it again")
        else:
            if saved == dataclasses.asdict(recipe):
                echo(f"pretrained miniature: {path} (cached; its recipe's hash is in the name)")
                return path
            echo(f"pretrained miniature: {path} holds another recipe ({saved}); building it again")
    started = time.time()
    web = Path(cache_dir) / f"web-{recipe.web_key()}"
    if not (web / CAPTIONS_CSV).is_file():  # the CSV is written last: its absence means incomplete
        echo(f"generating the web set in {web} ({recipe.identities} people) ...")
        generate_web(web, identities=recipe.identities, seed=recipe.data_seed,
                     max_per_identity=recipe.max_per_identity, overwrite=True)
    generated = time.time() - started
    clip, history = pretrain_clip(web, recipe, device=device, echo=echo)
    _refuse_non_finite(clip.state_dict(), recipe)   # a NaN miniature cached would poison every later run
    save_checkpoint(path, {"name": recipe.name, "epoch": history["epochs"], "state_dict": clip.state_dict(),
                           "recipe": dataclasses.asdict(recipe), "recipe_version": RECIPE_VERSION})
    write_json(path.with_suffix(".json"), {
        "recipe": dataclasses.asdict(recipe), "recipe_version": RECIPE_VERSION, "web_set": str(web),
        "seconds_generating": round(generated, 1), "seconds_total": round(time.time() - started, 1),
        "threads": torch.get_num_threads(), **history})
    echo(f"pretrained miniature written to {path} in {time.time() - started:.0f} s")
    return path


def _refuse_non_finite(state: dict, recipe: PretrainRecipe) -> None:
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"pretraining diverged: {len(bad)} tensor(s) are not finite (e.g. {bad[0]}); "
                         f"nothing cached; lower the learning rate (lr={recipe.lr})")


def pretrain_clip(web_root: str | Path, recipe: PretrainRecipe, device: str = "cpu", echo=log.info):
    """Train ``recipe.name`` from random weights on the pairs of ``web_root/captions.csv``.

    Returns ``(clip, history)``: the open_clip CLIP in eval mode, and a dict with the loss and
    learned temperature every few steps, the number of pairs and epochs, and the training time.
    The same recipe on the same machine and thread count gives the same weights.
    """
    captions = read_captions(web_root)
    paths = sorted(captions)
    torch.manual_seed(recipe.seed)
    clip = load_clip(recipe.name, "none", quick_gelu="false")  # what loading an open_clip checkpoint picks
    clip.logit_scale.data.fill_(math.log(1 / recipe.temperature))
    images, skipped = decode_images([Path(web_root) / p for p in paths], clip.visual.image_size)
    skipped = set(skipped)
    kept = [p for i, p in enumerate(paths) if i not in skipped]
    if len(kept) < recipe.batch_size:
        raise ValueError(f"{web_root}: {len(kept)} readable image-caption pairs, fewer than one batch "
                         f"({recipe.batch_size}); generate a larger web set")
    tokens = open_clip.tokenize([captions[p] for p in kept])
    target = pick_device(device)
    clip, images, tokens = clip.to(target), images.to(target), tokens.to(target)
    text = TextEncoder(clip)      # open_clip's text tower, run only up to the end-of-text token
    clip.requires_grad_(True)     # (TextEncoder freezes the modules it shares with clip: not here)
    optimizer = _optimizer(clip, recipe)
    generator = torch.Generator().manual_seed(recipe.seed)
    batches = _batches(len(kept), recipe, generator)
    history = {"step": [], "loss": [], "temperature": []}
    clip.train()
    started = time.time()
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, recipe)
        flip = torch.rand(len(batch), generator=generator) < 0.5   # captions never say left or right
        x = normalize(images[batch.to(target)], PIXEL_MEAN, PIXEL_STD)
        x = torch.where(flip.to(target)[:, None, None, None], x.flip(-1), x)
        loss = clip_loss(clip.encode_image(x), text(tokens[batch.to(target)]), clip.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, MAX_LOG_SCALE)
        if step % 25 == 0 or step == recipe.steps - 1:
            if not math.isfinite(loss.item()):   # checked where the loss is read anyway: no extra sync
                raise ValueError(f"pretraining diverged at step {step + 1}: loss {loss.item()}; nothing cached; "
                                 f"lower the learning rate (lr={recipe.lr})")
            history["step"].append(step + 1)
            history["loss"].append(round(loss.item(), 4))
            history["temperature"].append(round(1 / clip.logit_scale.exp().item(), 5))
        if (step + 1) % 100 == 0 or step + 1 == recipe.steps:
            echo(f"pretraining step {step + 1}/{recipe.steps}: loss {loss.item():.3f}, "
                 f"temperature {1 / clip.logit_scale.exp().item():.4f}, {time.time() - started:.0f} s")
    history.update(pairs=len(kept), epochs=math.ceil(recipe.steps * recipe.batch_size / len(kept)),
                   seconds_training=round(time.time() - started, 1))
    return clip.eval().requires_grad_(False), history


def _optimizer(clip, recipe: PretrainRecipe) -> torch.optim.AdamW:
    """AdamW with CLIP's betas and epsilon; weight decay as open_clip's training code applies it:
    not on 1-D parameters (gains, biases, the class embedding) nor on the temperature."""
    decay, no_decay = [], []
    for name, param in clip.named_parameters():
        (no_decay if param.ndim < 2 or "logit_scale" in name else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)


def _learning_rate(step: int, recipe: PretrainRecipe) -> float:
    """Linear warm-up to ``recipe.lr``, then cosine to 0 at the last step."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.5 * recipe.lr * (1 + math.cos(math.pi * progress))


def _batches(n: int, recipe: PretrainRecipe, generator: torch.Generator) -> list[torch.Tensor]:
    """``recipe.steps`` batches of distinct pairs: epochs of random order, the last short batch
    of each epoch dropped (a batch must hold ``batch_size`` pairs to have as many negatives)."""
    out = []
    while len(out) < recipe.steps:
        order = torch.randperm(n, generator=generator)
        out += list(order.split(recipe.batch_size))[: n // recipe.batch_size]
    return out[: recipe.steps]


# --------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    default = PretrainRecipe()
    parser = argparse.ArgumentParser(
        prog="python -m reidlib pretrain",
        description="Pretrain the tiny config's CLIP on a generated image-caption set (cached by recipe); "
                    "prints the checkpoint's path, for model.pretrained=PATH.")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help=f"cache folder (default {DEFAULT_CACHE})")
    for field in dataclasses.fields(PretrainRecipe):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(getattr(default, field.name)), default=getattr(default, field.name),
                            help=f"recipe: {field.name} (default {getattr(default, field.name)})")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cached file exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    recipe = PretrainRecipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainRecipe)})
    echo = lambda text: print(text, flush=True)  # noqa: E731
    path = build_miniature(recipe, args.cache, device=args.device, force=args.force, echo=echo)
    print(f"use it with: model.pretrained={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
