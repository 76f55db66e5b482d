"""Files written atomically and checkpoints loaded safely.

A checkpoint is one ``torch.save`` of a plain dict holding only tensors, numbers, strings, None,
lists, tuples and dicts, so it loads with ``torch.load(weights_only=True)``, which executes no
pickled code. :func:`save_checkpoint` refuses anything else at save time (finding out at load time
is too late) and writes through a temp file and ``os.replace``, as :func:`write_json` does for
small result files: a crash leaves the old file or the new one, never half of one.

Loading errors say what happened: a damaged file (torch's zip CRCs are checked), one holding
pickled code (refused, never run), or a file that is no checkpoint at all (an image, a text file:
called what it is); a file holding only a state dict loads as a :class:`PlainStateDict`. Temp files
a killed save left behind are removed by the next save in the folder, files get the umask's mode,
and a full disk is said as such (:class:`DiskFull`). :func:`lock_folder` keeps one training process
per run folder; :func:`read_metrics` tells a finished run's ``metrics.json`` from a damaged one.

Example::

    save_checkpoint("run/model_final.pt", {"model": model.state_dict(), "epoch": 10})
    state = load_checkpoint("run/model_final.pt")
    write_json("run/metrics.json", {"mAP": 0.9})
"""
from __future__ import annotations

import collections
import contextlib
import errno
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
import zlib
from pathlib import Path

# torch is imported where a checkpoint is saved or loaded, not here: the tables, the sweep's
# --status and its claims read run folders through this module without loading torch.


