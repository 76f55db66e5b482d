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
    superseded/<time>/<dataset>/<method>/seed<k>/   finished runs made with other settings
    <run folder>/claim.json           the run's owner while it runs (host, pid): see reidlib.experiments.claims
    <run folder>/queued.json, failed.json   waiting to start / the last attempt's error
    <run folder>/cross_metrics.json   with --cross: the model tested on the sweep's other data sets
    runs/submitit/                    submitit's job scripts and logs (--launcher slurm | local-submitit)

Where runs execute (reidlib.experiments.launch): one after another in this process; ``--jobs N`` worker
processes (CPU: one thread each); ``--gpus 0,1,..`` workers pinned with CUDA_VISIBLE_DEVICES, and
``--gpus-per-run K`` runs trained with torchrun over K GPUs; ``--launcher slurm`` one submitit job
per run. ``python -m reidlib sweep --status RESULTS`` prints every run's state (reidlib.experiments.status).

A run is complete when its ``metrics.json`` parses (a damaged one is set aside, and the run runs
again) and its resolved ``config.yaml`` equals the
config the sweep would run now (keys in :data:`REUSE_IGNORE` aside: where things live, how often to
log or save), so a sweep started again skips what is done and continues the rest (a half-trained
run resumes from its last checkpoint: ``resume=auto``). A finished run made with other settings is
never mixed into the table: it is reported with the differing keys, moved to ``superseded/`` and
run again, or, with ``strict``, the sweep refuses to start. A failed run is logged and reported at
the end; the others still run. A run is claimed atomically before it starts, so sweeps sharing a
results folder never run the same combination twice.

From Python::

    from reidlib.experiments.sweep import run_sweep
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

import yaml

from ..config import config_diff, dataset_keys, to_dict, with_defaults
from ..engine.checkpoint import RESUME_IGNORE
from ..storage import has_metrics, read_metrics
from .claims import claim_run, owner_record, read_claim, release_claim
from .launch import LAUNCHERS, gpu_slots, make_executor, train_run, worker_environment
from .layout import run_dir

# Shipped inside the package (``notebooks/`` at the top of a clone links here), so an installed
# reidlib runs the sweep and the demo without a clone.
NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"   # reidlib/notebooks
TRAIN_NOTEBOOK = NOTEBOOK_DIR / "train_eval.ipynb"
COMPARE_NOTEBOOK = NOTEBOOK_DIR / "compare.ipynb"
ATTENTION_NOTEBOOK = NOTEBOOK_DIR / "attention.ipynb"
FAILURE_LOG = "sweep_failures.log"
SUPERSEDED = "superseded"
FAILED_FILE = "failed.json"   # in a run folder: the last attempt's error (removed when a run succeeds)
QUEUED_FILE = "queued.json"   # in a run folder: a sweep has queued or submitted it (removed at its start)

# Keys a finished run may differ in and still be reused: those a resume may change, except the
# test settings, which change the reported metrics (only the weights path and the batch size do not).
REUSE_IGNORE = tuple(k for k in RESUME_IGNORE if k != "test") + ("test.weights", "test.batch_size")


# --------------------------------------------------------------------------- one run

def run_config(dataset: str, method: str, seed: int, data_root: str | None = None,
               overrides: list[str] | None = None, base_config: str | None = None,
               output_dir: str | Path | None = None, device: str = "auto",
               results_root: str | Path = "results"):
    """The :class:`~reidlib.config.Config` of one run (what train_eval.ipynb trains).

    The run's own keys come first, so ``overrides`` (``key=value`` strings) may still change any
    of them. ``base_config=None`` gives the method's real ViT-B/16 config (for VeRi-776 and
    VehicleID with the reference's vehicle settings, :func:`~reidlib.config.dataset_keys`),
    ``"tiny"`` the small random-init model for CPU tests and the demo.
    """
    vehicle = dataset_keys(dataset) if base_config is None else []
    keys = [*vehicle, f"data.dataset={dataset}", f"seed={seed}", f"device={device}",
            f"output_dir={output_dir or run_dir(results_root, dataset, method, seed)}"]
    if data_root:
        keys.append(f"data.root={data_root}")
    from ..methods import method_config  # torch: only when a config is made
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


