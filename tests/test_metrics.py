"""Tests for reidlib.eval.metrics: the Market-1501 protocol, tie-breaking, chunking, errors."""

import numpy as np
import pytest
import torch

from reidlib.eval import compute_distance, evaluate, rerank


def reference_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """The protocol written as plainly as possible: one stable argsort per query."""
    cmc, ap, inp = [], [], []
    for i in range(len(distmat)):
        order = np.argsort(distmat[i], kind="stable")
        junk = (g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])
        matches = (g_pids[order] == q_pids[i])[~junk]
        if not matches.any():
            continue
        hits = np.flatnonzero(matches)
        cmc.append([float(hits[0] < k) for k in range(1, max_rank + 1)])
        ap.append(np.mean((np.arange(len(hits)) + 1) / (hits + 1)))
        inp.append(len(hits) / (hits[-1] + 1))
    if not ap:
        return None
    return {"cmc": np.mean(cmc, 0), "mAP": np.mean(ap), "mINP": np.mean(inp), "n": len(ap)}


def labels(*arrays):
    return [np.asarray(a) for a in arrays]


# --------------------------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------------------------

# Gallery:     g0        g1        g2        g3        g4
# pid, cam:    (1, 0)    (2, 1)    (1, 1)    (0, 1)    (1, 2)
G_PIDS, G_CAMS = [1, 2, 1, 0, 1], [0, 1, 1, 1, 2]


def test_hand_computed_junk_distractors_and_skipped_queries():
    # q0 (pid 1, cam 0): g0 is junk (same pid and camera) and dropped. Remaining ranking
    #   g1 (neg, 0.2), g2 (match, 0.3), g3 (pid 0 distractor: a negative, 0.4), g4 (match, 0.5)
    #   -> hits = [1, 3]; CMC@1 = 0, CMC@k>=2 = 1; AP = (1/2 + 2/4) / 2 = 0.5; INP = 2/4 = 0.5.
    # q1 (pid 2, cam 0): g1 (pid 2, cam 1) is the only match and ranks first (0.1)
    #   -> hits = [0]; AP = 1; INP = 1.
    # q2 (pid 3): no pid 3 in the gallery -> skipped.
    # q3 (pid 2, cam 1): its only same-pid item g1 shares the camera -> junk -> skipped.
    distmat = np.array(
        [
            [0.1, 0.2, 0.3, 0.4, 0.5],
            [0.5, 0.1, 0.2, 0.3, 0.4],
            [0.1, 0.2, 0.3, 0.4, 0.5],
            [0.1, 0.2, 0.3, 0.4, 0.5],
        ]
    )
    q_pids, q_cams = [1, 2, 3, 2], [0, 0, 0, 1]
    r = evaluate(distmat=distmat, q_pids=q_pids, g_pids=G_PIDS, q_camids=q_cams, g_camids=G_CAMS, max_rank=10)
    assert r["num_valid_queries"] == 2
    # Gallery of 5 < max_rank 10: the curve is defined for every k ("first hit < k").
    assert r["cmc"] == pytest.approx([0.5] + [1.0] * 9)
    assert r["rank1"] == pytest.approx(0.5)
    assert r["rank5"] == r["rank10"] == pytest.approx(1.0)
    assert r["mAP"] == pytest.approx((0.5 + 1.0) / 2)
    assert r["mINP"] == pytest.approx((0.5 + 1.0) / 2)


def test_minp_and_ap_of_a_late_match():
    # Matches at g0 (0.0) and g4 (0.9) with three negatives between: hits = [0, 4].
    # AP = (1/1 + 2/5) / 2 = 0.7; INP = 2 / 5 = 0.4; CMC@1 = 1.
    distmat = np.array([[0.0, 0.2, 0.3, 0.4, 0.9]])
    r = evaluate(distmat=distmat, q_pids=[7], g_pids=[7, 1, 2, 3, 7], q_camids=[0], g_camids=[1] * 5)
    assert r["mAP"] == pytest.approx(0.7)
    assert r["mINP"] == pytest.approx(0.4)
    assert r["rank1"] == 1.0


def test_distractors_pid0_are_negatives():
    # Two pid-0 distractors rank ahead of the only match: hit = [2], AP = 1/3, rank-1 = 0.
    distmat = np.array([[0.1, 0.2, 0.3]])
    r = evaluate(distmat=distmat, q_pids=[5], g_pids=[0, 0, 5], q_camids=[0], g_camids=[1, 1, 1])
    assert r["rank1"] == 0.0 and r["cmc"][2] == 1.0
    assert r["mAP"] == pytest.approx(1 / 3)


