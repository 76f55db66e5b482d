"""Batch runs: execute ``notebooks/train_eval.ipynb`` with papermill for every (data set, method,
seed), then ``notebooks/compare.ipynb`` on everything that finished.

    python -m reidlib sweep --datasets market1501 dukemtmc --methods baseline proposed \\
        --seeds 0 1 2 --data-root /data --results results [--jobs 2] [--set key=value ...]

Layout under the results folder::

    <dataset>/<method>/seed<k>/       run folder: metrics.json, config.yaml, metrics.jsonl, curves
    runs/<dataset>_<method>_seed<k>.ipynb    the executed notebook of that run (kept), and .log:
                                      the kernel's own stderr
    runs/compare.ipynb                the executed comparison
    summary.md, summary.csv, figures/ the tables and figures of compare.ipynb
    sweep_failures.log                one entry per failed run

A run is complete when its ``metrics.json`` exists, so a sweep started again skips what is done
and continues the rest (a half-trained run resumes from its last checkpoint: ``resume=auto``).
A failed run is logged and reported at the end; the others still run.

From Python::

    from reidlib.sweep import run_sweep
    report = run_sweep(["market1501"], ["baseline", "proposed"], [0, 1], data_roots="data/synth",
                       results_root="results/try", base_config="tiny")
    print(report.format())
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from .config import METHODS, method_config, run_dir

# Shipped inside the package (``notebooks/`` at the top of a clone links here), so an installed
# reidlib runs the sweep and the demo without a clone.
NOTEBOOK_DIR = Path(__file__).resolve().parent / "notebooks"
TRAIN_NOTEBOOK = NOTEBOOK_DIR / "train_eval.ipynb"
COMPARE_NOTEBOOK = NOTEBOOK_DIR / "compare.ipynb"
ATTENTION_NOTEBOOK = NOTEBOOK_DIR / "attention.ipynb"
FAILURE_LOG = "sweep_failures.log"


# --------------------------------------------------------------------------- one run

def run_config(dataset: str, method: str, seed: int, data_root: str | None = None,
               overrides: list[str] | None = None, base_config: str | None = None,
               output_dir: str | Path | None = None, device: str = "auto",
               results_root: str | Path = "results"):
    """The :class:`~reidlib.config.Config` of one run (what train_eval.ipynb trains).

    The run's own keys come first, so ``overrides`` (``key=value`` strings) may still change any
    of them. ``base_config=None`` gives the method's real ViT-B/16 config, ``"tiny"`` the small
    random-init model for CPU tests and the demo.
    """
    keys = [f"data.dataset={dataset}", f"seed={seed}", f"device={device}",
            f"output_dir={output_dir or run_dir(results_root, dataset, method, seed)}"]
    if data_root:
        keys.append(f"data.root={data_root}")
    return method_config(method, keys + list(overrides or []), base=base_config)


@contextlib.contextmanager
def _stderr_to(path: Path | None):
    """Send this process's stderr file descriptor, which the kernel process inherits, to ``path``:
    the kernel's own start-up and shutdown messages land next to the executed notebook instead
    of between the progress lines (what the notebook's cells print is in the notebook)."""
    if path is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def execute_notebook(notebook: str | Path, out: str | Path, parameters: dict,
                     kernel_name: str | None = None, log_output: bool = False) -> None:
    """Run a notebook with papermill (its ``parameters`` cell replaced) and keep the executed copy.
    Raises papermill's PapermillExecutionError when a cell raises. Unless ``log_output``, the
    kernel's stderr goes to ``<out>.log`` and papermill's own log lines are not shown."""
    import papermill as pm
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("papermill").setLevel(logging.INFO if log_output else logging.WARNING)
    with _stderr_to(None if log_output else out.with_suffix(".log")):
        pm.execute_notebook(str(notebook), str(out), parameters=parameters, kernel_name=kernel_name,
                            progress_bar=False, log_output=log_output, cwd=os.getcwd())


def error_message(err: BaseException) -> str:
    """One line for a failed notebook: the exception raised in the cell, not papermill's wrapper."""
    ename, evalue = getattr(err, "ename", None), getattr(err, "evalue", None)
    text = f"{ename}: {evalue}" if ename else f"{type(err).__name__}: {err}"
    return " ".join(text.split())


# --------------------------------------------------------------------------- the sweep

@dataclass(frozen=True)
class Run:
    dataset: str
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.dataset}_{self.method}_seed{self.seed}"

    def __str__(self) -> str:
        return f"{self.dataset} {self.method} seed {self.seed}"


