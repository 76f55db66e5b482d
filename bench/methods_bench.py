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

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_bench import (  # noqa: E402
    bench_dataset,
    bench_inference,
    bench_parser,
    make_config,
    parse_bench_args,
    sync,
    timed,
)

from reidlib.data import make_image_cache  # noqa: E402
from reidlib.methods import ImageBatchStage, StageContext, get_method, image_step, load_plugins  # noqa: E402
from reidlib.runtime import setup_runtime, tf32_mode  # noqa: E402


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


def run(name: str, args, data_root: Path, dataset) -> list[dict]:
    plugins = (f"plugins=[{','.join(args.plugins)}]",) if args.plugins else ()
    cfg = make_config(name, args, data_root, plugins)
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
    parser = bench_parser(["baseline", "proposed", "pcl", "promptsg"], __doc__)
    parser.add_argument("--plugins", nargs="+", default=[], help="files or modules of methods of your own")
    args = parse_bench_args(parser, argv)
    if args.plugins:
        load_plugins(args.plugins)
    with tempfile.TemporaryDirectory() as tmp:
        data_root, dataset = bench_dataset(args, tmp)
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
