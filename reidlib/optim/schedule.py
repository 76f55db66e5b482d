"""Per-epoch learning-rate schedules of the two stages.

Stage 1 uses timm's ``CosineLRScheduler`` exactly as the reference builds it (its vendored copy of
timm 0.4's ``cosine_lr.py``; timm 1.0's formula is the same), stepped with ``step(epoch)``. Stage 2
uses the reference's ``WarmupMultiStepLR`` written as a pure function ``f(epoch, base_lr) -> lr``
and applied by :func:`set_epoch_lr`. Both are closed forms of the epoch, so a resumed run needs no
scheduler state: it sets the LR of the epoch it resumes at.

Epochs are numbered as the reference numbers them, from 1 in both stages: stage 1 calls
``scheduler.step(epoch)`` with epoch = 1..120, and stage 2's scheduler steps once in its
constructor and once at the start of every epoch. So the first epoch trains at f(1), the last at
f(epochs); the loops pass ``epoch + 1``.

Example::

    scheduler = stage1_scheduler(optimizer, epochs=120)
    for epoch in range(120):
        scheduler.step(epoch + 1)
        train_one_epoch(...)
"""
from __future__ import annotations

import functools
from bisect import bisect_right
from typing import Callable

import torch
from timm.scheduler import CosineLRScheduler

ScheduleFn = Callable[[int, float], float]


def stage1_scheduler(optimizer: torch.optim.Optimizer, epochs: int, warmup_epochs: int = 5,
                     warmup_lr: float = 1e-5, min_lr: float = 1e-6) -> CosineLRScheduler:
    """Stage-1 LR: linear warm-up from ``warmup_lr``, then one cosine cycle down to ``min_lr``.

    timm's closed form, per param group with base ``b`` (its ``initial_lr``)::

        epoch <  warmup_epochs:  lr = warmup_lr + epoch * (b - warmup_lr) / warmup_epochs
        epoch >= epochs:         lr = min_lr                     (past the single cycle)
        otherwise:               lr = min_lr + 0.5 * (b - min_lr) * (1 + cos(pi * epoch / epochs))

    The cosine uses t = epoch, not epoch - warmup_epochs (``warmup_prefix=False``, the reference's
    choice), so the warm-up ends below the base LR and the cosine picks up at
    cos(pi * warmup_epochs / epochs), a small jump.

    >>> opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=3.5e-4)
    >>> scheduler = stage1_scheduler(opt, 120)
    >>> scheduler.step(60); round(opt.param_groups[0]["lr"], 10)     # (base + min) / 2
    0.0001755
    """
    return CosineLRScheduler(optimizer, t_initial=epochs, lr_min=min_lr, warmup_t=warmup_epochs,
                             warmup_lr_init=warmup_lr, cycle_limit=1, t_in_epochs=True)


def warmup_multistep(epoch: int, base_lr: float, milestones=(30, 50), gamma: float = 0.1,
                     warmup_epochs: int = 10, warmup_factor: float = 0.1) -> float:
    """Stage-2 LR: the reference's ``WarmupMultiStepLR`` with linear warm-up, per epoch.

    Exactly::

        factor = warmup_factor * (1 - epoch / warmup_epochs) + epoch / warmup_epochs   if epoch < warmup_epochs
        factor = 1                                                                     otherwise
        lr     = base_lr * factor * gamma ** bisect_right(milestones, epoch)

    so the decay applies from the milestone epoch itself (epoch 30 already has x0.1).

    >>> warmup_multistep(0, 1.0)
    0.1
    >>> warmup_multistep(30, 1.0)
    0.1
    """
    milestones = list(milestones)
    if milestones != sorted(milestones):
        raise ValueError(f"milestones must be increasing, got {milestones}")
    factor = 1.0
    if epoch < warmup_epochs:
        alpha = epoch / warmup_epochs
        factor = warmup_factor * (1 - alpha) + alpha
    return base_lr * factor * gamma ** bisect_right(milestones, epoch)


def stage2_schedule(milestones=(30, 50), gamma: float = 0.1, warmup_epochs: int = 10,
                    warmup_factor: float = 0.1) -> ScheduleFn:
    """``warmup_multistep`` with everything but (epoch, base_lr) bound.

    >>> stage2_schedule()(10, 5e-6)
    5e-06
    """
    return functools.partial(warmup_multistep, milestones=tuple(milestones), gamma=gamma,
                             warmup_epochs=warmup_epochs, warmup_factor=warmup_factor)


def set_epoch_lr(optimizer: torch.optim.Optimizer, epoch: int, schedule_fn: ScheduleFn) -> list[float]:
    """Set every param group's LR for ``epoch`` from its own base LR; returns the LRs.

    A group's base is its ``initial_lr``; a group without one (first call) takes its current
    ``lr`` as the base, so build the groups with their base LRs (bias groups at 2x, say).

    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> set_epoch_lr(opt, 0, stage2_schedule())
    [0.1]
    """
    lrs = []
    for group in optimizer.param_groups:
        base = group.setdefault("initial_lr", group["lr"])
        group["lr"] = schedule_fn(epoch, base)
        lrs.append(group["lr"])
    return lrs
