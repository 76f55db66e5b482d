"""Training speed of every method's image stage, side by side: images/s per stage, the time a stage
spends before its first step of an epoch (PCL-CLIP rebuilds its memory of class centroids over the
whole training set there), inference images/s and peak GPU memory.

    python bench/methods_bench.py                                   # CUDA, Market size, ViT-B/16
    python bench/methods_bench.py --methods baseline pcl promptsg
    python bench/methods_bench.py --tiny --device cpu               # seconds on a CPU: the CI smoke test

Any registered method (and a plug-in's, with ``--plugins FILE``) is timed through its own stages
(``Method.stages``): the P x K image stages (:class:`reidlib.methods.ImageBatchStage`) are stepped
with the method's own loss and hooks; other stages (CLIP-ReID's prompt stage) are listed as not
timed here (``bench/train_bench.py`` times them). Random weights, bf16 autocast on a GPU that has it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_bench import MARKET, sync, timed  # noqa: E402

import reidlib  # noqa: E402
from reidlib.data import load_dataset, make_image_cache  # noqa: E402
from reidlib.demo.synth import generate_market  # noqa: E402
from reidlib.methods import ImageBatchStage, StageContext, get_method, image_step, load_plugins  # noqa: E402
from reidlib.runtime import setup_runtime, tf32_mode  # noqa: E402


def make_config(method: str, args, data_root: Path):
    overrides = [f"data.root={data_root}", f"output_dir={data_root / 'runs'}", "model.pretrained=none",
                 f"device={args.device}", f"compile={args.compile}", f"data.num_workers={args.workers}"]
    if args.plugins:
        overrides.append(f"plugins=[{','.join(args.plugins)}]")
    if args.tiny:
        overrides += ["stage2.ims_per_batch=16", "stage2.num_instance=4"]
    return reidlib.method_config(method, overrides, base="tiny" if args.tiny else None)


def bench_image_stage(stage: ImageBatchStage, ctx: StageContext, args) -> dict:
    """Images/s of ``stage``'s training steps and the seconds of its per-epoch set-up."""
    model, runtime = ctx.model, ctx.runtime
    optimizer = stage.optimizer(stage.trainable(model), ctx)
    stage.prepare(ctx, optimizer)
    model.train()
    sync(runtime.device)
    start = time.perf_counter()
    stage.start_epoch(ctx, 0)          # e.g. PCL-CLIP's memory: features of every training image
    sync(runtime.device)
    setup_s = time.perf_counter() - start
    model.train()
    stream, epoch = iter(()), 0

    def step():
        nonlocal stream, epoch
        batch = next(stream, None)
        if batch is None:  # a new epoch when the sampler runs out (small sets)
            stream, epoch = stage.batches.epoch(epoch), epoch + 1
            batch = next(stream)
        images, pids, _, _ = batch
        image_step(stage.module, optimizer, stage.loss, images, pids, None, None, runtime)
        stage.after_step(ctx, pids)

    seconds = timed(step, runtime.device, args.warmup, args.steps)
    return {"img_s": ctx.cfg.stage2.ims_per_batch / seconds, "epoch_setup_s": setup_s}


@torch.no_grad()
def bench_inference(model, cfg, runtime, args) -> float:
    model.eval()
    batch = torch.randn(args.infer_batch, 3, *cfg.model.image_size, device=runtime.device)

    def step():
        with runtime.autocast():
            model.encode_image(batch)

    return args.infer_batch / timed(step, runtime.device, args.warmup, args.steps)


def run(name: str, args, data_root: Path, dataset) -> list[dict]:
    cfg = make_config(name, args, data_root)
    runtime = setup_runtime(cfg)
    method = get_method(cfg.method)
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
    torch.manual_seed(0)
    model = method.build_model(cfg, dataset.num_train_pids, dataset.num_train_cams).to(runtime.device)
    cache = make_image_cache(dataset, cfg, runtime)
    ctx = StageContext(model, dataset, cfg, runtime, cache)
    rows = []
    with tf32_mode(cfg.tf32):
        for stage in method.stages(cfg):
            row = {"method": name, "stage": f"{stage.number}:{stage.name.replace(' ', '_')}"}
            if isinstance(stage, ImageBatchStage):
                row.update(bench_image_stage(stage, ctx, args))
            rows.append(row)
    with tf32_mode(cfg.test.tf32):
        rows[-1]["inference_img_s"] = bench_inference(model, cfg, runtime, args)
    if runtime.device.type == "cuda":
        rows[-1]["peak_gpu_gb"] = torch.cuda.max_memory_allocated(runtime.device) / 2**30
    for row in rows:
        row["device"] = str(runtime.device)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model and data set (CPU smoke test)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--infer-batch", type=int, default=512)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--data", default=None, help="reuse a generated set (else a temporary one)")
    parser.add_argument("--methods", nargs="+", default=["baseline", "proposed", "pcl", "promptsg"])
    parser.add_argument("--plugins", nargs="+", default=[], help="files or modules of methods of your own")
    args = parser.parse_args(argv)
    if args.plugins:
        load_plugins(args.plugins)
    if args.tiny:
        args.steps, args.warmup, args.infer_batch, args.workers = min(args.steps, 3), 1, 16, 0
    with tempfile.TemporaryDirectory() as tmp:
        data_root = Path(args.data or Path(tmp) / "market")
        if not (data_root / "bounding_box_train").is_dir():
            if args.tiny:
                generate_market(data_root, ids=24, cams=3, seed=0)
            else:
                generate_market(data_root, ids=MARKET["ids"], cams=MARKET["cams"], seed=0,
                                train_only=True, train_images=MARKET["train_images"])
        dataset = load_dataset("market1501", data_root, train_only=not args.tiny)
        rows = [row for name in args.methods for row in run(name, args, data_root, dataset)]
    print(f"device: {rows[0]['device']}"
          + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "")
          + f", torch {torch.__version__}, {len(dataset.train)} training images")
    keys = ["img_s", "epoch_setup_s", "inference_img_s", "peak_gpu_gb"]
    print(f"{'method':10s} {'stage':34s} " + " ".join(f"{k:>16s}" for k in keys))
    for row in rows:
        cells = [f"{row[k]:16.1f}" if k in row else f"{'-':>16s}" for k in keys]
        if "img_s" not in row:
            cells[0] = f"{'(train_bench)':>16s}"
        print(f"{row['method']:10s} {row['stage'][:34]:34s} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
