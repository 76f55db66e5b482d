"""The two-stage run users start: ``reidlib.train(cfg)`` and ``reidlib.test(cfg)``.

A run folder holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON object per
epoch and evaluation), resumable checkpoints, ``model_final.pt`` and ``metrics.json`` (the final
model's test metrics: the model is never selected on the test set).

Example::

    from reidlib import load_config, train
    cfg = load_config("tiny", ["data.root=data/synth", "output_dir=results/runs/try"])
    metrics = train(cfg)          # {'rank1': ..., 'mAP': ..., ...}
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml

from ..config import Config, method_of, to_dict
from ..data import TrainBatches, dataset_from_config, make_image_cache
from ..eval.extract import check_valid_queries, evaluate_model
from ..files import load_checkpoint, remove_stale_temp_files, require_file, save_checkpoint, write_json
from ..model import build_model, parameter_table, set_trainable
from ..model.io import load_trained_model, model_record
from ..runtime import Runtime, gather_tensor, seed_everything, setup_runtime
from .checkpoint import (
    RESUME_IGNORE,
    capture_rng_state,
    check_config_match,
    checkpoint_name,
    find_latest_checkpoint,
    restore_rng_state,
)
from .nonfinite import check_finite_weights
from .preflight import check_before_training
from .stage1 import (
    cache_image_features,
    make_stage1_optimizer,
    make_stage1_scheduler,
    stage1_images,
    train_stage1_epoch,
    wrap_for_stage1,
)
from .stage2 import make_loss, make_stage2_optimizer, train_stage2_epoch, wrap_for_stage2

log = logging.getLogger("reidlib")


def _save_epoch(runtime: Runtime, cfg: Config, model, optimizer, stage: int, epoch: int,
                dataset) -> None:
    """Resumable state after ``epoch`` completed epochs of ``stage``; older ones are removed
    (only once the new one is on disk, and never for weights that are not finite)."""
    # on every rank, so that under torchrun all of them stop together (their weights are the same)
    check_finite_weights(model.state_dict(), f"stage {stage} epoch {epoch}")
    if not runtime.is_main:
        return
    path = runtime.output_dir / checkpoint_name(stage, epoch)
    record = _final_record(model, cfg, dataset)
    save_checkpoint(path, {
        "stage": stage, "epoch": epoch, "optimizer": optimizer.state_dict(), "rng": capture_rng_state(),
        **record,
    })
    for old in runtime.output_dir.glob("checkpoint_stage*_e*.pt"):
        if old != path:
            old.unlink()


def _should_save(epoch: int, total: int, period: int) -> bool:
    return epoch == total or (period > 0 and epoch % period == 0)


def _resume_state(cfg: Config, runtime: Runtime) -> dict | None:
    if cfg.resume == "none":
        return None
    path = find_latest_checkpoint(runtime.output_dir) if cfg.resume == "auto" else Path(cfg.resume)
    if path is None:
        return None
    state = load_checkpoint(path, map_location="cpu")
    check_config_match(state["config"], to_dict(cfg), ignore=RESUME_IGNORE)
    log.info("resuming from %s (stage %d, %d epochs done)", path, state["stage"], state["epoch"])
    runtime.log_metrics({"event": "resume", "checkpoint": str(path), "stage": state["stage"],
                         "epoch": state["epoch"]})
    return state


def run_stage1(model, dataset, cfg: Config, runtime: Runtime, resume: dict | None,
               image_cache=None) -> list[int]:
    """Stage 1 from the start or a resumed epoch; returns the training images it found unreadable."""
    params = set_trainable(model, "stage1")
    optimizer = make_stage1_optimizer(params, cfg)
    start = 0
    if resume is not None and resume["stage"] == 1:
        optimizer.load_state_dict(resume["optimizer"])
        start = resume["epoch"]
    if start >= cfg.stage1.epochs:
        return []
    scheduler = make_stage1_scheduler(optimizer, cfg)
    # The GPU image cache is resized with the train interpolation; stage 1 wants the test one.
    same_resize = cfg.data.interpolation == cfg.data.test_interpolation
    images = stage1_images(dataset.train, cfg)
    feats, labels = cache_image_features(model, images, cfg, runtime,
                                         image_cache if same_resize else None)
    step_module = wrap_for_stage1(model, runtime)
    for epoch in range(start, cfg.stage1.epochs):
        record = train_stage1_epoch(model, step_module, optimizer, scheduler, feats, labels, epoch, cfg,
                                    runtime)
        runtime.log_metrics(record)
        if runtime.is_main:
            log.info("stage 1 epoch %d/%d loss %.4f lr %.2e", epoch + 1, cfg.stage1.epochs,
                     record["loss"], record["lr"])
        if _should_save(epoch + 1, cfg.stage1.epochs, cfg.stage1.checkpoint_period):
            _save_epoch(runtime, cfg, model, optimizer, 1, epoch + 1, dataset)
    return images.unreadable_indices


def run_stage2(model, dataset, cfg: Config, runtime: Runtime, resume: dict | None,
               image_cache=None) -> list[int]:
    """Stage 2 from the start or a resumed epoch; returns the training images it found unreadable."""
    params = set_trainable(model, "stage2")
    if runtime.is_main:
        log.info("stage 2 parameters:\n%s", parameter_table(model))
    optimizer = make_stage2_optimizer(params, cfg, model.uses_lora)
    start = 0
    if resume is not None and resume["stage"] == 2:
        optimizer.load_state_dict(resume["optimizer"])
        start = resume["epoch"]
    if start >= cfg.stage2.epochs:
        return []
    text_feats = model.all_text_features().float()  # prompts are frozen from here on
    batches = TrainBatches(dataset, cfg, runtime, image_cache)
    train_module = wrap_for_stage2(model, runtime, cfg.compile)
    loss_fn = make_loss(cfg)
    for epoch in range(start, cfg.stage2.epochs):
        record = train_stage2_epoch(model, train_module, optimizer, batches, loss_fn, text_feats,
                                    epoch, cfg, runtime)
        runtime.log_metrics(record)
        if runtime.is_main:
            log.info("stage 2 epoch %d/%d loss %.4f lr %.2e %.0f img/s", epoch + 1,
                     cfg.stage2.epochs, record["loss"], record["lr"], record["img_per_s"])
        done = epoch + 1
        if cfg.stage2.eval_period > 0 and done % cfg.stage2.eval_period == 0 and done < cfg.stage2.epochs:
            metrics = evaluate_model(model, dataset, cfg, runtime, progress=False)
            runtime.log_metrics({"stage": 2, "epoch": done, "eval": metrics})
        if _should_save(done, cfg.stage2.epochs, cfg.stage2.checkpoint_period):
            _save_epoch(runtime, cfg, model, optimizer, 2, done, dataset)
    return batches.unreadable_indices


def _load_stage1_prompts(model, path: str) -> None:
    state = load_checkpoint(path, map_location="cpu")
    prompts = {k: v for k, v in state["model"].items() if k.startswith("prompts.")}
    if not prompts:
        raise ValueError(f"{path}: no prompt weights in this checkpoint; pass a stage-1 or final checkpoint")
    missing = model.load_state_dict(prompts, strict=False)
    if any(k.startswith("prompts.") for k in missing.missing_keys):
        raise ValueError(f"{path}: prompt shapes do not match this config (number of identities or prompt settings)")


def _count_over_ranks(indices: list[int], runtime: Runtime) -> int:
    """How many distinct items the ranks found, together (each rank reads its own share)."""
    local = torch.tensor(sorted(set(indices)), dtype=torch.long)
    return len(torch.unique(gather_tensor(local.to(runtime.device), runtime)))


def _final_record(model, cfg: Config, dataset) -> dict:
    """The model and its card, as every checkpoint of a run holds them."""
    return model_record(model, cfg, dataset.num_train_pids, dataset.num_train_cams, num_views=dataset.num_views,
                        dataset=dataset)


def _save_final(runtime: Runtime, record: dict) -> None:
    save_checkpoint(runtime.output_dir / "model_final.pt", record)


def train(cfg: Config, dataset=None) -> dict:
    """Run stage 1 and stage 2 (resuming from the run folder when asked) and evaluate the final
    model on query/gallery. Returns the metrics dict also written to ``metrics.json``.

    Before any training: the output folder must be writable, stage 2's P x K batches possible and
    at least one query scorable (:mod:`~reidlib.engine.preflight`). A non-finite loss stops the
    run; ``model_final.pt`` is written before the final evaluation and again with its metrics."""
    runtime = setup_runtime(cfg)
    if runtime.is_main:
        stale = remove_stale_temp_files(runtime.output_dir)
        if stale:
            log.info("removed %d temp file(s) an interrupted save left in %s", len(stale), runtime.output_dir)
        (runtime.output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    dataset = dataset or dataset_from_config(cfg)
    if runtime.is_main:
        log.info("data set %s\n%s", cfg.data.dataset, dataset.stats_table())
    check_before_training(cfg, dataset, runtime)
    seed_everything(cfg.seed)  # before the build: random-init weights depend on it
    model = build_model(cfg.model, num_classes=dataset.num_train_pids, num_cameras=dataset.num_train_cams,
                        num_views=dataset.num_views).to(runtime.device)
    resume = _resume_state(cfg, runtime)
    if resume is not None:
        model.load_state_dict(resume["model"])
        restore_rng_state(resume["rng"])
    image_cache = make_image_cache(dataset, cfg, runtime)
    unreadable = list(image_cache.unreadable_indices) if image_cache is not None else []
    if cfg.stage1_weights and resume is None:
        _load_stage1_prompts(model, cfg.stage1_weights)
    elif resume is None or resume["stage"] == 1:
        unreadable += run_stage1(model, dataset, cfg, runtime, resume, image_cache)
    unreadable += run_stage2(model, dataset, cfg, runtime, resume if resume and resume["stage"] == 2 else None,
                             image_cache)
    del image_cache
    num_unreadable = _count_over_ranks(unreadable, runtime)
    check_finite_weights(model.state_dict(), "the final model")  # every rank, as at each epoch
    if runtime.is_main:
        if num_unreadable:
            log.warning("%d unreadable training image(s) in total, each replaced by another image of the "
                        "same person", num_unreadable)
        # Saved before the evaluation, so that a failing evaluation cannot lose the trained model.
        _save_final(runtime, _final_record(model, cfg, dataset))
    metrics = evaluate_model(model, dataset, cfg, runtime)
    metrics["num_unreadable_train_images"] = num_unreadable
    if runtime.is_main:
        _save_final(runtime, {**_final_record(model, cfg, dataset), "metrics": metrics})
        summary = {"dataset": cfg.data.dataset, "method": method_of(cfg), "seed": cfg.seed,
                   **metrics}
        runtime.log_metrics({"stage": "final", "eval": metrics})
        write_json(runtime.output_dir / "metrics.json", summary)
        log.info("final: R1 %.2f  mAP %.2f  mINP %.2f  (%s)", 100 * metrics["rank1"],
                 100 * metrics["mAP"], 100 * metrics["mINP"], metrics["protocol"])
    runtime.close()
    return metrics


def test(cfg: Config, weights: str | None = None, dataset=None) -> dict:
    """Evaluate a trained model (``weights`` or ``cfg.test.weights``) on the configured data set."""
    weights = weights or cfg.test.weights
    if not weights:
        raise ValueError("no weights given: pass weights=PATH (a model_final.pt or checkpoint)")
    require_file(weights)
    runtime = setup_runtime(cfg)
    dataset = dataset or dataset_from_config(cfg)
    check_valid_queries(dataset)  # before the model is loaded and any image encoded
    model, _ = load_trained_model(weights, cfg, device=runtime.device)
    metrics = evaluate_model(model, dataset, cfg, runtime)
    if runtime.is_main:
        write_json(runtime.output_dir / "test_metrics.json", {"weights": str(weights), **metrics})
    runtime.close()
    return metrics
