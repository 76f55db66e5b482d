"""The sweep: papermill per combination, complete runs skipped, failed runs reported, not fatal.

A stand-in for train_eval.ipynb (same parameters, no training) keeps these tests to seconds; the
real notebook runs in test_notebooks.py.
"""
import json

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from reidlib.config import load_config
from reidlib.sweep import main, parse_data_roots, run_config, run_dir, run_sweep

PARAMETERS = """dataset = "market1501"
data_root = None
method = "baseline"
seed = 0
base_config = None
overrides = []
output_dir = None
device = "auto"
"""
# Writes a plausible metrics.json; seed 13 is broken on purpose, after its metrics were written
# (a failure late in the notebook must not leave the run looking complete).
BODY = """import json, pathlib
out = pathlib.Path(output_dir)
out.mkdir(parents=True, exist_ok=True)
r1 = 0.5 + 0.01 * seed + (0.02 if method == "proposed" else 0.0)
metrics = {"dataset": dataset, "method": method, "seed": seed, "rank1": r1, "rank5": r1, "rank10": r1,
           "mAP": r1 - 0.2, "mINP": 0.1, "cmc": [r1] * 50, "num_valid_queries": 5,
           "data_root": data_root, "overrides": overrides}
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

