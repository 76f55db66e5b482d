"""The sweep: papermill per combination, complete runs skipped, failed runs reported, not fatal.

A stand-in for train_eval.ipynb (same parameters, no training) keeps these tests to seconds; the
real notebook runs in test_notebooks.py.
"""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_notebook

from reidlib.config import load_config, to_dict
from reidlib.experiments.claims import claim_run, release_claim
from reidlib.experiments.launch import (
    gpu_slots,
    make_executor,
    torchrun_command,
    worker_environment,
    write_launch_config,
)
from reidlib.experiments.status import run_state, run_states
from reidlib.experiments.sweep import main, parse_data_roots, run_config, run_dir, run_sweep

PARAMETERS = """dataset = "market1501"
data_root = None
method = "baseline"
seed = 0
base_config = None
start_weights = None
overrides = []
output_dir = None
device = "auto"
test_on = []
nproc_per_run = 1
"""
# Writes the resolved config.yaml (as reidlib.train does) and a plausible metrics.json; seed 13 is
# broken on purpose, after its metrics were written (a failure late in the notebook must not leave
# the run looking complete).
# FAKE_RUN_LOG: a file each execution appends "dataset method seed" to; FAKE_RUN_SECONDS: how
# long an execution takes (so that concurrent sweeps overlap).
BODY = """import json, os, pathlib, time, yaml
from reidlib.config import to_dict
from reidlib.experiments.sweep import run_config
out = pathlib.Path(output_dir)
out.mkdir(parents=True, exist_ok=True)
cfg = run_config(dataset, method, seed, data_root, overrides, base_config, output_dir, device)
(out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
r1 = 0.5 + 0.01 * seed + (0.02 if method == "proposed" else 0.0)
metrics = {"dataset": dataset, "method": method, "seed": seed, "rank1": r1, "rank5": r1, "rank10": r1,
           "mAP": r1 - 0.2, "mINP": 0.1, "cmc": [r1] * 50, "num_valid_queries": 5,
           "data_root": data_root, "overrides": overrides, "test_on": test_on, "nproc": nproc_per_run,
           "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES"), "threads": os.environ.get("OMP_NUM_THREADS")}
if os.environ.get("FAKE_RUN_LOG"):
    with open(os.environ["FAKE_RUN_LOG"], "a") as fh:
        fh.write(f"{dataset} {method} {seed}\\n")
time.sleep(float(os.environ.get("FAKE_RUN_SECONDS", "0")))
(out / "metrics.json").write_text(json.dumps(metrics))
if seed == 13:
    raise ValueError("broken on purpose")
"""


@pytest.fixture
def fake_notebook(tmp_path):
    params = new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    book = new_notebook(cells=[params, new_code_cell(BODY)])
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "fake_train.ipynb"
    nbformat.write(book, path)
    return path


@pytest.mark.slow
def test_rerun_skips_complete_runs_and_failures_are_reported(tmp_path, fake_notebook):
    root = tmp_path / "results"
    kwargs = dict(data_roots={"market1501": "/data/m"}, results_root=root, overrides=["stage2.epochs=1"],
                  notebook=fake_notebook, compare_notebook=None, echo=lambda text: None)
    report = run_sweep(["market1501"], ["proposed"], [0, 13], **kwargs)
    assert len(report.ran) == 1 and len(report.failed) == 1 and not report.ok
    assert all("ValueError: broken on purpose" in message for _, message in report.failed)
    for method in ("proposed",):
        good = json.loads((run_dir(root, "market1501", method, 0) / "metrics.json").read_text())
        assert good["data_root"] == "/data/m" and good["overrides"] == ["stage2.epochs=1"]
        broken = run_dir(root, "market1501", method, 13)
        assert not (broken / "metrics.json").exists() and (broken / "metrics.failed.json").exists()
        for seed in (0, 13):
            assert (root / "runs" / f"market1501_{method}_seed{seed}.ipynb").is_file()
    log = (root / "sweep_failures.log").read_text()
    assert log.count("broken on purpose") == 1 and "market1501 proposed seed 13" in log
    assert "failed runs" in report.format() and "market1501_proposed_seed13.ipynb" in report.format()

    lines = []
    again = run_sweep(["market1501"], ["proposed"], [0, 13], **{**kwargs, "echo": lines.append})
    assert [str(r) for r in again.skipped] == ["market1501 proposed seed 0"]
    assert again.ran == [] and len(again.failed) == 1
    assert "1 already complete, 1 to run" in lines[0] and "complete, skipped" in lines[1]


