"""The CPU demo: a generated data set and a pretrained miniature CLIP -> baseline and proposed over
seeds, from the miniature and, as a control, from random weights -> the summary table.

    python -m reidlib demo                   # make demo; a few minutes on 2 CPU cores
    python -m reidlib demo --seeds 0 1 2     # more seeds: a more honest spread

Steps: write the generated Market-format data set to ``data/synth`` (when missing; read as data set
``synth``) and print its statistics; pretrain the miniature CLIP on a generated image-caption set
(:mod:`reidlib.demo.pretrain`; cached in ``data/miniature`` under a hash of its recipe, so only
the first demo pays for it); train every (method, seed) with the ``tiny`` config twice, from the
miniature and from random weights (and test both starting points as they are: the table's
zero-shot rows), by executing ``notebooks/train_eval.ipynb`` through the sweep
(finished runs are skipped on a re-run); execute ``compare.ipynb`` on both groups and
``attention.ipynb`` on the pretrained runs; draw the miniature's zero-shot text-to-image search;
print the summary table. Results: ``results/demo/`` (``summary.md``, ``summary.csv``,
``figures/``, the runs in ``pretrained/`` and ``random/``, executed notebooks in ``runs/``).

The miniature knows colours, garments and where they sit on a body, from a few thousand generated
pictures: it stands for CLIP's premise (re-ID starts from a model that relates images to words),
not for CLIP's knowledge, and the numbers say nothing about ViT-B/16 on real data.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from ..config import load_config
from ..experiments.layout import run_dir
from ..experiments.sweep import ATTENTION_NOTEBOOK, COMPARE_NOTEBOOK, error_message, execute_notebook, run_sweep
from ..viz.tables import write_groups

DATASET = "synth"
# On top of the tiny config (whose epochs and LRs are sized for this demo): every other stage-2
# epoch is evaluated, so the training curves show the test metrics over time.
DEMO_OVERRIDES = ["stage2.eval_period=2"]
# The two starting points, each a results folder under --results. Both run GELU: the miniature was
# pretrained with it (and loading an open_clip checkpoint picks it), and the control then differs
# from it in the weights alone.
GROUPS = {"pretrained miniature": "pretrained", "random init": "random"}
# `--methods all`: the thesis's two and the newer methods beside them (each on the tiny config).
ALL_METHODS = ["baseline", "proposed", "pcl", "promptsg"]
ZERO_SHOT_FIGURE = "zero_shot_text_search.png"
# The starting weights' own test (no re-ID training) in each group: a row of the summary, a bar.
ZERO_SHOT_METHOD = "zero_shot"


def _has_images(root: Path) -> bool:
    return all(any((root / split).glob("*.jpg")) for split in ("bounding_box_train", "query", "bounding_box_test"))


def prepare_data(root: str | Path, ids: int = 60, cams: int = 4, seed: int = 0, echo=print) -> Path:
    """The generated data set at ``root``, written when it is not there yet (or lacks its captions,
    as one written by an older reidlib does)."""
    from .synth import CAPTIONS_CSV, generate_market
    root = Path(root)
    if not (_has_images(root) and (root / CAPTIONS_CSV).is_file()):
        echo(f"generating the demo data set in {root} ({ids} identities, {cams} cameras) ...")
        generate_market(root, ids=ids, cams=cams, seed=seed, overwrite=True)
    return root


def group_overrides(group: str, miniature: str | Path) -> list[str]:
    """The config keys of one starting point: the miniature's weights, or random ones."""
    weights = miniature if group == "pretrained" else "none"
    return [f"model.pretrained={weights}", "model.quick_gelu=false"]


