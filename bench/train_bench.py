"""Training-speed benchmark: every phase of the two-stage schedule, data pipeline included.

On a CUDA machine (the figures in bench/README.md): a generated Market-size training set (12,936
images, 751 identities, 6 cameras), ViT-B/16 with random weights, bf16. Prints

    stage-1 feature cache (img/s), stage-1 prompt steps (prompts/s), stage-2 steps for full
    fine-tuning and for LoRA (img/s), inference (img/s), peak GPU memory, and the projected time
    of the whole Market schedule (120 stage-1 + 60 stage-2 epochs + the final evaluation) for the
    baseline (clipreid prompts, full fine-tuning) and the proposed method (deep prompts + LoRA).

    python bench/train_bench.py                       # CUDA, Market size
    python bench/train_bench.py --compile             # with torch.compile
    python bench/train_bench.py --tiny                # seconds on a CPU: the CI smoke test

The steps are the methods' own (reidlib.methods.clipreid: the prompt and image-encoder stages),
timed over a few steps after warm-up steps; the projection multiplies the per-item rates by the schedule's item counts.
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
import reidlib  # noqa: E402
from reidlib.data import load_dataset, make_image_cache  # noqa: E402
from reidlib.demo.synth import generate_market  # noqa: E402
from reidlib.methods import StageContext, image_step  # noqa: E402
from reidlib.methods.clipreid import (  # noqa: E402
    ImageEncoderStage,
    cache_image_features,
    make_stage1_optimizer,
    stage1_step,
    wrap_for_stage1,
)
from reidlib.model import build_model, set_trainable  # noqa: E402
from reidlib.runtime import setup_runtime, tf32_mode  # noqa: E402

MARKET = {"train_images": 12936, "ids": 751, "cams": 6, "query": 3368, "gallery": 15913}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, steps: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def make_config(method: str, args, data_root: Path, extra: tuple[str, ...] = ()):
    """The method's full-scale config (``--tiny``: the tiny model's), random weights, the bench's keys."""
    base = "tiny" if args.tiny else None
    overrides = [f"data.root={data_root}", f"output_dir={data_root / 'runs'}", "model.pretrained=none",
                 f"device={args.device}", f"compile={args.compile}", f"data.num_workers={args.workers}", *extra]
    if args.tiny:
        overrides += ["stage2.ims_per_batch=16"]
    return reidlib.method_config(method, overrides, base=base)


def bench_parser(methods: list[str], description: str = __doc__) -> argparse.ArgumentParser:
    """The options the training benchmarks share (``methods``: the default ``--methods``; the first
    line of ``description``, a script's docstring, for ``--help``)."""
    parser = argparse.ArgumentParser(description=description.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model and data set (CPU smoke test)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--infer-batch", type=int, default=512)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--data", default=None, help="reuse a generated set (else a temporary one)")
    parser.add_argument("--methods", nargs="+", default=methods)
    return parser


def parse_bench_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.warmup, args.infer_batch, args.workers = min(args.steps, 3), 1, 16, 0
    return args


def bench_dataset(args, tmp: str) -> tuple[Path, object]:
    """(folder, data set) to time on: ``--data``, or a generated set in ``tmp`` (Market-size training
    set on a GPU; with ``--tiny`` a 24-identity set with query and gallery)."""
    data_root = Path(args.data or Path(tmp) / "market")
    if not (data_root / "bounding_box_train").is_dir():
        start = time.perf_counter()
        if args.tiny:
            generate_market(data_root, ids=24, cams=3, seed=0)
        else:
            generate_market(data_root, ids=MARKET["ids"], cams=MARKET["cams"], seed=0,
                            train_only=True, train_images=MARKET["train_images"])
        print(f"generated {data_root} in {time.perf_counter() - start:.0f} s")
    return data_root, load_dataset("market1501", data_root, train_only=not args.tiny)


def bench_stage1(model, cfg, runtime, dataset, cache, args) -> dict:
    set_trainable(model, "stage1")
    start = time.perf_counter()
    feats, labels = cache_image_features(model, dataset.train, cfg, runtime, cache)
    sync(runtime.device)
    cache_rate = len(feats) / (time.perf_counter() - start)
    optimizer = make_stage1_optimizer(set_trainable(model, "stage1"), cfg)
    step_module = wrap_for_stage1(model, runtime)
    batch = cfg.stage1.batch_size
    model.train()

    def step():
        idx = torch.randint(0, len(feats), (batch,), device=feats.device)
        stage1_step(step_module, optimizer, feats[idx], labels[idx], runtime)

    seconds = timed(step, runtime.device, args.warmup, args.steps)
    return {"stage1_cache_img_s": cache_rate, "stage1_prompts_s": batch / seconds}


