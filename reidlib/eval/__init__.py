"""Evaluation: re-identification metrics and k-reciprocal re-ranking.

Example:
    >>> from reidlib.eval import evaluate
    >>> metrics = evaluate(qf, gf, q_pids, g_pids, q_camids, g_camids)  # doctest: +SKIP
    >>> metrics["rank1"], metrics["mAP"]  # doctest: +SKIP
"""

from .distance import compute_distance
from .metrics import evaluate
from .rerank import rerank

__all__ = ["evaluate", "rerank", "compute_distance"]