@pytest.mark.slow
def test_cli_exit_status(tmp_path, fake_notebook, capsys):
    args = ["--datasets", "market1501", "--methods", "baseline", "--seeds", "13", "--results",
            str(tmp_path / "r"), "--notebook", str(fake_notebook), "--no-compare"]
    assert main(args) == 0                 # a failed run is reported, not fatal ...
    assert main(args + ["--strict"]) == 1  # ... unless asked
    out = capsys.readouterr().out
    assert "FAILED" in out and "1 failed" in out
    with pytest.raises(SystemExit):
        main(["--datasets", "market1501", "--methods", "bogus"])


def test_run_config_and_data_roots():
    cfg = run_config("dukemtmc", "proposed", 3, "/data/duke", ["stage2.epochs=2"], "tiny",
                     results_root="out")
    assert (cfg.data.dataset, cfg.data.root, cfg.seed, cfg.stage2.epochs) == ("dukemtmc", "/data/duke", 3, 2)
    assert cfg.output_dir == "out/dukemtmc/proposed/seed3" and cfg.model.lora.enabled
    assert cfg.model.name == load_config("tiny").model.name and cfg.model.prompt == "deep"
    assert run_config("market1501", "baseline", 0, overrides=["seed=7"]).seed == 7  # overrides win
    assert parse_data_roots(["/data"]) == "/data"
    assert parse_data_roots(["market1501=/m", "dukemtmc=/d"]) == {"market1501": "/m", "dukemtmc": "/d"}
    assert parse_data_roots(None) is None



def _collected_overrides(root):
    from reidlib.viz import collect_metrics
    return [json.loads((Path(p) / "metrics.json").read_text())["overrides"] for p in collect_metrics(root)["path"]]


@pytest.mark.slow
def test_a_finished_run_with_other_settings_is_moved_aside_and_rerun(tmp_path, fake_notebook):
    root = tmp_path / "results"
    kwargs = dict(results_root=root, notebook=fake_notebook, compare_notebook=None, echo=lambda text: None)
    run_sweep(["market1501"], ["proposed"], [0], overrides=["stage2.epochs=1"], **kwargs)
    lines = []
    report = run_sweep(["market1501"], ["proposed"], [0], overrides=["stage2.epochs=2"],
                       **{**kwargs, "echo": lines.append})
    assert [str(r) for r in report.ran] == ["market1501 proposed seed 0"] and report.skipped == []
    (run, diff, moved), = report.superseded
    assert diff == ["stage2.epochs: 1 (finished run) != 2 (this sweep)"]
    assert moved.parent.parent.parent.parent == root / "superseded" and moved.name == "seed0"
    assert json.loads((moved / "metrics.json").read_text())["overrides"] == ["stage2.epochs=1"]
    assert any("stage2.epochs: 1 (finished run) != 2 (this sweep)" in line for line in lines)
    assert "moved to" in report.format()
    # the table holds the new settings only: superseded/ and runs/ are never collected
    (root / "runs" / "stray").mkdir(parents=True)
    (root / "runs" / "stray" / "metrics.json").write_text((moved / "metrics.json").read_text())
    assert _collected_overrides(root) == [["stage2.epochs=2"]]
    again = run_sweep(["market1501"], ["proposed"], [0], overrides=["stage2.epochs=2"], **kwargs)
    assert again.ran == [] and len(again.skipped) == 1 and again.superseded == []
    # keys that do not change what is trained or tested never supersede a run
    same = run_sweep(["market1501"], ["proposed"], [0], overrides=["stage2.epochs=2", "data.num_workers=0",
                                                                   "stage2.log_period=7"], **kwargs)
    assert same.ran == [] and same.superseded == []


@pytest.mark.slow
def test_strict_refuses_to_sweep_over_runs_with_other_settings(tmp_path, fake_notebook, capsys):
    args = ["--datasets", "market1501", "--methods", "baseline", "--seeds", "0", "--results",
            str(tmp_path / "r"), "--notebook", str(fake_notebook), "--no-compare"]
    assert main(args + ["--set", "stage2.epochs=1"]) == 0
    before = (run_dir(tmp_path / "r", "market1501", "baseline", 0) / "metrics.json").read_text()
    capsys.readouterr()
    assert main(args + ["--set", "stage2.epochs=2", "test.rerank=true", "--strict"]) == 1
    err = capsys.readouterr().err
    assert "market1501 baseline seed 0" in err and "stage2.epochs" in err and "test.rerank" in err
    assert (run_dir(tmp_path / "r", "market1501", "baseline", 0) / "metrics.json").read_text() == before
    assert not (tmp_path / "r" / "superseded").exists()


