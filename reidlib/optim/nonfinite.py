"""Stop a run at the first non-finite loss, and never save non-finite weights.

Once a loss is NaN or inf (a learning rate far too high, say), every later step is NaN too;
training on only burns time and, worse, replaces the last good checkpoint with a useless one.
:class:`LossWatch` notes the first bad step on the device (no host sync per step); the loops look
at it every ``log_period`` steps and at the end of each epoch, and stop the run with the stage,
epoch and step. :func:`check_finite_weights` runs before every save, so a checkpoint on disk
always holds finite weights (a step can make the weights NaN while its own loss was finite).

Example::

    watch = LossWatch(device)
    for step, batch in enumerate(batches, 1):
        loss = train_step(batch)
        watch.update(loss, step)
        if step % log_period == 0:
            watch.check(runtime, stage=2, epoch=epoch + 1, hint="lower stage2.lr")
    watch.check(runtime, stage=2, epoch=epoch + 1, hint="lower stage2.lr")
    check_finite_weights(model.state_dict(), "stage 2 epoch 3")
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """A loss or a weight became NaN or infinite; the run stops without saving it."""


class LossWatch:
    """The first step (1-based) of an epoch whose loss was not finite, kept on the device."""

    def __init__(self, device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        """Record ``loss`` of ``step``; only the first non-finite one is kept."""
        new = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
        self.first_bad = torch.where(new, step, self.first_bad)
        self.bad_loss = torch.where(new, loss.detach().float(), self.bad_loss)

    def check(self, runtime, stage: int, epoch: int, hint: str) -> None:
        """Raise :class:`NonFiniteError` when a step so far had a non-finite loss (one host sync).

        Under torchrun every rank learns of a bad step on any rank, so they all stop together
        (a rank left waiting in the next all-reduce would hang)."""
        first = self.first_bad.clone()
        if runtime.distributed and dist.is_initialized():
            dist.all_reduce(first, op=dist.ReduceOp.MAX)
        step = int(first)
        if step >= 0:
            value = float(self.bad_loss) if int(self.first_bad) == step else float("nan")
            raise NonFiniteError(
                f"stage {stage}, epoch {epoch}, step {step}: the loss is {value} (not finite); the run "
                f"stopped without saving this epoch, the checkpoints on disk are kept; {hint}")


def non_finite_entries(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` that hold NaN or inf.

    >>> non_finite_entries({"w": torch.ones(2), "b": torch.tensor([float("nan")]), "n": torch.tensor(3)})
    ['b']
    """
    names = [k for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(state_dict[k]).all().cpu() for k in names]).tolist()  # one sync
    return [k for k, ok in zip(names, finite) if not ok]


def check_finite_weights(state_dict: dict, when: str) -> None:
    """Raise :class:`NonFiniteError` before a save when a weight is NaN or inf, so that the
    checkpoint already on disk is never replaced by a useless one."""
    bad = non_finite_entries(state_dict)
    if bad:
        raise NonFiniteError(
            f"{when}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {bad[0]}); not saved, so the "
            "last checkpoint on disk is kept; lower the learning rate and train again")
