"""Tests for reidlib.eval.rerank against a dense transcription of the published algorithm."""

import sys

import numpy as np
import pytest
import torch

from reidlib.eval import rerank
from reidlib.eval.rerank import estimate_memory

# ``reidlib.eval.rerank`` the attribute is the function; the module is reached through sys.modules.
rerank_module = sys.modules["reidlib.eval.rerank"]


def dense_rerank(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """Zhong et al. (CVPR 2017), transcribed from the published ``re_ranking`` (dense N x N).

    One change: ``argsort(kind="stable")`` so that ties break by index, as in the library.
    Inputs are plain (not squared) Euclidean distances; the function squares them.
    """
    original = np.concatenate(
        [np.concatenate([q_q_dist, q_g_dist], axis=1), np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0
    )
    original = np.power(original, 2).astype(np.float32)
    original = np.transpose(1.0 * original / np.max(original, axis=0))
    V = np.zeros_like(original).astype(np.float32)
    initial_rank = np.argsort(original, kind="stable").astype(np.int32)
    query_num, all_num = q_g_dist.shape[0], original.shape[0]
    half = int(np.around(k1 / 2.0)) + 1

    for i in range(all_num):
        forward = initial_rank[i, : k1 + 1]
        backward = initial_rank[forward, : k1 + 1]
        k_reciprocal = forward[np.where(backward == i)[0]]
        expansion = k_reciprocal
        for candidate in k_reciprocal:
            c_forward = initial_rank[candidate, :half]
            c_backward = initial_rank[c_forward, :half]
            c_reciprocal = c_forward[np.where(c_backward == candidate)[0]]
            if len(np.intersect1d(c_reciprocal, k_reciprocal)) > 2.0 / 3 * len(c_reciprocal):
                expansion = np.append(expansion, c_reciprocal)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        V[i, expansion] = 1.0 * weight / np.sum(weight)

    original = original[:query_num]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
    inverted = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jaccard = np.zeros_like(original, dtype=np.float32)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, all_num], dtype=np.float32)
        nonzero = np.where(V[i, :] != 0)[0]
        for k in nonzero:
            rows = inverted[k]
            temp_min[0, rows] = temp_min[0, rows] + np.minimum(V[i, k], V[rows, k])
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    final = jaccard * (1 - lambda_value) + original * lambda_value
    return final[:query_num, query_num:]


def euclidean(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(sq, 0))


def dense_from_features(qf, gf, **kwargs):
    return dense_rerank(euclidean(qf, gf), euclidean(qf, qf), euclidean(gf, gf), **kwargs)


def clustered(rng, num, dim, centres, noise=0.6):
    labels = rng.integers(0, len(centres), num)
    return (centres[labels] + noise * rng.normal(size=(num, dim))).astype(np.float32)


@pytest.mark.parametrize(
    "num_query, num_gallery, dim, k1, k2, lambda_value",
    [
        (5, 40, 8, 6, 3, 0.3),
        (20, 150, 16, 20, 6, 0.3),
        (30, 200, 32, 10, 1, 0.5),  # no query expansion
        (1, 12, 4, 3, 2, 0.0),  # pure Jaccard
        (25, 180, 64, 7, 4, 1.0),  # pure original distance
        (10, 30, 8, 25, 6, 0.3),  # k1 + 1 > N: every row is its own full neighbour list
        (12, 90, 16, 5, 7, 0.3),  # odd k1 (round half to even: 2), k2 > k1 + 1
    ],
)
def test_matches_dense_reference(num_query, num_gallery, dim, k1, k2, lambda_value):
    rng = np.random.default_rng(num_query * 1000 + num_gallery)
    centres = rng.normal(size=(8, dim))
    qf, gf = clustered(rng, num_query, dim, centres), clustered(rng, num_gallery, dim, centres)
    expected = dense_from_features(qf, gf, k1=k1, k2=k2, lambda_value=lambda_value)
    for chunk in (None, 7):
        got = rerank(qf, gf, k1=k1, k2=k2, lambda_value=lambda_value, chunk_size=chunk, device="cpu")
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_matches_dense_reference_with_ties():
    # Small integer features: every squared distance is an exact integer in float32 and float64,
    # so rows hold many exact ties, broken by index on both sides.
    rng = np.random.default_rng(3)
    qf = rng.integers(0, 3, (15, 3)).astype(np.float32)
    gf = rng.integers(0, 3, (80, 3)).astype(np.float32)
    expected = dense_from_features(qf, gf, k1=6, k2=3)
    got = rerank(qf, gf, k1=6, k2=3, device="cpu")
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_small_work_steps_give_the_same_result(monkeypatch):
    # Force the Jaccard pair enumeration and the query expansion to run in many small steps.
    rng = np.random.default_rng(11)
    centres = rng.normal(size=(6, 16))
    qf, gf = clustered(rng, 20, 16, centres), clustered(rng, 120, 16, centres)
    expected = rerank(qf, gf, k1=8, k2=4, device="cpu")
    monkeypatch.setattr(rerank_module, "_PAIRS_PER_STEP", 37)
    monkeypatch.setattr(rerank_module, "_SPARSE_STEP", 50)
    got = rerank(qf, gf, k1=8, k2=4, chunk_size=9, device="cpu")
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_tensor_in_tensor_out():
    torch.manual_seed(0)
    qf, gf = torch.randn(6, 16), torch.randn(50, 16)
    got = rerank(qf, gf, k1=6, k2=3, device="cpu")
    assert isinstance(got, torch.Tensor) and got.shape == (6, 50) and got.device == qf.device
    expected = dense_from_features(qf.numpy(), gf.numpy(), k1=6, k2=3)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4, rtol=0)


def test_memory_budget_error():
    torch.manual_seed(0)
    qf, gf = torch.randn(4, 8), torch.randn(20, 8)
    with pytest.raises(MemoryError, match=r"needs about .* GiB but the budget is .* GiB"):
        rerank(qf, gf, memory_budget_gb=1e-6)
    rerank(qf, gf, k1=5, memory_budget_gb=1.0)  # fits


def test_memory_estimate_at_market_size():
    # Market-1501 test set with 1280-d features: the estimate must stay well under 3 GiB.
    assert estimate_memory(3368, 15913, 1280) < 3 * 2**30


def test_parameter_and_input_errors():
    qf, gf = torch.randn(3, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="k1 must be a positive integer"):
        rerank(qf, gf, k1=0)
    with pytest.raises(ValueError, match="k2 must be a positive integer"):
        rerank(qf, gf, k2=0)
    with pytest.raises(ValueError, match="lambda_value must be in"):
        rerank(qf, gf, lambda_value=1.5)
    with pytest.raises(ValueError, match="qf has dimension 8 but gf has dimension 7"):
        rerank(qf, gf[:, :7])
    bad = gf.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="gf contains NaN"):
        rerank(qf, bad)
