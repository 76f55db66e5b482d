"""Wall time of the demo sweep run one notebook at a time vs ``--jobs N`` at once, on the CPU.

The demo's sweep (generated data set, tiny config, baseline and proposed over seeds 0 and 1, the
random-init group: ``model.pretrained=none``), executed twice into fresh folders: with ``jobs=1``,
then with ``jobs=N``. Both use one thread per run (``OMP_NUM_THREADS=1``, as the demo), so the runs
are the same computations and their metrics must agree exactly; the script checks it. Printed:
the machine (CPU model, cores, load average before and after), each sweep's wall time and the
speed-up.

Usage:
    python bench/sweep_bench.py                      # the demo sweep, jobs 1 vs 2
    python bench/sweep_bench.py --jobs 4 --seeds 0 1 2 3
    python bench/sweep_bench.py --quick              # 1 + 1 epochs per run: a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported anywhere: one thread per run
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reidlib.config import run_dir  # noqa: E402
from reidlib.demo import DATASET, DEMO_OVERRIDES, prepare_data  # noqa: E402
from reidlib.experiments.sweep import run_sweep  # noqa: E402

QUICK = ["stage1.epochs=1", "stage2.epochs=1", "stage2.steps=[1]", "stage2.eval_period=0"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed_sweep(root: Path, results: Path, jobs: int, methods, seeds, overrides) -> tuple[float, dict]:
    started = time.time()
    report = run_sweep([DATASET], methods, seeds, data_roots=str(root), results_root=results,
                       overrides=overrides, base_config="tiny", device="cpu", compare_notebook=None, jobs=jobs,
                       echo=lambda text: None)
    seconds = time.time() - started
    if not report.ok or len(report.ran) != len(methods) * len(seeds):
        raise SystemExit(f"the jobs={jobs} sweep failed: {report.format()}")
    metrics = {(m, s): json.loads((run_dir(results, DATASET, m, s) / "metrics.json").read_text())
               for m in methods for s in seeds}
    return seconds, {k: (v["rank1"], v["mAP"], v["mINP"]) for k, v in metrics.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs at once in the parallel sweep (default 2)")
    parser.add_argument("--methods", nargs="+", default=["baseline", "proposed"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--data", default="data/synth", help="the demo data set (generated when missing)")
    parser.add_argument("--quick", action="store_true", help="1 + 1 epochs per run")
    args = parser.parse_args()
    root = prepare_data(args.data, echo=print)
    overrides = DEMO_OVERRIDES + ["model.pretrained=none", "model.quick_gelu=false"] + (QUICK if args.quick else [])
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        sequential, first = timed_sweep(root, Path(tmp) / "jobs1", 1, args.methods, args.seeds, overrides)
        parallel, second = timed_sweep(root, Path(tmp) / f"jobs{args.jobs}", args.jobs, args.methods, args.seeds,
                                       overrides)
    load_after = os.getloadavg()
    runs = len(args.methods) * len(args.seeds)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; load average (1 min) {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after; OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    print(f"demo sweep: {runs} runs ({', '.join(args.methods)} x seeds {' '.join(map(str, args.seeds))}), "
          f"tiny config{' (1 + 1 epochs)' if args.quick else ''}")
    print("| jobs | wall (s) | per run (s) |\n|---|---|---|")
    print(f"| 1 | {sequential:.1f} | {sequential / runs:.1f} |")
    print(f"| {args.jobs} | {parallel:.1f} | {parallel / runs:.1f} |")
    print(f"speed-up: {sequential / parallel:.2f}x; metrics identical: {first == second}")
    return 0 if first == second else 1


if __name__ == "__main__":
    sys.exit(main())
