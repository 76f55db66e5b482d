"""``reidlib sweep --status RESULTS``: the state of every run of a results folder, read from the
folder alone (no scheduler is asked), so it works for local sweeps and SLURM jobs alike.

States, in this order of precedence:

- ``running``: a claim (``claim.json``) held by a live process, or by a process on another host;
- ``killed``: a claim left by a process that no longer exists on this host (the next sweep takes
  it over and resumes the run from its last checkpoint);
- ``done``: ``metrics.json`` parses and holds the metrics (Rank-1 and mAP shown; a damaged one
  counts as not done, and its error is shown when nothing else says more);
- ``failed``: the last attempt failed (``failed.json``: its error line);
- ``queued``: a sweep queued or submitted it (``queued.json``; the SLURM job id when there is one);
- ``partial``: checkpoints but no result and no owner (a stopped sweep; resumes when run again).

Example::

    print(format_status(run_states("results/thesis")))
"""
from __future__ import annotations

import json
from pathlib import Path

from ..storage import read_metrics
from .claims import is_abandoned, is_stale, read_claim

NOT_RUNS = ("runs", "superseded")


def _read(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def run_folders(root: str | Path) -> list[Path]:
    """Every ``<dataset>/<method>/seed<k>`` folder under ``root`` (not under runs/ or superseded/)."""
    root = Path(root)
    return sorted(p for p in root.glob("*/*/seed*") if p.is_dir() and p.relative_to(root).parts[0] not in NOT_RUNS)


def run_state(folder: Path) -> tuple[str, str]:
    """(state, detail) of one run folder; see the module's docstring."""
    claim = read_claim(folder)
    if claim is not None and is_abandoned(folder, claim):
        return "killed", "claim.json unreadable (owner unknown): a new sweep takes it over and resumes the run"
    if claim is not None:
        who = f"pid {claim.get('pid')} on {claim.get('host')} since {claim.get('time')}"
        if claim.get("slurm_job_id"):
            who += f", SLURM job {claim['slurm_job_id']}"
        return ("killed", f"{who}: gone; a new sweep resumes it") if is_stale(claim) else ("running", who)
    damaged = None
    if (folder / "metrics.json").is_file():
        try:
            m = read_metrics(folder / "metrics.json")
            return "done", f"Rank-1 {100 * float(m['rank1']):.2f} %, mAP {100 * float(m['mAP']):.2f} %"
        except (OSError, TypeError, ValueError) as err:
            damaged = f"{err}"   # not done: the next sweep runs it again
    if (folder / "failed.json").is_file():
        record = _read(folder / "failed.json")
        lines = str(record.get("error", "error not recorded")).strip().splitlines() or ["error not recorded"]
        return "failed", f"{record.get('time', '?')}: {lines[-1][:200]}"
    if (folder / "queued.json").is_file():
        record = _read(folder / "queued.json")
        if record.get("job_id"):
            return "queued", f"{record.get('launcher')} job {record['job_id']} since {record.get('time')}"
        gone = is_stale(record)  # the sweep that queued it, on this host, is gone
        return "queued", f"since {record.get('time')}" + ("; its sweep has stopped" if gone else "")
    if damaged:
        return "partial", damaged
    if any(folder.glob("checkpoint_*.pt")):
        return "partial", "checkpoints, no owner: resumes when the sweep runs again"
    return "empty", ""


def run_states(root: str | Path) -> list[dict]:
    """One dict per run folder: run (dataset/method/seed), state, detail."""
    root = Path(root)
    return [{"run": str(folder.relative_to(root)), "state": state, "detail": detail}
            for folder in run_folders(root) for state, detail in [run_state(folder)]]


def format_status(rows: list[dict]) -> str:
    """A fixed-width table and a count per state."""
    if not rows:
        return "no runs found"
    width = max(len(r["run"]) for r in rows)
    lines = [f"{'run':<{width}}  {'state':<8}  detail"]
    lines += [f"{r['run']:<{width}}  {r['state']:<8}  {r['detail']}".rstrip() for r in rows]
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items()))
    return "\n".join(lines)
