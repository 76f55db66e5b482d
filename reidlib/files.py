"""Files written atomically and checkpoints loaded safely.

A checkpoint is one ``torch.save`` of a plain dict holding only tensors, numbers, strings, None,
lists, tuples and dicts, so it loads with ``torch.load(weights_only=True)``, which executes no
pickled code. :func:`save_checkpoint` refuses anything else at save time (finding out at load time
is too late) and writes through a temp file and ``os.replace``, as :func:`write_json` does for
small result files: a crash leaves the old file or the new one, never half of one.

Loading errors say what happened: a damaged file, or one holding pickled code (refused, never
run); a file holding only a state dict loads as a :class:`PlainStateDict`. Temp files a killed
save left behind are removed by the next save in the folder, and files get the umask's mode.

Example::

    save_checkpoint("run/model_final.pt", {"model": model.state_dict(), "epoch": 10})
    state = load_checkpoint("run/model_final.pt")
    write_json("run/metrics.json", {"mAP": 0.9})
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import pickle
import pickletools
import re
import secrets
import shutil
import tempfile
import warnings
import zipfile
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
    if type(obj) in (dict, collections.OrderedDict, PlainStateDict):
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


# save_checkpoint's temp files: mkstemp's ".<name>." + 8 random characters + ".tmp"
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def remove_stale_temp_files(folder) -> list[Path]:
    """Delete the temp files an interrupted :func:`save_checkpoint` left in ``folder`` (a save
    killed between writing and renaming); returns what was removed.

    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp()); (folder / ".c.pt.abcd1234.tmp").write_bytes(b"half")
    4
    >>> [p.name for p in remove_stale_temp_files(folder)]
    ['.c.pt.abcd1234.tmp']
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if _TEMP_NAME.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    """The process's umask, read without changing it where /proc tells it (Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def check_writable(folder, key: str = "output_dir") -> Path:
    """Create ``folder`` if needed and write a probe file in it, so that a run fails before any
    work, naming ``key``, when its results could not be saved.

    >>> check_writable("/dev/null/run")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    OSError: output_dir=/dev/null/run is not writable (Not a directory); choose another output_dir ...
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise OSError(f"{key}={folder} is not writable ({err.strerror or err}); choose another {key} "
                      "or fix its permissions") from None
    return folder


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically; returns the path.

    The bytes go to a temp file in the same directory, are fsync'ed, then ``os.replace`` swaps
    it in: a crash at any point leaves either the old file or the new one, never half of one,
    and no stray temp file when Python sees the error. Temp files left by a process killed while
    saving (``.<name>.XXXXXXXX.tmp``) are removed by the next save in the same folder, so one
    folder should have one writer at a time (as a run folder has). The file gets the mode the
    umask gives a new file (0644 under the usual 022), not mkstemp's private 0600.

    >>> import tempfile, os
    >>> p = save_checkpoint(os.path.join(tempfile.mkdtemp(), "c.pt"), {"epoch": 3})
    >>> load_checkpoint(p)["epoch"]
    3
    """
    _check_safe(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_folder(folder):
    """Fill a temp folder beside ``folder``; when the block ends without error it replaces
    ``folder`` in one rename, so ``folder`` is never seen half-written (old or new, whole).

    The files are fsync'ed before the rename. An existing ``folder`` is first renamed aside and
    removed after the swap; a crash between those two renames leaves the old folder whole under
    ``.<name>.XXXXXXXX.old`` and nothing at ``folder``. Leftovers of killed saves are removed by the
    next save of the same folder.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "model"
    >>> with atomic_folder(target) as tmp:
    ...     _ = (tmp / "a.txt").write_text("new")
    >>> (target / "a.txt").read_text(), target.is_dir()
    ('new', True)
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; a model folder cannot replace it (pick another name)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_folders(folder, "tmp")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield tmp
        for item in tmp.iterdir():
            _fsync_file(item)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a saved folder gets the usual mode
        _swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(folder.parent)
    _remove_stale_folders(folder, "old")


