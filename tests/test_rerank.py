"""Tests for reidlib.eval.rerank against a dense transcription of the published algorithm."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for bench/
from bench.reference import dense_rerank, plain_euclidean  # noqa: E402
from reidlib.eval import rerank  # noqa: E402
from reidlib.eval.rerank import estimate_memory  # noqa: E402

# ``reidlib.eval.rerank`` the attribute is the function; the module is reached through sys.modules.
rerank_module = sys.modules["reidlib.eval.rerank"]


def euclidean(a, b):
    return plain_euclidean(a.astype(np.float64), b.astype(np.float64))


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
