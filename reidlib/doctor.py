"""``python -m reidlib doctor``: is this machine ready to train? One line per check, then exit 0 or 1.

Reports torch, CUDA, cuDNN and the driver; each GPU's name, compute capability and memory; what
``precision=auto`` picks there, TF32 and flash attention; NCCL for torchrun; open_clip and peft;
optionally whether a data set's train image cache fits on the device (``--data ROOT --dataset
NAME``); then a smoke run: the tiny config's two stages (1 + 1 epochs) and the final evaluation on
a generated data set, on the chosen device, through the same ``reidlib.train`` a real run takes
(on CUDA: the image cache, augmentation on the GPU, fused Adam, autocast). About 30 s on 2 CPU
cores, a few seconds on a GPU.

Every line is ``OK <check>: <what was found>`` or ``FAIL <check>: <what is wrong>``; the exit status
is 1 when any check failed.

Example::

    python -m reidlib doctor                                   # the default device (a GPU when present)
    python -m reidlib doctor --device cpu                      # what CI runs
    python -m reidlib doctor --data /datasets --dataset msmt17 # also: would MSMT17's image cache fit?
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .config import dataset_keys, load_config
from .runtime import choose_precision, device_memory, host_memory, pick_device

GiB = 2**30
# The oldest torch reidlib runs on (pyproject.toml's floor): torch.onnx.export(dynamo=True) with
# dynamic_shapes, as `reidlib export` calls it, is 2.6's.
TORCH_FLOOR = (2, 6)


@dataclass
class Check:
    """One line of the report: ``OK name: detail`` or ``FAIL name: detail``."""
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'OK' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string.

    >>> _release("2.14.1+cu130"), _release("2.6.0a0+git1234")
    ((2, 14), (2, 6))
    """
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def check_torch() -> Check:
    """torch's version against reidlib's floor, with its CUDA and cuDNN builds."""
    cuda = torch.version.cuda or "none"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    detail = f"{torch.__version__} (CUDA build {cuda}, cuDNN {cudnn or 'none'})"
    if _release(torch.__version__) < TORCH_FLOOR:
        return Check("torch", False, f"{detail}: reidlib needs torch >= {'.'.join(map(str, TORCH_FLOOR))}")
    return Check("torch", True, detail)


def check_packages() -> list[Check]:
    """open_clip and peft: installed, and their versions."""
    checks = []
    for name, dist_name in (("open_clip", "open_clip_torch"), ("peft", "peft")):
        version = _version(dist_name)
        checks.append(Check(name, version is not None, version or f"not installed (pip install {dist_name})"))
    return checks


def _driver_version() -> str:
    """The NVIDIA driver's release (nvidia-smi), else the CUDA driver API version torch sees."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    with contextlib.suppress(Exception):  # a private call: any failure only loses the detail
        api = torch._C._cuda_getDriverVersion()
        return f"unknown release (CUDA driver API {api // 1000}.{api % 1000 // 10})"
    return "unknown"


def check_devices(device: torch.device) -> list[Check]:
    """The driver, and per GPU: name, capability, memory, bf16, TF32, flash attention."""
    if device.type != "cuda":
        free, total = host_memory()
        memory = f", {free / GiB:.1f} of {total / GiB:.1f} GiB RAM free" if free is not None else ""
        # a CUDA build that sees no GPU: the driver is missing or older than the build wants
        unseen = torch.version.cuda and not torch.cuda.is_available()
        unseen = "; torch is a CUDA build but sees no GPU" if unseen else ""
        return [Check("device", True, f"cpu, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
                                      f"{memory}{unseen}")]
    checks = [Check("driver", True, _driver_version())]
    flash_built = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)()
    for index in range(torch.cuda.device_count()):
        here = torch.device("cuda", index)
        major, minor = torch.cuda.get_device_capability(here)
        free, total = device_memory(here)
        checks.append(Check(f"cuda:{index}", True, f"{torch.cuda.get_device_name(here)}, compute capability "
                                                   f"{major}.{minor}, {free / GiB:.1f} of {total / GiB:.1f} GiB free"))
    major, minor = torch.cuda.get_device_capability(device)
    ampere = (major, minor) >= (8, 0)
    _, why = choose_precision("auto", "cuda", (major, minor))
    checks.append(Check("precision", True, f"auto on {device} trains in {why.split(':')[0]}"
                                           + ("" if ampere else " (no native bf16 before compute capability 8.0)")))
    checks.append(Check("tf32", True, "supported (training uses it: tf32=true; test features: test.tf32)" if ampere
                        else "not on this card: fp32 matmuls run in full fp32"))
    flash = flash_built and ampere and torch.backends.cuda.flash_sdp_enabled()
    checks.append(Check("flash attention", True, "available to SDPA" if flash else
                        "not available (SDPA falls back to memory-efficient or math kernels: slower)"))
    return checks


def check_distributed(device: torch.device) -> Check:
    """NCCL (multi-GPU under torchrun) on CUDA; gloo on the CPU."""
    if device.type != "cuda":
        ok = dist.is_available() and dist.is_gloo_available()
        return Check("distributed", ok, "gloo (CPU torchrun)" if ok else "torch.distributed without gloo")
    if not (dist.is_available() and dist.is_nccl_available()):
        return Check("nccl", False, "torch has no NCCL: torchrun over several GPUs cannot start")
    version = torch.cuda.nccl.version()          # a tuple (2, 21, 5); an int in older torch
    version = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return Check("nccl", True, f"{version}, {torch.cuda.device_count()} GPU(s) for torchrun")


def check_image_cache(root: str, name: str, device: torch.device) -> Check:
    """Whether ``name``'s train image cache (at its config's input size) fits on ``device``."""
    from .data import dataset_from_config
    from .data.cache import cache_bytes, plan_image_cache
    try:
        cfg = load_config("vit_clipreid", [f"data.dataset={name}", f"data.root={root}", *dataset_keys(name)])
        dataset = dataset_from_config(cfg)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        return Check("data", False, f"{name} under {root}: {str(err).splitlines()[0]}")
    need = cache_bytes(len(dataset.train), cfg.model.image_size)
    size = "x".join(map(str, cfg.model.image_size))
    if device.type != "cuda":
        return Check("image cache", True, f"{name}: {len(dataset.train)} images, {need / GiB:.2f} GiB at {size}; "
                                          "used on CUDA only (the CPU reads through the DataLoader)")
    _, line = plan_image_cache(need, str(device), *device_memory(device), *host_memory())
    return Check("image cache", True, f"{name} ({len(dataset.train)} images at {size}): {line}")


class _Keep(logging.Handler):
    """Keeps the log messages it is given."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _quiet():
    """The smoke run's log lines kept, not printed, and its progress bars (stderr) swallowed: the
    report is the doctor's lines. Yields the list reidlib's log messages go to."""
    logger, keep, timm = logging.getLogger("reidlib"), _Keep(), logging.getLogger("timm")
    saved = logger.level, logger.propagate, timm.level
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    timm.setLevel(logging.ERROR)    # its note that a 1-epoch cosine schedule is flat
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield keep.messages
    finally:
        logger.removeHandler(keep)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        timm.setLevel(saved[2])


