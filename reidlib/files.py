"""Files written atomically and checkpoints loaded safely.

A checkpoint is one ``torch.save`` of a plain dict holding only tensors, numbers, strings, None,
lists, tuples and dicts, so it loads with ``torch.load(weights_only=True)``, which executes no
pickled code. :func:`save_checkpoint` refuses anything else at save time (finding out at load time
is too late) and writes through a temp file and ``os.replace``, as :func:`write_json` does for
small result files: a crash leaves the old file or the new one, never half of one.

Example::

    save_checkpoint("run/model_final.pt", {"model": model.state_dict(), "epoch": 10})
    state = load_checkpoint("run/model_final.pt")
    write_json("run/metrics.json", {"mAP": 0.9})
"""
from __future__ import annotations

import collections
import json
import os
import pickle
import tempfile
from pathlib import Path

import torch

_SAFE_LEAVES = (torch.Tensor, bool, int, float, complex, str, bytes, type(None),
                torch.dtype, torch.device, torch.Size)


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


def write_json(path, data: dict) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically (temp file, then ``os.replace``)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    return path
