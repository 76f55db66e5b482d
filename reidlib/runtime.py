"""What every stage shares at run time: device, precision, seeds, distributed ranks, the run log.

One :class:`Runtime` is made per run by :func:`setup_runtime`. Under ``torchrun`` it joins the
process group (NCCL on CUDA, gloo on CPU) and only rank 0 logs and writes files.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .storage import check_writable

log = logging.getLogger("reidlib")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a line is logged: a notebook cell's output, a
    redirected or captured stdout."""
    reidlib_progress = True

    def __init__(self):
        super().__init__(sys.stdout)
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def log_to_stdout(level: int = logging.INFO) -> None:
    """Print reidlib's log lines (the data set's table, a line per epoch, the final metrics) to
    stdout at ``level``; calling it again adds no second handler."""
    logger = logging.getLogger("reidlib")
    if not any(getattr(h, "reidlib_progress", False) for h in logger.handlers):
        logger.addHandler(_StdoutHandler())
    logger.setLevel(level)


def default_logging() -> bool:
    """What ``reidlib.train`` and ``reidlib.test`` do first: when nothing has configured logging (no
    handler on the root logger nor on ``reidlib``'s), print reidlib's INFO lines to stdout, as the
    command line prints them. Returns whether it added the handler.

    To keep a run quiet: ``logging.getLogger("reidlib").setLevel(logging.WARNING)`` (a level set
    on the logger is kept), or configure logging yourself (``logging.basicConfig(...)``: reidlib's
    lines then go where yours go, at your levels)."""
    logger = logging.getLogger("reidlib")
    if logging.getLogger().handlers or logger.handlers:
        return False
    logger.addHandler(_StdoutHandler())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    return True


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None          # None = full fp32
    output_dir: Path
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started: float = field(default_factory=time.time)
    scaler: Any = None                     # a torch.amp.GradScaler under fp16, else None
    # Where each metrics.jsonl record goes too (rank 0): callables taking the record, e.g. the
    # engine's TensorBoard writer; one with a close() is closed by close().
    sinks: list = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """Autocast to ``amp_dtype`` (bf16 or fp16) on the run's device; a no-op under fp32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def log_metrics(self, record: dict) -> None:
        """Append one JSON object to ``metrics.jsonl`` and hand it to every sink (rank 0 only)."""
        if not self.is_main:
            return
        record = {"time": round(time.time() - self.started, 2), **record}
        with open(self.output_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink(record)

    def close_sinks(self) -> None:
        """Close the sinks that can be closed (their files complete); they are dropped."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            if hasattr(sink, "close"):
                sink.close()

    def close(self) -> None:
        """Close the sinks and leave the process group (torchrun runs) once every rank is done."""
        self.close_sinks()
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


def choose_precision(precision: str, device_type: str,
                     capability: tuple[int, int] | None = None) -> tuple[torch.dtype | None, str]:
    """The autocast dtype (None: fp32) for training ``precision`` on a device, and why.

    ``auto`` is fp32 off CUDA, bf16 on cards that compute in it natively (compute capability
    >= 8.0: Ampere and later), fp16 on older ones (V100, T4: bf16 there is emulated and slow);
    fp16 trains with a GradScaler (:func:`make_grad_scaler`). A pure function, so tests can ask
    about cards they do not have.

    >>> choose_precision("auto", "cuda", (7, 0))[0], choose_precision("auto", "cuda", (9, 0))[0]
    (torch.float16, torch.bfloat16)
    >>> choose_precision("auto", "cpu")
    (None, 'fp32: auto on cpu')
    """
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"precision={precision!r}: use auto, bf16, fp16 or fp32")
    if precision != "auto":
        return _AMP_DTYPES[precision], f"{precision}: asked for"
    if device_type != "cuda":
        return None, f"fp32: auto on {device_type}"
    if capability is not None and tuple(capability) < (8, 0):
        return torch.float16, (f"fp16 autocast with a GradScaler: auto on a compute capability "
                               f"{capability[0]}.{capability[1]} card, which has no fast bf16 (8.0+)")
    return torch.bfloat16, "bf16: auto on a bf16 card"


_AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """CUDA compute capability of ``device`` (None elsewhere)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))


def pick_amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """:func:`choose_precision`'s dtype for the card ``device`` is."""
    return choose_precision(precision, device.type, device_capability(device))[0]


