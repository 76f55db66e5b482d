"""LR schedules against their closed forms; a resumed schedule needs no saved state."""
import math

import pytest
import torch

from reidlib.optim.schedule import set_epoch_lr, stage1_scheduler, stage2_schedule, warmup_multistep

BASE1, WARM_LR, MIN_LR, EPOCHS = 3.5e-4, 1e-5, 1e-6, 120


def scheduled_lr(epoch, base_lr, epochs, warmup_epochs=5, warmup_lr=1e-5, min_lr=1e-6):
    """Stage 1's LR at ``epoch`` from reidlib's scheduler (timm's CosineLRScheduler), one group."""
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([w], lr=base_lr)
    stage1_scheduler(opt, epochs, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, min_lr=min_lr).step(epoch)
    return opt.param_groups[0]["lr"]


def cosine(t):
    return MIN_LR + 0.5 * (BASE1 - MIN_LR) * (1 + math.cos(math.pi * t / EPOCHS))


@pytest.mark.parametrize("epoch, expected", [
    (0, 1e-5),                                # warm-up start
    (1, 1e-5 + 1 * (3.5e-4 - 1e-5) / 5),      # 7.8e-5
    (4, 1e-5 + 4 * (3.5e-4 - 1e-5) / 5),      # 2.82e-4
    (5, cosine(5)),                           # t = epoch (warmup_prefix=False), not epoch - 5
    (6, cosine(6)),
    (60, (3.5e-4 + 1e-6) / 2),                # cos(pi/2) = 0
    (119, cosine(119)),                       # last epoch, just above min_lr
    (120, 1e-6),                              # past the single cycle: lr_min
])
def test_stage1_cosine_values(epoch, expected):
    lr = scheduled_lr(epoch, BASE1, EPOCHS, warmup_epochs=5, warmup_lr=WARM_LR, min_lr=MIN_LR)
    assert lr == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_stage1_cosine_numbers():
    # a few absolute numbers, so a formula change shows even if cosine() above changed with it
    assert scheduled_lr(4, BASE1, EPOCHS) == pytest.approx(2.82e-4)
    assert scheduled_lr(5, BASE1, EPOCHS) == pytest.approx(3.48507e-4, rel=1e-5)
    assert scheduled_lr(119, BASE1, EPOCHS) == pytest.approx(1.05980e-6, rel=1e-5)


def test_stage1_warmup_zero():
    assert scheduled_lr(0, 1.0, 10, warmup_epochs=0, min_lr=0.0) == pytest.approx(1.0)


@pytest.mark.parametrize("epoch, factor", [
    (0, 0.1),                      # alpha 0: warmup_factor
    (5, 0.1 * 0.5 + 0.5),          # 0.55
    (9, 0.1 * 0.1 + 0.9),          # 0.91
    (10, 1.0),                     # warm-up over
    (29, 1.0),
    (30, 0.1),                     # bisect_right: the milestone epoch already decays
    (49, 0.1),
    (50, 0.01),
    (59, 0.01),
])
def test_stage2_warmup_multistep_values(epoch, factor):
    assert warmup_multistep(epoch, 5e-6) == pytest.approx(5e-6 * factor, rel=1e-12)


def test_stage2_rn50_settings_and_bad_milestones():
    # RN50: factor 0.01, steps 40/70
    assert warmup_multistep(0, 1.0, (40, 70), warmup_factor=0.01) == pytest.approx(0.01)
    assert warmup_multistep(70, 1.0, (40, 70), warmup_factor=0.01) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="increasing"):
        warmup_multistep(0, 1.0, (50, 30))


def _opt(lr=5e-6):
    w, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.Adam([{"params": [w], "lr": lr}, {"params": [b], "lr": 2 * lr}])


def test_set_epoch_lr_uses_each_groups_base():
    opt = _opt()
    fn = stage2_schedule()
    assert set_epoch_lr(opt, 0, fn) == pytest.approx([5e-7, 1e-6])
    assert set_epoch_lr(opt, 30, fn) == pytest.approx([5e-7, 1e-6])  # base kept in initial_lr
    assert set_epoch_lr(opt, 10, fn) == pytest.approx([5e-6, 1e-5])
    assert [g["initial_lr"] for g in opt.param_groups] == [5e-6, 1e-5]


def test_stage1_scheduler_per_group():
    opt = _opt(BASE1)
    scheduler = stage1_scheduler(opt, EPOCHS)
    # every group warms up from the same warmup_lr to its own base (timm's warmup_steps)
    scheduler.step(0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-5, 1e-5])
    scheduler.step(60)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([(BASE1 + MIN_LR) / 2, (2 * BASE1 + MIN_LR) / 2])


def test_stage1_resumes_from_optimizer_state_alone():
    """A run resumed at epoch 8 rebuilds the scheduler over the loaded optimizer: same LRs as the
    uninterrupted run (the schedule is a closed form of the epoch; nothing else is saved)."""
    opt = _opt(BASE1)
    scheduler = stage1_scheduler(opt, EPOCHS)
    for epoch in range(1, 8):
        scheduler.step(epoch)
        opt.step()
    saved = opt.state_dict()
    scheduler.step(8)
    uninterrupted = [g["lr"] for g in opt.param_groups]

    opt2 = _opt(BASE1 * 10)            # a fresh optimizer: its own LR must not leak in
    opt2.load_state_dict(saved)
    stage1_scheduler(opt2, EPOCHS).step(8)
    assert [g["lr"] for g in opt2.param_groups] == uninterrupted
    assert opt2.param_groups[0]["lr"] == pytest.approx(cosine(8))
