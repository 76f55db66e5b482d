"""Cross-data-set evaluation: a model trained on data set A tested on the query/gallery split of
data set B (the generalisation table of re-ID papers: train on A, test on B, no adaptation).

Results go to ``<run folder>/cross_metrics.json``, one entry per tested data set; a data set
already there is not evaluated again (a killed evaluation continues where it stopped). The file is
not named ``metrics.json`` on purpose: tables of in-domain results never read it.

Example::

    cfg = run_config("market1501", "baseline", 0, "data/market", base_config="tiny")
    reidlib.train(cfg)
    cross_evaluate(cfg, {"dukemtmc": "data/duke"})     # {'dukemtmc': {'rank1': ..., 'mAP': ...}}
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import Config
from ..data import load_dataset
from ..eval.inference import check_valid_queries, evaluate_model
from ..methods import run_label
from ..methods.trained import load_trained_model
from ..runtime import setup_runtime
from ..storage import write_json
from ..weights import final_model

log = logging.getLogger("reidlib")

CROSS_FILE = "cross_metrics.json"


def parse_targets(test_on) -> dict[str, str | None]:
    """``["dukemtmc=/data/duke", "msmt17"]`` (a name alone: the run's ``data.root``) or a dict
    name -> folder, as a dict.

    >>> parse_targets(["dukemtmc=/d", "msmt17"])
    {'dukemtmc': '/d', 'msmt17': None}
    """
    if isinstance(test_on, dict):
        return {str(k): (None if v is None else str(v)) for k, v in test_on.items()}
    targets = {}
    for item in test_on or []:
        name, _, folder = str(item).partition("=")
        if not name.strip():
            raise ValueError(f"test_on: '{item}' names no data set; give NAME or NAME=DIR, e.g. dukemtmc=/data/duke")
        targets[name.strip()] = folder.strip() or None
    return targets


def read_cross(folder: str | Path) -> dict:
    """The run's ``cross_metrics.json`` ({} when there is none)."""
    path = Path(folder) / CROSS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def cross_evaluate(cfg: Config, test_on, weights: str | Path | None = None) -> dict:
    """Test the run's final model (``weights``, default the run's model folder) on every
    data set of ``test_on`` (see :func:`parse_targets`) with the run's test settings; returns
    {data set: metrics} for all of them and writes them to ``<output_dir>/cross_metrics.json``."""
    targets = parse_targets(test_on)
    out = Path(cfg.output_dir)
    record = read_cross(out) or {"trained_on": cfg.data.dataset, "method": run_label(cfg), "seed": cfg.seed,
                                 "tested_on": {}}
    todo = {name: root for name, root in targets.items() if name not in record["tested_on"]}
    if not todo:
        return {name: record["tested_on"][name] for name in targets}
    weights = Path(weights or final_model(out))
    runtime = setup_runtime(cfg)
    model, _ = load_trained_model(weights, cfg, device=runtime.device)
    if getattr(model, "sie_cameras", 0) and cfg.test.default_camera < 0:
        raise ValueError(f"{weights}: trained with SIE, whose camera table is the training set's; testing on other "
                         "data sets needs one camera for all images: set test.default_camera=K (e.g. 0)")
    if getattr(model, "sie_views", 0) and cfg.test.default_view < 0:
        raise ValueError(f"{weights}: trained with view SIE; testing on other data sets needs one view for all "
                         "images: set test.default_view=K (e.g. 0)")
    for name, root in todo.items():
        dataset = load_dataset(name, root or cfg.data.root, test_size=cfg.data.test_size, trials=cfg.test.trials)
        check_valid_queries(dataset)
        metrics = evaluate_model(model, dataset, cfg, runtime)
        if runtime.is_main:
            record["tested_on"][name] = {"data_root": str(dataset.root), **metrics}
            write_json(out / CROSS_FILE, record)  # after each data set: a kill loses one at most
            log.info("trained on %s, tested on %s: R1 %.2f  mAP %.2f", cfg.data.dataset, name,
                     100 * metrics["rank1"], 100 * metrics["mAP"])
    runtime.close()
    return {name: record["tested_on"].get(name) for name in targets}
