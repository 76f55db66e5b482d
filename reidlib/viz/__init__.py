"""Tables, figures, attention maps and retrieval grids of trained runs (what the notebooks call).

    runs = collect_metrics("results")              # tables.py: metrics.json files -> DataFrame
    summary = summarize(runs)                       # mean ± std over seeds, paired test vs baseline
    plot_bars(runs, "bars.png"); plot_cmc(runs, "cmc.png")            # plots.py (+ .pdf, 300 dpi)
    training_curves("results/runs/tiny")            # a run's losses, LRs and evaluations (Figure)
    attention_maps(model, images)                   # attention.py: attention rollout of the ViT
    retrieval_grid("q.jpg", ranked_paths, flags, "grid.png")          # retrieval.py
    explore("runs/baseline/seed0", "runs/proposed/seed0")                # explorer.py: the interactive explorer
"""
import logging

from .figures import save_figure
from .plots import (
    plot_bars,
    plot_cmc,
    plot_gains,
    plot_training_curves,
    read_jsonl,
    training_curves,
    training_frames,
)
from .retrieval import rank_gallery, retrieval_figure, retrieval_grid, retrieval_rows
from .tables import (
    METHOD_NAMES,
    METRIC_NAMES,
    collect_cross,
    collect_groups,
    collect_metrics,
    collect_runs,
    comparison_table,
    cross_headlines,
    cross_markdown,
    cross_matrix,
    cross_summary,
    frontier_table,
    headline_table,
    methods_table,
    paired_test,
    summarize,
    summary_markdown,
    to_markdown,
    write_cross_matrix,
    write_groups,
    write_summary,
)

__all__ = ["collect_metrics", "collect_groups", "collect_runs", "write_groups", "summarize", "paired_test",
           "comparison_table", "methods_table", "frontier_table",
           "summary_markdown", "to_markdown", "write_summary", "plot_bars", "plot_cmc", "plot_gains",
           "plot_training_curves", "training_curves", "save_figure", "read_jsonl", "training_frames",
           "rank_gallery",
           "retrieval_grid", "retrieval_rows", "attention_maps", "attention_figure",
           "retrieval_figure", "headline_table", "show_progress",
           "METHOD_NAMES", "METRIC_NAMES", "collect_cross", "cross_headlines", "cross_summary",
           "cross_matrix", "cross_markdown", "write_cross_matrix", "explore"]


def __getattr__(name):
    # attention.py imports torch; tables and plots do not need it.
    if name in ("attention_maps", "attention_rollout", "last_layer_cls_attention", "attention_figure",
                "AttentionRecorder"):
        from . import attention
        return getattr(attention, name)
    # explorer.py needs ipywidgets (the `explore` extra) and torch: loaded when asked for. (Not a
    # module named explore: importing it would put the module where the function should be.)
    if name in ("explore", "Explorer"):
        from . import explorer
        return getattr(explorer, name)
    if name == "load_run_models":   # a sweep's layout: moved with the sweep
        raise AttributeError("reidlib.viz.load_run_models moved: use reidlib.experiments.load_run_models")
    if name == "text_search_figure":   # the demo's zero-shot figure: moved with the demo
        raise AttributeError("reidlib.viz.text_search_figure moved: use reidlib.demo.zeroshot.text_search_figure")
    raise AttributeError(f"module 'reidlib.viz' has no attribute '{name}'")


def show_progress(level: int = logging.INFO) -> None:
    """Print reidlib's log lines (data set table, a line per epoch, final metrics) to stdout at
    ``level``, also where logging is configured otherwise. ``reidlib.train`` and ``reidlib.test`` do
    this by themselves when nothing configured logging (:func:`reidlib.runtime.default_logging`);
    calling it again adds nothing."""
    from ..runtime import log_to_stdout
    log_to_stdout(level)
