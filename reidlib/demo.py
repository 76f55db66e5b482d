"""The CPU demo: a generated data set -> baseline and proposed over seeds -> the summary table.

    python -m reidlib demo                   # make demo; a few minutes on 2 CPU cores
    python -m reidlib demo --seeds 0 1 2     # more seeds: a more honest spread

Steps: write the generated Market-format data set to ``data/synth`` (when missing) and print its
statistics; train every (method, seed) with the ``tiny`` config by executing
``notebooks/train_eval.ipynb`` through the sweep (finished runs are skipped on a re-run); execute
``compare.ipynb`` and ``attention.ipynb``; print the summary table. Results: ``results/demo/``
(``summary.md``, ``summary.csv``, ``figures/``, one folder per run, executed notebooks in ``runs/``).

The tiny model is randomly initialised, so its numbers say nothing about CLIP; the demo shows
the whole pipeline working, end to end, in minutes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .config import run_dir
from .sweep import ATTENTION_NOTEBOOK, error_message, execute_notebook, run_sweep

# On top of the tiny config (whose epochs and LRs are sized for this demo): every other stage-2
# epoch is evaluated, so the training curves show the test metrics over time.
DEMO_OVERRIDES = ["stage2.eval_period=2"]


def _has_images(root: Path) -> bool:
    return all(any((root / split).glob("*.jpg")) for split in ("bounding_box_train", "query", "bounding_box_test"))


def prepare_data(root: str | Path, ids: int = 60, cams: int = 4, seed: int = 0, echo=print) -> Path:
    """The generated data set at ``root``, written when it is not there yet."""
    root = Path(root)
    if not _has_images(root):
        from .data.synth import generate_market
        echo(f"generating the demo data set in {root} ({ids} identities, {cams} cameras) ...")
        generate_market(root, ids=ids, cams=cams, seed=seed, overwrite=True)
    return root


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reidlib demo",
                                     description="Generated data -> baseline vs proposed over seeds (tiny "
                                                 "config, CPU) -> results/demo/summary.md and figures.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="default: 0 1")
    parser.add_argument("--methods", nargs="+", default=["baseline", "proposed"])
    parser.add_argument("--data", default="data/synth", help="generated data set folder (default data/synth)")
    parser.add_argument("--results", default="results/demo", help="results folder (default results/demo)")
    parser.add_argument("--ids", type=int, default=60, help="identities of the generated set (default 60)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help=f"config overrides after the demo's own ({' '.join(DEMO_OVERRIDES)})")
    parser.add_argument("--device", default="cpu", help="default cpu")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs trained at once, one CPU thread each (default: 2, or 1 on one core)")
    parser.add_argument("--no-attention", action="store_true", help="skip attention.ipynb")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a run failed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    echo = lambda text: print(text, flush=True)  # noqa: E731
    started = time.time()
    # One CPU thread per run (the notebooks' kernels inherit it) and --jobs runs at once: the tiny
    # model's matrices are too small to gain from threads, and on a busy machine spinning OpenMP
    # threads made runs several times slower (measured: 40 s with one thread vs 68-210 s with two).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = prepare_data(args.data, args.ids, echo=echo)
    from .data import load_dataset
    data = load_dataset("market1501", root)
    echo(data.stats_table())
    report = run_sweep(["market1501"], args.methods, args.seeds, data_roots=str(root),
                       results_root=args.results, overrides=DEMO_OVERRIDES + args.overrides,
                       base_config="tiny", device=args.device, jobs=args.jobs, echo=echo)
    results = Path(args.results)
    attention_ok = True
    trained = all((run_dir(results, "market1501", m, args.seeds[0]) / "model_final.pt").is_file()
                  for m in args.methods)
    if not args.no_attention and trained:
        echo(f"attention maps and retrieval grids: {ATTENTION_NOTEBOOK} -> {results / 'runs' / 'attention.ipynb'}")
        try:
            execute_notebook(ATTENTION_NOTEBOOK, results / "runs" / "attention.ipynb",
                             {"results_root": str(results), "dataset": "market1501", "data_root": str(root),
                              "seed": args.seeds[0], "methods": args.methods, "device": args.device,
                              "queries": [i * len(data.query) // 3 for i in range(3)]})
        except Exception as err:  # noqa: BLE001 - reported; the table is still there
            attention_ok = False
            echo(f"attention.ipynb failed: {error_message(err)}")
    if report.summary is not None and report.summary.is_file():
        echo("")
        echo(report.summary.read_text())
        figures = sorted((results / "figures").glob("*.png"))
        echo("figures:\n" + "\n".join(f"  {p}" for p in figures))
        echo(f"training curves: {results}/market1501/<method>/seed<k>/training_curves.png")
    echo(f"demo finished in {time.time() - started:.0f} s")
    ok = report.ok and attention_ok
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