def make_grad_scaler(amp_dtype: torch.dtype | None, device: torch.device):
    """A GradScaler for fp16 autocast (its small range underflows small gradients without one);
    None for bf16 and fp32, which need none."""
    if amp_dtype != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


@contextlib.contextmanager
def tf32_mode(enabled: bool):
    """TF32 for CUDA matmuls and cuDNN convolutions inside the block, restored after.

    TF32 keeps fp32's range with a 10-bit mantissa: faster fp32 matmuls on Ampere and later, a
    no-op on the CPU and older cards. Training uses it (``tf32``); test features do not unless
    asked (``test.tf32``), so that they are the fp32 features the reference computes.

    >>> with tf32_mode(False):
    ...     torch.backends.cuda.matmul.allow_tf32
    False
    """
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels for the rest of the process (``deterministic``): cuBLAS's fixed
    workspace (CUBLAS_WORKSPACE_CONFIG, read when cuBLAS starts, so set before the first matmul),
    no cuDNN autotuning, and torch's deterministic algorithms (a warning, not an error, for an op
    that has none). Off leaves torch's settings as they are.

    Repeatable GPU runs on the same card and software; bit-identical resume is guaranteed on the
    CPU only."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


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
    amp_dtype, why = choose_precision(cfg.precision, device.type, device_capability(device))
    if cfg.precision == "auto" and amp_dtype == torch.float16 and rank == 0:
        log.info("precision: %s", why)
    set_deterministic(cfg.deterministic)
    # TF32 is not switched on here for the whole process: training runs inside tf32_mode(cfg.tf32)
    return Runtime(device=device, amp_dtype=amp_dtype, output_dir=output_dir, rank=rank, world_size=world_size,
                   local_rank=local_rank, scaler=make_grad_scaler(amp_dtype, device))


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device as this process can use them: the driver's free memory
    plus what torch's caching allocator holds but does not use (reserved - allocated)."""
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + cached, total


def host_memory() -> tuple[int | None, int | None]:
    """(available, total) bytes of host RAM (Linux's MemAvailable); (None, None) where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        kib = lambda key: int(fields[key].split()[0]) * 1024  # noqa: E731
        return kib("MemAvailable"), kib("MemTotal")
    except (OSError, KeyError, ValueError):
        return None, None


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Odd 63-bit constant (the golden ratio's bits) that moves each rank's seeds far from every other
# (seed, stage, epoch) of rank 0.
RANK_STRIDE = 0x1E3779B97F4A7C15


def epoch_seed(seed: int, stage: int, epoch: int, rank: int = 0) -> int:
    """The seed an epoch starts from. Re-seeding at every epoch start makes a run resumed at an
    epoch boundary draw exactly what the uninterrupted run drew (augmentation, dropout, shuffles).

    ``rank``: under torchrun each rank draws its own augmentation and dropout; rank 0 draws what a
    single-process run draws. What all ranks must share (the sampler's and stage 1's shuffles)
    leaves ``rank`` at 0.

    >>> epoch_seed(1234, 2, 5) == epoch_seed(1234, 2, 5, rank=0) != epoch_seed(1234, 2, 5, rank=1)
    True
    """
    return (seed * 1_000_003 + stage * 10_007 + epoch + rank * RANK_STRIDE) % 2**63


def to_cpu(tree):
    """``tree`` (nested dicts, lists, tuples) with every tensor on the CPU, for saving: a
    checkpoint made on a GPU then loads anywhere, also without ``map_location``. Tensors already on
    the CPU are returned as they are (no copy).

    >>> to_cpu({"w": torch.ones(2), "steps": [torch.tensor(3)], "epoch": 4})["steps"][0].device
    device(type='cpu')
    """
    if isinstance(tree, torch.Tensor):
        return tree if tree.device.type == "cpu" else tree.cpu()
    if isinstance(tree, dict):
        moved = {k: to_cpu(v) for k, v in tree.items()}
        if all(moved[k] is v for k, v in tree.items()):
            return tree                      # nothing moved: the very object (bit-identical saves)
        out = copy.copy(tree)                # keeps the type and attributes (a state dict's _metadata)
        out.update(moved)
        return out
    if isinstance(tree, (list, tuple)):
        moved = [to_cpu(v) for v in tree]
        if all(a is b for a, b in zip(moved, tree)):
            return tree
        return type(tree)(moved) if not hasattr(tree, "_fields") else type(tree)(*moved)
    return tree


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