class SupersededRunsError(ValueError):
    """A strict sweep found finished runs made with other settings."""


@dataclass
class SweepReport:
    results_root: Path
    ran: list[Run] = field(default_factory=list)
    skipped: list[Run] = field(default_factory=list)
    failed: list[tuple[Run, str]] = field(default_factory=list)
    claimed: list[tuple[Run, str]] = field(default_factory=list)  # run, who holds it (another sweep)
    superseded: list[tuple[Run, list[str], Path]] = field(default_factory=list)  # run, keys, moved to
    compare_error: str | None = None
    summary: Path | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and self.compare_error is None

    def format(self) -> str:
        lines = [f"sweep finished in {_duration(self.seconds)}: {len(self.ran)} ran, "
                 f"{len(self.skipped)} skipped (already complete), {len(self.failed)} failed"
                 + (f", {len(self.claimed)} left to another sweep" if self.claimed else "")]
        for run, diff, moved in self.superseded:
            lines.append(f"  {run}: made with other settings ({_keys(diff)}), moved to {moved} and run again")
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


def _keys(diff: list[str]) -> str:
    return ", ".join(line.split(":")[0] for line in diff)


def finished_run_diff(folder: Path, expected: dict) -> list[str]:
    """How a finished run's resolved ``config.yaml`` differs from ``expected`` (the config the
    sweep would run now, as :func:`~reidlib.config.to_dict` gives it), keys in :data:`REUSE_IGNORE`
    aside; [] when it may be reused."""
    path = folder / "config.yaml"
    if not path.is_file():
        return ["config.yaml: missing, so the run's settings are unknown"]
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        return [f"config.yaml: unreadable ({type(err).__name__}), so its settings are unknown"]
    if not isinstance(saved, dict):
        return ["config.yaml: not a mapping, so its settings are unknown"]
    return config_diff(with_defaults(saved), expected, REUSE_IGNORE, names=("finished run", "this sweep"))


