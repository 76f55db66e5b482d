"""Experiments: many runs at once, and what is read across them.

Sweeps over data sets x methods x seeds (:mod:`.sweep`), who owns a run (:mod:`.claims`), the
state of every run (:mod:`.status`), where runs execute (:mod:`.launch`: this process, worker
processes, torchrun, SLURM), where runs live (:mod:`.layout`) and cross-data-set tests
(:mod:`.cross`). The core (config, data, model, methods, eval, engine, viz) never imports this
package.

Example::

    from reidlib.experiments import run_sweep
    run_sweep(["market1501"], ["baseline", "proposed"], [0, 1, 2], data_roots="data",
              results_root="results/table")
"""
from .layout import load_run_models, run_dir


def __getattr__(name):
    # The sweep imports torch only when a run trains; this keeps `reidlib sweep --help` quick.
    if name == "run_sweep":
        from .sweep import run_sweep
        return run_sweep
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["run_sweep", "run_dir", "load_run_models"]