def test_small_gallery_curve_does_not_depend_on_query_order():
    # The Cython evaluators leave stale values past the gallery length, so the curve depended on
    # query order. Here: q0 first hit at 1, q1 first hit at 0; every k is defined.
    distmat = np.array([[0.1, 0.2], [0.2, 0.1]])
    args = dict(g_pids=[0, 1], g_camids=[1, 1], max_rank=5)
    a = evaluate(distmat=distmat, q_pids=[1, 1], q_camids=[0, 0], **args)
    b = evaluate(distmat=distmat[::-1].copy(), q_pids=[1, 1], q_camids=[0, 0], **args)
    assert a["cmc"] == b["cmc"] == pytest.approx([0.5, 1, 1, 1, 1])


def test_ties_break_by_gallery_index():
    # All distances equal: the ranking is the gallery order. Valid items g1 (neg), g2 (match)
    # -> hit = [1]; g0 is junk.
    distmat = np.zeros((1, 3))
    r = evaluate(distmat=distmat, q_pids=[1], g_pids=[1, 2, 1], q_camids=[0], g_camids=[0, 1, 1])
    assert r["rank1"] == 0.0 and r["mAP"] == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# Agreement with the per-query reference
# --------------------------------------------------------------------------------------------


def random_case(rng, integer_distances):
    num_query, num_gallery = int(rng.integers(1, 25)), int(rng.integers(1, 60))
    num_ids, num_cams = int(rng.integers(1, 8)), int(rng.integers(1, 4))
    q_pids, g_pids = rng.integers(0, num_ids, num_query), rng.integers(0, num_ids, num_gallery)
    q_cams, g_cams = rng.integers(0, num_cams, num_query), rng.integers(0, num_cams, num_gallery)
    if integer_distances:  # many exact ties, to check the tie-breaking by gallery index
        distmat = rng.integers(0, 5, (num_query, num_gallery)).astype(np.float32)
    else:
        distmat = rng.random((num_query, num_gallery))
    return distmat, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("integer_distances", [False, True])
def test_matches_reference_on_random_cases(integer_distances):
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(150):
        distmat, q_pids, g_pids, q_cams, g_cams = random_case(rng, integer_distances)
        expected = reference_evaluate(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=10)
        kwargs = dict(distmat=distmat, q_pids=q_pids, g_pids=g_pids, q_camids=q_cams, g_camids=g_cams,
                      max_rank=10)
        if expected is None:
            with pytest.raises(ValueError, match="no query has a match"):
                evaluate(**kwargs, chunk_size=int(rng.integers(1, 8)))
            continue
        got = evaluate(**kwargs, chunk_size=int(rng.integers(1, 8)))
        assert got["num_valid_queries"] == expected["n"]
        np.testing.assert_allclose(got["cmc"], expected["cmc"], atol=1e-12)
        assert got["mAP"] == pytest.approx(expected["mAP"], abs=1e-12)
        assert got["mINP"] == pytest.approx(expected["mINP"], abs=1e-12)
        checked += 1
    assert checked > 50


def make_features(seed=0, num_query=40, num_gallery=300, dim=32, num_ids=20):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_ids, dim, generator=gen)
    q_pids = torch.randint(0, num_ids, (num_query,), generator=gen)
    g_pids = torch.randint(0, num_ids, (num_gallery,), generator=gen)
    qf = centres[q_pids] + 0.8 * torch.randn(num_query, dim, generator=gen)
    gf = centres[g_pids] + 0.8 * torch.randn(num_gallery, dim, generator=gen)
    q_cams = torch.randint(0, 3, (num_query,), generator=gen)
    g_cams = torch.randint(0, 3, (num_gallery,), generator=gen)
    return qf, gf, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("normalize", [True, False])
def test_features_path_equals_reference_on_the_distance(metric, normalize):
    qf, gf, *lab = make_features()
    got = evaluate(qf, gf, *lab, metric=metric, normalize=normalize)
    dist = compute_distance(qf, gf, metric, normalize).numpy()
    expected = reference_evaluate(dist, *labels(*lab))
    assert got["mAP"] == pytest.approx(expected["mAP"], abs=1e-12)
    np.testing.assert_allclose(got["cmc"], expected["cmc"])


def test_compute_distance_formulas():
    torch.manual_seed(0)
    qf, gf = torch.randn(6, 10, dtype=torch.float64), torch.randn(9, 10, dtype=torch.float64)
    qn, gn = qf / qf.norm(dim=1, keepdim=True), gf / gf.norm(dim=1, keepdim=True)
    close = np.testing.assert_allclose
    close(compute_distance(qf, gf), torch.cdist(qn, gn) ** 2, atol=1e-12)
    close(compute_distance(qf, gf, normalize=False), torch.cdist(qf, gf) ** 2, atol=1e-12)
    close(compute_distance(qf, gf, "cosine"), 1 - qn @ gn.T, atol=1e-12)
    # On unit vectors squared Euclidean is 2 - 2 cos.
    close(compute_distance(qf, gf), 2 * compute_distance(qf, gf, "cosine"), atol=1e-12)


