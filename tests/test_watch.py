"""Training you can watch, quietly: ``reidlib.train`` from Python logs as the command line does
(unless logging is configured), every run folder holds TensorBoard event files with the values of
``metrics.jsonl``, and nothing prints a warning its reader cannot act on."""
import contextlib
import io
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import reidlib
from reidlib.__main__ import main as cli
from reidlib.data import cpu_cores, usable_workers
from reidlib.runtime import default_logging
from reidlib.viz import plot_training_curves, read_jsonl, training_curves

ROOT = Path(__file__).resolve().parents[1]
S1, S2 = 2, 2          # epochs of the watched run's stages


@contextlib.contextmanager
def logging_untouched():
    """The logging of a plain ``python`` process or a notebook kernel: no handler anywhere, no
    level on reidlib's logger (pytest's own capture handlers set aside meanwhile)."""
    root, logger = logging.getLogger(), logging.getLogger("reidlib")
    saved = root.handlers[:], logger.handlers[:], logger.level
    root.handlers, logger.handlers = [], []
    logger.setLevel(logging.NOTSET)
    try:
        yield logger
    finally:
        root.handlers, logger.handlers = saved[0], saved[1]
        logger.setLevel(saved[2])


@pytest.fixture(scope="module")
def watched(synth_root, tmp_path_factory):
    """(cfg, run folder, metrics, stdout) of the tiny baseline trained from Python with no logging
    set up: 2 + 2 epochs, evaluated after every stage-2 epoch, asking for more workers than cores."""
    out = tmp_path_factory.mktemp("watched")
    cfg = reidlib.method_config("baseline", [f"data.root={synth_root}", f"output_dir={out}", "device=cpu",
                                             f"stage1.epochs={S1}", f"stage2.epochs={S2}", "stage2.eval_period=1",
                                             "stage2.ims_per_batch=16", f"data.num_workers={cpu_cores() + 2}"],
                                base="tiny")
    printed = io.StringIO()
    with logging_untouched() as logger, contextlib.redirect_stdout(printed):
        metrics = reidlib.train(cfg)
        added = [h for h in logger.handlers if getattr(h, "reidlib_progress", False)]
    assert len(added) == 1          # the handler train() added (removed again by logging_untouched)
    return cfg, out, metrics, printed.getvalue()


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# --------------------------------------------------------------------------- logging

def test_python_train_logs_like_the_cli_without_any_setup(watched):
    cfg, _, metrics, printed = watched
    for line in ("data set market1501", "split   | ids | images | cameras", f"stage 1 epoch 1/{S1} loss",
                 f"stage 1 epoch {S1}/{S1} loss", f"stage 2 epoch 1/{S2} loss", f"stage 2 epoch 1/{S2} test: R1",
                 f"final: R1 {100 * metrics['rank1']:.2f}"):
        assert line in printed, (line, printed)
    assert f"data.num_workers={cpu_cores() + 2} lowered to {cpu_cores()}" in printed
    assert cfg.data.num_workers == cpu_cores() + 2      # the caller's config is left as it was


