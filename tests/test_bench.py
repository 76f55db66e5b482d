
"""The benchmarks run end to end (their figures come from a GPU or an idle machine, not from here)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_train_bench_tiny_prints_every_phase():
    done = _run("bench/train_bench.py", "--tiny", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("method"))
    assert "stage2_img_s" in header and "projected_min" in header
    rows = [line.split() for line in lines if line.split()[:1] in (["baseline"], ["proposed"])]
    assert [r[0] for r in rows] == ["baseline", "proposed"]
    for row in rows:
        rates = [float(x) for x in row[2:6]]  # cache, prompts/s, stage 2, inference
        assert all(r > 0 for r in rates), row
        assert float(row[-1]) > 0             # projected minutes


@pytest.mark.slow
def test_methods_bench_tiny_times_every_image_stage():
    done = _run("bench/methods_bench.py", "--tiny", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines()
            if line.split()[:1] in (["baseline"], ["proposed"], ["pcl"], ["promptsg"])]
    assert sorted({r[0] for r in rows}) == ["baseline", "pcl", "promptsg", "proposed"]
    # columns: method, stage, img/s, epoch set-up seconds, inference img/s, peak GPU memory
    assert [r[2] for r in rows if r[0] == "baseline"][0] == "(train_bench)"      # the prompt stage
    for row in rows:
        if row[2] != "(train_bench)":
            assert float(row[2]) > 0 and float(row[3]) >= 0, row               # img/s, set-up seconds
    pcl = next(r for r in rows if r[0] == "pcl")
    assert pcl[1].startswith("1:") and float(pcl[4]) > 0                        # one stage; inference img/s


def test_eval_bench_tiny_agrees_with_its_baseline():
    done = _run("bench/eval_bench.py", "--tiny")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.strip("|").split("|") for line in done.stdout.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 3  # evaluate from features, from a distance matrix, re-ranking
    for row in rows:
        assert float(row[-1]) < 1e-4, row  # agreement with the bench's own baseline