def _swap_in(new: Path, folder: Path) -> None:
    """Rename ``new`` to ``folder``; an existing ``folder`` goes aside first (POSIX cannot rename a
    folder over a non-empty one) and comes back if the second rename fails."""
    if not folder.exists():
        os.rename(new, folder)
        return
    aside = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.old")
    os.rename(folder, aside)
    try:
        os.rename(new, folder)
    except BaseException:
        os.rename(aside, folder)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _remove_stale_folders(folder: Path, kind: str) -> None:
    """Remove ``.<name>.XXXXXXXX.<kind>`` folders that a killed :func:`atomic_folder` left."""
    pattern = re.compile(rf"^\.{re.escape(folder.name)}\.[a-z0-9_]{{8}}\.{kind}$")
    if folder.parent.is_dir():
        for p in folder.parent.iterdir():
            if pattern.match(p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
    os.chmod(path, 0o666 & ~_umask())


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be loaded."""


class NotAReidlibCheckpoint(CheckpointError, KeyError):
    """A key reidlib needs is missing from a file that holds only a plain state dict."""

    def __str__(self) -> str:
        return self.args[0]  # KeyError would quote the sentence


class PlainStateDict(collections.OrderedDict):
    """What :func:`load_checkpoint` returns for a file holding only a state dict (name -> tensor,
    e.g. ``torch.save(model.state_dict())``): the same mapping, but asking it for an entry that a
    reidlib checkpoint has (``state["config"]``) says what reidlib expected instead of
    ``KeyError: 'config'``."""

    def __init__(self, tensors, path):
        super().__init__(tensors)
        self.path = str(path)

    def __reduce__(self):
        # saved (torch.save, pickle, deepcopy) as the plain OrderedDict it is, so that a file
        # written from it loads with weights_only=True
        return collections.OrderedDict, (list(self.items()),)

    def __missing__(self, key):
        first = next(iter(self), None)
        raise NotAReidlibCheckpoint(
            f"{self.path} holds a plain state dict ({len(self)} tensors, e.g. {first!r}) with no {key!r} "
            "entry: reidlib expects a model file written by `reidlib train` (model_final.pt or "
            "checkpoint_stage*_e*.pt), which also records the config and the numbers of identities "
            "and cameras")


# Phrases of torch's weights_only unpickler when a pickle asks for code or objects it refuses
# ("Unsupported global: GLOBAL x.y ...", "Trying to load unsupported GLOBAL posix.system ...").
_REFUSED_PHRASES = ("unsupported global", "call reduce", "can only", "persistent_load", "must be imported")


def load_checkpoint(path, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)`` with one-line errors that say what happened and
    what to do: a missing file, a damaged one (truncated, not a checkpoint), or one that holds
    pickled code or objects, which weights_only loading refuses and never runs. A file holding
    only a state dict comes back as a :class:`PlainStateDict`.

    >>> load_checkpoint("/no/such.pt")
    Traceback (most recent call last):
    FileNotFoundError: checkpoint not found: /no/such.pt; pass weights=PATH to an existing file
    """
    path = require_file(path)
    try:
        with warnings.catch_warnings():  # torch's advice on pickle protocols is not the user's business
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refusal(str(e), path)
        if refused:
            raise CheckpointError(
                f"checkpoint {path} holds Python objects that weights_only loading refuses ({refused}); "
                "not run: reidlib loads only the tensors, numbers, strings, lists and dicts it saves "
                "itself") from None
        raise _corrupt(path, "unreadable pickle data") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError) as e:
        first = str(e).strip().split("\n")[0].split(". ")[0]  # torch's messages run on
        raise _corrupt(path, f"{type(e).__name__}: {first}" if first else type(e).__name__) from None
    if isinstance(state, dict) and state and "config" not in state \
            and all(isinstance(v, torch.Tensor) for v in state.values()):
        return PlainStateDict(state, path)
    return state


def require_file(path) -> Path:
    """``path`` as a Path when it is a file or a folder (a trained model's); else FileNotFoundError
    saying to pass weights=PATH."""
    path = Path(path)
    if not (path.is_file() or path.is_dir()):
        raise FileNotFoundError(f"checkpoint not found: {path}; pass weights=PATH to an existing file")
    return path


def _refusal(message: str, path: Path) -> str | None:
    """What weights_only loading refused (the offending global), or None for damaged bytes."""
    for line in message.splitlines():
        if any(phrase in line.lower() for phrase in _REFUSED_PHRASES):
            return line.strip().split(". ")[0].rstrip(".")
    if "unsupported operand" in message.lower():
        # an opcode the restricted unpickler lacks: garbage, or a pickle of another protocol that
        # imports code; read its opcodes (pickletools parses, never runs) to tell which
        names = pickled_globals(path)
        if names:
            return "it imports " + ", ".join(names[:3])
    return None


def pickled_globals(path) -> list[str]:
    """The globals (functions, classes) a pickle file, or a torch zip's ``data.pkl``, would import,
    read from its opcodes without running anything; [] for data that is not a pickle.

    >>> import pickle, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "p.pkl")
    >>> with open(path, "wb") as fh:
    ...     pickle.dump({"f": os.path.join}, fh)
    >>> pickled_globals(path)
    ['posixpath.join']
    """
    names, strings = [], []
    try:
        with _pickle_stream(Path(path)) as stream:
            for op, arg, _ in pickletools.genops(stream):
                if isinstance(arg, str):
                    strings.append(arg)
                if op.name in ("GLOBAL", "INST"):
                    names.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 - not a pickle: damaged data, reported as such by the caller
        return []
    return names


def _pickle_stream(path: Path):
    """The pickle bytes of a file: itself, or the ``data.pkl`` of torch's zip format (small: the
    tensors are stored beside it)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            member = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            return io.BytesIO(archive.read(member))
    return open(path, "rb")


def _corrupt(path: Path, reason: str) -> CheckpointError:
    """The error for a damaged file; resuming is advised only when a resumable checkpoint
    (``checkpoint_stage*.pt``, zero-padded: the last in name order is the latest) is left."""
    left = sorted(p.name for p in path.parent.glob("checkpoint_stage*.pt") if p.name != path.name)
    advice = (f"delete it and resume from the previous checkpoint ({left[-1]}; resume=auto picks it)" if left
              else f"delete it and train again ({path.parent} holds no other resumable checkpoint)")
    return CheckpointError(f"checkpoint {path} is corrupt or truncated ({reason}); {advice}")


def write_json(path, data: dict) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically (temp file, then ``os.replace``)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    return path
