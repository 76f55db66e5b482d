"""Where a sweep's runs execute: local worker processes pinned to GPUs, ``torchrun`` for a run over
several GPUs, and ``submitit`` for a SLURM cluster (its local executor for tests). Nothing here
schedules: a pool of workers takes runs one at a time, or SLURM does.

Example::

    gpu_slots("0,1,2,3", per_run=2)               # [('0', '1'), ('2', '3')]: two runs at once
    worker_environment(("2", "3"), jobs=2)        # {'CUDA_VISIBLE_DEVICES': '2,3'}
    torchrun_command("run/launch_config.yaml", 2) # [python, -m, torch.distributed.run, ...]
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LAUNCHERS = ("local", "slurm", "local-submitit")
LAUNCH_CONFIG = "launch_config.yaml"  # the resolved config a torchrun run is started from


def gpu_slots(gpus: str | None, per_run: int = 1) -> list[tuple[str, ...]]:
    """Split ``--gpus 0,1,2,3`` into groups of ``per_run`` GPUs, one group per concurrent run.

    >>> gpu_slots("0,1,2,3", 2)
    [('0', '1'), ('2', '3')]
    >>> gpu_slots(None)
    []
    """
    if gpus is None or gpus == "":
        return []
    ids = tuple(g.strip() for g in str(gpus).split(","))
    bad = [g for g in ids if not (g.isascii() and g.isdigit())]
    if bad:   # "abc", "-1", "0-3", "1.5", "0,,1": a pinned worker would see no GPU, or another one
        raise ValueError(f"--gpus {gpus}: {bad[0]!r} is not a GPU id; give non-negative integers separated by "
                         "commas, e.g. --gpus 0,1,2,3")
    if per_run < 1:
        raise ValueError(f"--gpus-per-run must be at least 1 (got {per_run})")
    if len(set(ids)) != len(ids):
        raise ValueError(f"--gpus lists a GPU twice ({gpus}); give each id once, e.g. --gpus 0,1,2,3")
    if len(ids) % per_run:
        raise ValueError(f"--gpus {gpus} has {len(ids)} GPU(s), not a multiple of --gpus-per-run {per_run}; "
                         f"give {len(ids) - len(ids) % per_run or per_run} GPUs or change --gpus-per-run")
    return [ids[i:i + per_run] for i in range(0, len(ids), per_run)]


def worker_environment(slot: tuple[str, ...] | None, jobs: int) -> dict[str, str]:
    """Environment variables of one worker (its notebooks' kernels and torchrun inherit them).

    A GPU slot pins the worker with ``CUDA_VISIBLE_DEVICES`` (the run then sees its GPUs as
    cuda:0..K-1). On the CPU, ``jobs`` workers share the cores: one thread each unless the caller
    set ``OMP_NUM_THREADS`` (each run with N threads and N runs would oversubscribe the cores).
    """
    if slot:
        return {"CUDA_VISIBLE_DEVICES": ",".join(slot)}
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        return {"OMP_NUM_THREADS": "1"}
    return {}


def torchrun_command(config_path: str | Path, nproc: int) -> list[str]:
    """``torchrun --standalone --nproc_per_node K -m reidlib train CONFIG``, through this Python
    (``python -m torch.distributed.run`` is torchrun without relying on PATH). ``--standalone``
    picks a free rendezvous port, so several runs on one node do not collide."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "reidlib", "train", str(config_path)]


def write_launch_config(cfg) -> Path:
    """The resolved config as ``<output_dir>/launch_config.yaml``, which ``reidlib train`` reads
    back as it is (every key explicit, so torchrun's processes train exactly ``cfg``)."""
    import yaml

    from ..config import to_dict
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / LAUNCH_CONFIG).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return out / LAUNCH_CONFIG


def train_run(cfg, dataset=None, nproc: int = 1) -> dict:
    """Train one run and return its final metrics: in this process (``nproc`` 1), or with
    ``torchrun`` over ``nproc`` processes (one per visible GPU; gloo on the CPU) started from the
    resolved config written to ``<output_dir>/launch_config.yaml``. What train_eval.ipynb calls."""
    if nproc <= 1:
        from ..engine.trainer import train
        return train(cfg, dataset=dataset)
    out = Path(cfg.output_dir)
    command = torchrun_command(write_launch_config(cfg), nproc)
    done = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        last = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
        raise RuntimeError(f"torchrun over {nproc} processes failed (exit {done.returncode}): {last.strip()}")
    from ..storage import read_metrics
    return read_metrics(out / "metrics.json")


def make_executor(launcher: str, folder: str | Path, partition: str | None = None, time_min: int = 240,
                  gpus_per_run: int = 1, account: str | None = None, cpus_per_run: int | None = None):
    """A submitit executor: ``slurm`` (one job per run, ``gpus_per_run`` GPUs on one node) or
    ``local-submitit`` (submitit's LocalExecutor: each job a local process, as on a cluster)."""
    import submitit
    if launcher == "slurm":
        executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        params = {"timeout_min": time_min, "gpus_per_node": gpus_per_run, "tasks_per_node": 1, "nodes": 1,
                  "slurm_job_name": "reidlib-sweep"}
        if partition:
            params["slurm_partition"] = partition
        if account:
            params["slurm_account"] = account
        if cpus_per_run:
            params["cpus_per_task"] = cpus_per_run
        executor.update_parameters(**params)
        return executor
    if launcher == "local-submitit":
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=time_min)
        return executor
    raise ValueError(f"--launcher {launcher}: not a submitit launcher; choose slurm or local-submitit")
