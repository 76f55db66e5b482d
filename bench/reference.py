"""Reference implementations that the benchmarks time reidlib against and the tests check it with.

``loop_evaluate`` (on ``numpy_distance``) is the per-query NumPy evaluation of the usual re-ID
toolkits.

``dense_rerank`` is the published k-reciprocal re-ranking (Zhong et al., "Re-ranking Person
Re-identification with k-reciprocal Encoding", CVPR 2017) in its dense N x N form, as torchreid and
the CLIP-ReID reference ship it, with one change: ``argsort(kind="stable")``, so that ties break by
index as in reidlib.
"""
from __future__ import annotations

import numpy as np


def dense_rerank(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """The published k-reciprocal re-ranking (Zhong et al., CVPR 2017), dense N x N, with a stable
    argsort so ties break by index. Inputs are plain Euclidean distances (it squares them)."""
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
        k_reciprocal = forward[np.where(initial_rank[forward, : k1 + 1] == i)[0]]
        expansion = k_reciprocal
        for candidate in k_reciprocal:
            c_forward = initial_rank[candidate, :half]
            c_reciprocal = c_forward[np.where(initial_rank[c_forward, :half] == candidate)[0]]
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
        del V_qe
    del initial_rank
    inverted = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jaccard = np.zeros_like(original, dtype=np.float32)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, all_num], dtype=np.float32)
        for k in np.where(V[i, :] != 0)[0]:
            rows = inverted[k]
            temp_min[0, rows] = temp_min[0, rows] + np.minimum(V[i, k], V[rows, k])
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    return (jaccard * (1 - lambda_value) + original * lambda_value)[:query_num, query_num:]


def plain_euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * (a @ b.T)
    return np.sqrt(np.maximum(sq, 0))



# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def numpy_distance(qf: np.ndarray, gf: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance of unit features, ``2 - 2 q.g``, in NumPy."""
    return np.maximum(2 - 2 * (qf @ gf.T), 0)


def loop_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """The Market protocol one query at a time, with a stable argsort of each row (the torchreid /
    fast-reid Python evaluators, without their per-element list comprehension)."""
    cmc, aps, inps = np.zeros(max_rank), [], []
    for i in range(len(distmat)):
        order = np.argsort(distmat[i], kind="stable")
        same_pid = g_pids[order] == q_pids[i]
        junk = same_pid & (g_camids[order] == q_camids[i])
        hits = np.flatnonzero(same_pid[~junk])
        if len(hits) == 0:
            continue
        cmc[hits[0] :] += 1
        aps.append(np.mean(np.arange(1, len(hits) + 1) / (hits + 1)))
        inps.append(len(hits) / (hits[-1] + 1))
    n = len(aps)
    return {"cmc": (cmc / n).tolist(), "rank1": cmc[0] / n, "mAP": float(np.mean(aps)),
            "mINP": float(np.mean(inps))}
