"""Where a sweep keeps its runs: ``RESULTS/<dataset>/<method>/seed<k>/``, one run folder each.

A run folder is what :func:`reidlib.train` writes (``config.yaml``, ``metrics.jsonl``,
``metrics.json``, the model and checkpoints); a sweep adds ``claim.json`` while the run is owned,
``failed.json`` when it failed and ``cross_metrics.json`` for cross-data-set tests.

Example::

    run_dir("results/table", "market1501", "proposed", 0)   # results/table/market1501/proposed/seed0
    models = load_run_models("results/demo/pretrained", "synth", ["baseline", "proposed"], seed=0)
"""
from __future__ import annotations

from pathlib import Path


def run_dir(results_root: str | Path, dataset: str, method: str, seed: int) -> Path:
    """The folder of one run of a sweep: ``results_root/<dataset>/<method>/seed<k>``."""
    return Path(results_root) / dataset / method / f"seed{seed}"


def load_run_models(results_root: str | Path, dataset: str, methods, seed: int, device: str = "cpu") -> dict:
    """method -> (model, cfg) from the model folder of ``results_root/<dataset>/<method>/seed<seed>``."""
    from ..methods.trained import load_trained_model  # torch: only when models are loaded
    from ..weights import final_model, has_final_model
    models = {}
    for method in methods:
        folder = run_dir(results_root, dataset, method, seed)
        path = final_model(folder)
        if not has_final_model(folder):
            raise FileNotFoundError(f"{path} not found: train this run first (train_eval.ipynb or "
                                    "python -m reidlib sweep)")
        model, cfg = load_trained_model(path, device=device)
        cfg.device = device
        models[method] = (model, cfg)
    return models
