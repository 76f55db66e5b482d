"""What the first GPU run depends on, checked on the CPU.

- precision: the choice per card (fake compute capabilities), bf16 and fp16 (GradScaler) training;
- the device image cache: its memory check (fake free memory) and, forced on the CPU with fused
  Adam, a run killed and resumed bit-identically;
- torch.compile: no graph breaks in either stage's forward (and, where a C++ compiler is, the
  compiled step equals the eager one);
- host syncs and devices: one stage-1 and one stage-2 step on the meta device, where a tensor
  holds no values, so that reading one back to the host (``.item()``, ``int()``, ``.tolist()``,
  ``.cpu()``) is caught, and so is a tensor made on the CPU beside the model's;
- TF32 scoping, per-rank seeds, checkpoints saved with CPU tensors, the deterministic switch;
- ``python -m reidlib doctor --device cpu``.
"""
import logging
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import reidlib
from reidlib.data import TrainBatches, TrainImageCache, load_dataset
from reidlib.data import cache as cache_module
from reidlib.data.cache import GiB, cache_bytes, make_image_cache, plan_image_cache
from reidlib.engine import trainer
from reidlib.methods import StageContext, clipreid, image_step, method_config
from reidlib.methods import base as methods_base
from reidlib.methods.clipreid import ImageEncoderStage, make_loss, make_stage1_optimizer, stage1_step
from reidlib.model import build_model, set_trainable
from reidlib.optim import LossWatch
from reidlib.runtime import (
    Runtime,
    choose_precision,
    epoch_seed,
    set_deterministic,
    setup_runtime,
    tf32_mode,
    to_cpu,
)
from reidlib.weights import read_trained

ROOT = Path(__file__).resolve().parents[1]


def tiny(root, out, *extra, method="baseline"):
    return method_config(method, [f"data.root={root}", f"output_dir={out}", "device=cpu", "stage1.epochs=1",
                                  "stage2.epochs=1", "stage2.ims_per_batch=16", "model.lora.lr=3e-4", *extra],
                         base="tiny")


def _finite(metrics):
    return all(torch.isfinite(torch.tensor(metrics[k])) for k in ("rank1", "mAP"))


# --------------------------------------------------------------------------- precision