def test_chunk_size_does_not_change_results():
    qf, gf, *lab = make_features(seed=1)
    results = [evaluate(qf, gf, *lab, chunk_size=c) for c in (1, 3, 7, 1000)]
    assert all(r == results[0] for r in results)
    dist = compute_distance(qf, gf)
    by_distance = evaluate(distmat=dist, q_pids=lab[0], g_pids=lab[1], q_camids=lab[2], g_camids=lab[3],
                           chunk_size=5)
    assert by_distance == results[0]


def test_explicit_cpu_device_numpy_and_torch_inputs_agree():
    qf, gf, *lab = make_features(seed=2)
    a = evaluate(qf, gf, *lab, device="cpu")
    b = evaluate(qf.numpy(), gf.numpy(), *[x.numpy() for x in lab], device=torch.device("cpu"))
    c = evaluate(qf.double(), gf.double(), *[x.tolist() for x in lab])
    assert a == b
    assert c["mAP"] == pytest.approx(a["mAP"], abs=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    qf, gf, *lab = make_features(seed=3)
    a, b = evaluate(qf, gf, *lab), evaluate(qf, gf, *lab, device="cuda")
    assert b["mAP"] == pytest.approx(a["mAP"], abs=1e-6)


def test_rerank_flag_scores_reranked_distances():
    qf, gf, *lab = make_features(seed=4)
    unit = lambda f: torch.nn.functional.normalize(f, dim=1)  # noqa: E731
    expected = evaluate(distmat=rerank(unit(qf), unit(gf), k1=8, k2=3, device="cpu"), q_pids=lab[0],
                        g_pids=lab[1], q_camids=lab[2], g_camids=lab[3])
    got = evaluate(qf, gf, *lab, rerank={"k1": 8, "k2": 3}, device="cpu")
    assert got == expected


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_error_when_no_query_is_valid():
    with pytest.raises(ValueError, match="no query has a match in the gallery from another camera"):
        evaluate(distmat=np.zeros((2, 2)), q_pids=[1, 2], g_pids=[1, 3], q_camids=[0, 0], g_camids=[0, 1])


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("q_pids", [1, 2, 3], "q_pids has 3 entries but distmat has 2 rows"),
        ("g_pids", [1], "g_pids has 1 entries but distmat columns has 2 rows"),
        ("q_camids", [0], "q_camids has 1 entries"),
        ("g_camids", [0, 1, 2], "g_camids has 3 entries"),
        ("q_pids", [0.5, 1.0], "q_pids must hold integers"),
    ],
)
def test_error_on_label_mismatch(field, value, message):
    kwargs = dict(distmat=np.zeros((2, 2)), q_pids=[1, 2], g_pids=[1, 2], q_camids=[0, 0], g_camids=[1, 1])
    kwargs[field] = value
    with pytest.raises(ValueError, match=message):
        evaluate(**kwargs)


def test_error_on_nan_or_inf():
    qf, gf, *lab = make_features(seed=6)
    bad_q, bad_g = qf.clone(), gf.clone()
    bad_q[3, 2], bad_g[7, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="qf contains NaN"):
        evaluate(bad_q, gf, *lab)
    with pytest.raises(ValueError, match="gf contains NaN"):
        evaluate(qf, bad_g, *lab)
    with pytest.raises(ValueError, match="gf contains NaN"):
        evaluate(qf, bad_g, *lab, rerank=True)
    args = dict(q_pids=[1, 2], g_pids=[1, 2], q_camids=[0, 0], g_camids=[1, 1])
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="distmat contains NaN"):
            evaluate(distmat=np.array([[0.0, bad], [0.0, 1.0]]), **args)


def test_error_on_bad_arguments():
    qf, gf, *lab = make_features(seed=7)
    with pytest.raises(ValueError, match="either features"):
        evaluate(qf, gf, *lab, distmat=np.zeros((len(qf), len(gf))))
    with pytest.raises(ValueError, match="qf has dimension 32 but gf has dimension 31"):
        evaluate(qf, gf[:, :-1], *lab)
    with pytest.raises(ValueError, match="metric must be one of"):
        evaluate(qf, gf, *lab, metric="manhattan")
    with pytest.raises(ValueError, match="rerank needs features"):
        evaluate(distmat=np.zeros((2, 2)), q_pids=[1, 2], g_pids=[1, 2], q_camids=[0, 0], g_camids=[1, 1],
                 rerank=True)
    with pytest.raises(ValueError, match="q_pids is required"):
        evaluate(qf, gf)
    with pytest.raises(ValueError, match="both qf and gf are required"):
        evaluate(qf, None, *lab)
    with pytest.raises(ValueError, match="pass features"):
        evaluate(q_pids=[1], g_pids=[1], q_camids=[0], g_camids=[1])