@pytest.mark.slow
def test_a_real_sweep_rerun_with_other_settings_reports_only_them(synth_root, tmp_path):
    """train_eval.ipynb itself, on the tiny config with one epoch per stage."""
    root = tmp_path / "results"
    kwargs = dict(data_roots=str(synth_root), results_root=root, base_config="tiny", device="cpu",
                  compare_notebook=None, echo=lambda text: None)
    one_epoch = ["stage1.epochs=1", "stage2.epochs=1", "stage2.ims_per_batch=16", "stage2.steps=[1]"]
    first = run_sweep(["market1501"], ["baseline"], [0], overrides=one_epoch, **kwargs)
    assert first.ok and len(first.ran) == 1
    second = run_sweep(["market1501"], ["baseline"], [0], overrides=one_epoch + ["stage2.margin=0.5"], **kwargs)
    assert second.ok and len(second.ran) == 1 and len(second.superseded) == 1
    from reidlib.viz import collect_metrics
    table = collect_metrics(root)
    assert len(table) == 1
    config = yaml.safe_load((Path(table["path"][0]) / "config.yaml").read_text())
    assert config["stage2"]["margin"] == 0.5
    old = second.superseded[0][2]
    assert yaml.safe_load((old / "config.yaml").read_text())["stage2"]["margin"] == 0.3


# --------------------------------------------------------------------------- scaling out

def _results(root, runs):
    return {(d, m, s): json.loads((run_dir(root, d, m, s) / "metrics.json").read_text()) for d, m, s in runs}


@pytest.mark.slow
def test_two_sweeps_started_at_once_run_each_combination_once(tmp_path, fake_notebook):
    root, log = tmp_path / "results", tmp_path / "executions.log"
    args = [sys.executable, "-m", "reidlib", "sweep", "--datasets", "market1501", "dukemtmc", "--methods",
            "baseline", "proposed", "--seeds", "0", "--results", str(root), "--notebook", str(fake_notebook),
            "--no-compare", "--jobs", "2"]
    env = {**os.environ, "FAKE_RUN_LOG": str(log), "FAKE_RUN_SECONDS": "1", "HF_HUB_OFFLINE": "1"}
    sweeps = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in sweeps]
    assert [p.returncode for p in sweeps] == [0, 0], outputs
    executed = log.read_text().splitlines()
    combos = [f"{d} {m} 0" for d in ("market1501", "dukemtmc") for m in ("baseline", "proposed")]
    assert sorted(executed) == sorted(combos)  # each exactly once, by one sweep or the other
    assert all((run_dir(root, *c.split()[:2], 0) / "metrics.json").is_file() for c in combos)
    assert not list(root.rglob("claim.json")) and not list(root.rglob("queued.json"))
    # what one sweep did not run, the other ran or finished while it looked
    ran = [int(re.search(r"(\d+) ran", out).group(1)) for out in outputs]
    assert sum(ran) == 4, outputs


