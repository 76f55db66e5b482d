"""Bad input and faults: each fails early with one clear line naming the key or file, and no
result is lost or mixed. Grouped by kind: hangs (run under a timeout, so a regression fails
instead of hanging), silent wrong values and tracebacks, late errors, lost work, misleading
messages, leftovers, counts, and the two fidelity settings. The sweep's "never mix results" is
tested in test_sweep.py.
"""
import contextlib
import io
import json
import logging
import math
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import reidlib
from reidlib.__main__ import main as cli
from reidlib.config import CONFIG_DIR, load_config
from reidlib.data import RandomIdentitySampler, ReIDDataset, load_dataset
from reidlib.data.sampler import identity_batches
from reidlib.eval import evaluate
from reidlib.eval.inference import extract_features
from reidlib.eval.metrics import DROPPED_REASON
from reidlib.methods import method_config
from reidlib.methods.trained import load_trained_model
from reidlib.optim.nonfinite import NonFiniteError, non_finite_entries
from reidlib.storage import CheckpointError, NotAReidlibCheckpoint, load_checkpoint, save_checkpoint
from reidlib.weights import read_trained

ROOT = Path(__file__).resolve().parents[1]


def tiny(root, out, *extra):
    """The tiny baseline, one epoch per stage, on CPU."""
    return method_config("baseline", [f"data.root={root}", f"output_dir={out}", "device=cpu",
                                      "stage1.epochs=1", "stage2.epochs=1", "stage2.ims_per_batch=16",
                                      "stage2.steps=[1]", *extra], base="tiny")


def run_cli(*args):
    """(exit status, stderr lines) of ``python -m reidlib ARGS`` run in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = cli(list(args))
    return status, err.getvalue().strip().splitlines()


@contextlib.contextmanager
def time_limit(seconds):
    """Turn a hang into a failure."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def read_jsonl(path):
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# --------------------------------------------------------------------------- hangs

