"""Per-epoch learning-rate schedules of the two stages.

Each schedule is a pure function ``f(epoch, base_lr) -> lr`` (other arguments bound by keyword),
so the LR of any epoch can be computed, tested and resumed without replaying steps. Two ways to
apply one to an optimizer, both setting every param group from its own base LR (``initial_lr``;
e.g. the stage-2 bias groups carry 2x the base):

- :func:`set_epoch_lr` at the start of each epoch (what the loops do), or
- :class:`EpochLR`, a torch ``LRScheduler`` whose ``state_dict`` round-trips through
  ``torch.load(weights_only=True)``.

Epochs count from 0: ``f(0, base)`` is the LR of the first training epoch. The reference
(CLIP-ReID) counts from 1 in both stages — stage 1 calls ``scheduler.step(epoch)`` with
epoch = 1..120, stage 2 calls ``scheduler.step()`` once at the start of every epoch after the
constructor's own step — so its first epoch trains at f(1) and its last at f(epochs). Pass
``epoch + 1`` to reproduce its exact sequence.

Example::

    fn = functools.partial(warmup_multistep, milestones=(30, 50))
    for epoch in range(60):
        set_epoch_lr(optimizer, epoch, fn)
        train_one_epoch(...)
"""
from __future__ import annotations

import functools
import math
from bisect import bisect_right
from typing import Callable

import torch
from torch.optim.lr_scheduler import LRScheduler

ScheduleFn = Callable[[int, float], float]


def cosine_with_warmup(epoch: int, base_lr: float, epochs: int, warmup_epochs: int = 5,
                       warmup_lr: float = 1e-5, min_lr: float = 1e-6) -> float:
    """Stage-1 LR: linear warm-up, then cosine decay (timm ``CosineLRScheduler``).

    Matches timm's ``CosineLRScheduler(t_initial=epochs, lr_min=min_lr, warmup_t=warmup_epochs,
    warmup_lr_init=warmup_lr, cycle_limit=1, t_in_epochs=True)`` stepped with ``step(epoch)``,
    as the reference builds it (its vendored copy of timm 0.4's ``cosine_lr.py``; timm 1.0's
    ``_get_lr`` is the same). Exactly::

        epoch <  warmup_epochs:  lr = warmup_lr + epoch * (base_lr - warmup_lr) / warmup_epochs
        epoch >= epochs:         lr = min_lr                     (past the single cycle)
        otherwise:               lr = min_lr + 0.5 * (base_lr - min_lr) * (1 + cos(pi * epoch / epochs))

    The cosine uses t = epoch, not epoch - warmup_epochs: timm subtracts the warm-up only with
    ``warmup_prefix=True`` and the reference leaves the default ``False``. The warm-up therefore
    ends below base_lr and the cosine picks up at cos(pi * warmup_epochs / epochs), a small jump.

    >>> cosine_with_warmup(0, 3.5e-4, 120)
    1e-05
    >>> round(cosine_with_warmup(60, 3.5e-4, 120), 10)   # half-way: (base + min) / 2
    0.0001755
    """
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (base_lr - warmup_lr) / warmup_epochs
    if epoch >= epochs:
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


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


def stage1_schedule(epochs: int, warmup_epochs: int = 5, warmup_lr: float = 1e-5,
                    min_lr: float = 1e-6) -> ScheduleFn:
    """``cosine_with_warmup`` with everything but (epoch, base_lr) bound.

    >>> stage1_schedule(120)(0, 3.5e-4)
    1e-05
    """
    return functools.partial(cosine_with_warmup, epochs=epochs, warmup_epochs=warmup_epochs,
                             warmup_lr=warmup_lr, min_lr=min_lr)


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


class EpochLR(LRScheduler):
    """A torch ``LRScheduler`` over a schedule function: group lr = fn(last_epoch, initial_lr).

    Construction applies epoch 0; call ``step()`` once per epoch, after that epoch's optimizer
    steps, to move to the next (the reference's "step at epoch start", one call earlier). The
    function itself is not part of ``state_dict`` (it is code, and would not load with
    ``weights_only=True``): rebuild the scheduler with the same function, then load the state.

    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> sched = EpochLR(opt, stage2_schedule())
    >>> opt.step(); sched.step(); sched.last_epoch, round(opt.param_groups[0]["lr"], 4)
    (1, 0.19)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule_fn: ScheduleFn, last_epoch: int = -1):
        self.schedule_fn = schedule_fn
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [self.schedule_fn(self.last_epoch, base) for base in self.base_lrs]

    # closed form anyway; lets the deprecated step(epoch) use it too
    _get_closed_form_lr = get_lr

    def set_epoch(self, epoch: int) -> list[float]:
        """Jump to ``epoch`` and apply its LRs (no deprecation warning, unlike ``step(epoch)``)."""
        self.last_epoch = epoch
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = list(lrs)
        return lrs

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "schedule_fn")}

    def load_state_dict(self, state_dict: dict) -> None:
        state = {k: v for k, v in state_dict.items() if k != "schedule_fn"}
        self.__dict__.update(state)


def stage1_scheduler(optimizer: torch.optim.Optimizer, epochs: int, warmup_epochs: int = 5,
                     warmup_lr: float = 1e-5, min_lr: float = 1e-6) -> EpochLR:
    """:class:`EpochLR` over :func:`cosine_with_warmup`."""
    return EpochLR(optimizer, stage1_schedule(epochs, warmup_epochs, warmup_lr, min_lr))


def stage2_scheduler(optimizer: torch.optim.Optimizer, milestones=(30, 50), gamma: float = 0.1,
                     warmup_epochs: int = 10, warmup_factor: float = 0.1) -> EpochLR:
    """:class:`EpochLR` over :func:`warmup_multistep`."""
    return EpochLR(optimizer, stage2_schedule(milestones, gamma, warmup_epochs, warmup_factor))
