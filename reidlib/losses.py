"""Losses of the two CLIP-ReID stages (Li et al., "CLIP-ReID", AAAI 2023).

Stage 1 learns the text prompts with a symmetric image<->text SupCon-form loss; stage 2 fine-tunes
the image encoder with label-smoothed ID loss, batch-hard triplet and an image-to-text CE.

All losses compute in fp32, also under autocast: the logits are raw (unnormalised, temperature 1)
dot products and the triplet distances use the ||x||^2 + ||y||^2 - 2xy expansion, both of which lose
too much in fp16/bf16.

Example::

    total, parts = Stage2Loss()(scores, feats, labels, proj, text_feats)
    total.backward(); print({k: v.item() for k, v in parts.items()})
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F


def _fp32(x: torch.Tensor):
    """Autocast switched off for x's device, so the ops inside run in the dtype we cast to (a
    device without autocast, such as the meta device the host-sync tests run on: nothing to do)."""
    if not torch.amp.is_autocast_available(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


# --------------------------------------------------------------------------- stage 1

def supcon_loss(a: torch.Tensor, b: torch.Tensor, labels_a: torch.Tensor,
                labels_b: torch.Tensor) -> torch.Tensor:
    """SupCon-form contrastive loss of rows ``a`` against columns ``b``.

    CLIP-ReID's L_i2t / L_t2i (Li et al. 2023), the supervised-contrastive form of Khosla et al. 2020.

    Temperature 1 and raw dot products, no L2 normalisation (as the reference). Per row:
    log-softmax over the columns, then the mean log-probability of the columns with the row's
    label; the loss is minus the mean over rows. Rows without any same-label column are left out
    of the mean (they never occur in stage 1, where both sides carry the same batch labels).

    >>> a = torch.tensor([[1., 0.], [0., 1.]])
    >>> round(supcon_loss(a, a, torch.tensor([0, 1]), torch.tensor([0, 1])).item(), 4)
    0.3133
    """
    with _fp32(a):
        logits = a.float() @ b.float().T
        log_prob = F.log_softmax(logits, dim=1)
        pos = (labels_a[:, None] == labels_b[None, :]).float()
        n_pos = pos.sum(1)
        mean_log_prob_pos = (pos * log_prob).sum(1) / n_pos.clamp(min=1)
        valid = (n_pos > 0).float()
        # sum/count instead of boolean indexing: no host sync
        return -(mean_log_prob_pos * valid).sum() / valid.sum().clamp(min=1)


def stage1_loss(img_feats: torch.Tensor, txt_feats: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
    """Stage-1 loss: L_i2t + L_t2i, the batch labels on both sides.

    >>> x = torch.tensor([[1., 0.], [0., 1.]])
    >>> round(stage1_loss(x, x, torch.tensor([0, 1])).item(), 4)
    0.6265
    """
    return supcon_loss(img_feats, txt_feats, labels, labels) + \
        supcon_loss(txt_feats, img_feats, labels, labels)


# --------------------------------------------------------------------------- pretraining

def clip_loss(img_feats: torch.Tensor, txt_feats: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric contrastive loss (Radford et al., ICML 2021): row i's caption is the
    positive of image i and every other caption in the batch a negative, and the other way round.

    Features are L2-normalised here; ``logit_scale`` is the log of the inverse temperature (a
    learnable scalar in CLIP). The loss is the mean of the image->text and text->image
    cross-entropies of the scaled cosine similarities.

    >>> x = torch.tensor([[1., 0.], [0., 1.]])
    >>> round(clip_loss(x, x, torch.tensor(0.)).item(), 4)      # temperature 1: log(1 + e^-1)
    0.3133
    """
    with _fp32(img_feats):
        img, txt = F.normalize(img_feats.float(), dim=-1), F.normalize(txt_feats.float(), dim=-1)
        logits = logit_scale.float().exp() * img @ txt.T
        targets = torch.arange(len(img), device=img.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


# --------------------------------------------------------------------------- stage 2

def cross_entropy_ls(logits: torch.Tensor, targets: torch.Tensor,
                     epsilon: float = 0.1) -> torch.Tensor:
    """Label-smoothed CE (Szegedy et al. 2016): target (1-eps)*onehot + eps/C, mean over the batch.

    Same as the reference's CrossEntropyLabelSmooth, which is torch's ``label_smoothing``.

    >>> round(cross_entropy_ls(torch.zeros(1, 4), torch.tensor([2])).item(), 4)  # log(4)
    1.3863
    """
    with _fp32(logits):
        return F.cross_entropy(logits.float(), targets, label_smoothing=epsilon)


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise distances sqrt(clamp(||x||^2 + ||y||^2 - 2 x.y, 1e-12)), as the reference.

    The clamp keeps sqrt's gradient finite on (near-)zero distances, e.g. an anchor to itself.

    >>> euclidean_dist(torch.tensor([[0., 0.]]), torch.tensor([[3., 4.]]))
    tensor([[5.]])
    """
    x, y = x.float(), y.float()
    xx = x.pow(2).sum(1, keepdim=True)
    yy = y.pow(2).sum(1, keepdim=True).T
    return (xx + yy - 2 * x @ y.T).clamp(min=1e-12).sqrt()


def triplet_hard(feats: torch.Tensor, labels: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017, "In Defense of the Triplet Loss").

    For each anchor: hardest positive = farthest same-label sample (the anchor itself counts, as
    in the reference, so an identity seen once gets d_ap ~ 0), hardest negative = closest
    other-label sample; loss = mean(relu(d_ap - d_an + margin)) (MarginRankingLoss form).

    A batch with a single identity has no negatives at all: the loss is then 0 (still attached
    to the graph, so backward works) instead of NaN. With two or more identities every anchor
    has a negative.

    >>> f = torch.tensor([[0.], [1.], [3.], [5.]])
    >>> round(triplet_hard(f, torch.tensor([0, 0, 1, 1])).item(), 4)  # anchors 0, 0, 0.3, 0
    0.075
    """
    with _fp32(feats):
        dist = euclidean_dist(feats, feats)
        same = labels[:, None] == labels[None, :]
        d_ap = dist.masked_fill(~same, float("-inf")).amax(1)
        d_an = dist.masked_fill(same, float("inf")).amin(1)
        has_neg = torch.isfinite(d_an)
        # anchors without a negative would give relu(-inf) = 0 anyway, but inf - inf style
        # gradients are NaN, so take them out before the subtraction
        d_an = torch.where(has_neg, d_an, d_ap + margin)
        per_anchor = F.relu(d_ap - d_an + margin) * has_neg.float()
        return per_anchor.sum() / has_neg.float().sum().clamp(min=1)


def i2t_logits(img_proj: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """Image-to-text logits: raw dot products with the text features of every identity [B, C].

    >>> i2t_logits(torch.ones(2, 3), torch.eye(3)).shape
    torch.Size([2, 3])
    """
    with _fp32(img_proj):
        return img_proj.float() @ text_feats.float().T


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


class Stage2Loss(nn.Module):
    """Stage-2 total: id_weight*ID + tri_weight*TRI + i2t_weight*I2T (CLIP-ReID, stage 2).

    ID  = sum of label-smoothed CE over the classifier outputs (both BNNeck heads).
    TRI = sum of batch-hard triplet over the features [f_last, f, f_proj].
    I2T = label-smoothed CE on f_proj @ T^T, T [C, d] the text features of all identities
          (skipped when ``text_feats`` is None).

    Returns ``(total, parts)``; parts are detached tensors (no host sync: the caller decides when
    to call ``.item()``).

    >>> loss = Stage2Loss()
    >>> s, f = [torch.zeros(4, 3)] * 2, [torch.randn(4, 8)] * 3
    >>> total, parts = loss(s, f, torch.tensor([0, 0, 1, 1]), torch.randn(4, 5), torch.randn(3, 5))
    >>> sorted(parts)
    ['i2t', 'id', 'tri']
    """

    def __init__(self, id_weight: float = 0.25, tri_weight: float = 1.0, i2t_weight: float = 1.0,
                 epsilon: float = 0.1, margin: float = 0.3):
        super().__init__()
        self.id_weight, self.tri_weight, self.i2t_weight = id_weight, tri_weight, i2t_weight
        self.epsilon, self.margin = epsilon, margin

    def forward(self, scores, feats, labels: torch.Tensor, img_proj: torch.Tensor | None = None,
                text_feats: torch.Tensor | None = None):
        id_loss = sum(cross_entropy_ls(s, labels, self.epsilon) for s in _as_list(scores))
        tri_loss = sum(triplet_hard(f, labels, self.margin) for f in _as_list(feats))
        if text_feats is None:
            i2t_loss = torch.zeros((), device=labels.device)
        else:
            i2t_loss = cross_entropy_ls(i2t_logits(img_proj, text_feats), labels, self.epsilon)
        total = self.id_weight * id_loss + self.tri_weight * tri_loss + self.i2t_weight * i2t_loss
        parts = {"id": id_loss.detach(), "tri": tri_loss.detach(), "i2t": i2t_loss.detach()}
        return total, parts
