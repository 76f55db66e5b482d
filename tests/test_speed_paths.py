"""The fast paths the GPU uses, checked on the CPU: bf16 autocast and the uint8 image cache."""
import torch

import reidlib
from reidlib.data import TrainBatches, TrainImageCache, load_dataset
from reidlib.losses import stage1_loss
from reidlib.methods.clipreid import cache_image_features, make_loss
from reidlib.model import build_model
from reidlib.runtime import Runtime


def _setup(synth_root, method="proposed"):
    cfg = reidlib.method_config(method, [f"data.root={synth_root}", "device=cpu",
                                         "stage2.ims_per_batch=16"], base="tiny")
    dataset = load_dataset("market1501", synth_root)
    torch.manual_seed(0)
    model = build_model(cfg.model, dataset.num_train_pids, dataset.num_train_cams)
    return cfg, dataset, model


def test_bf16_autocast_losses_match_fp32(synth_root):
    cfg, dataset, model = _setup(synth_root)
    runtime = Runtime(device=torch.device("cpu"), amp_dtype=None, output_dir=None)
    images, pids, _, _ = next(TrainBatches(dataset, cfg, runtime).epoch(0))
    text = model.all_text_features().float()
    loss_fn = make_loss(cfg)
    model.train()

    def losses(dtype):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            out = model(images, labels=pids)
            stage2, _ = loss_fn(out["logits"], out["feats"], pids, out["f_proj"], text)
            stage1 = stage1_loss(out["f_proj"].float(), model.encode_text(pids).float(), pids)
        return stage2.item(), stage1.item()

    full, half = losses(None), losses(torch.bfloat16)
    for a, b in zip(full, half):
        assert abs(a - b) <= 0.02 * abs(a), (full, half)  # bf16 keeps ~3 significant digits


def test_image_cache_path_gives_the_same_batches_and_features(synth_root):
    cfg, dataset, model = _setup(synth_root, "baseline")
    runtime = Runtime(device=torch.device("cpu"), amp_dtype=None, output_dir=None)
    cache = TrainImageCache(dataset.train, cfg.model.image_size, cfg.data.interpolation)
    # stage-1 feature cache: from the uint8 cache = from the DataLoader path (same resize)
    feats_loader, labels_loader = cache_image_features(model, dataset.train, cfg, runtime)
    feats_cache, labels_cache = cache_image_features(model, dataset.train, cfg, runtime, cache)
    assert torch.equal(labels_loader, labels_cache)
    assert torch.allclose(feats_loader, feats_cache, atol=1e-5)
    # stage-2 batches: same P x K identities as the DataLoader path, augmented on the device
    plain = list(TrainBatches(dataset, cfg, runtime).epoch(3))
    cached = list(TrainBatches(dataset, cfg, runtime, cache).epoch(3))
    assert len(plain) == len(cached) > 0
    for (x1, p1, c1, v1), (x2, p2, c2, v2) in zip(plain, cached):
        assert torch.equal(p1, p2) and torch.equal(c1, c2) and torch.equal(v1, v2)
        assert x1.shape == x2.shape == (16, 3, *cfg.model.image_size) and x2.dtype == torch.float32