def move_aside(root: Path, run: Run, stamp: str) -> Path:
    """Move a finished run's folder to ``root/superseded/<stamp>/<dataset>/<method>/seed<k>``."""
    target = run_dir(root / SUPERSEDED / stamp, run.dataset, run.method, run.seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    run_dir(root, run.dataset, run.method, run.seed).rename(target)
    return target


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
        m = read_metrics(folder / "metrics.json")
        return f"Rank-1 {100 * m['rank1']:.1f} %, mAP {100 * m['mAP']:.1f} %"
    except (OSError, ValueError, KeyError, TypeError):
        return "no metrics.json"


def run_complete(folder: Path, expected: dict, test_on=()) -> bool:
    """Whether a run needs nothing more: its ``metrics.json`` parses and holds the metrics, its config
    is ``expected`` (:func:`finished_run_diff`) and every data set of ``test_on`` is in its cross metrics."""
    if not has_metrics(folder) or finished_run_diff(folder, expected):
        return False
    return not _missing_cross(folder, test_on)


def _missing_cross(folder: Path, test_on) -> list[str]:
    if not test_on:
        return []
    from .cross import parse_targets, read_cross  # torch: only when there is a cross evaluation
    tested = read_cross(folder).get("tested_on", {})
    return [name for name in parse_targets(test_on) if name not in tested]


def train_or_reuse(cfg, dataset=None, nproc: int = 1) -> dict:
    """What train_eval.ipynb calls: the run's metrics, from its folder when it already finished
    with this very config (e.g. only its cross-data-set evaluation was missing), else trained, in
    this process or with torchrun over ``nproc`` processes (:func:`~reidlib.experiments.launch.train_run`)."""
    folder = Path(cfg.output_dir)
    if has_metrics(folder) and not finished_run_diff(folder, to_dict(cfg)):
        logging.getLogger("reidlib").info("%s: finished with this config, reusing its metrics.json", folder)
        return read_metrics(folder / "metrics.json")
    return train_run(cfg, dataset, nproc)


@dataclass(frozen=True)
class RunTask:
    """Everything a worker (a pool process or a submitit job) needs to execute one run."""
    run: Run
    notebook: str
    out_nb: str
    params: dict
    expected: dict
    lock_root: str
    kernel_name: str | None = None
    log_output: bool = False
    force: bool = False


def execute_run(task: RunTask) -> tuple[str, str | None, float]:
    """Claim the run, execute its notebook, release the claim: (state, error or None, seconds),
    state one of ``ran``, ``failed``, ``claimed`` (another live sweep holds it; the message says
    who) and ``complete`` (finished by another sweep since this one looked)."""
    folder = Path(task.params["output_dir"])
    claim = claim_run(folder, Path(task.lock_root))
    if claim is None:
        return "claimed", describe_claim(read_claim(folder)), 0.0
    try:
        (folder / QUEUED_FILE).unlink(missing_ok=True)
        _set_aside_damaged_metrics(folder)
        if not task.force and run_complete(folder, task.expected, task.params.get("test_on")):
            return "complete", None, 0.0
        if task.force and (folder / "metrics.json").is_file():  # so that train_or_reuse trains again
            (folder / "metrics.json").replace(folder / "metrics.previous.json")
        message, seconds = _run_notebook(task, folder)
        return ("failed" if message else "ran"), message, seconds
    finally:
        release_claim(claim)


def _set_aside_damaged_metrics(folder: Path) -> None:
    """A metrics.json that does not parse (a copy cut short) marks no finished run: it is kept as
    metrics.damaged.json, and the run trains again (resuming from its checkpoints)."""
    path = folder / "metrics.json"
    if path.is_file() and not has_metrics(folder):
        try:
            read_metrics(path)
        except (OSError, ValueError) as err:
            logging.getLogger("reidlib").warning("%s; kept as metrics.damaged.json, running the run again", err)
        path.replace(folder / "metrics.damaged.json")


def describe_claim(record: dict | None) -> str:
    if not record:
        return "claimed (owner unknown: its claim file is empty)"
    job = f", SLURM job {record['slurm_job_id']}" if record.get("slurm_job_id") else ""
    return f"claimed by pid {record.get('pid')} on {record.get('host')}{job} since {record.get('time')}"


def _run_notebook(task: RunTask, folder: Path) -> tuple[str | None, float]:
    started = time.time()
    had_metrics = has_metrics(folder)  # a finished run executed for its cross evaluation
    try:
        execute_notebook(task.notebook, Path(task.out_nb), task.params, task.kernel_name, task.log_output)
        if not has_metrics(folder):
            raise RuntimeError(f"the notebook finished but wrote no readable {folder / 'metrics.json'}")
    except Exception as err:  # noqa: BLE001 - any failure of one run is reported, not fatal
        message = error_message(err)
        if (folder / "metrics.json").is_file() and not had_metrics:  # failed after training: not complete
            (folder / "metrics.json").replace(folder / "metrics.failed.json")
        _write_json(folder / FAILED_FILE, {**owner_record(), "error": message, "notebook": task.out_nb})
        return message, time.time() - started
    (folder / "metrics.failed.json").unlink(missing_ok=True)  # from an earlier, failed attempt
    (folder / FAILED_FILE).unlink(missing_ok=True)
    return None, time.time() - started


def _write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


def _init_worker(slots, jobs: int) -> None:
    """A pool process's start: take a GPU slot (one per worker, kept for its life) and set the
    environment its notebooks' kernels inherit."""
    slot = slots.get() if slots is not None else None
    os.environ.update(worker_environment(slot, jobs))


def run_sweep(datasets, methods, seeds, data_roots=None, results_root: str | Path = "results",
              overrides=None, base_config: str | None = None, device: str = "auto",
              notebook: str | Path = TRAIN_NOTEBOOK, compare_notebook: str | Path | None = COMPARE_NOTEBOOK,
              kernel_name: str | None = None, log_output: bool = False, force: bool = False,
              jobs: int | None = 1, strict: bool = False, gpus: str | None = None, gpus_per_run: int = 1,
              launcher: str = "local", slurm: dict | None = None, cross: bool = False,
              echo=print) -> SweepReport:
    """Execute ``notebook`` for every (dataset, method, seed) not yet complete, then
    ``compare_notebook`` (None: skip it). ``data_roots`` is one folder for all data sets, a
    dict data set -> folder, or None (the config's ``data.root``). ``force`` reruns complete runs.
    A finished run whose config differs from this sweep's is moved to ``superseded/`` and rerun;
    with ``strict`` the sweep raises :class:`SupersededRunsError` instead, before running anything.

    Where runs execute: ``jobs`` > 1 runs that many notebooks at once in worker processes (on the
    CPU one thread each unless OMP_NUM_THREADS is set); ``gpus="0,1,2,3"`` pins each worker to
    ``gpus_per_run`` of them with CUDA_VISIBLE_DEVICES (``jobs`` None: as many workers as groups);
    ``gpus_per_run`` > 1 trains each run with torchrun. ``launcher="slurm"`` submits each run as a
    submitit job (``slurm``: partition, time_min, account, cpus_per_run), ``"local-submitit"``
    runs the jobs as local processes. Each run is claimed before it starts (:mod:`reidlib.experiments.claims`),
    so sweeps sharing a results folder never run a combination twice. ``cross`` also tests each
    trained model on the sweep's other data sets (``cross_metrics.json`` in the run folder).
    Returns a :class:`SweepReport`; never raises for a failed run."""
    started = time.time()
    root = Path(results_root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--results {root}: a file, not a folder; name a results folder (it is created if missing)")
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher '{launcher}': choose one of {', '.join(LAUNCHERS)}")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"--jobs {jobs}: give a positive number of runs at once, e.g. --jobs 2")
    slots = gpu_slots(gpus, gpus_per_run)
    jobs = len(slots) if jobs is None and slots else (jobs or 1)
    if slots and jobs > len(slots):
        raise ValueError(f"--jobs {jobs} needs {jobs * gpus_per_run} GPUs; --gpus {gpus} gives {len(slots)} "
                         f"group(s) of {gpus_per_run}: pass --jobs {len(slots)} or more GPUs")
    if Path(notebook).resolve() == Path(TRAIN_NOTEBOOK).resolve():   # a notebook of your own may read no data
        _check_config_roots(datasets, methods, seeds, data_roots, overrides, base_config)
    (root / "runs").mkdir(parents=True, exist_ok=True)
    report = SweepReport(results_root=root)
    runs = [Run(d, m, int(s)) for d in datasets for m in methods for s in seeds]
    folders = {r: run_dir(root, r.dataset, r.method, r.seed) for r in runs}
    # Every run's config now: a bad override fails here, before anything runs.
    expected = {r: to_dict(run_config(r.dataset, r.method, r.seed, _root_for(data_roots, r.dataset), overrides,
                                      base_config, folders[r], device))
                for r in runs}
    test_on = {r: _cross_targets(datasets, r.dataset, data_roots) if cross else [] for r in runs}
    finished = [r for r in runs if has_metrics(folders[r]) and read_claim(folders[r]) is None]
    differing = {r: d for r in finished if not force for d in [finished_run_diff(folders[r], expected[r])] if d}
    if differing and strict:
        raise SupersededRunsError(
            f"{len(differing)} finished run(s) in {root} were made with other settings than this sweep's: "
            + "; ".join(f"{r} ({' | '.join(d)})" for r, d in differing.items())
            + "; run the sweep with the same --set values, or without --strict to move them to "
            f"{root / SUPERSEDED} and train them again")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for r, diff in differing.items():
        moved = move_aside(root, r, stamp)
        report.superseded.append((r, diff, moved))
        echo(f"{r}: finished with other settings ({'; '.join(diff)}); moved to {moved}, to run again")
    todo = [r for r in runs if force or r not in finished or r in differing or _missing_cross(folders[r], test_on[r])]
    where = (f"{launcher} jobs" if launcher != "local" else
             f"{jobs} worker(s)" + (f" on GPUs {', '.join('+'.join(s) for s in slots[:jobs])}" if slots else ""))
    echo(f"sweep: {_count(len(runs), 'run')} ({_count(len(datasets), 'data set')} x "
         f"{_count(len(methods), 'method')} x {_count(len(seeds), 'seed')}); "
         f"{len(runs) - len(todo)} already complete, {len(todo)} to run on {where}; results in {root}")
    tags = {run: f"[{i}/{len(runs)}] {run}" for i, run in enumerate(runs, 1)}
    for run in runs:
        if run not in todo:
            report.skipped.append(run)
            echo(f"{tags[run]}: complete, skipped ({_headline(folders[run])})")

    def task(run: Run) -> RunTask:
        trains = force or run not in finished or run in differing
        params = {"dataset": run.dataset, "data_root": _root_for(data_roots, run.dataset),
                  "method": run.method, "seed": run.seed, "overrides": list(overrides or []),
                  "base_config": base_config, "start_weights": None,   # the config's weights + --set's
                  "output_dir": str(folders[run]), "device": device,
                  "test_on": test_on[run], "nproc_per_run": gpus_per_run}
        out_nb = root / "runs" / f"{run.name}{'' if trains else '_cross'}.ipynb"
        _write_json(folders[run] / QUEUED_FILE, {**owner_record(), "launcher": launcher})  # for --status
        return RunTask(run, str(notebook), str(out_nb), params, expected[run], str(root), kernel_name, log_output,
                       force)

    done_seconds, handled = [], []

    def finish(run: Run, state: str, message: str | None, seconds: float) -> None:
        handled.append(run)
        if state == "claimed":
            report.claimed.append((run, message))
            echo(f"{tags[run]}: {message}; left to that sweep")
            return
        if state == "complete":
            report.skipped.append(run)
            echo(f"{tags[run]}: finished meanwhile by another sweep ({_headline(folders[run])})")
            return
        if state == "failed":
            report.failed.append((run, message))
            _log_failure(root, run, message, root / "runs" / f"{run.name}.ipynb")
            echo(f"{tags[run]}: FAILED after {_duration(seconds)}: {message[:200]}")
            return
        report.ran.append(run)
        done_seconds.append(seconds)
        left = len(todo) - len(handled)
        eta = sum(done_seconds) / len(done_seconds) * left / max(1, min(jobs, left)) if left else 0
        eta_text = f"; about {_duration(eta)} left" if left and launcher == "local" else ""
        echo(f"{tags[run]}: done in {_duration(seconds)}: {_headline(folders[run])}{eta_text}")

    tasks = {run: task(run) for run in todo}
    sequential = launcher == "local" and jobs <= 1 and not slots
    for run in todo if not sequential else []:
        echo(f"{tags[run]}: queued -> {tasks[run].out_nb}")
    if launcher != "local":
        _submit(tasks, finish, launcher, root, gpus_per_run, slurm or {}, echo)
    elif sequential:
        for run in todo:
            echo(f"{tags[run]}: running -> {tasks[run].out_nb}")
            finish(run, *execute_run(tasks[run]))
    else:
        _pool(tasks, finish, jobs, slots)
    if compare_notebook is not None:
        _compare(root, runs, compare_notebook, kernel_name, log_output, report, echo)
    report.seconds = time.time() - started
    echo(report.format())
    return report


def _cross_targets(datasets, own: str, data_roots) -> list[str]:
    """The sweep's other data sets as test_on entries: NAME=DIR, or NAME (the run's data.root)."""
    return [d if _root_for(data_roots, d) is None else f"{d}={_root_for(data_roots, d)}"
            for d in dict.fromkeys(datasets) if d != own]


def _pool(tasks: dict, finish, jobs: int, slots) -> None:
    """``jobs`` worker processes, each pinned for its life to one GPU slot when there are slots."""
    # spawn, not fork: the parent may hold torch's threads (the demo loads the data set)
    context = multiprocessing.get_context("spawn")
    queue = None
    if slots:
        queue = context.Queue()
        for slot in slots[:jobs]:
            queue.put(slot)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker,
                             initargs=(queue, jobs)) as pool:
        futures = {pool.submit(execute_run, run_task): run for run, run_task in tasks.items()}
        for future in as_completed(futures):
            try:
                outcome = future.result()
            except Exception as err:  # noqa: BLE001 - a worker that died
                outcome = ("failed", error_message(err), 0.0)
            finish(futures[future], *outcome)


def _submit(tasks: dict, finish, launcher: str, root: Path, gpus_per_run: int, slurm: dict, echo) -> None:
    """One submitit job per run (SLURM, or local processes); waits for them, reporting each as it
    ends. A sweep stopped while it waits leaves the jobs running: ``--status`` shows them."""
    from submitit.helpers import as_completed as jobs_completed
    executor = make_executor(launcher, root / "runs" / "submitit", partition=slurm.get("partition"),
                             time_min=slurm.get("time_min", 240), gpus_per_run=gpus_per_run,
                             account=slurm.get("account"), cpus_per_run=slurm.get("cpus_per_run"))
    jobs = {}
    for run, run_task in tasks.items():
        job = executor.submit(execute_run, run_task)
        jobs[job] = run
        _write_json(Path(run_task.params["output_dir"]) / QUEUED_FILE,
                    {**owner_record(), "launcher": launcher, "job_id": str(job.job_id)})
        echo(f"{run}: submitted as job {job.job_id}")
    for job in jobs_completed(list(jobs)):
        try:
            outcome = job.result()
        except Exception as err:  # noqa: BLE001 - a job that failed or was cancelled
            outcome = ("failed", f"job {job.job_id}: " + " ".join(str(err).split())[-300:], 0.0)
        finish(jobs[job], *outcome)


def _compare(root: Path, runs, compare_notebook, kernel_name, log_output, report: SweepReport, echo) -> None:
    complete = any(has_metrics(run_dir(root, r.dataset, r.method, r.seed)) for r in runs)
    if not complete:
        echo("compare: skipped, no run is complete")
        return
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


def _check_datasets(datasets: list[str], data_roots) -> None:
    """Before any run starts: every data set name registered, every data folder given there.
    (Runs of a sweep fail one by one otherwise, each after its notebook's start-up.)"""
    from ..data import dataset_names  # torch: only once a sweep is asked for
    unknown = [d for d in datasets if d not in dataset_names()]
    if unknown:
        raise SystemExit(f"unknown data set(s) {', '.join(unknown)}; choose from {', '.join(dataset_names())}")
    folders = {d: _root_for(data_roots, d) for d in datasets}
    missing = {d: f for d, f in folders.items() if f is not None and not Path(f).is_dir()}
    if missing:
        name, folder = next(iter(missing.items()))
        raise SystemExit(f"--data-root: {folder} (data set {name}) is not a folder; give the folder that holds it")


def _check_config_roots(datasets, methods, seeds, data_roots, overrides, base_config) -> None:
    """Data sets without a data root of their own are read from their config's ``data.root``
    (relative to this folder, where the runs execute): that folder must exist too, before any run."""
    for name in datasets:
        if _root_for(data_roots, name) is not None:
            continue
        cfg = run_config(name, methods[0], seeds[0], None, overrides, base_config)
        if not Path(cfg.data.root).is_dir():
            raise ValueError(f"data set {name}: the config's data.root={cfg.data.root} is not a folder here; "
                             f"pass --data-root DIR (or {name}=DIR)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reidlib sweep",
        description="Run notebooks/train_eval.ipynb with papermill for every data set x method x seed "
                    "(complete runs are skipped), then notebooks/compare.ipynb.")
    parser.add_argument("--datasets", nargs="+", help="e.g. market1501 dukemtmc msmt17 (required unless --status)")
    parser.add_argument("--methods", nargs="+", default=["baseline", "proposed"],
                        help="registered methods or their variants (python -m reidlib methods lists them; "
                             "default: baseline proposed)")
    parser.add_argument("--plugins", nargs="+", default=[], metavar="FILE.py|MODULE",
                        help="files or modules that register methods of your own; every run imports them too")
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
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 when a run failed, and refuse to start when a finished run "
                             "was made with other settings (default: move it to superseded/ and rerun it)")
    parser.add_argument("--no-compare", action="store_true", help="do not run compare.ipynb at the end")
    parser.add_argument("--notebook", default=str(TRAIN_NOTEBOOK), help="the notebook run per combination")
    parser.add_argument("--kernel", default=None, help="Jupyter kernel (default: the notebook's, python3)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs at once, each in its worker process (default 1, or one per GPU group of --gpus); "
                             "on the CPU each worker gets one thread unless OMP_NUM_THREADS is set")
    parser.add_argument("--gpus", default=None, metavar="0,1,2,3",
                        help="GPUs of this node; each worker is pinned to --gpus-per-run of them "
                             "(CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--gpus-per-run", type=int, default=1,
                        help="GPUs per run (default 1); above 1 each run trains with torchrun over that many")
    parser.add_argument("--launcher", default="local", choices=LAUNCHERS,
                        help="local (worker processes, default), slurm (one submitit job per run), "
                             "local-submitit (submitit's local executor, as slurm on this machine)")
    parser.add_argument("--partition", default=None, help="slurm: partition")
    parser.add_argument("--time", type=int, default=240, metavar="MINUTES", help="slurm: time limit per run (240)")
    parser.add_argument("--account", default=None, help="slurm: account")
    parser.add_argument("--cpus-per-run", type=int, default=None, help="slurm: CPUs per job (default: the cluster's)")
    parser.add_argument("--cross", action="store_true",
                        help="also test each trained model on the sweep's other data sets (cross_metrics.json; "
                             "compare.ipynb writes the train-on-A / test-on-B matrix, cross.md)")
    parser.add_argument("--status", metavar="RESULTS", default=None,
                        help="print the state of every run under RESULTS (done, running, failed, queued) and exit")
    parser.add_argument("--verbose", action="store_true", help="stream the notebooks' output")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.status is not None:
        from .status import format_status, run_states
        if not Path(args.status).is_dir():
            raise SystemExit(f"--status {args.status}: no such results folder")
        print(format_status(run_states(args.status)))
        return 0
    if not args.datasets:
        parser.error("--datasets is required (or --status RESULTS)")
    from ..methods import load_plugins, variant_names  # torch: only once a sweep is asked for
    load_plugins(args.plugins)
    unknown = [m for m in args.methods if m not in variant_names()]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(variant_names())}")
    _check_datasets(args.datasets, parse_data_roots(args.data_root))
    if args.plugins:   # absolute paths: runs start in other folders and processes
        files = [str(Path(p).resolve()) if p.endswith(".py") else p for p in args.plugins]
        args.overrides = [f"plugins=[{', '.join(files)}]", *args.overrides]
    for notebook in [args.notebook] + ([] if args.no_compare else [str(COMPARE_NOTEBOOK)]):
        if not Path(notebook).is_file():
            raise SystemExit(f"notebook {notebook} not found: run from a clone of the repository "
                             "(the notebooks are not part of the installed package) or pass --notebook")
    try:
        report = run_sweep(args.datasets, args.methods, args.seeds, data_roots=parse_data_roots(args.data_root),
                           results_root=args.results, overrides=args.overrides, base_config=args.base,
                           device=args.device, notebook=args.notebook,
                           compare_notebook=None if args.no_compare else COMPARE_NOTEBOOK,
                           kernel_name=args.kernel, log_output=args.verbose, force=args.force,
                           jobs=args.jobs, strict=args.strict, gpus=args.gpus, gpus_per_run=args.gpus_per_run,
                           launcher=args.launcher, cross=args.cross,
                           slurm={"partition": args.partition, "time_min": args.time, "account": args.account,
                                  "cpus_per_run": args.cpus_per_run},
                           echo=lambda text: print(text, flush=True))
    except SupersededRunsError as err:
        print(f"sweep refused: {err}", file=sys.stderr)
        return 1
    return 1 if args.strict and not report.ok else 0


if __name__ == "__main__":
    sys.exit(main())