def test_no_handler_when_logging_is_configured(tmp_path, caplog):
    logger = logging.getLogger("reidlib")
    before = logger.handlers[:]
    # pytest's capture handlers sit on the root logger, as a user's logging.basicConfig would
    assert logging.getLogger().handlers and default_logging() is False
    cfg = reidlib.load_config("tiny", [f"data.root={tmp_path / 'nowhere'}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(FileNotFoundError):
        reidlib.train(cfg)
    assert logger.handlers == before
    with logging_untouched() as untouched:
        untouched.setLevel(logging.WARNING)      # a user's way to keep runs quiet: the level is kept
        assert default_logging() is True and untouched.level == logging.WARNING
        assert default_logging() is False        # once


# --------------------------------------------------------------------------- TensorBoard

EPOCH_TAGS = ["stage1/loss", "stage1/lr/group0", "stage1/prompts_per_s", "stage2/loss", "stage2/id_loss",
              "stage2/tri_loss", "stage2/i2t_loss", "stage2/lr/group0", "stage2/lr/group1", "stage2/img_per_s"]
EVAL_TAGS = ["eval/mAP", "eval/rank1", "eval/rank5", "eval/rank10", "eval/mINP"]


def test_tensorboard_holds_the_values_of_metrics_jsonl(watched):
    _, out, metrics, _ = watched
    records = read_jsonl(out / "metrics.jsonl")
    board = scalars(out / "tensorboard")
    assert set(EPOCH_TAGS + EVAL_TAGS) <= set(board), sorted(board)
    epochs = {stage: [r for r in records if r.get("stage") == stage and "loss" in r] for stage in (1, 2)}
    assert [len(epochs[1]), len(epochs[2])] == [S1, S2]
    parts = {"loss": "loss", "id": "id_loss", "tri": "tri_loss", "i2t": "i2t_loss"}
    for stage, offset in ((1, 0), (2, S1)):     # steps count the run's epochs: stage 2 follows stage 1
        rate = "prompts_per_s" if stage == 1 else "img_per_s"
        for key, tag in [*parts.items(), (rate, rate)]:
            if key not in epochs[stage][0]:
                continue
            expected = [(offset + r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in epochs[stage]]
            assert board[f"stage{stage}/{tag}"] == expected, tag
        for group in range(len(epochs[stage][0]["lr_groups"])):
            assert board[f"stage{stage}/lr/group{group}"] == [
                (offset + r["epoch"], pytest.approx(r["lr_groups"][group], rel=1e-6)) for r in epochs[stage]]
    assert epochs[1][0]["lr_groups"] == [epochs[1][0]["lr"]] and len(epochs[2][0]["lr_groups"]) == 2
    # every evaluation: the one after stage-2 epoch 1, then the final model's (at the last epoch)
    evaluations = [r for r in records if isinstance(r.get("eval"), dict)]
    assert [r["stage"] for r in evaluations] == [2, "final"]
    for key in ("mAP", "rank1", "rank5", "rank10", "mINP"):
        assert board[f"eval/{key}"] == [(S1 + 1, pytest.approx(evaluations[0]["eval"][key], rel=1e-6)),
                                        (S1 + S2, pytest.approx(metrics[key], rel=1e-6))]


def test_tensorboard_test_run_holds_the_final_metrics_and_cmc(watched):
    _, out, metrics, _ = watched
    saved = json.loads((out / "metrics.json").read_text())
    board = scalars(out / "tensorboard" / "test")
    for key in ("mAP", "rank1", "rank5", "rank10", "mINP"):
        assert board[f"test/{key}"] == [(S1 + S2, pytest.approx(saved[key], rel=1e-6))]
    assert board["test/cmc"] == [(k, pytest.approx(v, rel=1e-6)) for k, v in enumerate(saved["cmc"], start=1)]
    assert len(list((out / "tensorboard" / "test").glob("events.out.tfevents.*"))) == 1


def test_tensorboard_key_turns_it_off():
    assert reidlib.load_config("tiny").tensorboard is True
    assert reidlib.load_config("tiny", ["tensorboard=false"]).tensorboard is False
    assert "tensorboard = True" in reidlib.help_text()


# --------------------------------------------------------------------------- training curves

def test_training_curves_put_the_stages_apart(watched, tmp_path):
    from PIL import Image
    _, out, _, _ = watched
    fig = training_curves(out)
    titles = [ax.get_title() for ax in fig.axes]
    assert "Stage 1: loss per epoch" in titles and "Stage 2: loss per epoch" in titles
    assert len(fig.axes) == 4            # a loss panel per stage, the LRs, the evaluations
    plot_training_curves(out / "metrics.jsonl", tmp_path / "curves.png")
    assert round(Image.open(tmp_path / "curves.png").info["dpi"][0]) == 300
    assert (tmp_path / "curves.pdf").stat().st_size > 5_000


def test_training_curves_of_a_one_stage_method(tmp_path):
    lines = [{"stage": 1, "epoch": e, "loss": 3 - e / 4, "id_loss": 2 - e / 5, "lr": 1e-3, "lr_groups": [1e-3],
              "img_per_s": 9.0} for e in (1, 2, 3)]
    lines += [{"stage": 1, "epoch": 2, "eval": {"rank1": 0.3, "mAP": 0.2}},
              {"stage": "final", "eval": {"rank1": 0.5, "mAP": 0.35, "cmc": [0.5]}}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    fig = training_curves(tmp_path)
    assert [ax.get_title() for ax in fig.axes][0] == "Stage 1: loss per epoch" and len(fig.axes) == 3
    assert fig.axes[0].get_legend() is not None          # total and the id_loss part


# --------------------------------------------------------------------------- quiet by default

def _loader_warnings(workers: int) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.utils.data.DataLoader(range(4), num_workers=workers).check_worker_number_rationality()
    return [str(w.message) for w in caught]


def test_workers_are_clamped_to_the_cores(caplog):
    assert any("worker processes in total" in m for m in _loader_warnings(cpu_cores() + 3))   # the cause
    with caplog.at_level(logging.INFO, logger="reidlib"):
        workers = usable_workers(cpu_cores() + 3)
    assert workers == cpu_cores() and "lowered to" in caplog.text
    assert _loader_warnings(workers) == []
    assert usable_workers(0) == 0 and usable_workers(cpu_cores()) == cpu_cores()


NOTEBOOK_WITHOUT_WIDGETS = """
import sys, types, warnings
shell = type("ZMQInteractiveShell", (), {{}})()
sys.modules["IPython"] = types.SimpleNamespace(get_ipython=lambda: shell)
sys.modules["ipykernel"] = types.ModuleType("ipykernel")
sys.modules["ipykernel.zmqshell"] = types.ModuleType("ipykernel.zmqshell")
sys.modules["ipywidgets"] = None                    # not installed
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    {first}
    from tqdm.auto import tqdm
print(tqdm.__module__, sum(type(w.message).__name__ == "TqdmWarning" for w in caught))
"""


def test_no_tqdm_warning_in_a_notebook_without_ipywidgets():
    def run(first):
        done = subprocess.run([sys.executable, "-c", NOTEBOOK_WITHOUT_WIDGETS.format(first=first)],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert done.returncode == 0, done.stderr
        module, warned = done.stdout.split()
        return "notebook" in module, int(warned)
    assert run("pass") == (False, 1)            # tqdm's own: "IProgress not found", then text bars
    assert run("import reidlib") == (False, 0)  # the same text bars, which read fine, without the warning


def test_cli_test_prints_a_table_and_json_on_request(tiny_trained, tmp_path, capsys):
    cfg, out = tiny_trained
    keys = ["tiny", f"weights={out / 'model'}", f"data.root={cfg.data.root}", "device=cpu",
            f"output_dir={tmp_path}"]
    assert cli(["test", *keys]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "test_metrics.json").read_text())
    header, values = printed.splitlines()[:2]
    assert header.split() == ["R1", "R5", "R10", "mAP", "mINP"]
    assert values.split()[1:] == [f"{100 * saved[k]:.2f}" for k in ("rank1", "rank5", "rank10", "mAP", "mINP")]
    assert "cmc" not in printed and len(printed.splitlines()) <= 4
    assert cli(["test", *keys, "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["mAP"] == pytest.approx(saved["mAP"]) and len(as_json["cmc"]) == len(saved["cmc"])


def test_cli_help_of_a_config_shows_its_values(capsys):
    assert cli(["train", "tiny", "--help"]) == 0
    printed = capsys.readouterr().out
    assert "Config keys of tiny" in printed
    assert "model.name = 'vit-tiny8'  (default: 'ViT-B-16')" in printed
    assert "stage2.epochs = 12  (default: 60)" in printed
    assert cli(["train", "vit_proposed", "stage2.epochs=7", "--help"]) == 0
    printed = capsys.readouterr().out
    assert "model.prompt = 'deep'  (default: 'clipreid')" in printed and "stage2.epochs = 7" in printed
    assert cli(["train", "--help"]) == 0
    assert "model.name = 'ViT-B-16'\n" in capsys.readouterr().out      # no config: the defaults


def test_a_train_that_fails_on_its_inputs_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # output_dir: the config's own, relative to the current folder (results/runs/tiny)
    assert cli(["train", "tiny", f"data.root={tmp_path / 'nowhere'}"]) == 2
    assert "bounding_box_train" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert cli(["train", "tiny", "stage2.epochs=-1"]) == 2      # an invalid config
    assert list(tmp_path.iterdir()) == []