@pytest.mark.parametrize("capability, dtype", [((6, 1), torch.float16), ((7, 0), torch.float16),
                                               ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                               ((8, 9), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_precision_by_compute_capability(capability, dtype):
    chosen, why = choose_precision("auto", "cuda", capability)
    assert chosen == dtype
    if dtype == torch.float16:
        assert "GradScaler" in why and f"{capability[0]}.{capability[1]}" in why


def test_explicit_precisions_and_the_cpu():
    assert choose_precision("auto", "cpu")[0] is None
    assert choose_precision("fp32", "cuda", (9, 0))[0] is None
    assert choose_precision("bf16", "cpu")[0] == torch.bfloat16
    assert choose_precision("fp16", "cuda", (9, 0))[0] == torch.float16
    with pytest.raises(ValueError, match="fp16"):
        choose_precision("half", "cuda", (9, 0))


def test_fp16_runtime_has_a_grad_scaler(tmp_path):
    fp16 = setup_runtime(reidlib.load_config("tiny", ["device=cpu", "precision=fp16", f"output_dir={tmp_path}"]))
    bf16 = setup_runtime(reidlib.load_config("tiny", ["device=cpu", "precision=bf16", f"output_dir={tmp_path}"]))
    assert fp16.amp_dtype == torch.float16 and isinstance(fp16.scaler, torch.amp.GradScaler)
    assert bf16.amp_dtype == torch.bfloat16 and bf16.scaler is None


def test_train_in_bf16_on_the_cpu(small_generated, tmp_path, one_thread):
    metrics = reidlib.train(tiny(small_generated, tmp_path, "precision=bf16"))
    assert _finite(metrics)


def test_train_in_fp16_steps_through_the_grad_scaler(small_generated, tmp_path, monkeypatch, one_thread):
    steps = []
    original = torch.amp.GradScaler.step
    monkeypatch.setattr(torch.amp.GradScaler, "step",
                        lambda self, optimizer, *a, **k: steps.append(1) or original(self, optimizer, *a, **k))
    metrics = reidlib.train(tiny(small_generated, tmp_path, "precision=fp16"))
    assert _finite(metrics) and len(steps) >= 2          # stage 1 and stage 2 steps
    saved = trainer.load_checkpoint(next(tmp_path.glob("checkpoint_*.pt")))
    assert saved["scaler"]["scale"] > 0                  # the loss scale is resumed with the run


# --------------------------------------------------------------------------- the device image cache

def test_image_cache_plan_with_made_up_memory():
    market = cache_bytes(12936, (256, 128))
    fits, line = plan_image_cache(market, "cuda:0", 79 * GiB, 80 * GiB, 100 * GiB, 128 * GiB)
    assert fits and line == "image cache: 1.18 GiB on cuda:0"
    # an 8 GiB card: 8 - 25% - 2 GiB = 4 GiB for a cache; a 5 GiB cache does not fit
    fits, line = plan_image_cache(5 * GiB, "cuda:1", 8 * GiB, 8 * GiB)
    assert not fits and line.startswith("image cache off: needs 5.00 GiB, 8.00 GiB free on cuda:1")
    assert line.endswith("using the DataLoader")
    # room on the card, not in host RAM to decode it (4 ranks on the host decode 4 copies)
    fits, line = plan_image_cache(3 * GiB, "cuda:0", 79 * GiB, 80 * GiB, 16 * GiB, 32 * GiB, ranks_on_host=4)
    assert not fits and "needs 12.00 GiB, 16.00 GiB free in host RAM" in line
    assert plan_image_cache(3 * GiB, "cuda:0", 79 * GiB, 80 * GiB, 16 * GiB, 32 * GiB)[0]


def _fake_cuda_run(monkeypatch, device_free, device_total=16 * GiB):
    monkeypatch.setattr(cache_module, "device_memory", lambda device: (device_free, device_total))
    monkeypatch.setattr(cache_module, "host_memory", lambda: (64 * GiB, 128 * GiB))
    return Runtime(device=torch.device("cuda", 0), amp_dtype=None, output_dir=None)


def test_image_cache_falls_back_to_the_dataloader_when_memory_is_short(small_generated, monkeypatch, caplog):
    dataset = load_dataset("market1501", small_generated)
    # the train set at 20000 x 20000 would be ~30 GiB: far more than a 16 GiB card leaves
    cfg = reidlib.load_config("tiny", ["model.image_size=[20000, 20000]"])
    runtime = _fake_cuda_run(monkeypatch, device_free=15 * GiB)
    with caplog.at_level(logging.INFO, logger="reidlib"):
        assert make_image_cache(dataset, cfg, runtime) is None        # decided before decoding anything
    assert "image cache off: needs" in caplog.text and "using the DataLoader" in caplog.text


def test_image_cache_is_built_when_it_fits(small_generated, monkeypatch, caplog):
    dataset = load_dataset("market1501", small_generated)
    cfg = reidlib.load_config("tiny")
    runtime = _fake_cuda_run(monkeypatch, device_free=15 * GiB)
    monkeypatch.setattr(TrainImageCache, "to", lambda self, device: self)   # no CUDA here: stays on the CPU
    with caplog.at_level(logging.INFO, logger="reidlib"):
        cache = make_image_cache(dataset, cfg, runtime)
    assert isinstance(cache, TrainImageCache) and len(cache) == len(dataset.train)
    assert "image cache: 0.00 GiB on cuda:0" in caplog.text



def _cache_and_fused_adam_on_the_cpu(monkeypatch):
    """The GPU's data and optimizer path on the CPU: the uint8 image cache augmented by
    gpu_train_augment, and fused Adam in both stages."""
    def cpu_cache(dataset, cfg, runtime):
        return TrainImageCache(dataset.train, cfg.model.image_size, cfg.data.interpolation)
    monkeypatch.setattr(trainer, "make_image_cache", cpu_cache)
    fused = []
    monkeypatch.setattr(methods_base, "use_fused_adam", lambda params: fused.append(1) or True)
    monkeypatch.setattr(clipreid, "use_fused_adam", lambda params: fused.append(1) or True)
    return fused


def test_image_cache_and_fused_adam_resume_bit_identically(small_generated, tmp_path, monkeypatch,
                                                           train_killed_in_epoch, one_thread):
    fused = _cache_and_fused_adam_on_the_cpu(monkeypatch)
    batches_from_cache = []
    original_epoch = TrainBatches.epoch
    def epoch(self, number):
        batches_from_cache.append(self.cache is not None)
        return original_epoch(self, number)
    monkeypatch.setattr(TrainBatches, "epoch", epoch)
    keys = ["stage2.epochs=2", "stage1.checkpoint_period=1", "stage2.checkpoint_period=1"]
    straight = reidlib.train(tiny(small_generated, tmp_path / "straight", *keys, method="proposed"))
    assert fused and all(batches_from_cache) and batches_from_cache

    cfg = tiny(small_generated, tmp_path / "resumed", *keys, method="proposed")
    train_killed_in_epoch(cfg, ImageEncoderStage, 1)
    resumed = reidlib.train(cfg)

    assert resumed == straight
    a, b = (read_trained(tmp_path / run / "model")["model"] for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- torch.compile

def _stage_inputs(method):
    cfg = method_config(method, ["device=cpu", "model.sie_camera=true"], base="tiny")
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=8, num_cameras=3)
    images = torch.randn(8, 3, *cfg.model.image_size)
    pids = torch.arange(4).repeat_interleave(2)
    return cfg, model, images, pids, torch.zeros(8, dtype=torch.long)


@pytest.mark.parametrize("method", ["baseline", "proposed"])
def test_both_stages_compile_without_graph_breaks(method):
    """Dynamo's trace only (no C++ compiler needed): a graph break, e.g. a value read back from a
    tensor, would split the compiled GPU step and sync the host."""
    _, model, images, pids, cams = _stage_inputs(method)
    torch._dynamo.reset()
    try:
        stage2 = torch._dynamo.explain(model.train())(images, labels=pids, cams=cams, views=None)
        stage1 = torch._dynamo.explain(clipreid._PromptStep(model))(pids)
    finally:
        torch._dynamo.reset()
    assert stage2.graph_break_count == 0, [str(b.reason) for b in stage2.break_reasons]
    assert stage1.graph_break_count == 0, [str(b.reason) for b in stage1.break_reasons]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None,
                    reason="no C++ compiler: torch.compile's CPU backend (inductor) needs one")
def test_compiled_stage2_step_equals_eager():
    """Inductor on the CPU (~40 s on 2 cores): the compiled forward + losses + backward give the
    eager gradients to float tolerance."""
    cfg, model, images, pids, cams = _stage_inputs("baseline")
    text, loss_fn = model.all_text_features().float(), make_loss(cfg)

    def grads(module):
        model.zero_grad(set_to_none=True)
        out = module(images, labels=pids, cams=cams)
        loss_fn(out["logits"], out["feats"], pids, out["f_proj"], text)[0].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    try:
        compiled = grads(torch.compile(model.train()))
    finally:
        torch._dynamo.reset()
    eager = grads(model)
    assert compiled.keys() == eager.keys()
    assert all(torch.allclose(compiled[k], eager[k], atol=1e-4, rtol=1e-3) for k in eager)


# --------------------------------------------------------------------------- host syncs, devices

class HostReads(TorchDispatchMode):
    """Notes every value read back from a meta tensor (``aten._local_scalar_dense``: ``.item()``,
    ``int()``, ``bool()``, ``float()``; ``.tolist()`` goes through it too) with the Python stack
    that made it, and answers 0 so that the step can go on; any other op that would need the
    values (``.cpu()``, ``nonzero``) fails on the meta device by itself, and so does an op that
    mixes meta tensors with CPU tensors that are not 0-d: a tensor left on the wrong device.
    ``answer``: the value a read gets."""

    def __init__(self, answer=0):
        super().__init__()
        self.reads: list[str] = []
        self.answer = answer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            import traceback
            frames = [f for f in traceback.extract_stack()[:-1] if "site-packages" not in f.filename]
            self.reads.append(" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-3:]))
            return bool(self.answer) if args[0].dtype == torch.bool else self.answer
        return func(*args, **(kwargs or {}))


def _on_meta(method):
    cfg = method_config(method, ["device=cpu", "model.sie_camera=true"], base="tiny")
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=8, num_cameras=3).to("meta")
    return cfg, model, Runtime(device=torch.device("meta"), amp_dtype=None, output_dir=None)


def _all_on_meta(model, optimizer):
    """Parameters, gradients and optimizer state on the model's device (Adam's 0-d step counts
    stay on the host unless fused, as on CUDA)."""
    wrong = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "meta"]
    wrong += [n for n, p in model.named_parameters() if p.grad is not None and p.grad.device.type != "meta"]
    wrong += [k for state in optimizer.state.values() for k, v in state.items()
              if isinstance(v, torch.Tensor) and v.dim() > 0 and v.device.type != "meta"]
    return wrong


@pytest.mark.parametrize("method", ["baseline", "proposed"])
def test_a_stage1_step_reads_nothing_back(method):
    cfg, model, runtime = _on_meta(method)
    optimizer = make_stage1_optimizer(set_trainable(model, "stage1"), cfg)
    step_module = clipreid.wrap_for_stage1(model, runtime)
    feats = torch.randn(16, model.embed_dim, device="meta")
    labels = torch.randint(0, 8, (16,), device="meta")
    watch = LossWatch(runtime.device)
    model.train()
    with HostReads() as mode:
        for step in (1, 2):          # the second step: Adam's state exists
            watch.update(stage1_step(step_module, optimizer, feats, labels, runtime), step)
    assert mode.reads == []
    assert _all_on_meta(model, optimizer) == []


@pytest.mark.parametrize("method", ["baseline", "proposed"])
def test_a_stage2_step_reads_nothing_back(method):
    cfg, model, runtime = _on_meta(method)
    stage = ImageEncoderStage(2, "image encoder")
    optimizer = stage.optimizer(stage.trainable(model), StageContext(model, None, cfg, runtime))
    stage.text_feats, stage.loss_fn = model.all_text_features().float(), make_loss(cfg)
    images = torch.randn(16, 3, *cfg.model.image_size, device="meta")
    pids = torch.arange(4, device="meta").repeat_interleave(4)
    cams = torch.zeros(16, dtype=torch.long, device="meta")
    watch = LossWatch(runtime.device)
    model.train()
    with HostReads() as mode:
        for step in (1, 2):
            loss, parts = image_step(model, optimizer, stage.loss, images, pids, cams, None, runtime)
            watch.update(loss, step)
            sums = {name: value.float() for name, value in {"loss": loss, **parts}.items()}
    assert mode.reads == [] and all(v.device.type == "meta" for v in sums.values())
    assert _all_on_meta(model, optimizer) == []


def test_gpu_augmentation_reads_nothing_back():
    from reidlib.data.transforms import gpu_train_augment
    cfg = reidlib.load_config("tiny")
    images = torch.zeros(16, 3, *cfg.model.image_size, dtype=torch.uint8, device="meta")
    with HostReads() as mode:
        out = gpu_train_augment(images, cfg.data)
    assert mode.reads == [] and out.device.type == "meta" and out.dtype == torch.float32


def test_the_harness_catches_a_host_read():
    """The EOT position read from the device, as stage 1 did before it became a Python int."""
    _, model, _ = _on_meta("baseline")
    labels = torch.tensor([0, 1], device="meta")
    with HostReads(answer=model.prompts.eot) as mode:
        model.text(model.prompts.tokens, model.prompts(labels))          # eot=None: found by argmax
    assert len(mode.reads) == 1 and "forward" in mode.reads[0]
    with HostReads() as mode:
        model.encode_text(labels)
    assert mode.reads == []


def test_caption_retrieval_compares_on_the_model_device():
    from reidlib.demo.zeroshot import caption_retrieval
    from reidlib.model import load_clip
    clip = load_clip("vit-tiny8", "none").to("meta")
    images = torch.zeros(3, 3, 128, 64, dtype=torch.uint8)
    with HostReads():                  # the rank-1 rates are read back at the end: 0 here
        result = caption_retrieval(clip, images, ["a", "b", "c"])
    assert result["n"] == 3


# --------------------------------------------------------------------------- TF32, seeds, checkpoints

def test_tf32_mode_sets_and_restores_both_switches():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with pytest.raises(KeyError):
        with tf32_mode(True):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
            with tf32_mode(False):
                assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            assert torch.backends.cuda.matmul.allow_tf32
            raise KeyError("restored on the way out of an error too")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_training_runs_with_tf32_and_test_features_without(small_generated, tmp_path, monkeypatch, one_thread):
    seen = {}
    def spy(name, function):
        def wrapped(*args, **kwargs):
            seen.setdefault(name, torch.backends.cuda.matmul.allow_tf32)
            return function(*args, **kwargs)
        return wrapped
    monkeypatch.setattr(trainer, "evaluate_model", spy("test", trainer.evaluate_model))
    monkeypatch.setattr(ImageEncoderStage, "train_epoch", spy("train", ImageEncoderStage.train_epoch))
    before = torch.backends.cuda.matmul.allow_tf32
    reidlib.train(tiny(small_generated, tmp_path))
    assert seen == {"train": True, "test": False}
    assert torch.backends.cuda.matmul.allow_tf32 == before           # nothing left switched for the process
    seen.clear()
    reidlib.train(tiny(small_generated, tmp_path / "b", "tf32=false", "test.tf32=true"))
    assert seen == {"train": False, "test": True}


def test_each_rank_has_its_own_epoch_seed_and_rank_0_keeps_todays():
    today = lambda seed, stage, epoch: (seed * 1_000_003 + stage * 10_007 + epoch) % 2**63  # noqa: E731
    for seed, stage, epoch in [(1234, 1, 0), (0, 2, 59), (2**40, 2, 7)]:
        assert epoch_seed(seed, stage, epoch) == epoch_seed(seed, stage, epoch, rank=0) == today(seed, stage, epoch)
        ranks = {epoch_seed(seed, stage, epoch, rank=r) for r in range(8)}
        assert len(ranks) == 8
    # a rank's seeds are not rank 0's seeds of other epochs or seeds either
    rank0 = {epoch_seed(s, st, e) for s in range(4) for st in (1, 2) for e in range(120)}
    assert not rank0 & {epoch_seed(s, st, e, rank=1) for s in range(4) for st in (1, 2) for e in range(120)}


def test_ranks_draw_different_augmentation_from_the_image_cache(small_generated):
    dataset = load_dataset("market1501", small_generated)
    cfg = reidlib.load_config("tiny", ["stage2.ims_per_batch=16"])
    cache = TrainImageCache(dataset.train, cfg.model.image_size, cfg.data.interpolation)

    def first_batch(rank):
        runtime = Runtime(device=torch.device("cpu"), amp_dtype=None, output_dir=None, rank=rank)
        return next(TrainBatches(dataset, cfg, runtime, cache).epoch(0))

    (x0, p0, *_), (x0_again, _, *_), (x1, p1, *_) = first_batch(0), first_batch(0), first_batch(1)
    assert torch.equal(p0, p1)                      # the same images (one sampler seed) ...
    assert torch.equal(x0, x0_again) and not torch.equal(x0, x1)     # ... augmented per rank


def test_image_stage_seeds_its_epoch_with_the_rank(small_generated, tmp_path, monkeypatch, one_thread):
    seeds = []
    monkeypatch.setattr(methods_base, "epoch_seed", lambda *a: seeds.append(a) or epoch_seed(*a))
    cfg = tiny(small_generated, tmp_path)
    dataset = load_dataset("market1501", small_generated)
    model = build_model(cfg.model, dataset.num_train_pids, dataset.num_train_cams)
    runtime = Runtime(device=torch.device("cpu"), amp_dtype=None, output_dir=tmp_path, rank=3)
    ctx = StageContext(model, dataset, cfg, runtime)
    stage = ImageEncoderStage(2, "image encoder")
    optimizer = stage.optimizer(stage.trainable(model), ctx)
    stage.prepare(ctx, optimizer)
    stage.train_epoch(ctx, optimizer, 0)
    assert seeds == [(cfg.seed, 2, 0, 3)]


class FakeCuda(torch.Tensor):
    """A CPU tensor that says it lives on cuda:0; ``.cpu()`` gives a plain CPU tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func == torch.Tensor.device.__get__:      # a new method-wrapper each time: ==, not is
            return torch.device("cuda", 0)
        if func is torch.Tensor.cpu:
            with torch._C.DisableTorchFunctionSubclass():
                return args[0].clone()
        return super().__torch_function__(func, types, args, kwargs or {})


def _fake_cuda(t):
    return t.as_subclass(FakeCuda)


def test_to_cpu_moves_every_tensor_and_keeps_cpu_ones():
    plain = torch.ones(2)
    tree = {"w": _fake_cuda(torch.ones(3)), "state": {0: {"step": _fake_cuda(torch.tensor(2.0))}},
            "rng": [plain, _fake_cuda(torch.zeros(4))], "epoch": 3}
    out = to_cpu(tree)
    leaves = [out["w"], out["state"][0]["step"], *out["rng"]]
    assert all(type(t) is torch.Tensor and t.device.type == "cpu" for t in leaves)
    assert out["rng"][0] is plain and out["epoch"] == 3 and torch.equal(out["w"], torch.ones(3))
    assert to_cpu(out) is out                       # all on the CPU already: the very objects


def test_checkpoints_are_saved_with_cpu_tensors(small_generated, tmp_path, monkeypatch):
    """A GPU run's optimizer state and RNG hold CUDA tensors; what is saved must not."""
    cfg = tiny(small_generated, tmp_path)
    dataset = load_dataset("market1501", small_generated)
    model = build_model(cfg.model, dataset.num_train_pids, dataset.num_train_cams)
    optimizer = torch.optim.Adam(model.parameters())
    model.prompts.per_id.grad = torch.zeros_like(model.prompts.per_id)
    optimizer.step()
    for state in optimizer.state.values():            # as fused Adam on CUDA keeps them
        for key in state:
            state[key] = _fake_cuda(state[key])
    cuda_rng = _fake_cuda(torch.zeros(8, dtype=torch.uint8))
    monkeypatch.setattr(trainer, "capture_rng_state", lambda: {"torch": torch.get_rng_state(), "cuda": [cuda_rng]})
    saved = {}
    monkeypatch.setattr(trainer, "save_checkpoint", lambda path, state: saved.update(state))
    runtime = Runtime(device=torch.device("cpu"), amp_dtype=None, output_dir=tmp_path)
    trainer._save_epoch(runtime, cfg, model, optimizer, 1, 1, dataset)

    def tensors(tree):
        if isinstance(tree, torch.Tensor):
            yield tree
        elif isinstance(tree, dict):
            yield from (t for v in tree.values() for t in tensors(v))
        elif isinstance(tree, (list, tuple)):
            yield from (t for v in tree for t in tensors(v))
    found = list(tensors(saved))
    assert len(found) > 10 and not [t for t in found if isinstance(t, FakeCuda) or t.device.type != "cpu"]


def test_deterministic_switch(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not reidlib.load_config("tiny").deterministic
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
    set_deterministic(False)                         # off leaves torch's own setting alone
    assert not torch.are_deterministic_algorithms_enabled()


def test_torch_floor_is_one_place():
    """pyproject's torch floor is the one doctor checks, and the API the floor is for exists."""
    from reidlib.doctor import TORCH_FLOOR
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floor = next(d for d in project["dependencies"] if d.startswith("torch>="))
    assert floor == "torch>=" + ".".join(map(str, TORCH_FLOOR))
    import inspect
    assert "dynamo" in inspect.signature(torch.onnx.export).parameters


# --------------------------------------------------------------------------- doctor

def test_doctor_reports_a_missing_gpu_as_one_fail_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from reidlib.doctor import run_checks
    lines = [check.line() for check in run_checks("cuda", smoke=False)]
    assert lines[0].startswith("OK torch: ") and lines[-1].startswith("FAIL device: ")
    assert all(line.startswith(("OK ", "FAIL ")) for line in lines)


@pytest.mark.parametrize("capability, precision", [((7, 0), "fp16"), ((9, 0), "bf16")])
def test_doctor_gpu_lines_for_made_up_cards(monkeypatch, capability, precision):
    """The doctor's CUDA branch, run against made-up cards (two, of compute capability 7.0 or 9.0)."""
    from reidlib import doctor
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Made-up GPU")
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 21, 5))
    monkeypatch.setattr(doctor, "device_memory", lambda device: (30 * GiB, 32 * GiB))
    monkeypatch.setattr(doctor, "_driver_version", lambda: "550.54.15")
    lines = [c.line() for c in [*doctor.check_devices(torch.device("cuda", 0)),
                                doctor.check_distributed(torch.device("cuda", 0))]]
    assert lines[:3] == ["OK driver: 550.54.15",
                         f"OK cuda:0: Made-up GPU, compute capability {capability[0]}.{capability[1]}, "
                         "30.0 of 32.0 GiB free",
                         f"OK cuda:1: Made-up GPU, compute capability {capability[0]}.{capability[1]}, "
                         "30.0 of 32.0 GiB free"]
    assert lines[3].startswith(f"OK precision: auto on cuda:0 trains in {precision}")
    assert ("not on this card" in lines[4]) == (precision == "fp16")
    assert ("not available" in lines[5]) == (precision == "fp16")
    assert lines[-1] == "OK nccl: 2.21.5, 2 GPU(s) for torchrun"


@pytest.mark.slow
def test_doctor_on_the_cpu(small_generated, tmp_path):
    """``python -m reidlib doctor --device cpu``: every line OK, the smoke run among them (~20 s)."""
    done = subprocess.run([sys.executable, "-m", "reidlib", "doctor", "--device", "cpu",
                           "--data", str(small_generated)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert all(line.startswith("OK ") for line in lines), lines
    names = [line[3:].split(":")[0] for line in lines]
    assert {"torch", "open_clip", "peft", "device", "distributed", "image cache", "generated data",
            "smoke run", "checkpoint"} <= set(names), names
