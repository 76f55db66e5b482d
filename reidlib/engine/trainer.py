"""The run users start: ``reidlib.train(cfg)`` (any registered method) and ``reidlib.test(cfg)``.

A run folder holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON object per
epoch and evaluation), ``tensorboard/`` (the same records as TensorBoard event files, unless
``tensorboard=false``: :mod:`.tensorboard_log`), resumable checkpoints, ``model/`` (the trained
model: ``model.safetensors`` and its card ``config.json``) and ``metrics.json`` (the final
model's test metrics: the model is never selected on the test set).

From Python, as on the command line, a run logs its progress (the data set, a line per epoch, the
final metrics) unless logging is configured already: :func:`reidlib.runtime.default_logging`.
Nothing is written before the inputs are checked (the config, the method's settings, the data set
and what training needs of it).

Example::

    from reidlib import load_config, train
    cfg = load_config("tiny", ["data.root=data/synth", "output_dir=results/runs/try"])
    metrics = train(cfg)          # {'rank1': ..., 'mAP': ..., ...}
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path

import torch
import yaml

from ..config import Config, to_dict, validate
from ..data import dataset_from_config, make_image_cache, usable_workers
from ..eval.inference import check_valid_queries, evaluate_model
from ..methods import StageContext, method_for, run_label
from ..methods import build as build_method_model
from ..methods.trained import load_trained_model
from ..optim import check_finite_weights
from ..runtime import (
    Runtime,
    default_logging,
    gather_tensor,
    seed_everything,
    setup_runtime,
    tf32_mode,
    to_cpu,
)
from ..storage import (
    load_checkpoint,
    lock_folder,
    remove_stale_temp_files,
    require_file,
    save_checkpoint,
    write_json,
)
from ..weights import final_model, model_record, save_trained
from ..weights.trained import MODEL_FOLDER
from .checkpoint import (
    RESUME_IGNORE,
    capture_rng_state,
    check_config_match,
    check_train_list,
    checkpoint_name,
    find_latest_checkpoint,
    restore_rng_state,
    train_list_fingerprint,
)
from .loop import run_stages
from .preflight import check_before_training
from .tensorboard_log import FOLDER as TENSORBOARD_FOLDER
from .tensorboard_log import TensorBoardLog, stage_offsets

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
    scaler = {"scaler": runtime.scaler.state_dict()} if runtime.scaler is not None else {}
    # to_cpu: a GPU run's tensors (weights, Adam's moments, fused Adam's steps) load on any machine
    save_checkpoint(path, to_cpu({
        "stage": stage, "epoch": epoch, "optimizer": optimizer.state_dict(), "rng": capture_rng_state(),
        "train_list": train_list_fingerprint(dataset), **scaler, **record,
    }))
    for old in runtime.output_dir.glob("checkpoint_stage*_e*.pt"):
        if old != path:
            old.unlink()


def _resume_state(cfg: Config, runtime: Runtime, dataset) -> dict | None:
    if cfg.resume == "none":
        return None
    path = find_latest_checkpoint(runtime.output_dir) if cfg.resume == "auto" else Path(cfg.resume)
    if path is None:
        return None
    state = {} if path.is_dir() else load_checkpoint(path, map_location="cpu")   # a folder: a final model
    if not (isinstance(state, dict) and {"stage", "epoch", "optimizer", "rng"} <= set(state)):
        raise ValueError(f"resume={path}: a trained model, not a resumable checkpoint (checkpoint_stage*_e*.pt, "
                         "with the optimizer's state); to continue a run pass resume=auto, to start from these "
                         "weights pass model.pretrained=PATH")
    check_config_match(state["config"], to_dict(cfg), ignore=RESUME_IGNORE)
    check_train_list(state.get("train_list"), train_list_fingerprint(dataset), path, cfg.data.root)
    log.info("resuming from %s (stage %d, %d epochs done)", path, state["stage"], state["epoch"])
    runtime.log_metrics({"event": "resume", "checkpoint": str(path), "stage": state["stage"],
                         "epoch": state["epoch"]})
    return state


def _count_over_ranks(indices: list[int], runtime: Runtime) -> int:
    """How many distinct items the ranks found, together (each rank reads its own share)."""
    local = torch.tensor(sorted(set(indices)), dtype=torch.long)
    return len(torch.unique(gather_tensor(local.to(runtime.device), runtime)))


def _final_record(model, cfg: Config, dataset) -> dict:
    """The model and its card, as every checkpoint of a run holds them."""
    record = model_record(model, cfg, dataset.num_train_pids, dataset.num_train_cams, num_views=dataset.num_views,
                          dataset=dataset)
    return {**record, "method": run_label(cfg)}


def _save_final(runtime: Runtime, record: dict) -> None:
    """The trained model as a folder: model.safetensors + config.json (the card), read without pickle."""
    card = {k: v for k, v in record.items() if k != "model"}
    save_trained(final_model(runtime.output_dir).with_name(MODEL_FOLDER), to_cpu(record["model"]), card)


def train(cfg: Config, dataset=None) -> dict:
    """Train ``cfg.method``'s stages (resuming from the run folder when asked) and evaluate the
    final model on query/gallery. Returns the metrics dict also written to ``metrics.json``.

    Before anything is written (the run folder included): the config valid, the method's settings
    and the data set readable, stage 2's P x K batches possible and at least one query scorable
    (:mod:`~reidlib.engine.preflight`); then the output folder must be writable. A non-finite loss
    stops the run; the model folder is written before the final evaluation and again with its
    metrics. The run holds a lock on its folder: a second process training there fails at once.
    Logs its progress to stdout unless logging is configured (:func:`~reidlib.runtime.default_logging`)."""
    default_logging()
    validate(cfg)         # a config changed in Python never went through load_config's checks
    _check_input_files(cfg)
    method = method_for(cfg)
    method.check(cfg)     # a setting the method cannot train with
    main = os.environ.get("RANK", "0") == "0"
    cfg = _with_usable_workers(cfg, quiet=not main)
    dataset = dataset or dataset_from_config(cfg)           # a missing data set fails here
    check_before_training(cfg, dataset, int(os.environ.get("WORLD_SIZE", "1")))
    # rank 0 only under torchrun: the ranks of one run share its folder
    with lock_folder(cfg.output_dir) if main else _no_lock():
        return _train(cfg, method, dataset)


def _with_usable_workers(cfg: Config, quiet: bool = False) -> Config:
    """``cfg``, or a copy whose ``data.num_workers`` is at most the CPU cores this process may use
    (the caller's config is left as it is)."""
    workers = usable_workers(cfg.data.num_workers, quiet=quiet)
    if workers == cfg.data.num_workers:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.data.num_workers = workers
    return cfg


@contextlib.contextmanager
def _no_lock():
    yield


def _check_input_files(cfg: Config) -> None:
    """A missing resume= or stage1_weights= file, named by its own key (not "pass weights=")."""
    hints = {"resume": "pass resume=auto (the run folder's latest checkpoint), resume=none, or a "
                       "checkpoint_stage*_e*.pt",
             "stage1_weights": "pass a checkpoint of a run whose stage 1 finished (checkpoint_stage*_e*.pt)"}
    for key, hint in hints.items():
        value = getattr(cfg, key)
        if value and value not in ("auto", "none") and not Path(value).exists():
            raise FileNotFoundError(f"{key}={value}: no such file; {hint}")


def _train(cfg: Config, method, dataset) -> dict:
    runtime = setup_runtime(cfg)
    try:
        return _train_in(cfg, method, dataset, runtime)
    finally:
        runtime.close_sinks()     # the event files complete, also when the run fails


def _train_in(cfg: Config, method, dataset, runtime: Runtime) -> dict:
    if runtime.is_main:
        stale = remove_stale_temp_files(runtime.output_dir)
        if stale:
            log.info("removed %d temp file(s) an interrupted save left in %s", len(stale), runtime.output_dir)
        (runtime.output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        log.info("data set %s\n%s", cfg.data.dataset, dataset.stats_table())
    seed_everything(cfg.seed)  # before the build: random-init weights depend on it
    model = build_method_model(cfg, num_classes=dataset.num_train_pids, num_cameras=dataset.num_train_cams,
                               num_views=dataset.num_views).to(runtime.device)
    resume = _resume_state(cfg, runtime, dataset)
    stages = method.stages(cfg)
    if cfg.tensorboard and runtime.is_main:
        offsets = stage_offsets(stages, cfg)
        done = offsets.get(resume["stage"], 0) + resume["epoch"] if resume is not None else 0
        try:
            runtime.sinks.append(TensorBoardLog(runtime.output_dir / TENSORBOARD_FOLDER, offsets, resume_step=done))
        except ImportError as err:     # a core dependency, but an environment may lack it
            log.warning("no TensorBoard event files (%s): pip install tensorboard, or set tensorboard=false", err)
    if resume is not None:
        model.load_state_dict(resume["model"])
        restore_rng_state(resume["rng"])
        if runtime.scaler is not None and resume.get("scaler"):
            runtime.scaler.load_state_dict(resume["scaler"])     # fp16: the loss scale it had reached
    image_cache = make_image_cache(dataset, cfg, runtime)
    unreadable = list(image_cache.unreadable_indices) if image_cache is not None else []
    ctx = StageContext(model, dataset, cfg, runtime, image_cache)

    def save(optimizer, stage: int, epoch: int) -> None:
        _save_epoch(runtime, cfg, model, optimizer, stage, epoch, dataset)

    with tf32_mode(cfg.tf32):     # for training only: evaluation runs under test.tf32
        unreadable += run_stages(stages, ctx, resume, save)
    del image_cache, ctx
    num_unreadable = _count_over_ranks(unreadable, runtime)
    check_finite_weights(model.state_dict(), "the final model")  # every rank, as at each epoch
    if runtime.is_main:
        if num_unreadable:
            log.warning("%d unreadable training image(s) in total, each replaced by another image of the "
                        "same person", num_unreadable)
        # Saved before the evaluation, so that a failing evaluation cannot lose the trained model.
        _save_final(runtime, _final_record(model, cfg, dataset))
    with tf32_mode(cfg.test.tf32):
        metrics = evaluate_model(model, dataset, cfg, runtime)
    metrics["num_unreadable_train_images"] = num_unreadable
    if runtime.is_main:
        _save_final(runtime, {**_final_record(model, cfg, dataset), "metrics": metrics})
        summary = {"dataset": cfg.data.dataset, "method": run_label(cfg), "seed": cfg.seed,
                   **metrics}
        runtime.log_metrics({"stage": "final", "eval": metrics})
        write_json(runtime.output_dir / "metrics.json", summary)
        log.info("final: R1 %.2f  mAP %.2f  mINP %.2f  (%s)", 100 * metrics["rank1"],
                 100 * metrics["mAP"], 100 * metrics["mINP"], metrics["protocol"])
    runtime.close()
    return metrics


def test(cfg: Config, weights: str | None = None, dataset=None) -> dict:
    """Evaluate a trained model (``weights`` or ``cfg.test.weights``) on the configured data set;
    writes ``test_metrics.json`` to ``cfg.output_dir`` (only once the data set is read)."""
    default_logging()
    validate(cfg)
    weights = weights or cfg.test.weights
    if not weights:
        raise ValueError("no weights given: pass weights=PATH (a run's model folder, a checkpoint or a "
                         "reference state dict)")
    require_file(weights)
    cfg = _with_usable_workers(cfg, quiet=os.environ.get("RANK", "0") != "0")
    dataset = dataset or dataset_from_config(cfg)
    check_valid_queries(dataset)  # before the model is loaded and any image encoded
    runtime = setup_runtime(cfg)
    model, _ = load_trained_model(weights, cfg, device=runtime.device)
    with tf32_mode(cfg.test.tf32):
        metrics = evaluate_model(model, dataset, cfg, runtime)
    if runtime.is_main:
        write_json(runtime.output_dir / "test_metrics.json", {"weights": str(weights), **metrics})
    runtime.close()
    return metrics
