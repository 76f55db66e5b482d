"""Batched feature extraction for any list of images, and the query/gallery evaluation of a model.

Example::

    feats, pids, camids = extract_features(model, dataset.query, cfg)
    metrics = evaluate_model(model, dataset, cfg)      # {'rank1': ..., 'mAP': ..., ...}
"""
from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..data import UnreadableImageError, build_transforms, read_image
from ..runtime import Runtime, gather_tensor, local_runtime, shard
from .metrics import evaluate

log = logging.getLogger("reidlib")


class _TestImages(torch.utils.data.Dataset):
    """Test-time images; an unreadable file yields ``ok=False`` and is dropped after encoding
    (a test image must not be replaced by another one, as training does)."""

    def __init__(self, items, transform, image_size):
        self.items, self.transform, self.image_size = list(items), transform, image_size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, pid, camid = self.items[index]
        try:
            return self.transform(read_image(path)), pid, camid, True
        except UnreadableImageError as err:
            log.warning("%s; skipped", err)
            return torch.zeros(3, *self.image_size), pid, camid, False


def extract_features(model, items, cfg, runtime: Runtime | None = None, progress: bool = True,
                     desc: str = "features", return_kept: bool = False):
    """Test features of ``items`` ((path, pid, camid) tuples) in their order.

    Returns ``(features [N, D] float32 on the CPU, pids [N], camids [N])``. Uses the test transform,
    bf16 autocast on CUDA, ``cfg.test.flip`` (mean of the image's and its mirror's feature), and under
    torchrun each rank encodes a contiguous shard which is then gathered. Unreadable images are
    skipped and counted in a warning; with ``return_kept`` a fourth value, a bool mask over ``items``,
    says which were kept.
    """
    feats, pids, camids, keep = _extract(model, items, cfg, runtime, progress, desc)
    if not bool(keep.all()):
        log.warning("%s: %d unreadable image(s) skipped", desc, int((~keep).sum()))
    if return_kept:
        return feats[keep], pids[keep], camids[keep], keep
    return feats[keep], pids[keep], camids[keep]


@torch.no_grad()
def _extract(model, items, cfg, runtime, progress, desc):
    runtime = runtime or local_runtime(cfg.device, cfg.precision)
    transform = build_transforms(cfg.data, cfg.model.image_size, train=False)
    dataset = _TestImages(items, transform, cfg.model.image_size)
    local = Subset(dataset, list(shard(len(dataset), runtime)))
    loader = DataLoader(local, batch_size=cfg.test.batch_size, shuffle=False,
                        num_workers=cfg.data.num_workers, pin_memory=runtime.device.type == "cuda")
    was_training = model.training
    model.eval()
    feats, pids, camids, oks = [], [], [], []
    bar = tqdm(loader, desc=desc, disable=not (progress and runtime.is_main), leave=False)
    for images, pid, camid, ok in bar:
        images = images.to(runtime.device, non_blocking=True)
        cams = camid.to(runtime.device) if getattr(model, "uses_sie", False) else None
        with runtime.autocast():
            f = model.encode_image(images, cams=cams).float()
            if cfg.test.flip:
                f = (f + model.encode_image(images.flip(-1), cams=cams).float()) / 2
        feats.append(f)
        pids.append(pid)
        camids.append(camid)
        oks.append(ok.to(torch.uint8))
    model.train(was_training)
    dim = getattr(model, "feature_dim", 0)
    out = torch.cat(feats) if feats else torch.zeros(0, dim, device=runtime.device)
    out = gather_tensor(out, runtime).cpu()
    pid_t = gather_tensor(torch.cat(pids) if pids else torch.zeros(0, dtype=torch.long), runtime)
    cam_t = gather_tensor(torch.cat(camids) if camids else torch.zeros(0, dtype=torch.long), runtime)
    ok_t = gather_tensor(torch.cat(oks) if oks else torch.zeros(0, dtype=torch.uint8), runtime)
    return out, pid_t.cpu(), cam_t.cpu(), ok_t.cpu().bool()


def evaluate_model(model, dataset, cfg, runtime: Runtime | None = None, progress: bool = True) -> dict:
    """Encode query and gallery and compute CMC/mAP/mINP (and re-ranked metrics when asked)."""
    qf, q_pids, q_cams = extract_features(model, dataset.query, cfg, runtime, progress, "query")
    gf, g_pids, g_cams = extract_features(model, dataset.gallery, cfg, runtime, progress, "gallery")
    if runtime is not None and not runtime.is_main:
        return {}
    device = runtime.device if runtime is not None else None
    kwargs = dict(metric=cfg.test.metric, normalize=cfg.test.feat_norm, max_rank=cfg.test.max_rank,
                  device=device)
    metrics = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, **kwargs)
    if cfg.test.rerank:
        options = dict(k1=cfg.test.k1, k2=cfg.test.k2, lambda_value=cfg.test.lambda_value)
        reranked = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, rerank=options, **kwargs)
        metrics.update({f"rerank_{k}": v for k, v in reranked.items()})
    return metrics
