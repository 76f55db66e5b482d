"""Training primitives that methods build their stages from: per-epoch LR schedules
(:mod:`.schedule`) and the non-finite loss and weight checks (:mod:`.nonfinite`).

Example::

    from reidlib.optim import LossWatch, set_epoch_lr, stage2_schedule
    set_epoch_lr(optimizer, epoch + 1, stage2_schedule(milestones=(30, 50)))
"""
from .nonfinite import LossWatch, NonFiniteError, check_finite_weights, non_finite_entries
from .schedule import set_epoch_lr, stage1_scheduler, stage2_schedule, warmup_multistep

__all__ = ["LossWatch", "NonFiniteError", "check_finite_weights", "non_finite_entries", "set_epoch_lr",
           "stage1_scheduler", "stage2_schedule", "warmup_multistep"]
