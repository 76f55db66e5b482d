"""TensorBoard event files of a run, written from the records the engine logs to ``metrics.jsonl``.

Every run folder gets ``tensorboard/`` (config key ``tensorboard``; rank 0 only): open it with
``tensorboard --logdir RUN/tensorboard`` (or a sweep's results folder, for all its runs). Nothing
here is called by a method: :class:`TensorBoardLog` is a sink of the run's
:class:`~reidlib.runtime.Runtime`, so whatever a stage's :meth:`~reidlib.methods.Stage.train_epoch`
returns is in TensorBoard too. Tags, from the records:

- an epoch of stage N: ``stageN/loss``; the loss's parts, every other number of the record, as
  ``stageN/<part>_loss`` (CLIP-ReID's stage 2: ``stage2/id_loss``, ``stage2/tri_loss``,
  ``stage2/i2t_loss``; a part already named ``..._loss`` keeps its name); throughput
  ``stageN/img_per_s`` (or any ``..._per_s``: stage 1's ``stage1/prompts_per_s``) and durations in
  seconds (``..._s``: PCL-CLIP's ``stage1/memory_s``) as they are named; the LR of each of
  the optimizer's parameter groups, ``stageN/lr/group0``, ``stageN/lr/group1``, ...;
- an evaluation during training: ``eval/mAP``, ``eval/rank1``, ``eval/rank5``, ``eval/rank10``,
  ``eval/mINP`` (and ``eval/rerank_*`` with re-ranking); the final model's evaluation is the last
  point of these curves;
- the final model's test (``tensorboard/test/``, a run of its own, rewritten by each final
  evaluation): ``test/mAP``, ``test/rank1``, ``test/rank5``, ``test/rank10``, ``test/mINP``, the CMC
  curve ``test/cmc`` (step = rank k, value = matching rate at rank <= k) and ``test/summary`` (text).

Steps count epochs over the whole run: stage 1's epoch e is step e, stage 2's epoch e is step
``stage1 epochs + e``, so that all curves share one axis. A resumed run purges the steps after its
checkpoint (TensorBoard's ``purge_step``) and writes them again: no step is there twice.
"""
from __future__ import annotations

import math
from pathlib import Path

FOLDER = "tensorboard"
TEST_FOLDER = "test"
SKIPPED = ("stage", "epoch", "time", "steps", "lr", "lr_groups")
EVAL_KEYS = ("mAP", "rank1", "rank5", "rank10", "mINP")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def epoch_scalars(record: dict) -> dict[str, float]:
    """tag -> value of one epoch record of stage N (see the module's docstring).

    >>> epoch_scalars({"stage": 2, "epoch": 1, "loss": 3.0, "id": 2.0, "lr": 1e-3, "lr_groups": [1e-3, 2e-3],
    ...                "img_per_s": 40.0, "memory_s": 0.5, "steps": 5, "time": 9.1})
    {'stage2/loss': 3.0, 'stage2/id_loss': 2.0, 'stage2/img_per_s': 40.0, 'stage2/memory_s': 0.5, \
'stage2/lr/group0': 0.001, 'stage2/lr/group1': 0.002}
    """
    stage = f"stage{record['stage']}"
    out = {}
    for key, value in record.items():
        if key in SKIPPED or not _number(value):
            continue
        # a loss part keeps or gets "_loss"; a rate ("_per_s") and a duration in seconds ("_s", such as
        # PCL-CLIP's memory_s) keep their names
        name = key if key.endswith(("loss", "_per_s", "_s")) else f"{key}_loss"
        out[f"{stage}/{name}"] = float(value)
    groups = record.get("lr_groups")
    if isinstance(groups, (list, tuple)) and groups:
        out.update({f"{stage}/lr/group{i}": float(lr) for i, lr in enumerate(groups) if _number(lr)})
    elif _number(record.get("lr")):
        out[f"{stage}/lr/group0"] = float(record["lr"])
    return out


def eval_scalars(metrics: dict, prefix: str = "eval") -> dict[str, float]:
    """``prefix/<metric>`` of an evaluation's metrics: mAP, rank-1/5/10, mINP and their re-ranked
    values (the CMC list and counts left out)."""
    keys = [k for k in EVAL_KEYS if k in metrics] + [f"rerank_{k}" for k in EVAL_KEYS if f"rerank_{k}" in metrics]
    return {f"{prefix}/{k}": float(metrics[k]) for k in keys if _number(metrics[k])}


def stage_offsets(stages, cfg) -> dict[int, int]:
    """stage number -> the steps before its first epoch (the epochs of the stages before it)."""
    offsets, done = {}, 0
    for stage in stages:
        offsets[stage.number] = done
        done += stage.epochs(cfg)
    return offsets


class TensorBoardLog:
    """A :class:`~reidlib.runtime.Runtime` sink: each record logged to ``metrics.jsonl`` goes to
    the event files in ``folder`` as well (see the module's docstring for the tags).

    ``offsets``: :func:`stage_offsets`; ``resume_step``: the step of the checkpoint a resumed run
    starts from (0 for a fresh run): the steps after it, from an earlier process, are purged.
    """

    def __init__(self, folder: str | Path, offsets: dict[int, int], resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # here: it loads tensorboard's protobufs
        self.folder = Path(folder)
        self.offsets = offsets
        self.last_step = resume_step
        self.trained = False          # an epoch trained in this process (else a re-evaluation)
        self.writer = SummaryWriter(str(self.folder), purge_step=resume_step + 1)

    def step(self, record: dict) -> int:
        return self.offsets.get(record.get("stage"), 0) + int(record.get("epoch", 0))

    def __call__(self, record: dict) -> None:
        stage = record.get("stage")
        if isinstance(record.get("eval"), dict):
            if stage == "final":
                self._final(record["eval"])
            else:
                self._scalars(eval_scalars(record["eval"]), self.step(record))
        elif isinstance(stage, int) and "epoch" in record:
            step = self.step(record)
            self._scalars(epoch_scalars(record), step)
            self.trained, self.last_step = True, max(self.last_step, step)

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()     # once per epoch: a run killed later keeps what it logged

    def _final(self, metrics: dict) -> None:
        if self.trained:        # a re-evaluation of a finished run has its point there already
            self._scalars(eval_scalars(metrics), self.last_step)
        write_test(self.folder / TEST_FOLDER, metrics, self.last_step)

    def close(self) -> None:
        self.writer.close()


def write_test(folder: str | Path, metrics: dict, step: int = 0) -> None:
    """The final model's test in ``folder`` (its earlier event files replaced): ``test/<metric>``
    at ``step``, the CMC curve ``test/cmc`` over rank, and a ``test/summary`` text table."""
    from torch.utils.tensorboard import SummaryWriter
    folder = Path(folder)
    for old in folder.glob("events.out.tfevents.*"):
        old.unlink()
    writer = SummaryWriter(str(folder))
    try:
        for tag, value in eval_scalars(metrics, "test").items():
            writer.add_scalar(tag, value, step)
        for rank, value in enumerate(metrics.get("cmc") or [], start=1):
            if _number(value):
                writer.add_scalar("test/cmc", float(value), rank)
        rows = [f"| {k} | {100 * float(metrics[k]):.2f} |" for k in EVAL_KEYS if _number(metrics.get(k))]
        writer.add_text("test/summary", "\n".join(["| metric | % |", "|---|---|", *rows]), step)
    finally:
        writer.close()
