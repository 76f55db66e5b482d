"""Per-query time of the retrieval explorer (``reidlib.viz.explore``, in ``reidlib/viz/explorer.py``)
at Market-1501 size, on the CPU.

The explorer computes, once per model and setting, every query's ranking (AP, first true match,
top 50) and keeps it in the run folder; moving to another query then looks arrays up and draws the
page. This script times each part on synthetic features (``bench/eval_bench.py``'s clustered
1280-d features: 3,368 queries x 15,913 gallery images, 750 identities, 6 cameras):

- once per model and setting: ranking every query, from plain and from k-reciprocal re-ranked
  distances; writing and reading the cache file;
- per query: the view (lookup of the top k, AP, first true match); the whole query order sorted
  by the AP difference of two models; the explorer's own handler when its query slider moves (the
  widgets of ``reidlib.viz.explorer`` on two models with these rankings: the page of two models
  side by side, k = 10, 22 image files read, resized and embedded, every control updated; the
  browser's drawing is not included); and, for comparison, one query ranked without the cache
  (its distance row, the protocol's exclusion, a stable sort).

Usage:
    python bench/explore_bench.py            # Market size
    python bench/explore_bench.py --tiny     # seconds-long smoke run (tests/test_explore_state.py)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.eval_bench import SIZES, cpu_model, make_data  # noqa: E402
from reidlib.eval.distance import GalleryDistance  # noqa: E402
from reidlib.eval.protocol import excluded, ranked_gallery  # noqa: E402
from reidlib.eval.rerank import rerank  # noqa: E402
from reidlib.viz.explorer_state import (  # noqa: E402
    Rankings,
    average_precision,
    cached_arrays,
    query_view,
    rank_queries,
    sort_queries,
)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def timed(fn, repeats: int = 1):
    """``(result, best wall seconds)`` of ``repeats`` calls."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def per_call(fn, calls: list) -> tuple[float, float]:
    """(median, 95th percentile) wall milliseconds of ``fn(x)`` over ``calls``."""
    times = []
    for x in calls:
        start = time.perf_counter()
        fn(x)
        times.append(1000 * (time.perf_counter() - start))
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.95 * len(times)))]


def items(pids, cams, images: list[Path]) -> list[tuple]:
    """(path, pid, camid) items; the paths cycle through a few real image files."""
    return [(str(images[i % len(images)]), int(p), int(c)) for i, (p, c) in enumerate(zip(pids, cams))]


