"""A method of a user's own, outside the package: the image encoder fine-tuned with an ID loss and
a batch-hard triplet loss, no text at all, one stage. It is the example of docs/architecture.md;
tests/test_methods.py trains, resumes, sweeps and evaluates it through reidlib's public API."""
from dataclasses import dataclass, field

import torch

from reidlib.losses import cross_entropy_ls, triplet_hard
from reidlib.methods import ImageBatchStage, Method, register_method


@dataclass
class PlainOptions:
    margin: float = field(default=0.3, metadata={"help": "triplet margin"})
    id_weight: float = field(default=1.0, metadata={"help": "weight of the ID loss"})


class IDTripletStage(ImageBatchStage):
    """P x K batches; loss = id_weight x label-smoothed CE on the BNNeck logits + triplet on f."""

    def __init__(self, options: PlainOptions):
        super().__init__(number=1, name="image encoder")
        self.opt = options

    def trainable(self, model):
        names = {n for n, _ in model.named_parameters()
                 if n.startswith(("visual.", "bottleneck.", "classifier.")) and not n.endswith("bottleneck.bias")}
        for name, param in model.named_parameters():
            param.requires_grad_(name in names)
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def optimizer(self, params, ctx):
        return torch.optim.Adam([p for _, p in params], lr=ctx.cfg.stage2.lr, weight_decay=1e-4)

    def loss(self, out, pids):
        ce = cross_entropy_ls(out["logits"][0], pids)
        tri = triplet_hard(out["feats"][1], pids, margin=self.opt.margin)
        return self.opt.id_weight * ce + tri, {"id_loss": ce.detach(), "tri_loss": tri.detach()}


@register_method
class Plain(Method):
    name = "plain"
    summary = "image encoder with ID + triplet losses, one stage, no text (a test plug-in)"
    Options = PlainOptions

    def stages(self, cfg):
        return [IDTripletStage(self.options(cfg))]
