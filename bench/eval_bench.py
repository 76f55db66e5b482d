"""Speed and memory of reidlib.eval at Market-1501 and MSMT17 test-set sizes.

Features are synthetic: one random unit centre per identity, a small per-camera shift, Gaussian
noise, L2-normalised float32, with 15% of the gallery as pid-0 distractors (Market style).

Each row is timed in this process: best wall time of ``--repeats`` runs and its process CPU time
(all threads; the figure that other load on the machine changes least). Memory is the peak
resident-set growth during the call, read from the kernel's high-water mark (``VmHWM``, reset
before each call through ``/proc/self/clear_refs``), so it counts every NumPy and torch
allocation, the result included.

Baselines, written here and timed in the same run:
- a per-query NumPy loop (a stable ``argsort`` per row, as the torchreid/fast-reid Python
  evaluators do, without their per-element list comprehension) on a NumPy distance matrix;
- with ``--dense-rerank``, the published dense re-ranking (``re_ranking`` of torchreid, with a
  stable argsort), fed plain Euclidean distances; about 8 GB and 5 minutes at Market size.

Usage:
    python bench/eval_bench.py                       # Market size, with baselines
    python bench/eval_bench.py --sizes market msmt   # both sizes
    python bench/eval_bench.py --tiny                # seconds-long smoke run (CI)
    python bench/eval_bench.py --dense-rerank        # also the dense re-ranking reference
    python bench/eval_bench.py --load                # idle vs one core busy, against the references
    python bench/eval_bench.py --tiny --load         # the same at the tiny size (seconds)

``--load`` times evaluation and re-ranking twice, idle and with a background process spinning on
one core of this process's affinity mask, and prints each one's ratio to ``bench/reference.py``'s
NumPy references (the per-query loop; the dense re-ranking) timed under the same load. Its size
is ``medium`` (1000 x 5000, 256-d), where the dense reference takes seconds, not minutes.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.reference import dense_rerank, loop_evaluate, numpy_distance, plain_euclidean  # noqa: E402
from reidlib.eval import evaluate, rerank  # noqa: E402


@dataclass
class Size:
    name: str
    num_query: int
    num_gallery: int
    num_ids: int
    num_cams: int
    dim: int = 1280


SIZES = {
    "market": Size("market", 3368, 15913, 750, 6),
    "msmt": Size("msmt", 11659, 82161, 3060, 15),
    "medium": Size("medium", 1000, 5000, 300, 6, dim=256),
    "tiny": Size("tiny", 200, 1500, 60, 6, dim=64),
}


# --------------------------------------------------------------------------------------------
# Synthetic features
# --------------------------------------------------------------------------------------------


def make_data(size: Size, identity_scale: float = 0.36, camera_scale: float = 0.1, seed: int = 0):
    """Clustered unit features with identity and camera labels (query pids never 0).

    Each image is ``identity_scale * centre + camera_scale * camera_shift + noise`` (noise of norm
    about 1), normalised; the scales give rank-1 ~0.99 and mAP ~0.8 at Market size, near what
    CLIP-ReID reaches, so the positives sit where a trained model puts them.
    """
    gen = torch.Generator().manual_seed(seed)
    unit = lambda x: torch.nn.functional.normalize(x, dim=1)  # noqa: E731
    centres = unit(torch.randn(size.num_ids + 1, size.dim, generator=gen))
    cam_shift = unit(torch.randn(size.num_cams, size.dim, generator=gen))

    def sample(pids, cams):
        x = identity_scale * centres[pids] + camera_scale * cam_shift[cams]
        x += torch.randn(len(pids), size.dim, generator=gen) / size.dim**0.5
        distractor = pids == 0  # distractors: unrelated images, each its own random direction
        x[distractor] = torch.randn(int(distractor.sum()), size.dim, generator=gen)
        return unit(x)

    q_pids = torch.randint(1, size.num_ids + 1, (size.num_query,), generator=gen)
    g_pids = torch.randint(1, size.num_ids + 1, (size.num_gallery,), generator=gen)
    g_pids[torch.rand(size.num_gallery, generator=gen) < 0.15] = 0
    q_cams = torch.randint(0, size.num_cams, (size.num_query,), generator=gen)
    g_cams = torch.randint(0, size.num_cams, (size.num_gallery,), generator=gen)
    return sample(q_pids, q_cams), sample(g_pids, g_cams), q_pids, g_pids, q_cams, g_cams


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def _status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _lifetime_peak_mib() -> float:
    """Fallback where the peak cannot be reset: growth shows only when a call beats every earlier one."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