def smoke_run(device: str, folder: Path) -> list[Check]:
    """The tiny config, 1 + 1 epochs and the final evaluation on a generated set, on ``device``."""
    from .demo.synth import generate_market
    from .engine.trainer import train
    from .methods import method_config
    from .storage import load_checkpoint
    started = time.perf_counter()
    try:
        root = generate_market(folder / "market", ids=16, cams=3, images_per_id=8, seed=0)
    except Exception as err:  # noqa: BLE001 - any failure is one FAIL line
        return [Check("generated data", False, f"{type(err).__name__}: {str(err).splitlines()[0]}")]
    checks = [Check("generated data", True, f"{root} in {time.perf_counter() - started:.1f} s")]
    cfg = method_config("baseline", [f"data.root={root}", f"output_dir={folder / 'run'}", f"device={device}",
                                     "stage1.epochs=1", "stage2.epochs=1", "stage2.ims_per_batch=16",
                                     "test.batch_size=32", "data.num_workers=0"], base="tiny")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        with _quiet() as messages:
            metrics = train(cfg)
    except Exception as err:  # noqa: BLE001
        return checks + [Check("smoke run", False, f"{type(err).__name__}: {str(err).splitlines()[0]}")]
    seconds = time.perf_counter() - started
    checks += [Check("smoke " + m.split(":")[0], True, m.split(": ", 1)[-1])
               for m in messages if m.startswith(("image cache", "precision:"))]
    peak = f", peak {torch.cuda.max_memory_allocated() / GiB:.2f} GiB" if device.startswith("cuda") else ""
    good = all(math.isfinite(metrics[k]) for k in ("rank1", "mAP"))
    checks.append(Check("smoke run", good, f"stage 1 + stage 2 + evaluation on {device} in {seconds:.1f} s{peak}, "
                                           f"mAP {metrics['mAP']:.3f}" + ("" if good else " (not finite)")))
    saved = sorted((folder / "run").glob("checkpoint_*.pt"))
    if not saved:
        return checks + [Check("checkpoint", False, "the smoke run wrote no checkpoint")]
    state = load_checkpoint(saved[-1], map_location=None)    # where the tensors were saved
    devices = {t.device.type for t in _tensors(state)}
    checks.append(Check("checkpoint", devices <= {"cpu"}, f"{saved[-1].name}: tensors on {', '.join(sorted(devices))}"))
    return checks


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def run_checks(device_name: str = "auto", data: str | None = None, dataset: str = "market1501",
               smoke: bool = True):
    """Every check, in report order, each as soon as it is done (a generator); a device that
    cannot be used ends the report there."""
    yield from _guarded("torch", lambda: [check_torch()])
    yield from _guarded("packages", check_packages)
    try:
        device = pick_device(device_name)
    except (RuntimeError, ValueError) as err:
        yield Check("device", False, str(err))
        return
    yield from _guarded("device", lambda: check_devices(device))
    yield from _guarded("distributed", lambda: [check_distributed(device)])
    if data:
        yield from _guarded("image cache", lambda: [check_image_cache(data, dataset, device)])
    if smoke:
        with tempfile.TemporaryDirectory(prefix="reidlib-doctor-") as tmp:
            yield from _guarded("smoke run", lambda: smoke_run(str(device), Path(tmp)))


def _guarded(name: str, checks):
    """The checks ``checks()`` returns, or one FAIL line when it raises (a CUDA error, say)."""
    try:
        yield from checks()
    except Exception as err:  # noqa: BLE001 - the report goes on, one line per failure
        yield Check(name, False, f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reidlib doctor", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--data", default=None, help="a data set root: would its train image cache fit?")
    parser.add_argument("--dataset", default="market1501", help="the data set under --data (default market1501)")
    parser.add_argument("--no-smoke", action="store_true", help="leave out the smoke run")
    args = parser.parse_args(argv)
    failed = False
    for check in run_checks(args.device, args.data, args.dataset, smoke=not args.no_smoke):
        print(check.line(), flush=True)
        failed |= not check.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
