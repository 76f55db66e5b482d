"""Losses against small hand-computed cases."""
import math

import pytest
import torch

from reidlib.losses import (
    Stage2Loss,
    cross_entropy_ls,
    euclidean_dist,
    i2t_logits,
    stage1_loss,
    supcon_loss,
    triplet_hard,
)

# --------------------------------------------------------------------------- SupCon

def test_supcon_2x2_by_hand():
    # a = [[1,0],[0,1]], b = [[2,0],[0,1]]  ->  logits = a b^T = [[2,0],[0,1]]
    # row 0: log_softmax([2,0]) = [2 - log(e^2+1), -log(e^2+1)]; positive col 0 -> 2 - log(e^2+1)
    # row 1: log_softmax([0,1]) = [-log(1+e), 1 - log(1+e)];     positive col 1 -> 1 - log(1+e)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    expected = -((2 - math.log(math.e ** 2 + 1)) + (1 - math.log(1 + math.e))) / 2
    assert supcon_loss(a, b, labels, labels).item() == pytest.approx(expected, rel=1e-6)


def test_supcon_averages_over_all_positives_and_is_not_normalised():
    # labels [0,0]: both columns are positives of both rows; logits [[1,1],[1,1]] -> log p = -log 2
    # mean over positives = -log 2 per row -> loss log 2. Scaling features changes nothing here,
    # but with distinct columns it does: no L2 normalisation.
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    lab = torch.tensor([0, 0])
    assert supcon_loss(a, b, lab, lab).item() == pytest.approx(math.log(2), rel=1e-6)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    lab = torch.tensor([0, 1])
    assert supcon_loss(3 * x, x, lab, lab).item() < supcon_loss(x, x, lab, lab).item()


def test_supcon_skips_rows_without_positive():
    # row 1 (label 2) has no same-label column: only row 0 counts: -(2 - log(e^2 + 1))
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    loss = supcon_loss(a, b, torch.tensor([0, 2]), torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(-(2 - math.log(math.e ** 2 + 1)), rel=1e-6)


def test_stage1_loss_is_both_directions():
    torch.manual_seed(0)
    img, txt = torch.randn(6, 4), torch.randn(6, 4)
    lab = torch.tensor([0, 0, 1, 1, 2, 2])
    expected = supcon_loss(img, txt, lab, lab) + supcon_loss(txt, img, lab, lab)
    assert stage1_loss(img, txt, lab).item() == pytest.approx(expected.item())
    # asymmetric in general (the two log-softmaxes run over different axes)
    assert supcon_loss(img, txt, lab, lab).item() != pytest.approx(supcon_loss(txt, img, lab, lab).item())


def test_stage1_loss_fp32_under_autocast_and_grads():
    img = torch.randn(4, 8, dtype=torch.bfloat16)
    txt = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = stage1_loss(img, txt, torch.tensor([0, 1, 0, 1]))
    assert loss.dtype == torch.float32
    loss.backward()
    assert txt.grad is not None and torch.isfinite(txt.grad).all()


# --------------------------------------------------------------------------- label-smoothed CE

def test_cross_entropy_ls_explicit_formula():
    # -(1-eps) log p_y - eps/C sum_c log p_c
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    y = torch.tensor([0, 2])
    eps, C = 0.1, 3
    logp = torch.log_softmax(logits, 1)
    per = -(1 - eps) * logp[torch.arange(2), y] - eps / C * logp.sum(1)
    assert cross_entropy_ls(logits, y, eps).item() == pytest.approx(per.mean().item(), rel=1e-6)


def test_cross_entropy_ls_uniform_logits_is_log_c():
    # uniform prediction: every log p = -log C whatever the target mix
    assert cross_entropy_ls(torch.zeros(3, 5), torch.tensor([0, 1, 4])).item() == pytest.approx(math.log(5))


# --------------------------------------------------------------------------- triplet

def test_euclidean_dist():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    d = euclidean_dist(x, x)
    assert d[0, 1].item() == pytest.approx(5.0)
    assert d[0, 0].item() == pytest.approx(1e-6)  # sqrt of the 1e-12 clamp


def test_triplet_hard_four_samples_by_hand():
    # 1-d features 0, 1, 3, 5 with labels A A B B; distances |xi - xj|:
    #        0  1  3  5
    #   0 [  0  1  3  5 ]   anchor 0: d_ap = 1 (to 1), d_an = 3 (to 3) -> relu(1 - 3 + 0.5) = 0
    #   1 [  1  0  2  4 ]   anchor 1: d_ap = 1,        d_an = 2        -> relu(1 - 2 + 0.5) = 0
    #   3 [  3  2  0  2 ]   anchor 3: d_ap = 2 (to 5), d_an = 2 (to 1) -> relu(2 - 2 + 0.5) = 0.5
    #   5 [  5  4  2  0 ]   anchor 5: d_ap = 2,        d_an = 4        -> relu(2 - 4 + 0.5) = 0
    # margin 0.5 -> mean 0.125; margin 1.5 -> (0 + 0.5 + 1.5 + 0)/4 = 0.5
    f = torch.tensor([[0.0], [1.0], [3.0], [5.0]])
    lab = torch.tensor([0, 0, 1, 1])
    assert triplet_hard(f, lab, margin=0.5).item() == pytest.approx(0.125, abs=1e-5)
    assert triplet_hard(f, lab, margin=1.5).item() == pytest.approx(0.5, abs=1e-5)


def test_triplet_hard_singleton_identity_uses_self_as_positive():
    # labels A B: each anchor's only positive is itself (d_ap = 1e-6), d_an = 2
    f = torch.tensor([[0.0], [2.0]])
    loss = triplet_hard(f, torch.tensor([0, 1]), margin=3.0)
    assert loss.item() == pytest.approx(3.0 - 2.0 + 1e-6, abs=1e-5)


def test_triplet_hard_single_identity_batch_is_zero_and_backprops():
    f = torch.randn(4, 3, requires_grad=True)
    loss = triplet_hard(f, torch.zeros(4, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(f.grad).all()


def test_triplet_gradients_finite_with_duplicates():
    f = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0], [0.0, 1.0]], requires_grad=True)
    triplet_hard(f, torch.tensor([0, 0, 1, 1])).backward()
    assert torch.isfinite(f.grad).all()