@dataclass
class SweepReport:
    results_root: Path
    ran: list[Run] = field(default_factory=list)
    skipped: list[Run] = field(default_factory=list)
    failed: list[tuple[Run, str]] = field(default_factory=list)
    compare_error: str | None = None
    summary: Path | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and self.compare_error is None

    def format(self) -> str:
        lines = [f"sweep finished in {_duration(self.seconds)}: {len(self.ran)} ran, "
                 f"{len(self.skipped)} skipped (already complete), {len(self.failed)} failed"]
        if self.failed:
            lines.append(f"failed runs (details in {self.results_root / FAILURE_LOG}):")
            for run, message in self.failed:
                lines.append(f"  {run}: {message[:300]}")
                lines.append(f"    executed notebook: {self.results_root / 'runs' / (run.name + '.ipynb')}")
        if self.compare_error:
            lines.append(f"compare.ipynb failed: {self.compare_error[:300]}")
        if self.summary is not None:
            lines.append(f"summary: {self.summary}")
        return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _root_for(data_roots, dataset: str) -> str | None:
    if data_roots is None or isinstance(data_roots, (str, Path)):
        return None if data_roots is None else str(data_roots)
    return None if data_roots.get(dataset) is None else str(data_roots[dataset])


def _log_failure(results_root: Path, run: Run | str, message: str, notebook: Path) -> None:
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    with open(results_root / FAILURE_LOG, "a") as fh:
        fh.write(f"{stamp}  {run}  (notebook {notebook})\n    {message}\n")


def _headline(folder: Path) -> str:
    try:
        m = json.loads((folder / "metrics.json").read_text())
        return f"Rank-1 {100 * m['rank1']:.1f} %, mAP {100 * m['mAP']:.1f} %"
    except (OSError, ValueError, KeyError, TypeError):
        return "no metrics.json"


def _execute_run(notebook, out_nb: Path, params: dict, kernel_name, log_output: bool) -> tuple[str | None, float]:
    """One run, in the sweep's process or a worker process: (None or the error, seconds)."""
    folder = Path(params["output_dir"])
    started = time.time()
    try:
        execute_notebook(notebook, out_nb, params, kernel_name, log_output)
        if not (folder / "metrics.json").is_file():
            raise RuntimeError(f"the notebook finished but wrote no {folder / 'metrics.json'}")
    except Exception as err:  # noqa: BLE001 - any failure of one run is reported, not fatal
        if (folder / "metrics.json").is_file():  # failed after training: not complete
            (folder / "metrics.json").replace(folder / "metrics.failed.json")
        return error_message(err), time.time() - started
    (folder / "metrics.failed.json").unlink(missing_ok=True)  # from an earlier, failed attempt
    return None, time.time() - started


def run_sweep(datasets, methods, seeds, data_roots=None, results_root: str | Path = "results",
              overrides=None, base_config: str | None = None, device: str = "auto",
              notebook: str | Path = TRAIN_NOTEBOOK, compare_notebook: str | Path | None = COMPARE_NOTEBOOK,
              kernel_name: str | None = None, log_output: bool = False, force: bool = False,
              jobs: int = 1, echo=print) -> SweepReport:
    """Execute ``notebook`` for every (dataset, method, seed) not yet complete, then
    ``compare_notebook`` (None: skip it). ``data_roots`` is one folder for all data sets, a
    dict data set -> folder, or None (the config's ``data.root``). ``force`` reruns complete runs.
    ``jobs`` > 1 runs that many notebooks at once (separate processes; e.g. CPU runs with one
    thread each). Returns a :class:`SweepReport`; never raises for a failed run."""
    started = time.time()
    root = Path(results_root)
    (root / "runs").mkdir(parents=True, exist_ok=True)
    report = SweepReport(results_root=root)
    runs = [Run(d, m, int(s)) for d in datasets for m in methods for s in seeds]
    todo = [r for r in runs if force or not (run_dir(root, r.dataset, r.method, r.seed) / "metrics.json").is_file()]
    echo(f"sweep: {_count(len(runs), 'run')} ({_count(len(datasets), 'data set')} x "
         f"{_count(len(methods), 'method')} x {_count(len(seeds), 'seed')}); "
         f"{len(runs) - len(todo)} already complete, {len(todo)} to run; results in {root}")
    tags = {run: f"[{i}/{len(runs)}] {run}" for i, run in enumerate(runs, 1)}
    for run in runs:
        if run not in todo:
            report.skipped.append(run)
            echo(f"{tags[run]}: complete, skipped ({_headline(run_dir(root, run.dataset, run.method, run.seed))})")

    def task(run: Run) -> tuple:
        params = {"dataset": run.dataset, "data_root": _root_for(data_roots, run.dataset),
                  "method": run.method, "seed": run.seed, "overrides": list(overrides or []),
                  "base_config": base_config, "output_dir": str(run_dir(root, run.dataset, run.method, run.seed)),
                  "device": device}
        echo(f"{tags[run]}: {'running' if jobs <= 1 else 'queued'} -> {root / 'runs' / (run.name + '.ipynb')}")
        return notebook, root / "runs" / f"{run.name}.ipynb", params, kernel_name, log_output

    done_seconds = []

    def finish(run: Run, message: str | None, seconds: float) -> None:
        if message is not None:
            report.failed.append((run, message))
            _log_failure(root, run, message, root / "runs" / f"{run.name}.ipynb")
            echo(f"{tags[run]}: FAILED after {_duration(seconds)}: {message[:200]}")
            return
        report.ran.append(run)
        done_seconds.append(seconds)
        left = len(todo) - len(report.ran) - len(report.failed)
        eta = sum(done_seconds) / len(done_seconds) * left / max(1, min(jobs, left)) if left else 0
        eta_text = f"; about {_duration(eta)} left" if left else ""
        echo(f"{tags[run]}: done in {_duration(seconds)}: "
             f"{_headline(run_dir(root, run.dataset, run.method, run.seed))}{eta_text}")

    if jobs <= 1:
        for run in todo:
            finish(run, *_execute_run(*task(run)))
    else:
        # spawn, not fork: the parent may hold torch's threads (the demo loads the data set)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = {pool.submit(_execute_run, *task(run)): run for run in todo}
            for future in as_completed(futures):
                try:
                    message, seconds = future.result()
                except Exception as err:  # noqa: BLE001 - a worker that died
                    message, seconds = error_message(err), 0.0
                finish(futures[future], message, seconds)
    if compare_notebook is not None:
        complete = any((run_dir(root, r.dataset, r.method, r.seed) / "metrics.json").is_file() for r in runs)
        if complete:
            out_nb = root / "runs" / "compare.ipynb"
            echo(f"compare: {compare_notebook} -> {out_nb}")
            try:
                execute_notebook(compare_notebook, out_nb, {"results_root": str(root), "out_dir": str(root)},
                                 kernel_name, log_output)
                report.summary = root / "summary.md"
            except KeyboardInterrupt:
                raise
            except Exception as err:  # noqa: BLE001
                report.compare_error = error_message(err)
                _log_failure(root, "compare", report.compare_error, out_nb)
        else:
            echo("compare: skipped, no run is complete")
    report.seconds = time.time() - started
    echo(report.format())
    return report