@pytest.mark.slow
def test_a_failed_run_in_one_worker_does_not_stop_the_other(tmp_path, fake_notebook, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    root = tmp_path / "results"
    report = run_sweep(["market1501"], ["baseline"], [13, 0], results_root=root, notebook=fake_notebook,
                       compare_notebook=None, jobs=2, echo=lambda text: None)
    assert [str(r) for r in report.ran] == ["market1501 baseline seed 0"]
    assert [(str(r), m) for r, m in report.failed] == [("market1501 baseline seed 13", "ValueError: broken on purpose")]
    assert _results(root, [("market1501", "baseline", 0)])[("market1501", "baseline", 0)]["threads"] == "1"
    rows = {r["run"]: r for r in run_states(root)}
    assert rows["market1501/baseline/seed0"]["state"] == "done"
    assert rows["market1501/baseline/seed13"]["state"] == "failed"
    assert rows["market1501/baseline/seed13"]["detail"].endswith("ValueError: broken on purpose")
    assert main(["--status", str(root)]) == 0
    out = capsys.readouterr().out
    assert "1 done, 1 failed" in out and "broken on purpose" in out


@pytest.mark.slow
def test_gpu_workers_are_pinned_and_runs_get_their_process_count(tmp_path, fake_notebook):
    root = tmp_path / "results"
    report = run_sweep(["market1501"], ["baseline"], [0, 1], results_root=root, notebook=fake_notebook,
                       compare_notebook=None, jobs=None, gpus="4,5,6,7", gpus_per_run=2, echo=lambda text: None)
    assert len(report.ran) == 2
    seen = [m["visible_gpus"] for m in _results(root, [("market1501", "baseline", s) for s in range(2)]).values()]
    assert set(seen) <= {"4,5", "6,7"} and len(seen) == 2  # two workers, each pinned to its pair
    assert {m["nproc"] for m in _results(root, [("market1501", "baseline", 0)]).values()} == {2}
    with pytest.raises(ValueError, match="needs 6 GPUs"):
        run_sweep(["market1501"], ["baseline"], [0], results_root=root, notebook=fake_notebook, jobs=3,
                  gpus="0,1,2,3", gpus_per_run=2, compare_notebook=None, echo=lambda text: None)


def test_gpu_slots_environment_and_torchrun_command(monkeypatch, tmp_path):
    assert gpu_slots("0,1,2,3", 2) == [("0", "1"), ("2", "3")] and gpu_slots("", 1) == []
    for bad, match in (("0,1,2", "not a multiple"), ("0,0", "twice")):
        with pytest.raises(ValueError, match=match):
            gpu_slots(bad, 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert worker_environment(("2", "3"), jobs=2) == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert worker_environment(None, jobs=2) == {"OMP_NUM_THREADS": "1"} and worker_environment(None, jobs=1) == {}
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert worker_environment(None, jobs=2) == {}  # the caller's choice stands
    cfg = run_config("dukemtmc", "proposed", 3, "/data/duke", ["stage2.epochs=2", "model.lora.lr=1e-4"], "tiny",
                     output_dir=tmp_path / "run", device="cpu")
    assert to_dict(load_config(write_launch_config(cfg))) == to_dict(cfg)  # what torchrun's processes train
    command = torchrun_command("r/launch_config.yaml", 4)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[3:] == ["--standalone", "--nproc_per_node", "4", "-m", "reidlib", "train", "r/launch_config.yaml"]


def test_claims_are_exclusive_and_stale_ones_are_taken_over(tmp_path):
    folder = tmp_path / "results" / "market1501" / "baseline" / "seed0"
    claim = claim_run(folder)
    assert claim is not None and claim_run(folder) is None  # held by this (live) process
    assert run_state(folder)[0] == "running"
    release_claim(claim)
    assert not claim.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"host": socket.gethostname(), "pid": int(dead.stdout), "time": "earlier"}
    (folder / "claim.json").write_text(json.dumps(record))
    assert run_state(folder)[0] == "killed"
    assert claim_run(folder) is not None  # its owner is gone: taken over
    (folder / "claim.json").write_text(json.dumps({**record, "host": "another-node"}))
    assert claim_run(folder) is None and run_state(folder)[0] == "running"  # never taken from another host


@pytest.mark.slow
def test_a_killed_sweeps_stale_claim_does_not_block_the_next_sweep(tmp_path, fake_notebook):
    root = tmp_path / "results"
    folder = run_dir(root, "market1501", "baseline", 0)
    folder.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / "claim.json").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    report = run_sweep(["market1501"], ["baseline"], [0], results_root=root, notebook=fake_notebook,
                       compare_notebook=None, echo=lambda text: None)
    assert len(report.ran) == 1 and not (folder / "claim.json").exists()


@pytest.mark.slow
def test_submitit_local_executor_runs_a_two_run_sweep(tmp_path, fake_notebook):
    root = tmp_path / "results"
    lines = []
    report = run_sweep(["market1501"], ["baseline", "proposed"], [0], results_root=root, notebook=fake_notebook,
                       compare_notebook=None, launcher="local-submitit", echo=lines.append)
    assert sorted(str(r) for r in report.ran) == ["market1501 baseline seed 0", "market1501 proposed seed 0"]
    assert report.ok and sum("submitted as job" in line for line in lines) == 2
    assert [r["state"] for r in run_states(root)] == ["done", "done"]
    again = run_sweep(["market1501"], ["baseline", "proposed"], [0], results_root=root, notebook=fake_notebook,
                      compare_notebook=None, launcher="local-submitit", echo=lambda text: None)
    assert again.ran == [] and len(again.skipped) == 2


