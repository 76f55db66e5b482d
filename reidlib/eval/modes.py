"""Running a module in eval mode for a while, then putting it back as it was.

Feature extraction, attention maps and the zero-shot CLIP demo switch a model to eval mode (no
dropout, batch-norm running statistics) and must hand it back unchanged: evaluation runs in the
middle of training, where a model left in eval mode would train without dropout.

Example:
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    >>> with eval_mode(net):
    ...     net.training
    False
    >>> net.training
    True
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``module`` in eval mode inside the ``with`` block; on leaving it, also by an exception,
    give every submodule back its own previous training flag.

    Each submodule's flag is restored, not the top module's flag spread to all: parts a trainer
    keeps in eval mode on purpose (a frozen encoder, frozen batch norm) stay so.

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    >>> _ = net[1].eval()                      # frozen batch norm inside a training model
    >>> with eval_mode(net):
    ...     pass
    >>> net.training, net[1].training
    (True, False)
    """
    previous = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in previous:
            m.training = training
