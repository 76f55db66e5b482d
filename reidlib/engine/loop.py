"""The one stage loop: any method's stages, in order, with what every stage shares.

For each stage of the method: leave it out when a resumed run is past it, or when it stands aside
(:meth:`~reidlib.methods.Stage.skip`); otherwise set its trainable parameters, build its optimizer
(restoring the optimizer's state when the run resumes inside this stage), prepare it, and train
the epochs left. After every epoch: one record in ``metrics.jsonl`` (and TensorBoard, through the
runtime's sinks: :mod:`.tensorboard_log`) and one log line, an
evaluation every ``eval_period`` epochs (logged, never used to pick a model), and a resumable
checkpoint every ``checkpoint_period`` epochs and at the stage's end, written only with finite
weights and named after the stage and epoch.

Example::

    ctx = StageContext(model, dataset, cfg, runtime, image_cache)
    unreadable = run_stages(get_method(cfg.method), ctx, resume=None, save=save_epoch)
"""
from __future__ import annotations

import logging

from ..eval.inference import evaluate_model
from ..methods import Stage, StageContext
from ..methods.base import log_parameters
from ..runtime import tf32_mode

log = logging.getLogger("reidlib")


def _due(epoch: int, total: int, period: int) -> bool:
    return epoch == total or (period > 0 and epoch % period == 0)


def _epoch_line(record: dict, total: int) -> str:
    line = f"stage {record['stage']} epoch {record['epoch']}/{total} loss {record['loss']:.4f} lr {record['lr']:.2e}"
    return line + (f" {record['img_per_s']:.0f} img/s" if "img_per_s" in record else "")


def run_stage(stage: Stage, ctx: StageContext, resume: dict | None, save) -> list[int]:
    """Train ``stage`` from its start, or from the epoch ``resume`` (a checkpoint of this stage)
    stopped at; ``save(optimizer, stage_number, epochs_done)`` writes a checkpoint. Returns the
    training images the stage found unreadable."""
    cfg, runtime, model = ctx.cfg, ctx.runtime, ctx.model
    params = stage.trainable(model)
    log_parameters(model, runtime, stage, log)
    optimizer = stage.optimizer(params, ctx)
    start = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        start = resume["epoch"]
    epochs = stage.epochs(cfg)
    if start >= epochs:
        return []
    stage.prepare(ctx, optimizer)
    for epoch in range(start, epochs):
        record = stage.train_epoch(ctx, optimizer, epoch)
        # the LR of every parameter group (the record's "lr" is the first's): the schedule after the epoch
        record.setdefault("lr_groups", [group["lr"] for group in optimizer.param_groups])
        runtime.log_metrics(record)     # metrics.jsonl, and the runtime's sinks (TensorBoard)
        if runtime.is_main:
            log.info(_epoch_line(record, epochs))
        done = epoch + 1
        period = stage.eval_period(cfg)
        if period > 0 and done % period == 0 and done < epochs:
            with tf32_mode(cfg.test.tf32):
                metrics = evaluate_model(model, ctx.dataset, cfg, runtime, progress=False)
            runtime.log_metrics({"stage": stage.number, "epoch": done, "eval": metrics})
            if runtime.is_main:
                log.info("stage %d epoch %d/%d test: R1 %.2f  mAP %.2f", stage.number, done, epochs,
                         100 * metrics["rank1"], 100 * metrics["mAP"])
        if _due(done, epochs, stage.checkpoint_period(cfg)):
            save(optimizer, stage.number, done)
    return stage.unreadable_indices


def run_stages(stages: list[Stage], ctx: StageContext, resume: dict | None, save) -> list[int]:
    """Every stage in order (see :func:`run_stage`); a resumed run starts in the checkpoint's stage.
    Returns the unreadable training images all stages found."""
    unreadable: list[int] = []
    for stage in stages:
        if resume is not None and resume["stage"] > stage.number:
            continue                    # finished before the checkpoint was written
        if resume is None and stage.skip(ctx):
            continue
        here = resume if resume is not None and resume["stage"] == stage.number else None
        unreadable += run_stage(stage, ctx, here, save)
    return unreadable