def test_slurm_executor_writes_the_job_script_asked_for(tmp_path, monkeypatch):
    """No cluster here: a stand-in ``srun`` on PATH lets submitit build its SLURM executor, and the
    sbatch script it would submit is checked."""
    from submitit.slurm.slurm import _make_sbatch_string
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    executor = make_executor("slurm", tmp_path, partition="gpu", time_min=90, gpus_per_run=2, account="lab")
    script = _make_sbatch_string(command="python -m x", folder=tmp_path, **executor._executor.parameters)
    for line in ("--partition=gpu", "--time=90", "--gpus-per-node=2", "--account=lab", "--nodes=1",
                 "--job-name=reidlib-sweep"):
        assert f"#SBATCH {line}" in script
    with pytest.raises(ValueError, match="choose slurm or local-submitit"):
        make_executor("local", tmp_path)


@pytest.mark.slow
def test_jobs_2_equals_jobs_1_and_the_cross_matrix(synth_root, tmp_path, monkeypatch):
    """train_eval.ipynb itself on two generated data sets, with --cross: the parallel sweep gives
    the sequential one's numbers, and the matrix is 2 x 2 with the in-domain runs on its diagonal."""
    from reidlib.demo.synth import generate_market
    from reidlib.viz import collect_cross, collect_metrics, cross_matrix, cross_summary
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same threads in both sweeps: the same numbers
    duke = generate_market(tmp_path / "duke", ids=24, cams=3, seed=6)
    roots = {"market1501": str(synth_root), "dukemtmc": str(duke)}
    one_epoch = ["stage1.epochs=1", "stage2.epochs=1", "stage2.ims_per_batch=16", "stage2.steps=[1]"]
    kwargs = dict(data_roots=roots, overrides=one_epoch, base_config="tiny", device="cpu", cross=True,
                  echo=lambda text: None)
    runs = [(d, "baseline", 0) for d in roots]
    sequential = run_sweep(list(roots), ["baseline"], [0], results_root=tmp_path / "one", jobs=1,
                           compare_notebook=None, **kwargs)
    parallel = run_sweep(list(roots), ["baseline"], [0], results_root=tmp_path / "two", jobs=2, **kwargs)
    assert sequential.ok and parallel.ok and len(sequential.ran) == len(parallel.ran) == 2
    keys = ("rank1", "rank5", "mAP", "mINP", "cmc", "num_valid_queries")
    first, second = _results(tmp_path / "one", runs), _results(tmp_path / "two", runs)
    assert {r: [m[k] for k in keys] for r, m in first.items()} == {r: [m[k] for k in keys] for r, m in second.items()}
    cross_one, cross_two = (cross_summary(collect_cross(tmp_path / r)) for r in ("one", "two"))
    pd.testing.assert_frame_equal(cross_one, cross_two)
    for stat in ("rank1_mean", "mAP_mean"):
        matrix = cross_matrix(cross_two, "baseline", stat)
        assert matrix.shape == (2, 2) and list(matrix.index) == ["market1501", "dukemtmc"] == list(matrix.columns)
        assert not matrix.isna().any().any()
        in_domain = collect_metrics(tmp_path / "two").set_index("dataset")[stat.split("_")[0]] * 100
        for dataset in roots:
            assert matrix.loc[dataset, dataset] == pytest.approx(in_domain[dataset], abs=1e-9)
    tested = json.loads((run_dir(tmp_path / "two", "market1501", "baseline", 0) / "cross_metrics.json").read_text())
    assert list(tested["tested_on"]) == ["dukemtmc"] and tested["trained_on"] == "market1501"
    text = (tmp_path / "two" / "cross.md").read_text()  # written by compare.ipynb beside the summary
    assert "tested on dukemtmc" in text and (tmp_path / "two" / "summary.md").is_file()
    # a rerun finds everything complete, cross results included
    again = run_sweep(list(roots), ["baseline"], [0], results_root=tmp_path / "one", jobs=1, compare_notebook=None,
                      **kwargs)
    assert again.ran == [] and len(again.skipped) == 2


def test_a_missing_config_data_root_fails_before_any_run(tmp_path, monkeypatch):
    """No --data-root: the config's data.root must be a folder here (where the runs execute)."""
    monkeypatch.chdir(tmp_path)
    args = ["--datasets", "market1501", "--methods", "baseline", "--seeds", "0", "--results", str(tmp_path / "r"),
            "--base", "tiny", "--no-compare"]
    with pytest.raises(ValueError, match=r"data set market1501: the config's data.root=data/synth is not a folder"):
        main(args)   # the command line turns it into one line and exit status 2
    assert not (tmp_path / "r").exists()