@dataclass
class Timing:
    seconds: float  # wall clock
    cpu: float  # process CPU time, all threads: less sensitive to other load on the machine
    peak_mib: float  # growth of the resident set's high-water mark during the call


def measure(fn, repeats: int = 1):
    """``(result, Timing)`` of the fastest of ``repeats`` calls."""
    best_result, best = None, Timing(float("inf"), float("nan"), float("nan"))
    for _ in range(repeats):
        exact_peak = _reset_peak()
        before = _status_mib("VmRSS") if exact_peak else _lifetime_peak_mib()
        start, cpu_start = time.perf_counter(), time.process_time()
        result = fn()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        after = _status_mib("VmHWM") if exact_peak else _lifetime_peak_mib()
        if seconds < best.seconds:
            best_result, best = result, Timing(seconds, cpu, after - before)
        del result
    return best_result, best


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def metric_gap(a: dict, b: dict) -> float:
    """Largest difference between two metric dicts (rank-1, mAP, mINP and the CMC curve)."""
    gaps = [abs(a[k] - b[k]) for k in ("rank1", "mAP", "mINP")]
    return max(gaps + [float(np.abs(np.subtract(a["cmc"], b["cmc"])).max())])


def show(name: str, t: Timing, extra: str = "") -> None:
    print(f"{name}: {t.seconds:.2f} s (cpu {t.cpu:.2f} s), peak +{t.peak_mib:.0f} MiB {extra}", flush=True)


def row(size_label: str, task: str, t: Timing, **extra) -> dict:
    return {"size": size_label, "task": task, "time": t.seconds, "cpu": t.cpu, "peak": t.peak_mib, **extra}


def bench_size(size: Size, args, rows: list) -> None:
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_data(size)
    labels = (q_pids, g_pids, q_cams, g_cams)
    np_labels = [x.numpy() for x in labels]
    label = f"{size.name} {size.num_query}x{size.num_gallery}"
    repeats = args.repeats if size.name != "msmt" else 1
    print(f"\n== {label}, {size.dim}-d, {size.num_cams} cameras ==", flush=True)

    ours, t = measure(lambda: evaluate(qf, gf, *labels), repeats)
    show("evaluate(features)", t, f"rank1={ours['rank1']:.4f} mAP={ours['mAP']:.4f} mINP={ours['mINP']:.4f}")
    row_f = row(label, "evaluate from features", t)

    distmat = numpy_distance(qf.numpy(), gf.numpy())
    kwargs = dict(q_pids=q_pids, g_pids=g_pids, q_camids=q_cams, g_camids=g_cams)
    from_dist, t = measure(lambda: evaluate(distmat=distmat, **kwargs), repeats)
    show("evaluate(distmat)", t)
    row_d = row(label, "evaluate from distmat", t)

    if not args.skip_baseline:
        _, t_dist = measure(lambda: numpy_distance(qf.numpy(), gf.numpy()))
        base, t_loop = measure(lambda: loop_evaluate(distmat, *np_labels))
        gap_d, gap_f = metric_gap(from_dist, base), metric_gap(ours, base)
        print(f"baseline: numpy distance {t_dist.seconds:.2f} s + per-query loop {t_loop.seconds:.2f} s "
              f"(peak +{t_loop.peak_mib:.0f} MiB); largest metric difference: from distmat {gap_d:.1e}, "
              f"from features {gap_f:.1e}", flush=True)
        row_f.update(base=t_dist.seconds + t_loop.seconds, agree=f"{gap_f:.0e}")
        row_d.update(base=t_loop.seconds, agree=f"{gap_d:.0e}")
    rows += [row_f, row_d]
    distmat = None  # free the Q x G block before re-ranking (the lambdas above hold it otherwise)

    if size.name != "msmt" and not args.skip_rerank:
        bench_rerank(size, qf, gf, labels, label, args, rows)


def bench_rerank(size, qf, gf, labels, label, args, rows) -> None:
    got, t = measure(lambda: rerank(qf, gf, device="cpu"))
    scored = evaluate(distmat=got, q_pids=labels[0], g_pids=labels[1], q_camids=labels[2], g_camids=labels[3])
    show("rerank", t, f"re-ranked: rank1={scored['rank1']:.4f} mAP={scored['mAP']:.4f}")
    r = row(label, "rerank (k1=20, k2=6, lambda=0.3)", t)
    if args.dense_rerank or size.name == "tiny":
        q, g = qf.numpy(), gf.numpy()

        def dense():
            return dense_rerank(plain_euclidean(q, g), plain_euclidean(q, q), plain_euclidean(g, g))

        expected, t_dense = measure(dense)
        diff = float(np.abs(got.numpy() - expected).max())
        show("dense reference", t_dense, f"max |difference| {diff:.1e}")
        r.update(base=t_dense.seconds, agree=f"{diff:.0e}")
    rows.append(r)


