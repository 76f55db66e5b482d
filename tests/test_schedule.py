"""LR schedules against their closed forms; scheduler state round trip."""
import io
import math

import pytest
import torch

from reidlib.engine.schedule import (EpochLR, cosine_with_warmup, set_epoch_lr, stage1_schedule,
                                     stage1_scheduler, stage2_schedule, stage2_scheduler,
                                     warmup_multistep)

BASE1, WARM_LR, MIN_LR, EPOCHS = 3.5e-4, 1e-5, 1e-6, 120


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
    lr = cosine_with_warmup(epoch, BASE1, EPOCHS, warmup_epochs=5, warmup_lr=WARM_LR, min_lr=MIN_LR)
    assert lr == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_stage1_cosine_numbers():
    # a few absolute numbers, so a formula change shows even if cosine() above changed with it
    assert cosine_with_warmup(4, BASE1, EPOCHS) == pytest.approx(2.82e-4)
    assert cosine_with_warmup(5, BASE1, EPOCHS) == pytest.approx(3.48507e-4, rel=1e-5)
    assert cosine_with_warmup(119, BASE1, EPOCHS) == pytest.approx(1.05980e-6, rel=1e-5)


def test_stage1_warmup_zero():
    assert cosine_with_warmup(0, 1.0, 10, warmup_epochs=0, min_lr=0.0) == pytest.approx(1.0)


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


def test_set_epoch_lr_stage1_per_group():
    opt = _opt(BASE1)
    fn = stage1_schedule(EPOCHS)
    # every group warms up from the same warmup_lr to its own base (as timm's warmup_steps)
    assert set_epoch_lr(opt, 0, fn) == pytest.approx([1e-5, 1e-5])
    assert set_epoch_lr(opt, 60, fn) == pytest.approx([(BASE1 + MIN_LR) / 2, (2 * BASE1 + MIN_LR) / 2])


def test_epoch_lr_matches_function_per_step():
    opt = _opt()
    sched = stage2_scheduler(opt)
    fn = stage2_schedule()
    for epoch in range(60):
        assert sched.last_epoch == epoch
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([fn(epoch, 5e-6), fn(epoch, 1e-5)])
        opt.step()
        sched.step()


def test_scheduler_state_round_trip_weights_only():
    opt = _opt(BASE1)
    sched = stage1_scheduler(opt, EPOCHS)
    for _ in range(7):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert "schedule_fn" not in state

    opt2 = _opt(BASE1)
    sched2 = stage1_scheduler(opt2, EPOCHS)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 7 and sched2.base_lrs == sched.base_lrs
    assert sched2.schedule_fn is not None
    opt.step(); sched.step(); opt2.step(); sched2.step()
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert opt2.param_groups[0]["lr"] == pytest.approx(cosine(8))


def test_epoch_lr_set_epoch():
    opt = _opt()
    sched = EpochLR(opt, stage2_schedule())
    assert sched.set_epoch(50) == pytest.approx([5e-8, 1e-7])
    assert sched.get_last_lr() == pytest.approx([5e-8, 1e-7])
