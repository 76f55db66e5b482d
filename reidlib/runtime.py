"""What every stage shares at run time: device, precision, seeds, distributed ranks, the run log.

One :class:`Runtime` is made per run by :func:`setup_runtime`. Under ``torchrun`` it joins the
process group (NCCL on CUDA, gloo on CPU) and only rank 0 logs and writes files.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .files import check_writable

log = logging.getLogger("reidlib")


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None          # None = full fp32
    output_dir: Path
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started: float = field(default_factory=time.time)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """bf16 autocast on CUDA (when asked), a no-op on CPU."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def log_metrics(self, record: dict) -> None:
        """Append one JSON object to ``metrics.jsonl`` (rank 0 only)."""
        if not self.is_main:
            return
        record = {"time": round(time.time() - self.started, 2), **record}
        with open(self.output_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        """Leave the process group (torchrun runs) once every rank is done."""
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} asked for, but torch sees no CUDA device; use device=cpu")
    return device


def pick_amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def setup_runtime(cfg) -> Runtime:
    """Device, precision, process group and output folder for a run."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device)
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    output_dir = Path(cfg.output_dir)
    if rank == 0:
        check_writable(output_dir)  # creates it; fails now, naming output_dir, not after training
    runtime = Runtime(device=device, amp_dtype=pick_amp_dtype(cfg.precision, device),
                      output_dir=output_dir, rank=rank, world_size=world_size, local_rank=local_rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return runtime


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, stage: int, epoch: int) -> int:
    """The seed an epoch starts from. Re-seeding at every epoch start makes a run resumed at an
    epoch boundary draw exactly what the uninterrupted run drew (augmentation, dropout, shuffles)."""
    return (seed * 1_000_003 + stage * 10_007 + epoch) % 2**63


def gather_tensor(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Concatenate a per-rank tensor over ranks (rank order); sizes may differ by rank."""
    if not runtime.distributed:
        return tensor
    backend_device = runtime.device if runtime.device.type == "cuda" else torch.device("cpu")
    local = tensor.to(backend_device)
    size = torch.tensor([local.shape[0]], device=backend_device)
    sizes = [torch.zeros_like(size) for _ in range(runtime.world_size)]
    dist.all_gather(sizes, size)
    max_size = int(max(s.item() for s in sizes))
    padded = torch.zeros((max_size, *local.shape[1:]), dtype=local.dtype, device=backend_device)
    padded[: local.shape[0]] = local
    parts = [torch.zeros_like(padded) for _ in range(runtime.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).to(tensor.device)


def shard(n: int, runtime: Runtime) -> range:
    """The contiguous slice of ``range(n)`` this rank handles (inference, caching)."""
    per_rank = (n + runtime.world_size - 1) // runtime.world_size
    start = min(n, runtime.rank * per_rank)
    return range(start, min(n, start + per_rank))