def _safe_leaves() -> tuple:
    import torch
    return (torch.Tensor, bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _check_safe(obj, key: str = "state") -> None:
    """Raise TypeError naming the first value that ``torch.load(weights_only=True)`` would refuse.

    Checked at save time, because finding out at resume time is too late.
    """
    if isinstance(obj, _safe_leaves()):
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


class DiskFull(OSError):
    """No space left (or the quota reached) while saving: said as such, naming the file."""


@contextlib.contextmanager
def disk_full_as_such(path):
    """Turn ENOSPC / EDQUOT raised in the block into one :class:`DiskFull` line naming ``path``
    (torch and NumPy report it as a bare "[Errno 28]" deep in their writers, or as a failing zip)."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT) or isinstance(err, DiskFull):
            raise
        full = DiskFull(f"no space left on the device while writing {path} (disk full or quota reached); "
                        "free some space or write elsewhere")
        full.errno = err.errno
        raise full from None


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
    import torch
    _check_safe(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f, disk_full_as_such(path):
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
        with disk_full_as_such(folder):
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
    import torch
    path = require_file(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file (a trained model folder is read with "
                              "reidlib.weights.read_trained; resuming needs a checkpoint_stage*_e*.pt)")
    _check_zip_crcs(path)
    try:
        with warnings.catch_warnings():  # torch's advice on pickle protocols is not the user's business
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # a TorchScript export given as a checkpoint: the error below says what it is
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refusal(str(e), path)
        if refused:
            raise CheckpointError(
                f"checkpoint {path} holds Python objects that weights_only loading refuses ({refused}); "
                "not run: reidlib loads only the tensors, numbers, strings, lists and dicts it saves "
                "itself") from None
        raise _not_a_checkpoint(path) or _corrupt(path, "unreadable pickle data") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError) as e:
        first = str(e).strip().split("\n")[0].split(". ")[0]  # torch's messages run on
        raise _not_a_checkpoint(path) or _corrupt(path, f"{type(e).__name__}: {first}" if first
                                                   else type(e).__name__) from None
    if isinstance(state, dict) and state and "config" not in state \
            and all(isinstance(v, torch.Tensor) for v in state.values()):
        return PlainStateDict(state, path)
    return state


def _check_zip_crcs(path: Path) -> None:
    """torch's zip format stores a CRC-32 per member but torch does not check it when loading: a
    flipped bit inside a tensor loads as a wrong weight. Checked here (one extra read of the file,
    about a second for a ViT-B/16 model); a file that is not a zip is left to torch.load."""
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error):
        return   # damaged beyond the CRCs: torch.load's error says so
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: the bytes of {bad} do not match their stored "
                              f"checksum (flipped bits on disk or in a copy); {_advice(path)}")


# The first bytes of files people pass by mistake, and what they are.
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"BM", "a BMP image"), (b"%PDF", "a PDF document"), (b"\x93NUMPY", "a NumPy .npy array"),
          (b"\x89HDF", "an HDF5 file"), (b"\x1f\x8b", "a gzip file"))


def _file_kind(path: Path) -> str | None:
    """What a file that torch could not load is, when it is plainly something else: an image, a
    NumPy array or archive, another zip, a text file, an empty file; None when it may be a damaged
    checkpoint."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if not head:
        return None   # most likely a save cut short: "corrupt or truncated" says more
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head.startswith(b"PK") and zipfile.is_zipfile(path):
        with contextlib.suppress(zipfile.BadZipFile, OSError):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
            if any(n.endswith("constants.pkl") for n in names):
                return "a TorchScript model (torch.jit.save, as reidlib export writes it: load it with torch.jit.load)"
            if any(n.endswith("data.pkl") for n in names):
                return None   # torch's own format, damaged
            if names and all(n.endswith(".npy") for n in names):
                return "a NumPy .npz archive"
            return f"a zip archive of {len(names)} file(s) (e.g. {names[0] if names else 'none'}), not torch's format"
    if b"\0" not in head:
        with contextlib.suppress(UnicodeDecodeError):
            head.decode("utf-8")
            return "a text file"
    return None


def _not_a_checkpoint(path: Path) -> CheckpointError | None:
    kind = _file_kind(path)
    if kind is None:
        return None
    return CheckpointError(f"{path} is not a checkpoint: it is {kind}; pass a trained model (a run's model "
                           "folder or a .pt file written by reidlib or torch.save)")


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
    return CheckpointError(f"checkpoint {path} is corrupt or truncated ({reason}); {_advice(path)}")


def _advice(path: Path) -> str:
    left = sorted(p.name for p in path.parent.glob("checkpoint_stage*.pt") if p.name != path.name)
    return (f"delete it and resume from the previous checkpoint ({left[-1]}; resume=auto picks it)" if left
            else f"delete it and train again ({path.parent} holds no other resumable checkpoint)")


def write_json(path, data: dict) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically (temp file, then ``os.replace``)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with disk_full_as_such(path):
            tmp.write_text(json.dumps(data, indent=2))
    except OSError:
        tmp.unlink(missing_ok=True)   # never half a JSON left beside the old file
        raise
    tmp.replace(path)
    return path


# The keys a finished run's metrics.json must hold (reidlib.train writes them, with more).
METRICS_KEYS = ("rank1", "mAP")


def read_metrics(path, required=METRICS_KEYS) -> dict:
    """A ``metrics.json`` as a dict; a one-line ValueError naming the file when it does not parse
    (a copy cut short, a disk that filled) or lacks one of ``required``, so that such a run is
    never counted as finished.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "metrics.json"); _ = open(path, "w").write('{"rank1": 0.5')
    >>> read_metrics(path)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: .../metrics.json is unreadable (not complete JSON: ...); the run is not finished: train it again
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        reason = str(err).split(":")[0]
        raise ValueError(f"{path} is unreadable (not complete JSON: {reason}); the run is not finished: "
                         "train it again") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds a {type(record).__name__}, not a metrics record; the run is not finished")
    missing = [k for k in required if k not in record]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; the run is not finished: train it again")
    return record


def has_metrics(folder) -> bool:
    """Whether a run folder holds a ``metrics.json`` that parses and has :data:`METRICS_KEYS`: a
    finished run (an existing but damaged file is not one)."""
    try:
        read_metrics(Path(folder) / "metrics.json")
    except (OSError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------- one writer per run folder

LOCK_FILE = ".lock"


class FolderLocked(RuntimeError):
    """Another process holds the folder's lock (it trains in it)."""


@contextlib.contextmanager
def lock_folder(folder, key: str = "output_dir"):
    """Hold an exclusive, non-blocking ``flock`` on ``folder/.lock`` for the block, so that a
    second process training in the same folder fails at once (:class:`FolderLocked`, naming the
    folder and the holder's pid) instead of both writing checkpoints over each other. The kernel
    drops the lock when its holder dies, however it dies: a killed run leaves no stale lock. The
    file stays (removing it would let two processes lock two different files). Where ``flock``
    does not work (no fcntl, some network file systems) the block runs unlocked.

    >>> import tempfile
    >>> with lock_folder(tempfile.mkdtemp()):
    ...     pass
    """
    folder = check_writable(folder, key)   # created here: an unwritable one is said as such
    try:
        import fcntl
    except ImportError:   # not POSIX
        yield folder
        return
    with open(folder / LOCK_FILE, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise FolderLocked(f"{key}={folder} is in use by another run (pid {holder}); wait for it to end "
                               f"or choose another {key}") from None
        except OSError:   # flock unsupported here: run as before, unlocked
            yield folder
            return
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        try:
            yield folder
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