# --------------------------------------------------------------------------------------------
# Idle vs loaded
# --------------------------------------------------------------------------------------------


def busy_core() -> subprocess.Popen:
    """A background process spinning on the first core of this process's affinity mask: the
    "loaded" case, another job holding one core."""
    cpu = min(os.sched_getaffinity(0))
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def compare_load(size: Size, repeats: int) -> list[dict]:
    """Evaluation and re-ranking against their references, idle and with one core busy."""
    qf, gf, *labels = make_data(size)
    q, g, np_labels = qf.numpy(), gf.numpy(), [x.numpy() for x in labels]
    tasks = {
        "evaluate from features": (lambda: evaluate(qf, gf, *labels),
                                   lambda: loop_evaluate(numpy_distance(q, g), *np_labels)),
        "rerank (k1=20, k2=6, lambda=0.3)": (
            lambda: rerank(qf, gf, device="cpu"),
            lambda: dense_rerank(plain_euclidean(q, g), plain_euclidean(q, q), plain_euclidean(g, g))),
    }
    rows = []
    for condition in ("idle", "loaded"):
        busy = busy_core() if condition == "loaded" else None
        try:
            time.sleep(1.0 if busy else 0.0)   # let the spinner take its core
            load = os.getloadavg()[0]
            for task, (ours, reference) in tasks.items():
                _, t = measure(ours, repeats)
                _, t_ref = measure(reference, max(1, repeats // 3))
                rows.append({"condition": condition, "load": load, "task": task, "time": t.seconds,
                             "cpu": t.cpu, "base": t_ref.seconds})
                print(f"{condition}: {task}: {t.seconds:.3f} s, reference {t_ref.seconds:.2f} s, "
                      f"{t_ref.seconds / t.seconds:.1f}x", flush=True)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    return rows


def print_load_table(size: Size, rows: list) -> None:
    print(f"\n{size.name} {size.num_query}x{size.num_gallery}, {size.dim}-d: idle vs one core busy")
    print("| condition | load average | task | reidlib (s) | CPU (s) | reference (s) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['condition']} | {r['load']:.1f} | {r['task']} | {r['time']:.3f} | {r['cpu']:.2f} | "
              f"{r['base']:.2f} | {r['base'] / r['time']:.1f}x |")


def cpu_model() -> str:
    """The CPU's name as /proc/cpuinfo gives it (platform.processor() is empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def print_table(rows: list) -> None:
    print("\n| size | task | time (s) | CPU (s) | peak RSS growth (MiB) | baseline (s) | speed-up "
          "| largest difference |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = f"{r['base']:.2f}" if "base" in r else "-"
        ratio = f"{r['base'] / r['time']:.1f}x" if "base" in r else "-"
        print(f"| {r['size']} | {r['task']} | {r['time']:.2f} | {r['cpu']:.2f} | {r['peak']:.0f} | {base} | "
              f"{ratio} | {r.get('agree', '-')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=["market", "msmt"], default=["market"])
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run instead")
    parser.add_argument("--skip-baseline", action="store_true", help="skip the NumPy per-query loop")
    parser.add_argument("--skip-rerank", action="store_true", help="skip re-ranking")
    parser.add_argument("--dense-rerank", action="store_true",
                        help="also run the dense re-ranking (~8 GB and ~5 min at Market size)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (best kept; MSMT: 1)")
    parser.add_argument("--load", action="store_true",
                        help="only the idle vs one-core-busy comparison against the references (medium size; "
                             "tiny with --tiny)")
    args = parser.parse_args()

    cuda = "yes" if torch.cuda.is_available() else "no"
    print(f"{cpu_model()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
          f"torch threads, torch {torch.__version__}, numpy {np.__version__}, CUDA {cuda}")
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    if args.load:
        size = SIZES["tiny" if args.tiny else "medium"]
        print_load_table(size, compare_load(size, args.repeats))
        print(f"load average at end: {os.getloadavg()[0]:.1f}")
        return
    rows: list = []
    for name in ["tiny"] if args.tiny else args.sizes:
        bench_size(SIZES[name], args, rows)
    print_table(rows)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
