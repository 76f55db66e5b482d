"""The thesis: CLIP-ReID with deep textual prompts in stage 1 and LoRA on the image encoder in stage 2.

What it adds to :mod:`.clipreid` (the stages and losses are CLIP-ReID's):

* **Deep prompts** (``model.prompt=deep``, :class:`reidlib.model.DeepPromptLearner`): shared and
  identity-specific learnable tokens, injected at the input and replaced in text blocks
  1..depth-1 (MaPLe-style, Khattak et al., CVPR 2023); ``model.n_shared``, ``model.n_per_id``,
  ``model.depth``, ``model.deep_per_id``.
* **LoRA** (``model.lora.enabled=true``, :func:`reidlib.model.apply_lora`; Hu et al., ICLR 2022,
  rank-stabilised scaling of Kalajdzievski 2023): stage 2 then trains the LoRA A/B matrices, the
  image encoder's LayerNorms, the BNNeck and the classifiers, at ``model.lora.lr``.

Variants for the ablation table: ``proposed`` (both), ``deep_only`` and ``lora_only``.
"""
from __future__ import annotations

from .clipreid import CLIPReID
from .registry import register_method


@register_method
class Thesis(CLIPReID):
    name = "thesis"
    summary = "CLIP-ReID + deep textual prompts (stage 1) + LoRA on the image encoder (stage 2)"
    config = "vit_proposed"
    # LoRA alone keeps CLIP-ReID's prompts and its stage-1 LR: it starts from CLIP-ReID's config
    variants = {"proposed": (None, []), "deep_only": (None, ["model.lora.enabled=false"]),
                "lora_only": ("vit_clipreid", ["model.lora.enabled=true"])}

    def check(self, cfg):
        self.options(cfg)   # no options of its own: any options.* is a typo

    def run_label(self, cfg):
        deep, lora = cfg.model.prompt == "deep", cfg.model.lora.enabled
        return {(True, True): "proposed", (True, False): "deep_only", (False, True): "lora_only",
                (False, False): "thesis"}[(deep, lora)]
