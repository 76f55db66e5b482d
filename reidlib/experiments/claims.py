"""Atomic claims on a sweep's run folders, so that several sweeps (processes on one machine, or
jobs on a cluster's nodes) sharing one results folder never run the same combination twice.

A claim is the file ``<run folder>/claim.json``, created with ``O_CREAT | O_EXCL``: the file
system lets exactly one creator win, also over NFS v3+ and Lustre, which a cluster's shared results
folder usually is. It holds the owner's host and process id. A claim whose owner is a process
that no longer exists on *this* host (a killed sweep, an out-of-memory kill) is stale and is taken
over; a claim from another host is never taken over (its process cannot be checked from here:
remove the file by hand when that job is gone). Take-overs on one host are serialised with an
``flock`` on ``<results>/.claims.lock``, so two sweeps cannot both take over the same stale claim.

Example::

    claim = claim_run(Path("results/market1501/baseline/seed0"))
    if claim is None:
        print("another sweep runs it:", read_claim(Path("results/market1501/baseline/seed0")))
    else:
        try:
            ...                                 # train the run
        finally:
            release_claim(claim)
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

CLAIM_FILE = "claim.json"
LOCK_FILE = ".claims.lock"
# A claim file is written in the instant after its creation; one still unreadable this long after
# (garbage, or its writer killed in between) belongs to nobody and is taken over.
UNREADABLE_CLAIM_SECONDS = 60

log = logging.getLogger("reidlib")


def owner_record() -> dict:
    """Who claims: host, pid, time, and the SLURM job id when there is one."""
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "time": datetime.datetime.now().isoformat(timespec="seconds")}
    if os.environ.get("SLURM_JOB_ID"):
        record["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return record


def read_claim(folder: Path) -> dict | None:
    """The claim on a run folder, or None. A claim file cut short (its writer killed between the
    create and the write) reads as {} and counts as a claim of unknown owner."""
    try:
        text = (Path(folder) / CLAIM_FILE).read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_abandoned(folder: Path, record: dict | None) -> bool:
    """A claim that cannot say who holds it (not a JSON record with an int ``pid`` and a ``host``)
    and was written more than :data:`UNREADABLE_CLAIM_SECONDS` ago: no process will ever release it."""
    if record is None or (isinstance(record.get("pid"), int) and record.get("host")):
        return False
    try:
        age = time.time() - (Path(folder) / CLAIM_FILE).stat().st_mtime
    except OSError:
        return False
    return age > UNREADABLE_CLAIM_SECONDS


def is_stale(record: dict | None) -> bool:
    """A claim whose owner is known to be dead: same host, process gone."""
    if not record or record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    return not pid_alive(record["pid"])


@contextlib.contextmanager
def _host_lock(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(owner_record(), fh)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def claim_run(folder: Path, lock_root: Path | None = None) -> Path | None:
    """Claim ``folder`` for this process: the claim file's path, or None when a live process (or
    one on another host) holds it. A stale claim (see :func:`is_stale`) is taken over.
    ``lock_root``: where the host-wide lock file lives (default: three levels up, the results
    folder of ``<results>/<dataset>/<method>/seed<k>``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CLAIM_FILE
    if _create(path):
        return path
    with _host_lock(Path(lock_root) if lock_root else folder.parents[2]):
        record = read_claim(folder)
        if is_abandoned(folder, record):
            log.warning("%s: unreadable claim (%s), older than %d s: taken over", path,
                        (path.read_bytes()[:60] if path.is_file() else b"").decode("utf-8", "replace") or "empty",
                        UNREADABLE_CLAIM_SECONDS)
            path.unlink(missing_ok=True)
        elif is_stale(record):
            path.unlink(missing_ok=True)
        return path if _create(path) else None


def release_claim(path: Path) -> None:
    """Remove a claim this process holds (never another's: the file is checked first)."""
    record = read_claim(Path(path).parent)
    if record is not None and record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
        Path(path).unlink(missing_ok=True)
