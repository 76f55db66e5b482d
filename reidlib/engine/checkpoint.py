"""Resumable training state: checkpoint names, RNG state, and the config check on resume.

A training checkpoint (written with :func:`reidlib.storage.save_checkpoint`, atomic and
``weights_only``-safe) holds the model, the optimizer, the RNG states (:func:`capture_rng_state`),
stage, epoch and the resolved config. Nothing else is needed to resume: the learning rate of an
epoch is a closed form of the epoch, and every epoch's shuffles and draws start from a seed derived
from (seed, stage, epoch).

Files are named ``checkpoint_stage{N}_e{epoch:03d}.pt`` (N: the stage number; :func:`checkpoint_name`) in the run
folder; ``resume: auto`` picks :func:`find_latest_checkpoint`.

Example::

    save_checkpoint(run_dir / checkpoint_name(2, 10), {"model": model.state_dict(), "epoch": 10,
                    "stage": 2, "rng": capture_rng_state(), "config": to_dict(cfg)})
    state = load_checkpoint(find_latest_checkpoint(run_dir))
    check_config_match(state["config"], to_dict(cfg))
    restore_rng_state(state["rng"])
"""
from __future__ import annotations

import hashlib
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from ..config import config_diff, with_defaults

# Config keys that may change between a run and its resume without changing what is trained:
# where things live, how often to log/save/evaluate, and the test-time settings.
RESUME_IGNORE = (
    "resume", "output_dir", "device", "compile", "base", "stage1_weights", "plugins", "tensorboard",
    "data.root", "data.num_workers",
    "stage1.log_period", "stage1.checkpoint_period",
    "stage2.log_period", "stage2.checkpoint_period", "stage2.eval_period",
    "test",
)

_NAME_RE = re.compile(r"^checkpoint_stage(\d+)_e(\d+)\.pt$")


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

def train_list_fingerprint(dataset) -> dict:
    """``{"images": N, "sha256": ...}`` of the training list: its sorted (path relative to the data
    set's root, pid, camid) lines. Stored in every checkpoint, so that a run resumed on another data
    set of the same name and size (``data.root`` may change on resume: the data moved) is caught.

    >>> class D: root, train = "/d", [("/d/b.jpg", 1, 0), ("/d/a.jpg", 0, 2)]
    >>> train_list_fingerprint(D())["images"]
    2
    """
    lines = sorted(f"{os.path.relpath(path, dataset.root)}\t{pid}\t{camid}" for path, pid, camid in dataset.train)
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return {"images": len(lines), "sha256": digest}


def check_train_list(saved: dict | None, current: dict, checkpoint, root) -> None:
    """Raise ValueError when a checkpoint was trained on another training list than ``current``
    (:func:`train_list_fingerprint`); checkpoints written before fingerprints existed pass."""
    if not saved or saved.get("sha256") == current["sha256"]:
        return
    how = ("as many images, but other file names, identities or cameras" if saved.get("images") == current["images"]
           else f"{saved.get('images')} images in the checkpoint's, {current['images']} now")
    raise ValueError(f"{checkpoint} was trained on another training list than data.root={root} gives ({how}); "
                     "resume with the data it was trained on, or start a new run (resume=none or another "
                     "output_dir)")


def check_config_match(saved: dict, current: dict, ignore=RESUME_IGNORE) -> None:
    """Raise ValueError listing the differing keys, if any.

    >>> check_config_match({"lr": 1}, {"lr": 1})
    """
    full_saved, full_current = with_defaults(saved), with_defaults(current)
    if full_saved is saved or full_current is current:   # not whole configs: compare as given
        full_saved, full_current = saved, current
    diff = config_diff(full_saved, full_current, ignore)
    if diff:
        raise ValueError(f"the checkpoint's config differs from the current one in {len(diff)} "
                         f"key(s): {'; '.join(diff)}; resume with the same config, or start a "
                         "new run (resume=none or another output_dir)")