def bench_stage2(model, cfg, runtime, dataset, cache, args) -> float:
    stage, ctx = ImageEncoderStage(2, "image encoder"), StageContext(model, dataset, cfg, runtime, cache)
    optimizer = stage.optimizer(stage.trainable(model), ctx)
    stage.prepare(ctx, optimizer)      # text features, P x K batches, DDP/compile wrapping
    batches = stage.batches
    model.train()
    stream = iter(())
    epoch = 0

    def step():
        nonlocal stream, epoch
        batch = next(stream, None)
        if batch is None:  # a new epoch when the sampler runs out (small sets)
            stream, epoch = batches.epoch(epoch), epoch + 1
            batch = next(stream)
        images, pids, _, _ = batch
        image_step(stage.module, optimizer, stage.loss, images, pids, None, None, runtime)

    seconds = timed(step, runtime.device, args.warmup, args.steps)
    return cfg.stage2.ims_per_batch / seconds


@torch.no_grad()
def bench_inference(model, cfg, runtime, args) -> float:
    model.eval()
    batch = torch.randn(args.infer_batch, 3, *cfg.model.image_size, device=runtime.device)

    def step():
        with runtime.autocast():
            model.encode_image(batch)

    return args.infer_batch / timed(step, runtime.device, args.warmup, args.steps)


def projected_minutes(r: dict, sizes: dict, cfg) -> float:
    """Whole schedule: cache + stage-1 epochs + stage-2 epochs + the final query/gallery pass."""
    n = sizes["train_images"]
    seconds = (n / r["stage1_cache_img_s"] + cfg.stage1.epochs * n / r["stage1_prompts_s"]
               + cfg.stage2.epochs * n / r["stage2_img_s"]
               + (sizes["query"] + sizes["gallery"]) / r["inference_img_s"])
    return seconds / 60


def run(method: str, args, data_root: Path, dataset) -> dict:
    cfg = make_config(method, args, data_root)
    runtime = setup_runtime(cfg)
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
    torch.manual_seed(0)
    model = build_model(cfg.model, dataset.num_train_pids, dataset.num_train_cams).to(runtime.device)
    start = time.perf_counter()
    cache = make_image_cache(dataset, cfg, runtime)
    decode_s = time.perf_counter() - start
    result = {"method": method, "device": str(runtime.device), "decode_s": decode_s}
    with tf32_mode(cfg.tf32):            # as train() trains; inference as evaluation runs
        result.update(bench_stage1(model, cfg, runtime, dataset, cache, args))
        result["stage2_img_s"] = bench_stage2(model, cfg, runtime, dataset, cache, args)
    with tf32_mode(cfg.test.tf32):
        result["inference_img_s"] = bench_inference(model, cfg, runtime, args)
    if runtime.device.type == "cuda":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated(runtime.device) / 2**30
    sizes = MARKET if not args.tiny else {"train_images": len(dataset.train), "query": len(dataset.query),
                                          "gallery": len(dataset.gallery)}
    result["projected_min"] = projected_minutes(result, sizes, cfg) + decode_s / 60
    return result


def main(argv=None) -> int:
    args = parse_bench_args(bench_parser(["baseline", "proposed"]), argv)
    with tempfile.TemporaryDirectory() as tmp:
        data_root, dataset = bench_dataset(args, tmp)
        rows = [run(method, args, data_root, dataset) for method in args.methods]
    keys = ["decode_s", "stage1_cache_img_s", "stage1_prompts_s", "stage2_img_s", "inference_img_s",
            "peak_gpu_gb", "projected_min"]
    print(f"device: {rows[0]['device']}"
          + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "")
          + f", torch {torch.__version__}")
    print(f"{'method':10s} " + " ".join(f"{k:>18s}" for k in keys))
    for row in rows:
        print(f"{row['method']:10s} " + " ".join(
            f"{row[k]:18.1f}" if k in row else f"{'-':>18s}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