def test_a_zero_batch_is_refused_at_load_instead_of_hanging(tmp_path):
    done = subprocess.run([sys.executable, "-m", "reidlib", "train", "tiny", "stage2.ims_per_batch=0",
                           f"output_dir={tmp_path / 'run'}", "device=cpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "stage2.ims_per_batch=0" in lines[0] and "positive integer" in lines[0]


def test_the_sampler_refuses_empty_batches_instead_of_looping():
    pids = [i // 4 for i in range(40)]
    with time_limit(20):
        for batch_size, num_instance in [(0, 4), (4, 0)]:
            with pytest.raises(ValueError, match="must be positive"):
                RandomIdentitySampler(pids, batch_size=batch_size, num_instance=num_instance).batches()
        with pytest.raises(ValueError, match="P >= 1"):
            identity_batches(pids, 0, 4, np.random.default_rng(0))


# --------------------------------------------------------------------------- silent wrong values, tracebacks

@pytest.mark.parametrize("setting, says", [
    ("stage1.epochs=-5", "positive integer"),          # trained nothing and wrote metrics
    ("stage2.warmup_factor=-0.5", "in (0, 1]"),        # a negative learning rate
    ("stage2.num_instance=0", "positive integer"),     # ZeroDivisionError
    ("stage2.epochs=1.5", "wants an integer"),         # TypeError after stage 1
    ("stage2.steps=[abc]", "wants an integer"),        # list elements unchecked
    ("stage1.batch_size=0", "positive integer"),
    ("test.batch_size=0", "positive integer"),
    ("stage2.lr=-1", "> 0"),
    ("model.image_size=[128]", "two positive integers"),
    ("stage2.ims_per_batch=30", "multiple of stage2.num_instance"),
    ("stage2.lr=nan", "> 0"),
])
def test_bad_values_are_one_line_errors_naming_the_key(tmp_path, setting, says):
    status, lines = run_cli("train", "tiny", setting, f"output_dir={tmp_path}", "data.root=/nonexistent")
    key = setting.split("=")[0]
    assert status == 2 and len(lines) == 1, lines
    assert key in lines[0] and says in lines[0], lines
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_ints_stay_ints_and_lists_are_typed():
    cfg = load_config("tiny", ["stage2.epochs=2.0", "stage2.steps=[3, 5]", "data.pixel_mean=[0, 1, 0.5]"])
    assert cfg.stage2.epochs == 2 and isinstance(cfg.stage2.epochs, int)
    assert cfg.stage2.steps == [3, 5] and all(isinstance(x, float) for x in cfg.data.pixel_mean)
    with pytest.raises(ValueError, match=r"stage2.steps=\[5, 3\].*increasing"):
        load_config("tiny", ["stage2.steps=[5, 3]"])
    assert load_config("tiny", ["stage1.checkpoint_period=0"]).stage1.checkpoint_period == 0  # 0 = at the end


@pytest.mark.parametrize("top", ["-1", "0", "many"])
def test_search_top_must_be_positive(tmp_path, top):
    status, lines = run_cli("search", "tiny", f"weights={tmp_path / 'w.pt'}", f"query={tmp_path / 'q.jpg'}",
                            f"gallery={tmp_path}", f"top={top}")
    assert status == 2 and len(lines) == 1 and f"top={top}" in lines[0], lines
    from reidlib.search import search
    with pytest.raises(ValueError, match="top=-1"):
        search(load_config("tiny"), tmp_path / "q.jpg", tmp_path, top=-1)


# --------------------------------------------------------------------------- late errors

def test_too_few_identities_for_a_batch_fail_before_stage_1(synth_root, tmp_path):
    # the generated set has 12 training identities; 64 / 4 asks for 16 per batch
    with pytest.raises(ValueError, match=r"stage2.ims_per_batch=64 / stage2.num_instance=4 .* has 12"):
        reidlib.train(tiny(synth_root, tmp_path, "stage2.ims_per_batch=64"))
    assert read_jsonl(tmp_path / "metrics.jsonl") == [] and not list(tmp_path.glob("*.pt"))


def _one_camera(synth_root) -> ReIDDataset:
    """The generated set with every query and gallery image from camera 0: no query can be scored."""
    ds = load_dataset("market1501", synth_root)
    same = lambda items: [(path, pid, 0) for path, pid, _ in items]  # noqa: E731
    return ReIDDataset("one_camera", synth_root, ds.train, same(ds.query), same(ds.gallery))


def test_a_data_set_without_valid_queries_fails_before_training(synth_root, tmp_path):
    with pytest.raises(ValueError, match=r"none of its \d+ queries can be scored"):
        reidlib.train(tiny(synth_root, tmp_path), dataset=_one_camera(synth_root))
    assert read_jsonl(tmp_path / "metrics.jsonl") == []
    # `test` checks before loading the weights (here a damaged file) or encoding any image
    weights = tmp_path / "damaged.pt"
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"none of its \d+ queries can be scored"):
        reidlib.test(tiny(synth_root, tmp_path), weights=str(weights), dataset=_one_camera(synth_root))


def test_an_unwritable_output_folder_fails_first(synth_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match=r"output_dir=.*a_file/run is not writable"):
        reidlib.train(tiny(synth_root, blocker / "run"))


# --------------------------------------------------------------------------- lost work

def test_a_nan_loss_stops_the_run_and_keeps_the_good_checkpoint(synth_root, tmp_path):
    cfg = tiny(synth_root, tmp_path, "stage2.epochs=3", "stage2.lr=1e8", "stage1.checkpoint_period=1",
               "stage2.checkpoint_period=1", "stage2.steps=[2]")
    with pytest.raises(NonFiniteError, match=r"stage 2, epoch 1, step \d+: the loss is (nan|inf)"):
        reidlib.train(cfg)
    assert [p.name for p in tmp_path.glob("checkpoint_*.pt")] == ["checkpoint_stage1_e001.pt"]
    assert non_finite_entries(load_checkpoint(tmp_path / "checkpoint_stage1_e001.pt")["model"]) == []
    assert not (tmp_path / "model").exists()
    assert [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r.get("stage") == 2] == []


def test_non_finite_weights_never_replace_a_good_checkpoint(synth_root, tmp_path, monkeypatch):
    from reidlib.methods.clipreid import ImageEncoderStage
    original = ImageEncoderStage.train_epoch

    def poisons_epoch_2(self, ctx, optimizer, epoch):
        record = original(self, ctx, optimizer, epoch)
        if epoch == 1:  # the second epoch ends with NaN weights but a finite loss
            with torch.no_grad():
                next(ctx.model.parameters()).fill_(math.nan)
        return record

    monkeypatch.setattr(ImageEncoderStage, "train_epoch", poisons_epoch_2)
    cfg = tiny(synth_root, tmp_path, "stage2.epochs=2", "stage2.checkpoint_period=1")
    with pytest.raises(NonFiniteError, match="stage 2 epoch 2: 1 weight tensor.*not saved"):
        reidlib.train(cfg)
    assert [p.name for p in tmp_path.glob("checkpoint_*.pt")] == ["checkpoint_stage2_e001.pt"]
    assert non_finite_entries(load_checkpoint(tmp_path / "checkpoint_stage2_e001.pt")["model"]) == []


def test_the_final_model_is_saved_before_the_evaluation(synth_root, tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr("reidlib.engine.trainer.evaluate_model", fails)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        reidlib.train(tiny(synth_root, tmp_path))
    state = read_trained(tmp_path / "model")
    assert "metrics" not in state and not (tmp_path / "metrics.json").exists()
    model, _ = load_trained_model(tmp_path / "model")
    assert model.feature_dim > 0


def test_the_final_model_records_its_metrics(tiny_trained):
    _, out = tiny_trained
    saved = json.loads((out / "metrics.json").read_text())
    state = read_trained(out / "model")
    assert state["metrics"]["mAP"] == saved["mAP"] and state["metrics"]["cmc"] == saved["cmc"]
    assert {"model", "config", "num_classes"} <= set(state)


# --------------------------------------------------------------------------- messages

class _CreatesAFile:
    """A pickle that, if it were run, would create ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("writer", ["torch.save", "pickle protocol 4"])
def test_a_malicious_pickle_is_refused_not_run_and_not_called_corrupt(tmp_path, writer):
    created = tmp_path / "created_by_the_pickle"
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save({"model": _CreatesAFile(created)}, path)
    else:
        path.write_bytes(pickle.dumps({"model": _CreatesAFile(created)}, protocol=4))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "holds Python objects that weights_only loading refuses" in message and "not run" in message
    assert "open" in message and "corrupt" not in message and "\n" not in message
    assert not created.exists()


def test_resume_is_advised_only_when_a_checkpoint_is_left(tmp_path):
    lone = tmp_path / "lone" / "checkpoint_stage2_e003.pt"
    lone.parent.mkdir()
    lone.write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(lone)
    assert "corrupt or truncated" in str(err.value) and "resume from" not in str(err.value)
    assert "train again" in str(err.value)
    save_checkpoint(lone.parent / "checkpoint_stage2_e002.pt", {"epoch": 2})
    with pytest.raises(CheckpointError, match=r"resume from the previous checkpoint \(checkpoint_stage2_e002.pt"):
        load_checkpoint(lone)


def test_a_plain_state_dict_says_what_was_expected(synth_root, tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    state = load_checkpoint(path)
    assert set(state) == {"weight", "bias"}
    with pytest.raises(NotAReidlibCheckpoint, match=r"plain state dict \(2 tensors.*no 'config' entry"):
        state["config"]
    resaved = save_checkpoint(tmp_path / "again.pt", {"model": state})  # still a plain mapping on disk
    assert torch.equal(load_checkpoint(resaved)["model"]["weight"], state["weight"])
    status, lines = run_cli("test", "tiny", f"weights={path}", f"data.root={synth_root}",
                            f"output_dir={tmp_path / 'out'}", "device=cpu")
    assert status == 2 and len(lines) == 1 and str(path) in lines[0], lines
    assert "KeyError: config" not in lines[0] and "KeyError: 'config'" not in lines[0]


def test_an_overflowing_feature_is_not_called_nan():
    rng = np.random.default_rng(0)
    qf, gf = rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal((10, 8)).astype(np.float32)
    labels = ([1, 2, 3, 4], [1, 2, 3, 4, 0, 0, 1, 2, 3, 4], [0] * 4, [1] * 10)
    big_q, big_g = qf.copy(), gf.copy()
    big_q[1, 3], big_g[2, 2] = 1e20, 1e20
    for q, g, name in [(big_q, gf, "qf row 1"), (qf, big_g, "gf row 2")]:
        for normalize in (True, False):  # normalised, the big row used to become zeros silently
            with pytest.raises(ValueError) as err:
                evaluate(q, g, *labels, normalize=normalize)
            assert f"{name} holds values up to 1e+20, too large for float32" in str(err.value)
            assert "NaN" not in str(err.value)
    with pytest.raises(ValueError, match="gf row 2 holds values up to 1e"):
        evaluate(qf, big_g, *labels, rerank=True)


# --------------------------------------------------------------------------- leftovers

def test_stale_temp_files_go_at_the_next_save(tmp_path):
    stale = tmp_path / ".checkpoint_stage2_e005.pt.k3j4h5g6.tmp"   # a save killed mid-write
    stale.write_bytes(b"\0" * 1000)
    kept = [tmp_path / "notes.tmp", tmp_path / "metrics.json"]
    for p in kept:
        p.write_text("{}")
    save_checkpoint(tmp_path / "checkpoint_stage2_e006.pt", {"epoch": 6})
    assert not stale.exists() and all(p.exists() for p in kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_stage2_e006.pt", "metrics.json", "notes.tmp"]


def test_stale_temp_files_go_at_the_start_of_a_run(synth_root, tmp_path):
    stale = tmp_path / ".model_final.pt.abcdefgh.tmp"
    stale.write_bytes(b"\0" * 1000)
    with pytest.raises(ValueError, match="identities per batch"):  # the pre-flight checks: nothing touched yet
        reidlib.train(tiny(synth_root, tmp_path, "stage2.ims_per_batch=64"))
    assert stale.exists()
    with pytest.raises(ValueError, match="not a resumable checkpoint"):   # stops once the run has started
        reidlib.train(tiny(synth_root, tmp_path, f"resume={tmp_path}"))
    assert not stale.exists()


@pytest.mark.parametrize("umask, mode", [(0o027, 0o640), (0o002, 0o664)])
def test_checkpoint_mode_follows_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path / "c.pt", {"epoch": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode


# --------------------------------------------------------------------------- counts

def test_unreadable_training_images_are_counted_in_metrics(synth_root, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    broken = sorted((data / "bounding_box_train").glob("*.jpg"))[5]
    broken.write_bytes(b"not a jpeg")
    with caplog.at_level(logging.WARNING, logger="reidlib"):
        metrics = reidlib.train(tiny(data, tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_unreadable_train_images"] == saved["num_unreadable_train_images"] == 1
    assert "1 unreadable training image(s) in total" in caplog.text
    assert saved["num_dropped_queries"] == 0 and saved["dropped_queries_reason"] == DROPPED_REASON


def test_dropped_queries_are_counted_with_the_reason():
    rng = np.random.default_rng(1)
    qf, gf = rng.standard_normal((3, 8)), rng.standard_normal((4, 8))
    # query 2 (pid 3) is in the gallery only from its own camera; query 3 (pid 9) not at all
    r = evaluate(qf, gf, [1, 3, 9], [1, 3, 1, 5], [0, 0, 0], [1, 0, 2, 1])
    assert r["num_valid_queries"] == 1 and r["num_dropped_queries"] == 2
    assert r["dropped_queries_reason"] == "no gallery image of the same identity from another camera"


def test_shipped_configs_bound_the_work_a_kill_loses():
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cfg = load_config(path)
        assert 1 <= cfg.stage2.checkpoint_period <= 5, path.name


# --------------------------------------------------------------------------- fidelity

def test_rn50_normalises_with_imagenet_statistics():
    cfg = load_config("rn50_clipreid")
    assert cfg.data.pixel_mean == [0.485, 0.456, 0.406] and cfg.data.pixel_std == [0.229, 0.224, 0.225]
    assert load_config("vit_clipreid").data.pixel_mean == [0.5, 0.5, 0.5]


def test_extraction_is_fp32_unless_asked(tiny_trained):
    cfg, out = tiny_trained
    assert cfg.test.precision == "fp32" and cfg.precision == "auto"
    model, _ = load_trained_model(out / "model")
    items = load_dataset("market1501", cfg.data.root).query
    feats = {p: extract_features(model, items, load_config("tiny", [f"test.precision={p}", "device=cpu"]),
                                 progress=False)[0] for p in ("fp32", "bf16")}
    default = extract_features(model, items, cfg, progress=False)[0]
    assert torch.equal(default, feats["fp32"])
    relative = (feats["bf16"] - feats["fp32"]).norm(dim=1) / feats["fp32"].norm(dim=1)
    assert 1e-4 < float(relative.mean()) < 0.1  # bf16 keeps about 3 significant digits
