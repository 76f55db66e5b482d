"""Shared fixtures: a generated Market-format data set and a briefly trained tiny model."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub from the tests

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: on a small, busy CPU, thread hand-offs cost more than they save."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small generated Market-1501-format folder (24 ids: 12 train, 12 test, 3 cameras)."""
    from reidlib.demo.synth import generate_market
    return generate_market(tmp_path_factory.mktemp("synth") / "market", ids=24, cams=3, seed=5)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The demo's generated data set (60 ids: 30 train, 30 test, 4 cameras, seed 0), made once."""
    from reidlib.demo.synth import generate_market
    return generate_market(tmp_path_factory.mktemp("demo_data") / "synth", ids=60, cams=4, seed=0)


@pytest.fixture(scope="session")
def small_generated(tmp_path_factory):
    """A very small generated set with distractors and junk (8 ids, 3 cameras, seed 3), made once."""
    from reidlib.demo.synth import generate_market
    return generate_market(tmp_path_factory.mktemp("small"), seed=3, **SMALL_SET)


SMALL_SET = dict(ids=8, cams=3, images_per_id=6, distractors=3, junk=2)


@pytest.fixture(scope="session")
def tiny_trained(synth_root, tmp_path_factory):
    """(cfg, run folder) of the tiny baseline trained for one epoch per stage."""
    import reidlib
    out = tmp_path_factory.mktemp("tiny_run")
    cfg = reidlib.method_config("baseline", [f"data.root={synth_root}", f"output_dir={out}",
                                             "device=cpu", "stage1.epochs=1", "stage2.epochs=1",
                                             "stage2.ims_per_batch=16"], base="tiny")
    reidlib.train(cfg)
    return cfg, out


@pytest.fixture(scope="session")
def proposed_trained(synth_root, tmp_path_factory):
    """(cfg, run folder) of the tiny proposed method (deep prompts, LoRA), one epoch per stage:
    a second model beside ``tiny_trained`` for the retrieval explorer's comparisons."""
    import reidlib
    out = tmp_path_factory.mktemp("tiny_proposed")
    cfg = reidlib.method_config("proposed", [f"data.root={synth_root}", f"output_dir={out}",
                                             "device=cpu", "stage1.epochs=1", "stage2.epochs=1",
                                             "stage2.ims_per_batch=16"], base="tiny")
    reidlib.train(cfg)
    return cfg, out


@pytest.fixture(scope="session")
def miniature(tmp_path_factory):
    """(checkpoint path, recipe) of the miniature CLIP pretrained for the tests: the demo's recipe
    with 300 steps instead of 500 (about a minute on 2 cores), built once per session by
    ``python -m reidlib pretrain``, as the demo builds it (a process of its own, whose torch threads
    sleep while they wait: threads spinning in this process crawl when other jobs share the cores)."""
    import subprocess
    import sys

    from filelock import FileLock

    from reidlib.demo.pretrain import PretrainRecipe, miniature_path
    recipe = PretrainRecipe(steps=300, warmup_steps=30)
    # one build for the whole run: under pytest-xdist (`make test` runs two workers) the workers share
    # the base temp folder's parent, and the second finds the first's checkpoint in the cache
    cache = tmp_path_factory.getbasetemp().parent / "miniature"
    cache.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "reidlib", "pretrain", "--cache", str(cache), "--steps", str(recipe.steps),
               "--warmup-steps", str(recipe.warmup_steps)]
    with FileLock(str(cache) + ".lock"):
        done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return miniature_path(recipe, cache), recipe


def untrained_metrics(cfg, dataset) -> dict:
    """Test metrics of ``cfg``'s method's model as built before training (seeded with ``cfg.seed``,
    as ``reidlib.train`` builds it): the start a learning test compares the trained model with."""
    import torch

    import reidlib
    from reidlib.eval.inference import evaluate_model
    from reidlib.runtime import setup_runtime
    torch.manual_seed(cfg.seed)
    untrained = reidlib.methods.build(cfg, dataset.num_train_pids, dataset.num_train_cams)
    return evaluate_model(untrained, dataset, cfg, setup_runtime(cfg), progress=False)


class KilledRun(Exception):
    """Stands for a kill -9 in the middle of an epoch."""


@pytest.fixture
def train_killed_in_epoch(monkeypatch):
    """``train_killed_in_epoch(cfg, stage_class, epoch)``: ``reidlib.train(cfg)`` killed as
    ``stage_class`` starts its 0-based ``epoch``, leaving the run folder as a kill would; the stage
    trains normally again afterwards, so a second ``train(cfg)`` resumes."""
    import reidlib

    def run(cfg, stage_class, epoch: int) -> None:
        original = stage_class.train_epoch

        def dies(self, ctx, optimizer, number):
            if number == epoch:
                raise KilledRun()
            return original(self, ctx, optimizer, number)

        monkeypatch.setattr(stage_class, "train_epoch", dies)
        try:
            with pytest.raises(KilledRun):
                reidlib.train(cfg)
        finally:
            monkeypatch.setattr(stage_class, "train_epoch", original)
    return run