# --------------------------------------------------------------------------- stage 2

def test_stage2_total_matches_formula():
    torch.manual_seed(0)
    B, C, d = 8, 4, 6
    lab = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    scores = [torch.randn(B, C), torch.randn(B, C)]
    feats = [torch.randn(B, d), torch.randn(B, d), torch.randn(B, 5)]
    proj, text = feats[2], torch.randn(C, 5)
    loss = Stage2Loss(id_weight=0.25, tri_weight=1.0, i2t_weight=1.0, epsilon=0.1, margin=0.3)
    total, parts = loss(scores, feats, lab, proj, text)
    ID = sum(cross_entropy_ls(s, lab, 0.1) for s in scores)
    TRI = sum(triplet_hard(f, lab, 0.3) for f in feats)
    I2T = cross_entropy_ls(proj @ text.T, lab, 0.1)
    assert total.item() == pytest.approx((0.25 * ID + TRI + I2T).item(), rel=1e-6)
    assert parts["id"].item() == pytest.approx(ID.item())
    assert parts["tri"].item() == pytest.approx(TRI.item())
    assert parts["i2t"].item() == pytest.approx(I2T.item())
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in parts.values())


def test_stage2_weights_and_no_text():
    torch.manual_seed(1)
    lab = torch.tensor([0, 0, 1, 1])
    scores, feats = torch.randn(4, 2), [torch.randn(4, 3)]
    total, parts = Stage2Loss(id_weight=2.0, tri_weight=0.5)(scores, feats, lab)
    assert parts["i2t"].item() == 0.0
    assert total.item() == pytest.approx(2.0 * parts["id"].item() + 0.5 * parts["tri"].item(), rel=1e-6)


def test_stage2_backward_under_autocast():
    torch.manual_seed(2)
    lab = torch.tensor([0, 0, 1, 1])
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = x @ w
        total, _ = Stage2Loss()([f[:, :2]], [f], lab, f, torch.randn(2, 3))
    assert total.dtype == torch.float32
    total.backward()
    assert torch.isfinite(w.grad).all()


def test_i2t_logits_shape():
    assert i2t_logits(torch.ones(2, 3), torch.ones(5, 3)).tolist() == [[3.0] * 5] * 2