def make_images(folder: Path, count: int = 64) -> list[Path]:
    """Small person-crop-sized PNGs (64 x 128, as Market-1501's) for the page's timing."""
    gen = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(gen.integers(0, 255, (128, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


class BenchModel:
    """What :class:`reidlib.viz.explorer_models.ExplorerSession` asks of a model, with the rankings
    given: so the explorer's widgets can be timed on synthetic features, without a network."""

    def __init__(self, label: str, rankings: Rankings, num_query: int, num_gallery: int):
        from types import SimpleNamespace
        self.label, self._rankings = label, rankings
        self.cfg = SimpleNamespace(test=SimpleNamespace(flip=False), model=SimpleNamespace(image_size=(128, 64)))
        self._kept = {"q_kept": np.ones(num_query, bool), "g_kept": np.ones(num_gallery, bool)}

    def features(self, data, flip):
        return self._kept

    def rankings(self, data, flip, reranked, keep):
        return self._rankings

    def attention_available(self):
        return False

    def text_support(self):
        return False, f"{self.label}: no text tower in this benchmark"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small problem, for a smoke run")
    parser.add_argument("--queries", type=int, default=200, help="queries timed per row (default 200)")
    parser.add_argument("--skip-rerank", action="store_true", help="leave out the re-ranked rankings (~20 s)")
    args = parser.parse_args()
    size = SIZES["tiny" if args.tiny else "market"]
    size = type(size)(size.name, size.num_query, size.num_gallery, size.num_ids, size.num_cams,
                      dim=64 if args.tiny else 1280)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {load_average()}; "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"problem: {size.num_query} queries x {size.num_gallery} gallery images, {size.dim}-d features")
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_data(size)
    gen = torch.Generator().manual_seed(1)
    qf_b = torch.nn.functional.normalize(qf + 0.02 * torch.randn(qf.shape, generator=gen), dim=1)  # model "B"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = make_images(folder)
        query, gallery = items(q_pids, q_cams, images), items(g_pids, g_cams, images)
        kernel = GalleryDistance(gf, "euclidean", True)
        ranking, seconds = timed(lambda: rank_queries(lambda r: kernel(qf[r]), query, gallery, keep=50))
        rows.append(("once per model and setting", "rank every query (AP, first match, top 50)", f"{seconds:.2f} s"))
        ranking_b = rank_queries(lambda r: kernel(qf_b[r]), query, gallery, keep=50)
        if not args.skip_rerank:   # the explorer's re-ranking toggle, the first time (then cached)
            def reranked():
                dist = rerank(qf, gf)
                return rank_queries(lambda r: dist[r], query, gallery, keep=50)
            _, seconds = timed(reranked)
            rows.append(("once per model and setting", "re-rank (Zhong et al., CVPR 2017) and rank every query",
                         f"{seconds:.2f} s"))
        file = folder / "rankings.npz"
        _, seconds = timed(lambda: cached_arrays(file, ranking.arrays))
        rows.append(("once per model and setting", "write the rankings' cache file", f"{1000 * seconds:.0f} ms"))
        (arrays, reused), seconds = timed(lambda: cached_arrays(file, ranking.arrays), repeats=3)
        assert reused
        reloaded = Rankings.from_arrays(arrays)
        rows.append(("once per session", f"read the cache file ({file.stat().st_size / 2**20:.1f} MiB)",
                     f"{1000 * seconds:.1f} ms"))

        picks = torch.randint(0, size.num_query, (args.queries,), generator=gen).tolist()
        med, p95 = per_call(lambda i: query_view(reloaded, i, query, gallery, k=10), picks)
        rows.append(("per query", "view: top 10, AP, first true match (cached)", f"{med:.3f} ms (p95 {p95:.3f})"))
        everyone = list(range(size.num_query))
        med, p95 = per_call(lambda _: sort_queries(everyone, "b_wins", ranking.ap, ranking_b.ap), picks[:20])
        rows.append(("per order change", "sort all queries by AP of B - A", f"{med:.2f} ms (p95 {p95:.2f})"))

        from reidlib.viz.explorer import Explorer
        from reidlib.viz.explorer_models import ExploreData, ExplorerSession
        data = ExploreData(size.name, str(folder), query, gallery)
        models = [BenchModel(name, r, len(query), len(gallery)) for name, r in (("A", reloaded), ("B", ranking_b))]
        explorer, seconds = timed(lambda: Explorer(ExplorerSession(models, data, k=10)))
        rows.append(("once per session", "build the widgets and draw the first page", f"{1000 * seconds:.0f} ms"))

        def step(position):
            explorer.query.value = position          # as the slider does: the handler redraws the page
        med, p95 = per_call(step, picks[:50])
        rows.append(("per query", "query slider moved: page of 2 models x (query + 10 matches)",
                     f"{med:.1f} ms (p95 {p95:.1f})"))
        explorer.sort.value = "b_wins"
        med, p95 = per_call(step, picks[:50])
        rows.append(("per query", "the same, queries ordered by AP of B - A", f"{med:.1f} ms (p95 {p95:.1f})"))
        assert explorer.html().count("reid-match") == 20, "the page should show 2 x 10 matches"

        g_pid_t, g_cam_t = torch.as_tensor(g_pids), torch.as_tensor(g_cams)

        def uncached(i):
            row = kernel(qf[i:i + 1])[0]
            mask = excluded([q_pids[i]], [q_cams[i]], g_pid_t, g_cam_t)[0]
            order = ranked_gallery(row, mask)
            return average_precision((g_pid_t[order] == q_pids[i]).numpy())
        med, p95 = per_call(uncached, picks[:50])
        rows.append(("per query, for comparison", "the same without the cache (distance row, sort)",
                     f"{med:.1f} ms (p95 {p95:.1f})"))
        check = [i for i in picks[:50] if not np.isnan(ranking.ap[i])]
        gap = max((abs(uncached(i) - ranking.ap[i]) for i in check), default=0.0)
    width = max(len(r[1]) for r in rows)
    print("\n| when | what | time |\n|---|---|---|")
    for when, what, value in rows:
        print(f"| {when} | {what:<{width}} | {value} |")
    print(f"\nAP of the cached rankings vs a full sort per query: largest difference {gap:.1e}")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