def zero_shot_queries(data, captions: dict[str, str], count: int = 3) -> list[tuple[str, int]]:
    """(caption, pid) of ``count`` query images spread over the query list: what each shows, in
    the words of the data set's ``captions.csv``."""
    picked = [data.query[i * len(data.query) // count] for i in range(count)]
    return [(captions[Path(path).relative_to(data.root).as_posix()], pid) for path, pid, _ in picked]


def zero_shot_figure(miniature: str | Path, data, out_png: str | Path, top: int = 5) -> None:
    """The miniature's text-to-image search on the test gallery, before any re-ID training."""
    import matplotlib.pyplot as plt

    from ..weights.clip import load_clip
    from .synth import read_captions
    from .zeroshot import text_search_figure
    clip = load_clip(load_config("tiny").model.name, str(miniature))   # the architecture the runs train
    queries = zero_shot_queries(data, read_captions(data.root))
    figure = text_search_figure(clip, queries, data, out_png, top=top,
                                title=f"Zero-shot text-to-image search, pretrained miniature, top {top} ({data.name})")
    plt.close(figure)


def zero_shot_config(group: str, miniature: str | Path, root: str | Path, overrides=(), device: str = "cpu"):
    """The config a group's runs start from (the tiny config, the demo's keys, the group's weights)."""
    return load_config("tiny", [*DEMO_OVERRIDES, *group_overrides(group, miniature), *overrides,
                                f"data.dataset={DATASET}", f"data.root={root}", f"device={device}"])


def zero_shot_metrics(cfg, data) -> dict:
    """Test metrics of the re-ID model as ``cfg`` builds it, before any training: the starting
    weights' image features as they are (the classifiers, which the test does not use, drawn with
    seed 0)."""
    import torch

    from ..eval.inference import evaluate_model
    from ..model import build_model
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=data.num_train_pids)
    return evaluate_model(model, data, cfg, progress=False)


def write_zero_shot(group_root: str | Path, metrics: dict, cfg=None) -> Path:
    """``GROUP/<dataset>/zero_shot/metrics.json``: the starting weights' test, a run of "method"
    ``zero_shot`` (seed 0: nothing was trained) that the summary lists beside the trained runs (a
    reference point: in the table of all runs and the bars, never in a paired test). Not a sweep's
    ``seed<k>`` folder, so that sweeps and their status leave it alone."""
    from ..storage import write_json
    path = Path(group_root) / DATASET / ZERO_SHOT_METHOD / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {"weights": cfg.model.pretrained} if cfg is not None else {}
    write_json(path, {"dataset": DATASET, "method": ZERO_SHOT_METHOD, "seed": 0, **weights,
                      **{k: v for k, v in metrics.items()}})
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reidlib demo",
                                     description="Generated data + pretrained miniature CLIP -> baseline vs "
                                                 "proposed over seeds, from the miniature and from random "
                                                 "weights (tiny config, CPU) -> results/demo/summary.md.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="default: 0 1")
    parser.add_argument("--methods", nargs="+", default=["baseline", "proposed"],
                        help="sweep names (default: baseline proposed); 'all': " + " ".join(ALL_METHODS))
    parser.add_argument("--data", default="data/synth", help="generated data set folder (default data/synth)")
    parser.add_argument("--results", default="results/demo", help="results folder (default results/demo)")
    parser.add_argument("--ids", type=int, default=60, help="identities of the generated set (default 60)")
    parser.add_argument("--miniature", default=None,
                        help="a pretrained miniature checkpoint to use (default: build or reuse the cached one)")
    parser.add_argument("--cache", default="data/miniature", help="the miniature's cache (default data/miniature)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help=f"config overrides after the demo's own ({' '.join(DEMO_OVERRIDES)})")
    parser.add_argument("--device", default="cpu", help="default cpu")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs trained at once, one CPU thread each (default: 2, or 1 on one core)")
    parser.add_argument("--no-attention", action="store_true", help="skip attention.ipynb")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a run failed")
    return parser


def _miniature(args) -> Path:
    """The miniature's checkpoint: the one given, or the cached one of the default recipe, built
    the first time by ``python -m reidlib pretrain`` in a process of its own: there torch starts with
    two threads that sleep while they wait (OMP_WAIT_POLICY, read when torch loads), where this
    process has torch loaded already and its runs take one thread each."""
    from .pretrain import PretrainRecipe, miniature_path
    if args.miniature:
        return Path(args.miniature)
    env = {**os.environ, "OMP_NUM_THREADS": str(min(2, os.cpu_count() or 1)), "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "reidlib", "pretrain", "--cache", args.cache, "--device", args.device]
    if subprocess.run(command, env=env).returncode != 0:
        raise RuntimeError(f"pretraining the miniature failed ({' '.join(command[1:])}); see the lines above")
    return miniature_path(PretrainRecipe(), args.cache)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "all" in args.methods:
        expanded = (m for name in args.methods for m in (ALL_METHODS if name == "all" else [name]))
        args.methods = list(dict.fromkeys(expanded))
    echo = lambda text: print(text, flush=True)  # noqa: E731
    started = time.time()
    # One CPU thread per run (the notebooks' kernels inherit it) and --jobs runs at once: the tiny
    # model's matrices are too small to gain from threads, and on a busy machine spinning OpenMP
    # threads made runs several times slower (measured: 40 s with one thread vs 68-210 s with two).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = prepare_data(args.data, args.ids, echo=echo)
    from ..data import load_dataset
    data = load_dataset(DATASET, root)
    echo(data.stats_table())
    miniature = _miniature(args)
    results = Path(args.results)
    reports = {}
    for label, group in GROUPS.items():
        echo(f"--- {label}: {results / group}")
        reports[group] = run_sweep([DATASET], args.methods, args.seeds, data_roots=str(root),
                                   results_root=results / group, compare_notebook=None,
                                   overrides=DEMO_OVERRIDES + group_overrides(group, miniature) + args.overrides,
                                   base_config="tiny", device=args.device, jobs=args.jobs, echo=echo)
    ok = all(report.ok for report in reports.values())
    for label, group in GROUPS.items():   # the starting weights themselves: the table's zero-shot rows
        try:
            cfg = zero_shot_config(group, miniature, root, args.overrides, args.device)
            write_zero_shot(results / group, zero_shot_metrics(cfg, data), cfg)
        except Exception as err:  # noqa: BLE001 - reported; the trained runs are still compared
            ok = False
            echo(f"zero-shot evaluation ({label}) failed: {type(err).__name__}: {err}")
    summary = _compare(results, echo)
    ok &= summary is not None
    figures = results / "figures"
    try:
        zero_shot_figure(miniature, data, figures / ZERO_SHOT_FIGURE)
    except Exception as err:  # noqa: BLE001 - reported; the table is still there
        ok = False
        echo(f"zero-shot search figure failed: {type(err).__name__}: {err}")
    if not args.no_attention:
        ok &= _attention(args, results, root, data, echo)
    if summary is not None:
        echo("")
        echo(summary.read_text())
        echo("figures:\n" + "\n".join(f"  {p}" for p in sorted(figures.glob("*.png"))))
        echo(f"training curves: {results}/<pretrained|random>/{DATASET}/<method>/seed<k>/training_curves.png")
    echo(f"demo finished in {time.time() - started:.0f} s")
    return 1 if args.strict and not ok else 0


def _compare(results: Path, echo) -> Path | None:
    """compare.ipynb over both groups: summary.md, summary.csv and the figures in ``results``."""
    out_nb = results / "runs" / "compare.ipynb"
    echo(f"compare: {COMPARE_NOTEBOOK} -> {out_nb}")
    write_groups(results, GROUPS)   # compare.ipynb's default groups="auto" reads it: the folder compares as it is
    try:
        execute_notebook(COMPARE_NOTEBOOK, out_nb, {"results_root": str(results), "out_dir": str(results),
                                                    "groups": "auto"})
    except Exception as err:  # noqa: BLE001 - reported; the runs are still there
        echo(f"compare.ipynb failed: {error_message(err)}")
        return None
    return results / "summary.md"


def _attention(args, results: Path, root: Path, data, echo) -> bool:
    """attention.ipynb on the runs from the miniature: attention maps and retrieval grids."""
    pretrained = results / GROUPS["pretrained miniature"]
    from ..weights import has_final_model
    if not all(has_final_model(run_dir(pretrained, DATASET, m, args.seeds[0])) for m in args.methods):
        return True  # a failed run is reported already
    out_nb = results / "runs" / "attention.ipynb"
    echo(f"attention maps and retrieval grids: {ATTENTION_NOTEBOOK} -> {out_nb}")
    try:
        execute_notebook(ATTENTION_NOTEBOOK, out_nb,
                         {"results_root": str(pretrained), "out_dir": str(results / "figures"), "dataset": DATASET,
                          "data_root": str(root), "seed": args.seeds[0], "methods": args.methods,
                          "device": args.device, "queries": [i * len(data.query) // 3 for i in range(3)]})
    except Exception as err:  # noqa: BLE001 - reported; the table is still there
        echo(f"attention.ipynb failed: {error_message(err)}")
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
