"""Resumable checkpoints: atomic save, weights_only load, RNG state, config checks.

A checkpoint is one ``torch.save`` of a plain dict holding only tensors, numbers, strings, None,
lists, tuples and dicts — model, optimizer, scheduler and scaler state, RNG states
(:func:`capture_rng_state`), sampler state, epoch, stage and the resolved config as a plain dict —
so it loads with ``torch.load(weights_only=True)``, which executes no pickled code.

Files are named ``checkpoint_stage{1,2}_e{epoch:03d}.pt`` (:func:`checkpoint_name`) in the run
folder; ``resume: auto`` picks :func:`find_latest_checkpoint`.

Example::

    save_checkpoint(run_dir / checkpoint_name(2, 10), {"model": model.state_dict(), "epoch": 10,
                    "stage": 2, "rng": capture_rng_state(), "config": to_dict(cfg)})
    state = load_checkpoint(find_latest_checkpoint(run_dir))
    check_config_match(state["config"], to_dict(cfg))
    restore_rng_state(state["rng"])
"""
from __future__ import annotations

import collections
import fnmatch
import os
import pickle
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

# Config keys that may change between a run and its resume without changing what is trained:
# where things live, how often to log/save/evaluate, and the test-time settings.
RESUME_IGNORE = (
    "resume", "output_dir", "device", "compile", "base", "stage1_weights",
    "data.root", "data.num_workers",
    "stage1.log_period", "stage1.checkpoint_period",
    "stage2.log_period", "stage2.checkpoint_period", "stage2.eval_period",
    "test",
)

_NAME_RE = re.compile(r"^checkpoint_stage([12])_e(\d+)\.pt$")
_SAFE_LEAVES = (torch.Tensor, bool, int, float, complex, str, bytes, type(None),
                torch.dtype, torch.device, torch.Size)


# --------------------------------------------------------------------------- names

def checkpoint_name(stage: int, epoch: int) -> str:
    """File name of a stage/epoch checkpoint.

    >>> checkpoint_name(1, 5)
    'checkpoint_stage1_e005.pt'
    """
    return f"checkpoint_stage{stage}_e{epoch:03d}.pt"


def find_latest_checkpoint(run_dir) -> Path | None:
    """The checkpoint to resume from: stage 2 beats stage 1, then the highest epoch; None if none.

    Only complete files match the name pattern (temp files are ``.<name>.*.tmp``).

    >>> find_latest_checkpoint("/nonexistent") is None
    True
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    best, best_key = None, None
    for p in run_dir.iterdir():
        m = _NAME_RE.match(p.name)
        if m and p.is_file():
            key = (int(m.group(1)), int(m.group(2)))
            if best_key is None or key > best_key:
                best, best_key = p, key
    return best


# --------------------------------------------------------------------------- save / load

def _check_safe(obj, key: str = "state") -> None:
    """Raise TypeError naming the first value that ``torch.load(weights_only=True)`` would refuse.

    Checked at save time, because finding out at resume time is too late.
    """
    if isinstance(obj, _SAFE_LEAVES):
        return
    if type(obj) in (dict, collections.OrderedDict):
        for k, v in obj.items():
            _check_safe(k, f"{key}[{k!r}] (key)")
            _check_safe(v, f"{key}.{k}")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_safe(v, f"{key}[{i}]")
        return
    raise TypeError(f"checkpoint value {key} is a {type(obj).__module__}.{type(obj).__name__}, which "
                    "torch.load(weights_only=True) refuses; convert it to a tensor, number, "
                    "string, list or dict")


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically; returns the path.

    The bytes go to a temp file in the same directory, are fsync'ed, then ``os.replace`` swaps
    it in: a crash at any point leaves either the old file or the new one, never half of one,
    and no stray temp file when Python sees the error.

    >>> import tempfile, os
    >>> p = save_checkpoint(os.path.join(tempfile.mkdtemp(), "c.pt"), {"epoch": 3})
    >>> load_checkpoint(p)["epoch"]
    3
    """
    _check_safe(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(path.parent)
    return path


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be loaded."""


def load_checkpoint(path, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)`` with one-line errors that say what to do.

    >>> load_checkpoint("/no/such.pt")
    Traceback (most recent call last):
    FileNotFoundError: checkpoint not found: /no/such.pt; pass weights=PATH to an existing file
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}; pass weights=PATH to an existing file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg:
            # well-formed, but holds pickled Python objects: not written by save_checkpoint
            what = msg[msg.index("Unsupported global"):].split(" was not")[0]
            raise CheckpointError(
                f"checkpoint {path} holds Python objects that weights_only loading refuses "
                f"({what}); it was not written by save_checkpoint") from None
        raise _corrupt(path, "unreadable pickle data") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError) as e:
        first = str(e).strip().split("\n")[0].split(". ")[0]  # torch's messages run on
        raise _corrupt(path, f"{type(e).__name__}: {first}" if first else type(e).__name__) from None


def _corrupt(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is corrupt or truncated ({reason}); "
                           "delete it and resume from the previous checkpoint")


# --------------------------------------------------------------------------- RNG

def capture_rng_state() -> dict:
    """Python, numpy (legacy global), torch CPU and CUDA RNG states, weights_only-safe.

    ``random.getstate()`` becomes {version, state: list of ints, gauss_next}; numpy's
    ``get_state()`` keys become an int64 tensor; CUDA states are captured when CUDA is available.

    >>> s = capture_rng_state(); a = torch.rand(1); restore_rng_state(s); bool(torch.rand(1) == a)
    True
    """
    version, mt, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "state": list(mt), "gauss_next": gauss_next},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`: draws after it repeat the draws after the capture.

    CUDA states are restored for the devices present (a checkpoint from a machine with more
    GPUs restores the first ones); they are skipped without CUDA.
    """
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda[: torch.cuda.device_count()]])


# --------------------------------------------------------------------------- config checks

def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _ignored(key: str, ignore) -> bool:
    """Exact key, any key under it ("test" covers "test.k1"), or an fnmatch pattern."""
    return any(key == p or key.startswith(p + ".") or fnmatch.fnmatchcase(key, p) for p in ignore)


def _norm(v):
    # a config saved with tuples must equal one loaded from YAML with lists
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v


_MISSING = object()


def config_diff(saved: dict, current: dict, ignore=RESUME_IGNORE) -> list[str]:
    """Dotted keys whose values differ, as ``"key: <saved> (checkpoint) != <current> (current)"``.

    >>> config_diff({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 0}, ignore=())
    ['a.c: 2 (checkpoint) != 3 (current)', 'd: <absent> (checkpoint) != 0 (current)']
    """
    a, b = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if _ignored(key, ignore):
            continue
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va is _MISSING or vb is _MISSING or _norm(va) != _norm(vb):
            show = lambda v: "<absent>" if v is _MISSING else repr(v)  # noqa: E731
            out.append(f"{key}: {show(va)} (checkpoint) != {show(vb)} (current)")
    return out


def check_config_match(saved: dict, current: dict, ignore=RESUME_IGNORE) -> None:
    """Raise ValueError listing the differing keys, if any.

    >>> check_config_match({"lr": 1}, {"lr": 1})
    """
    diff = config_diff(saved, current, ignore)
    if diff:
        raise ValueError(f"the checkpoint's config differs from the current one in {len(diff)} "
                         f"key(s): {'; '.join(diff)}; resume with the same config, or start a "
                         "new run (resume=none or another output_dir)")
