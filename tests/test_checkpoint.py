"""Checkpoints: atomic save, weights_only load, RNG restore, config checks, resume discovery."""
import random

import numpy as np
import pytest
import torch

from reidlib.config import config_diff
from reidlib.engine import checkpoint as ckpt
from reidlib.engine.checkpoint import (
    RESUME_IGNORE,
    capture_rng_state,
    check_config_match,
    checkpoint_name,
    find_latest_checkpoint,
    restore_rng_state,
)
from reidlib.storage import CheckpointError, load_checkpoint, save_checkpoint


def _full_state():
    """Everything a training loop puts in a checkpoint."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).sum().backward()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30)
    opt.step()
    sched.step()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    return {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(), "rng": capture_rng_state(),
        "sampler": {"epoch": 3, "seed": 1234, "order": [4, 1, 2]},
        "epoch": 3, "stage": 2,
        "config": {"stage2": {"lr": 5e-6, "steps": [30, 50]}, "seed": 1234, "output_dir": "runs/x"},
    }


def test_full_state_round_trip_weights_only(tmp_path):
    state = _full_state()
    path = save_checkpoint(tmp_path / checkpoint_name(2, 3), state)
    loaded = load_checkpoint(path)  # weights_only=True inside
    assert loaded["epoch"] == 3 and loaded["stage"] == 2
    assert loaded["config"] == state["config"] and loaded["sampler"] == state["sampler"]
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    assert loaded["scheduler"]["last_epoch"] == 1
    assert loaded["optimizer"]["param_groups"][0]["lr"] == state["optimizer"]["param_groups"][0]["lr"]
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    assert loaded["rng"]["python"]["state"] == state["rng"]["python"]["state"]


def test_save_refuses_unsafe_values_with_the_key(tmp_path):
    with pytest.raises(TypeError, match=r"state\.sampler\.order.*numpy\.ndarray"):
        save_checkpoint(tmp_path / "c.pt", {"sampler": {"order": np.arange(3)}})
    assert list(tmp_path.iterdir()) == []


def test_atomic_save_survives_crash(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_stage1_e001.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes hit the disk, then the crash
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real_save)

    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no stray temp file
    old = load_checkpoint(path)
    assert old["epoch"] == 1 and torch.equal(old["w"], torch.ones(3))


def test_save_overwrites_and_creates_dirs(tmp_path):
    path = tmp_path / "a" / "b" / "c.pt"
    save_checkpoint(path, {"epoch": 1})
    save_checkpoint(path, {"epoch": 2})
    assert load_checkpoint(path)["epoch"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]


def test_missing_file_message(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError) as e:
        load_checkpoint(missing)
    assert str(e.value) == f"checkpoint not found: {missing}; pass weights=PATH to an existing file"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_message(tmp_path, damage):
    path = save_checkpoint(tmp_path / "c.pt", {"w": torch.arange(1000.0)})
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\0not a checkpoint" * 8,
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "corrupt or truncated" in msg and "delete it" in msg
    assert "\n" not in msg


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"cfg": _Opaque()}, path)
    with pytest.raises(CheckpointError, match="Unsupported global.*_Opaque"):
        load_checkpoint(path)


class _Opaque:
    pass


def test_rng_restore_reproduces_draws():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gauss_next, which must round-trip too
    np.random.standard_normal()  # likewise numpy's cached gaussian
    state = capture_rng_state()
    first = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
             np.random.standard_normal(), torch.rand(3).tolist(), torch.randint(0, 100, (4,)).tolist())
    restore_rng_state(state)
    again = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
             np.random.standard_normal(), torch.rand(3).tolist(), torch.randint(0, 100, (4,)).tolist())
    assert first == again


def test_rng_restore_after_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "c.pt", {"rng": capture_rng_state()})
    first = (random.random(), np.random.rand(), torch.rand(2).tolist())
    restore_rng_state(load_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(2).tolist()) == first


def test_config_diff_and_check():
    saved = {"stage2": {"lr": 5e-6, "steps": (30, 50), "log_period": 50}, "seed": 1, "output_dir": "a"}
    current = {"stage2": {"lr": 1e-5, "steps": [30, 50], "log_period": 10}, "seed": 1,
               "output_dir": "b", "new_key": True}
    assert config_diff(saved, current, ignore=()) == [
        "new_key: <absent> (checkpoint) != True (current)",
        "output_dir: 'a' (checkpoint) != 'b' (current)",
        "stage2.log_period: 50 (checkpoint) != 10 (current)",
        "stage2.lr: 5e-06 (checkpoint) != 1e-05 (current)",
    ]  # the tuple/list steps compare equal
    # the default ignore list drops run-location and logging keys
    assert config_diff(saved, current, ignore=RESUME_IGNORE) == [
        "new_key: <absent> (checkpoint) != True (current)",
        "stage2.lr: 5e-06 (checkpoint) != 1e-05 (current)",
    ]
    assert config_diff(saved, current, ignore=("stage2", "new_*", "output_dir")) == []
    with pytest.raises(ValueError, match=r"in 2 key\(s\): new_key: .*; stage2.lr: 5e-06"):
        check_config_match(saved, current)
    check_config_match(saved, saved)


def test_find_latest_checkpoint(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    for name in ["checkpoint_stage1_e120.pt", "checkpoint_stage1_e005.pt", "checkpoint_stage2_e009.pt",
                 "checkpoint_stage2_e010.pt", ".checkpoint_stage2_e011.pt.abc.tmp",
                 "checkpoint_stage2_e099.pt.tmp", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    assert find_latest_checkpoint(tmp_path).name == "checkpoint_stage2_e010.pt"
    (tmp_path / "checkpoint_stage2_e009.pt").unlink()
    (tmp_path / "checkpoint_stage2_e010.pt").unlink()
    assert find_latest_checkpoint(tmp_path).name == "checkpoint_stage1_e120.pt"


def test_checkpoint_name():
    assert checkpoint_name(2, 60) == "checkpoint_stage2_e060.pt"
    assert ckpt._NAME_RE.match(checkpoint_name(1, 1234))
