"""Reliability, round three: each fault of the issue with the test that failed before its fix.

Wrong numbers or lost work first (1-10, in the issue's order), then the families of rough edges
(state dicts, convert, unwritable outputs, hints, config, sweep, data, exit statuses).
"""
import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_bad_input import tiny  # the tiny baseline, one epoch per stage

import reidlib
from reidlib.__main__ import main as cli
from reidlib.config import load_config
from reidlib.storage import CheckpointError, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run_cli(*args):
    """(exit status, stderr lines) of ``python -m reidlib ARGS`` run in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = cli([str(a) for a in args])
        except SystemExit as exit_:        # usage errors (argparse's too) leave through SystemExit
            status = exit_.code
    return status, err.getvalue().strip().splitlines()


def one_line(status, lines, *words, code=2):
    assert status == code and len(lines) == 1, (status, lines)
    for word in words:
        assert word in lines[0], lines


def _view_sie_weights(tmp_path):
    """A tiny model with camera and view SIE (3 cameras x 4 views), saved as a checkpoint."""
    from reidlib.model import build_model
    from reidlib.weights import model_record
    cfg = load_config("tiny", ["device=cpu", "model.sie_camera=true", "model.sie_view=true"])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=5, num_cameras=3, num_views=4).eval()
    return save_checkpoint(tmp_path / "m.pt", model_record(model, cfg, 5, 3, num_views=4))


# --------------------------------------------------------------------------- 1. default_view

def test_extract_and_search_pass_the_default_view_on(tmp_path, synth_root, one_thread):
    from reidlib.search import extract_folder, search
    weights = _view_sie_weights(tmp_path)
    cfg = load_config("tiny", ["device=cpu", f"test.weights={weights}", "test.default_view=2",
                               "data.num_workers=0"])
    out = extract_folder(cfg, Path(synth_root) / "query", tmp_path / "f.npz")
    data = np.load(out)
    expected = reidlib.FeatureExtractor(weights, device="cpu", default_view=2)
    first = Path(str(data["paths"][0]))
    cam = int(data["camids"][0])
    assert torch.allclose(torch.from_numpy(data["features"][:1]), expected([first], cameras=[cam]), atol=1e-5)
    ranked = search(cfg, first, out, top=3, grid=None)
    assert len(ranked) == 3


# --------------------------------------------------------------------------- 2. empty crops

def test_an_empty_crop_is_refused_naming_its_index(tiny_trained):
    _, run = tiny_trained
    extractor = reidlib.FeatureExtractor(run / "model", device="cpu")
    frame = np.zeros((128, 64, 3), np.uint8)
    with pytest.raises(ValueError, match=r"image 1 .*empty.*0x10") as err:
        extractor([frame, frame[90:0, 10:20]])
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- 3. pretrain recipe

@pytest.mark.parametrize("flag", [["--lr", "inf"], ["--lr", "nan"], ["--temperature", "inf"],
                                  ["--weight-decay", "nan"]])
def test_pretrain_refuses_a_recipe_that_is_not_finite(tmp_path, flag):
    status, lines = run_cli("pretrain", "--cache", tmp_path / "c", "--steps", "2", "--warmup-steps", "1", *flag)
    one_line(status, lines, flag[0][2:].replace("-", "_"), "finite")
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("*.pt"))


def test_pretrain_never_caches_weights_that_are_not_finite(tmp_path, monkeypatch):
    from reidlib.demo import pretrain

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([1.0, math.nan]))

    monkeypatch.setattr(pretrain, "generate_web", lambda web, **kw: (Path(web).mkdir(parents=True),
                                                                     (Path(web) / "captions.csv").write_text("")))
    monkeypatch.setattr(pretrain, "pretrain_clip", lambda *a, **kw: (Broken(), {"epochs": 1}))
    recipe = pretrain.PretrainRecipe(steps=2, warmup_steps=1)
    with pytest.raises(ValueError, match="not finite.*w"):
        pretrain.build_miniature(recipe, tmp_path, echo=lambda text: None)
    assert not pretrain.miniature_path(recipe, tmp_path).exists()


# --------------------------------------------------------------------------- 4. metrics.json must parse

def _finished_folder(root, *, metrics_text):
    from reidlib.experiments import run_dir
    folder = run_dir(root, "market1501", "baseline", 0)
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(metrics_text)
    return folder


def test_a_truncated_metrics_json_is_not_done(tmp_path):
    from reidlib.experiments.status import run_state
    from reidlib.experiments.sweep import run_complete
    from reidlib.viz.tables import collect_metrics
    good = json.dumps({"dataset": "market1501", "method": "baseline", "seed": 0, "rank1": 0.5, "mAP": 0.3})
    folder = _finished_folder(tmp_path, metrics_text=good[:25])
    assert run_state(folder)[0] != "done"
    assert not run_complete(folder, {})
    with pytest.raises(ValueError, match=f"{folder / 'metrics.json'}"):
        collect_metrics(tmp_path)
    (folder / "metrics.json").write_text(json.dumps({"dataset": "market1501"}))  # parses, lacks the metrics
    assert run_state(folder)[0] != "done"
    with pytest.raises(ValueError, match="rank1"):
        collect_metrics(tmp_path)
    (folder / "metrics.json").write_text(good)
    assert run_state(folder)[0] == "done" and len(collect_metrics(tmp_path)) == 1


# --------------------------------------------------------------------------- 5. generator workers

def _children(pid):
    """Live (not zombie) processes whose parent is ``pid``, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_generator_workers_exit_when_their_parent_is_killed(tmp_path):
    code = ("from reidlib.demo.synth import generate_market\n"
            f"generate_market({str(tmp_path / 'set')!r}, ids=400, cams=4, workers=2, images_per_id=30)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], env=ENV)
    try:
        deadline = time.time() + 60
        while len(_children(parent.pid)) < 2 and time.time() < deadline:
            time.sleep(0.05)
        workers = _children(parent.pid)
        assert len(workers) >= 2, "the generator started no workers"
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.time() + 5
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    left = [w for w in workers if _alive(w)]
    for w in left:                       # do not leave them behind when the test fails
        os.kill(w, signal.SIGKILL)
    assert not left, f"workers {left} outlived their parent"


# --------------------------------------------------------------------------- 6. zip CRCs

def _flip_a_tensor_byte(path):
    """Flip bits in the middle of the first tensor's bytes of a torch zip file (CRC now wrong)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename)
    data = bytearray(Path(path).read_bytes())
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def test_flipped_bits_in_a_torch_checkpoint_are_found(tmp_path):
    path = save_checkpoint(tmp_path / "model_final.pt", {"model": {"w": torch.arange(1000.0)}, "config": {}})
    _flip_a_tensor_byte(path)
    with pytest.raises(CheckpointError, match="damaged") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value) and "model_final.pt" in str(err.value)


# --------------------------------------------------------------------------- 7. sweep --gpus / --jobs

@pytest.mark.parametrize("args, says", [
    (["--gpus", "abc"], "--gpus"), (["--gpus", "-1"], "--gpus"), (["--gpus", "0-3"], "--gpus"),
    (["--gpus", "1.5"], "--gpus"), (["--gpus", "0,,1"], "--gpus"), (["--jobs", "-3"], "--jobs"),
    (["--jobs", "0"], "--jobs"),
])
def test_sweep_refuses_bad_gpus_and_jobs(tmp_path, args, says):
    status, lines = run_cli("sweep", "--datasets", "market1501", "--methods", "baseline", "--seeds", "0",
                            "--results", tmp_path / "r", "--no-compare", *args)
    one_line(status, lines, says)
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- 8. training list fingerprint

def test_resuming_on_another_training_list_is_refused(tmp_path, synth_root):
    other = tmp_path / "other"
    shutil.copytree(synth_root, other)
    train = other / "bounding_box_train"
    first = sorted(train.glob("*.jpg"))[0]
    # the same names, counts and identities; one image now from another (existing) camera
    first.rename(train / first.name.replace("_c1", "_c2", 1) if "_c1" in first.name
                 else train / first.name.replace(first.name[5:7], "_c1", 1))
    out = tmp_path / "run"
    reidlib.train(tiny(synth_root, out))
    with pytest.raises(ValueError, match="training list") as err:
        reidlib.train(tiny(other, out))
    assert "data.root" in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- 9. one run per folder

def test_a_second_training_process_on_one_folder_fails_at_once(tmp_path, synth_root):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fh = open({str(out / '.lock')!r}, "a+")
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fh.seek(0); fh.truncate(); fh.write(str(os.getpid())); fh.flush()
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.time()
        with pytest.raises(RuntimeError, match=rf"{out}.*pid {holder.pid}") as err:
            reidlib.train(tiny(synth_root, out))
        assert time.time() - started < 20 and "\n" not in str(err.value)
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_the_run_folder_lock_is_released_and_reports_its_holder(tmp_path):
    from reidlib.storage import FolderLocked, lock_folder
    with lock_folder(tmp_path, "output_dir"):
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        code = f"from reidlib.storage import lock_folder\nwith lock_folder({str(tmp_path)!r}, 'output_dir'): pass"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
        assert done.returncode != 0 and f"pid {os.getpid()}" in done.stderr
        assert issubclass(FolderLocked, RuntimeError)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- 10. configs changed in Python

@pytest.mark.parametrize("key, value, says", [
    ("epochs", 0, "stage2.epochs=0"), ("lr", -1, "stage2.lr=-1"), ("ims_per_batch", "32", "stage2.ims_per_batch"),
    ("lr", math.inf, "stage2.lr=inf"), ("epochs", 2.5, "stage2.epochs"), ("epochs", True, "stage2.epochs"),
])
def test_train_and_test_validate_a_config_changed_in_python(tmp_path, key, value, says):
    cfg = tiny("/nonexistent", tmp_path / "run")
    setattr(cfg.stage2, key, value)
    with pytest.raises(ValueError, match=says.replace(".", r"\.")):
        reidlib.train(cfg)
    with pytest.raises(ValueError, match=says.replace(".", r"\.")):
        reidlib.test(cfg, weights=str(tmp_path))
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- data edges: the extractor

def test_the_extractor_refuses_nan_batches_fractional_cameras_and_bytes(tmp_path, one_thread):
    extractor = reidlib.FeatureExtractor(_view_sie_weights(tmp_path), device="cpu")
    batch = torch.zeros(3, 3, 128, 64)
    batch[2, 0, 5, 5] = math.nan
    with pytest.raises(ValueError, match="image 2 of the preprocessed batch holds NaN"):
        extractor(batch, cameras=0, views=0)
    with pytest.raises(ValueError, match="camera ids must be whole numbers.*1.7"):
        extractor(batch[:2], cameras=[0, 1.7], views=0)
    with pytest.raises(ValueError, match="camera ids must be whole numbers"):
        extractor(batch[:2], cameras=[True, False], views=0)
    assert extractor(batch[:2], cameras=[0.0, 2.0], views=1).shape[0] == 2   # whole floats are fine
    with pytest.raises(TypeError, match="image 0 is bytes.*decode it first"):
        extractor(b"\xff\xd8\xff\xe0 jpeg data", cameras=0, views=0)


# --------------------------------------------------------------------------- state dicts and files

@pytest.mark.parametrize("make, says", [
    (lambda p: __import__("PIL.Image").Image.new("RGB", (4, 4)).save(p, format="PNG"), "a PNG image"),
    (lambda p: __import__("PIL.Image").Image.new("RGB", (4, 4)).save(p, format="JPEG"), "a JPEG image"),
    (lambda p: Path(p).write_text("model: vit\nepochs: 3\n"), "a text file"),
    (lambda p: np.savez(open(p, "wb"), a=np.zeros(3)), "a NumPy .npz archive"),
])
def test_a_file_that_is_no_checkpoint_is_called_what_it_is(tmp_path, make, says):
    path = tmp_path / "weights.pt"
    make(path)
    with pytest.raises(CheckpointError, match=f"is not a checkpoint: it is {says}") as err:
        load_checkpoint(path)
    assert "corrupt" not in str(err.value) and "\n" not in str(err.value)


def test_a_truncated_checkpoint_is_still_corrupt(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"model": {"w": torch.arange(1000.0)}, "config": {}})
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))   # an exported model
    with pytest.raises(CheckpointError, match="not a checkpoint: it is a TorchScript model"):
        load_checkpoint(path)
    path.write_bytes(b"")     # a save killed at its start
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_are_one_line_errors(tmp_path, one_thread):
    from test_reference_weights import _reference_state, _source

    from reidlib.model import build_model
    cfg = load_config("tiny")
    model = build_model(cfg.model, num_classes=5)
    state = model.state_dict()
    missing = {k: v for k, v in state.items() if k != "bottleneck.bias"}
    with pytest.raises(ValueError, match=r"1 missing key\(s\) \(e\.g\. bottleneck\.bias\)") as err:
        model.load_state_dict(missing)
    assert "\n" not in str(err.value) and isinstance(err.value, RuntimeError)   # torch's kind too
    wrong = {**state, "bottleneck.weight": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"bottleneck\.weight is \[5\] in the weights but \[64\]"):
        model.load_state_dict(wrong, strict=False)
    # a reference state dict without a tensor every reference model has
    _, source = _source()
    ref = _reference_state(source, prompt="clipreid")
    del ref["text_encoder.ln_final.weight"]
    torch.save(ref, tmp_path / "ref.pth")
    with pytest.raises(ValueError, match=r"incomplete CLIP-ReID reference state dict: no 'ln_final.weight'") as err:
        reidlib.load_trained_model(tmp_path / "ref.pth", cfg)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- config edges

@pytest.mark.parametrize("setting, says", [
    ("stage2.lr=inf", "stage2.lr=inf is not a finite number"), ("model.lora.lr=-inf", "model.lora.lr=-inf"),
    ("output_dir=", "output_dir is empty"), ("output_dir=  ", "output_dir is empty"),
])
def test_infinite_values_and_an_empty_output_dir_are_refused(tmp_path, setting, says):
    status, lines = run_cli("train", "tiny", setting, "data.root=/nonexistent")
    one_line(status, lines, says)


@pytest.mark.parametrize("text, says", [
    ("stage2:\n\tepochs: 3\n", "line 2"),                       # a tab in the indentation
    ("seed: !!python/object/apply:os.system ['echo hi']\n", "python"),
])
def test_a_yaml_that_does_not_parse_is_one_line_naming_the_file(tmp_path, text, says):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    status, lines = run_cli("train", path, "data.root=/nonexistent")
    one_line(status, lines, str(path), "not valid YAML", says)


def test_a_relative_base_resolves_against_the_yaml_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    (folder / "sub").mkdir(parents=True)
    (folder / "common.yaml").write_text("base: tiny\nstage2:\n  epochs: 7\n")
    (folder / "sub" / "run.yaml").write_text("base: ../common.yaml\nseed: 3\n")
    monkeypatch.chdir(tmp_path)          # not the YAMLs' folder
    cfg = load_config(folder / "sub" / "run.yaml")
    assert (cfg.stage2.epochs, cfg.seed, cfg.model.name) == (7, 3, load_config("tiny").model.name)


def test_one_override_as_a_string_is_one_override():
    assert load_config("tiny", "stage2.epochs=3").stage2.epochs == 3


# --------------------------------------------------------------------------- exit statuses

@pytest.mark.parametrize("args, says", [
    (["convert", "only_one.pt"], "give IN OUT"),
    (["export", "format=onnx"], "give weights=PATH"),
    (["train"], "give a CONFIG"),
    (["train", "tiny", "extra"], "unexpected argument"),
    (["sweep", "--datasets", "market1501", "--methods", "bogus", "--no-compare"], "unknown method"),
    (["sweep", "--status", "/nonexistent/results"], "no such results folder"),
    (["nosuchcommand"], "unknown command"),
])
def test_usage_errors_exit_2_with_one_line(args, says):
    one_line(*run_cli(*args), says)
    done = subprocess.run([sys.executable, "-m", "reidlib", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 2 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


# --------------------------------------------------------------------------------------------- speed under load

def test_evaluation_threads_follow_the_free_cores_and_keep_the_numbers(monkeypatch):
    import reidlib.eval.distance as distance
    from reidlib.eval import evaluate, rerank
    from reidlib.eval.distance import GalleryDistance, cpu_threads
    gen = torch.Generator().manual_seed(0)
    qf, gf = torch.randn(73, 1280, generator=gen), torch.randn(400, 1280, generator=gen)
    labels = (torch.arange(73) % 20, torch.arange(400) % 20, torch.zeros(73, dtype=torch.long),
              torch.ones(400, dtype=torch.long))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)     # more threads than rows / 32: MKL would split the inner dimension
        expected = (GalleryDistance(gf, "euclidean", True)(qf), evaluate(qf, gf, *labels), rerank(qf, gf))
        monkeypatch.setattr(distance, "free_cores", lambda: 1)     # a busy machine
        seen = []
        with cpu_threads(torch.device("cpu")):
            seen.append(torch.get_num_threads())
            got = (GalleryDistance(gf, "euclidean", True)(qf), evaluate(qf, gf, *labels), rerank(qf, gf))
        assert seen == [1] and torch.get_num_threads() == 8     # lowered inside, restored after
        assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and torch.equal(got[2], expected[2])
    finally:
        torch.set_num_threads(before)
    assert 1 <= distance.free_cores() <= (os.cpu_count() or 1)


def test_eval_bench_compares_idle_and_loaded_against_the_references():
    done = subprocess.run([sys.executable, "bench/eval_bench.py", "--tiny", "--load", "--repeats", "1"], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.strip("|").split("|") for line in done.stdout.splitlines() if line.startswith(("| idle", "| loaded"))]
    assert sorted((r[0].strip(), r[2].strip()[:6]) for r in rows) == [
        ("idle", "evalua"), ("idle", "rerank"), ("loaded", "evalua"), ("loaded", "rerank")]
    assert all(float(r[-1].strip().rstrip("x")) > 0 for r in rows)


# --------------------------------------------------------------------------------------------- hints

def test_resume_and_stage1_weights_name_their_own_key(tmp_path, tiny_trained):
    _, run = tiny_trained
    for key in ("resume", "stage1_weights"):
        with pytest.raises(FileNotFoundError, match=f"^{key}=.*nope.pt: no such file") as err:
            reidlib.train(tiny("/nonexistent", tmp_path / key, f"{key}={tmp_path / 'nope.pt'}"))
        assert "weights=PATH" not in str(err.value)
    legacy = save_checkpoint(tmp_path / "model_final.pt", {k: v for k, v in load_checkpoint(
        next(run.glob("checkpoint_stage*.pt"))).items() if k not in ("stage", "epoch", "optimizer", "rng")})
    for final in (run / "model", legacy):   # final models, not resumable checkpoints
        cfg = tiny(tiny_trained[0].data.root, tmp_path / "again", f"resume={final}")
        with pytest.raises(ValueError, match=f"resume={final}: a trained model, not a resumable checkpoint"):
            reidlib.train(cfg)


# --------------------------------------------------------------------------------------------- outputs

def test_convert_refuses_out_equal_to_in_and_an_unwritable_out(tmp_path, tiny_trained):
    _, run = tiny_trained
    one_line(*run_cli("convert", run / "model", run / "model"), "OUT is IN")
    assert reidlib.load_trained_model(run / "model")   # untouched
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    one_line(*run_cli("convert", run / "model", blocker / "out"), "OUT=", "not writable")


def test_export_and_extract_check_out_before_the_work(tmp_path, tiny_trained, monkeypatch):
    import reidlib.export as export
    import reidlib.search as search
    _, run = tiny_trained
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr(export, "load_trained_model", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(OSError, match="out=.*a_file is not writable"):
        export.export_model(run / "model", blocker / "m.onnx")
    monkeypatch.setattr(search, "list_image_folder", lambda *a, **k: pytest.fail("encoded before the check"))
    cfg = load_config("tiny", ["device=cpu", f"test.weights={run / 'model'}"])
    with pytest.raises(OSError, match="out=.*a_file is not writable"):
        search.extract_folder(cfg, tmp_path, blocker / "f.npz")


def test_a_killed_export_leaves_no_temp_file_behind(tmp_path, tiny_trained):
    _, run = tiny_trained
    stale = tmp_path / ".m.pt.ab12cd34.tmp"          # what a kill -9 during the write leaves
    stale.write_bytes(b"half")
    other = tmp_path / ".other.pt.ab12cd34.tmp"     # another export's: not ours to remove
    other.write_bytes(b"half")
    reidlib.export_model(run / "model", tmp_path / "m.pt", format="torchscript")
    assert not stale.exists() and other.exists() and (tmp_path / "m.pt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.pt.")]


def test_an_exported_sie_graph_gives_nan_for_an_unknown_camera(tmp_path, one_thread):
    weights = _view_sie_weights(tmp_path)
    out = reidlib.export_model(weights, tmp_path / "graph.pt", format="torchscript")
    graph = torch.jit.load(str(out))
    images = torch.randn(3, 3, 128, 64)
    feats = graph(images, torch.tensor([0, -1, 3]), torch.tensor([1, 1, 1]))
    expected = reidlib.FeatureExtractor(weights, device="cpu")(images[:1], cameras=[0], views=[1])
    assert torch.allclose(feats[:1], expected, atol=1e-5)
    assert bool(feats[1:].isnan().all())          # camera -1 and camera 3 (of 3): refused, not a wrong row


def test_saves_say_disk_full_as_such(tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"no space left on the device while writing .*c\.pt \(disk full") as err:
        save_checkpoint(tmp_path / "c.pt", {"epoch": 1})
    assert "\n" not in str(err.value) and err.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []                      # no temp file left


def test_nan_weights_are_never_saved_as_a_model(tmp_path, tiny_trained):
    from reidlib.weights import read_trained, save_trained
    _, run = tiny_trained
    state = read_trained(run / "model")
    weights = state.pop("model")
    key = next(k for k, v in weights.items() if v.is_floating_point())
    weights[key] = weights[key].clone().fill_(math.nan)
    card = {k: v for k, v in state.items() if k in ("config", "num_classes", "num_cameras", "num_views",
                                                    "quick_gelu")}
    with pytest.raises(ValueError, match=f"NaN or inf.*{key}"):
        save_trained(tmp_path / "model", weights, card)
    assert not (tmp_path / "model").exists()


def test_search_against_an_empty_gallery_is_an_error(tmp_path, tiny_trained, synth_root):
    from reidlib.search import search
    _, run = tiny_trained
    empty = tmp_path / "empty.npz"
    np.savez(empty, features=np.zeros((0, 8), np.float32), paths=np.array([], dtype=str),
             pids=np.zeros(0, np.int64), camids=np.zeros(0, np.int64))
    query = sorted((Path(synth_root) / "query").glob("*.jpg"))[0]
    cfg = load_config("tiny", ["device=cpu", f"test.weights={run / 'model'}", "data.num_workers=0"])
    with pytest.raises(ValueError, match="holds no readable image"):
        search(cfg, query, empty, grid=tmp_path / "grid.png")
    assert not (tmp_path / "grid.png").exists()


# --------------------------------------------------------------------------------------------- sweep edges

def test_compare_on_an_empty_folder_is_a_clear_error_and_writes_nothing(tmp_path):
    from reidlib.viz import collect_metrics, summarize
    empty = tmp_path / "results"
    empty.mkdir()
    with pytest.raises(ValueError, match="no finished runs to compare"):
        summarize(collect_metrics(empty))
    with pytest.raises(ValueError, match="no finished runs to compare"):
        summarize(collect_metrics(tmp_path / "missing"))
    assert list(empty.iterdir()) == [] and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("args, says", [
    (["--datasets", "market1501", "nosuchset"], "unknown data set(s) nosuchset"),
    (["--datasets", "market1501", "--data-root", "/nonexistent/data"], "/nonexistent/data"),
])
def test_sweep_refuses_unknown_data_sets_and_missing_roots_before_any_run(tmp_path, args, says):
    one_line(*run_cli("sweep", *args, "--methods", "baseline", "--seeds", "0", "--results", tmp_path / "r",
                      "--no-compare"), says)
    assert not (tmp_path / "r").exists()


def test_sweep_results_that_is_a_file_is_one_line(tmp_path):
    results = tmp_path / "results.txt"
    results.write_text("")
    one_line(*run_cli("sweep", "--datasets", "market1501", "--methods", "baseline", "--seeds", "0",
                      "--results", results, "--no-compare"), "--results", "a file, not a folder")
    one_line(*run_cli("sweep", "--status", results), "no such results folder")


def test_a_garbage_claim_does_not_block_its_run_forever(tmp_path, caplog):
    from reidlib.experiments import run_dir
    from reidlib.experiments.claims import UNREADABLE_CLAIM_SECONDS, claim_run, read_claim
    from reidlib.experiments.status import run_state
    folder = run_dir(tmp_path, "market1501", "baseline", 0)
    folder.mkdir(parents=True)
    (folder / "claim.json").write_text("\x00garbage{")
    assert claim_run(folder, tmp_path) is None          # fresh: its writer may be writing it now
    old = time.time() - UNREADABLE_CLAIM_SECONDS - 5
    os.utime(folder / "claim.json", (old, old))
    assert run_state(folder)[0] == "killed"
    with caplog.at_level("WARNING", logger="reidlib"):
        claim = claim_run(folder, tmp_path)
    assert claim is not None and read_claim(folder)["pid"] == os.getpid()
    assert any("unreadable claim" in r.getMessage() for r in caplog.records)


def test_a_sweep_reruns_a_run_whose_metrics_json_is_truncated(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook
    from test_sweep import BODY, PARAMETERS  # the fake train notebook of the sweep's tests

    from reidlib.experiments import run_dir
    from reidlib.experiments.status import run_state
    from reidlib.experiments.sweep import run_sweep
    params = new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    book = new_notebook(cells=[params, new_code_cell(BODY)])
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(book, tmp_path / "fake.ipynb")
    kwargs = dict(results_root=tmp_path / "r", notebook=tmp_path / "fake.ipynb", compare_notebook=None,
                  echo=lambda text: None)
    assert len(run_sweep(["market1501"], ["baseline"], [0], **kwargs).ran) == 1
    folder = run_dir(tmp_path / "r", "market1501", "baseline", 0)
    good = (folder / "metrics.json").read_text()
    (folder / "metrics.json").write_text(good[:30])           # a copy cut short
    assert run_state(folder)[0] != "done"
    again = run_sweep(["market1501"], ["baseline"], [0], **kwargs)
    assert len(again.ran) == 1 and not again.skipped               # run again, not skipped as done
    assert json.loads((folder / "metrics.json").read_text()) == json.loads(good)
    assert (folder / "metrics.damaged.json").read_text() == good[:30]


# --------------------------------------------------------------------------------------------- data edges: lists

def _folder_set(tmp_path, train_rows, bom=False):
    from PIL import Image
    (tmp_path / "imgs").mkdir(exist_ok=True)
    for name in "abcdef":
        Image.new("RGB", (8, 16)).save(tmp_path / "imgs" / f"{name}.jpg")
    text = "path,pid,camid\n" + "".join(f"{row}\n" for row in train_rows)
    (tmp_path / "train.csv").write_bytes(("\ufeff" if bom else "").encode() + text.encode())


def test_a_csv_with_a_byte_order_mark_reads(tmp_path):
    from reidlib.data import load_dataset
    _folder_set(tmp_path, ["imgs/a.jpg,3,0", "imgs/b.jpg,4,1"], bom=True)     # as Excel saves "CSV UTF-8"
    ds = load_dataset("folder", tmp_path, train_only=True)
    assert [(Path(p).name, pid) for p, pid, _ in ds.train] == [("a.jpg", 0), ("b.jpg", 1)]


def test_list_files_with_repeats_double_labels_or_low_pids(tmp_path, caplog):
    from reidlib.data import load_dataset
    _folder_set(tmp_path, ["imgs/a.jpg,3,0", "imgs/a.jpg,3,0", "imgs/b.jpg,4,1"])
    with caplog.at_level("WARNING", logger="reidlib"):
        ds = load_dataset("folder", tmp_path, train_only=True)
    assert len(ds.train) == 2 and any("skipped 1 repeated line" in r.getMessage() for r in caplog.records)
    _folder_set(tmp_path, ["imgs/a.jpg,3,0", "imgs/a.jpg,5,0"])
    with pytest.raises(ValueError, match=r"lists .*a\.jpg twice, as pid 3 camera 0 and as pid 5 camera 0"):
        load_dataset("folder", tmp_path, train_only=True)
    _folder_set(tmp_path, ["imgs/a.jpg,-3,0"])
    with pytest.raises(ValueError, match=r"a\.jpg pid -3; identities are >= 0"):
        load_dataset("folder", tmp_path, train_only=True)