# --------------------------------------------------------------------------- command line

def parse_data_roots(values: list[str] | None):
    """``--data-root DIR`` (every data set) or ``--data-root NAME=DIR`` (repeatable)."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    roots = {}
    for value in values:
        if "=" not in value:
            raise SystemExit(f"--data-root: give one DIR, or NAME=DIR for each data set (got '{value}')")
        name, folder = value.split("=", 1)
        roots[name] = folder
    return roots


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reidlib sweep",
        description="Run notebooks/train_eval.ipynb with papermill for every data set x method x seed "
                    "(complete runs are skipped), then notebooks/compare.ipynb.")
    parser.add_argument("--datasets", nargs="+", required=True, help="e.g. market1501 dukemtmc msmt17")
    parser.add_argument("--methods", nargs="+", default=["baseline", "proposed"],
                        help=f"any of {', '.join(METHODS)} (default: baseline proposed)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="default: 0 1 2")
    parser.add_argument("--data-root", nargs="+", metavar="DIR|NAME=DIR",
                        help="data folder for all data sets, or NAME=DIR per data set "
                             "(default: the config's data.root)")
    parser.add_argument("--results", default="results", help="results folder (default: results)")
    parser.add_argument("--base", default=None,
                        help="config replacing the methods' ViT-B/16 YAML, e.g. tiny (CPU); default: none")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="config overrides for every run, e.g. --set stage2.epochs=30 test.rerank=true")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--force", action="store_true", help="rerun complete runs too")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a run failed")
    parser.add_argument("--no-compare", action="store_true", help="do not run compare.ipynb at the end")
    parser.add_argument("--notebook", default=str(TRAIN_NOTEBOOK), help="the notebook run per combination")
    parser.add_argument("--kernel", default=None, help="Jupyter kernel (default: the notebook's, python3)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="notebooks run at once (default 1); e.g. 2 on a 2-core CPU with OMP_NUM_THREADS=1")
    parser.add_argument("--verbose", action="store_true", help="stream the notebooks' output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    for notebook in [args.notebook] + ([] if args.no_compare else [str(COMPARE_NOTEBOOK)]):
        if not Path(notebook).is_file():
            raise SystemExit(f"notebook {notebook} not found: run from a clone of the repository "
                             "(the notebooks are not part of the installed package) or pass --notebook")
    report = run_sweep(args.datasets, args.methods, args.seeds, data_roots=parse_data_roots(args.data_root),
                       results_root=args.results, overrides=args.overrides, base_config=args.base,
                       device=args.device, notebook=args.notebook,
                       compare_notebook=None if args.no_compare else COMPARE_NOTEBOOK,
                       kernel_name=args.kernel, log_output=args.verbose, force=args.force,
                       jobs=args.jobs, echo=lambda text: print(text, flush=True))
    return 1 if args.strict and not report.ok else 0


if __name__ == "__main__":
    sys.exit(main())
