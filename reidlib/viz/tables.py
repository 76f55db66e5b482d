"""Results tables: every run's ``metrics.json`` -> one DataFrame -> mean ± std over seeds, and a
paired test of each method against the baseline.

The thesis's gains (+0.1 to +0.75 points) are the size of the seed-to-seed noise, so a gain is
reported with the spread over seeds and a paired test on runs that share a seed (same data order,
same initialisation of the new parameters), never as a single number.

Example::

    runs = collect_metrics("results")            # one row per run, metrics as fractions
    summary = summarize(runs)                     # one row per (dataset, method), in %
    print(summary_markdown(summary))              # the thesis-style table with its notes
    write_summary(summary, "results")             # results/summary.md and results/summary.csv
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..storage import METRICS_KEYS, read_metrics

# Metric key in metrics.json -> its name in tables and on axes (values are shown in %).
METRIC_NAMES = {"rank1": "Rank-1", "rank5": "Rank-5", "rank10": "Rank-10", "mAP": "mAP",
                "mINP": "mINP"}
METHOD_NAMES = {"baseline": "CLIP-ReID (baseline)", "proposed": "Proposed (deep prompts + LoRA)",
                "deep_only": "Deep prompts only", "lora_only": "LoRA only", "pcl": "PCL-CLIP",
                "promptsg": "PromptSG", "zero_shot": "Zero-shot (no re-ID training)"}
SHORT_NAMES = {"baseline": "Baseline", "proposed": "Proposed", "deep_only": "Deep only",
               "lora_only": "LoRA only", "pcl": "PCL-CLIP", "promptsg": "PromptSG", "zero_shot": "Zero-shot"}
METHOD_ORDER = ["baseline", "proposed", "deep_only", "lora_only", "pcl", "promptsg", "zero_shot"]
# "Methods" that are reference points, not trained: the starting weights evaluated as they are
# (the demo's miniature before any re-ID training, reidlib.demo.run). Their rows stand in the table
# of all runs, the bars and the CMC curves, never in a paired comparison or the gains figure.
NOT_COMPARED = ("zero_shot",)
# The thesis's table compares these with the baseline; every other method goes in the methods table.
THESIS_METHODS = ("baseline", "proposed", "deep_only", "lora_only")
DATASET_ORDER = ["market1501", "dukemtmc", "msmt17", "occ_duke", "iust"]  # the thesis table's first
TESTED = ("rank1", "mAP")     # the metrics the thesis table compares
ALPHA = 0.05                  # significance level of the '*' mark
WILCOXON_MIN_PAIRS = 6        # with fewer pairs the exact two-sided p can never go below 0.05

TEST_NOTE = (
    "Mean ± sample standard deviation (ddof = 1) over seeds, in %. "
    "Δ = method mean − baseline mean, in percentage points (± the standard deviation of the "
    "per-seed differences). p: two-sided paired t-test (scipy.stats.ttest_rel) on runs matched by "
    f"seed; * marks p < {ALPHA}. The Wilcoxon signed-rank test (scipy.stats.wilcoxon, exact) is "
    f"added from {WILCOXON_MIN_PAIRS} pairs on: with fewer, its smallest possible p is above "
    f"{ALPHA}. n/a: fewer than 2 seeds in common, or identical differences on every seed. With a "
    "handful of seeds these tests have little power: a p above 0.05 does not show the methods equal.")


def method_label(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def _method_sort_key(method: str):
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def ordered_datasets(datasets) -> list[str]:
    """The distinct data sets, in the thesis table's order, then the others by name."""
    return sorted(set(datasets), key=_dataset_sort_key)


def _dataset_sort_key(dataset: str):
    return (DATASET_ORDER.index(dataset) if dataset in DATASET_ORDER else len(DATASET_ORDER), dataset)


# --------------------------------------------------------------------------- collecting runs

# Folders under a results root that hold no run of the table: executed notebooks, and finished
# runs a sweep replaced because they were made with other settings (see reidlib.experiments.sweep).
NOT_RUNS = ("runs", "superseded")
# What a table needs of each metrics.json: where the run belongs, and its metrics.
TABLE_KEYS = ("dataset", "method", "seed", *METRICS_KEYS)


def collect_metrics(root: str | Path) -> pd.DataFrame:
    """One row per ``metrics.json`` found under ``root`` (any depth), except under ``runs/`` and
    ``superseded/`` (:data:`NOT_RUNS`).

    Columns: dataset, method, seed, rank1, rank5, rank10, mAP, mINP (fractions, as written by
    the trainer), num_valid_queries, cmc (the list of CMC values) and path (the run folder).
    """
    rows = []
    root = Path(root)
    for path in sorted(root.rglob("metrics.json")):
        if set(path.relative_to(root).parts[:-1]) & set(NOT_RUNS):
            continue
        record = read_metrics(path, TABLE_KEYS)   # a damaged file is named, not a bare JSONDecodeError
        record["path"] = str(path.parent)
        rows.append(record)
    columns = ["dataset", "method", "seed", *METRIC_NAMES, "num_valid_queries", "cmc", "path"]
    df = pd.DataFrame(rows)
    for col in columns:
        if col not in df:
            df[col] = pd.Series(dtype=object)
    df = df[columns + [c for c in df.columns if c not in columns]]
    if len(df):
        df["seed"] = df["seed"].astype(int)
        df = df.sort_values(["dataset", "method", "seed"], key=_sort_key).reset_index(drop=True)
        _refuse_repeated_runs(df, root)
    return df


def _refuse_repeated_runs(runs: pd.DataFrame, root: Path) -> None:
    """Two runs of one (dataset, method, seed) under one root would be averaged as one seed, or
    one would silently win: e.g. the demo's runs from the miniature and from random weights."""
    repeated = runs[runs.duplicated(["dataset", "method", "seed"], keep=False)]
    if len(repeated):
        first = repeated.iloc[0]
        paths = repeated[(repeated["dataset"] == first["dataset"]) & (repeated["method"] == first["method"])
                         & (repeated["seed"] == first["seed"])]["path"].tolist()
        raise ValueError(f"{root} holds {len(paths)} runs of {first['dataset']} {first['method']} seed "
                         f"{first['seed']} ({', '.join(paths)}); point it at one sweep's folder, or keep "
                         "the groups apart with collect_groups({label: folder}) (compare.ipynb: groups=), or "
                         f"name them in {root / GROUPS_FILE}")


def collect_groups(groups: dict) -> pd.DataFrame:
    """The runs of several results folders in one frame, each run's data set renamed
    ``"<dataset>, <label>"``, so that tables, tests and figures keep the groups apart: e.g. the demo's
    runs started from the pretrained miniature and from random weights, which share data set,
    methods and seeds. ``groups``: label -> results folder (:func:`collect_metrics` reads each).

    Example::

        runs = collect_groups({"pretrained miniature": "results/demo/pretrained",
                               "random init": "results/demo/random"})
        summarize(runs)                # rows 'synth, pretrained miniature' and 'synth, random init'
    """
    if not groups:
        raise ValueError("collect_groups: no groups given; pass {label: results folder, ...}")
    frames = []
    for label, root in groups.items():
        runs = collect_metrics(root)
        runs["dataset"] = runs["dataset"].map(lambda dataset, label=label: f"{dataset}, {label}")
        frames.append(runs)
    runs = pd.concat([f for f in frames if len(f)] or frames[:1], ignore_index=True)  # empty frames: no dtypes
    if len(runs):
        runs = runs.sort_values(["dataset", "method", "seed"], key=_sort_key).reset_index(drop=True)
    return runs


# A results folder may name groups of runs kept apart in its tables: {label: subfolder} (the demo's
# "pretrained miniature" and "random init" runs share data set, methods and seeds).
GROUPS_FILE = "groups.json"


def write_groups(root: str | Path, groups: dict[str, str]) -> Path:
    """Record ``{label: subfolder}`` in ``root/groups.json``, for :func:`collect_runs`."""
    path = Path(root) / GROUPS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(groups, indent=1) + "\n")
    return path


def collect_runs(root: str | Path, groups: dict | str | None = "auto") -> pd.DataFrame:
    """The runs a comparison reads: ``groups`` {label: folder} through :func:`collect_groups`;
    ``"auto"``: the groups ``root/groups.json`` names (folders relative to ``root``) when it is
    there, else every run under ``root``; None: every run under ``root`` (:func:`collect_metrics`).

    Example::

        runs = collect_runs("results/demo")      # the demo's two groups, from its groups.json
    """
    if isinstance(groups, dict):
        return collect_groups(groups)
    if groups not in ("auto", None):
        raise ValueError(f"groups={groups!r}: give {{label: folder}}, 'auto' or None")
    listed = Path(root) / GROUPS_FILE
    if groups == "auto" and listed.is_file():
        try:
            named = json.loads(listed.read_text())
        except ValueError as err:
            raise ValueError(f"{listed} is not valid JSON ({err}); it should map labels to subfolders, "
                             "or delete it to compare every run under the folder") from None
        return collect_groups({label: Path(root) / folder for label, folder in named.items()})
    return collect_metrics(root)


def _sort_key(col: pd.Series) -> pd.Series:
    if col.name == "method":
        return col.map(_method_sort_key)
    if col.name == "dataset":
        return col.map(_dataset_sort_key)
    return col


# --------------------------------------------------------------------------- statistics

def paired_test(values: dict, reference: dict) -> dict:
    """Paired comparison of two methods over the seeds both have.

    ``values`` and ``reference`` map seed -> metric (any unit). Returns n_pairs, the mean and
    standard deviation of the per-seed differences (values - reference), the paired t statistic
    and its two-sided p (scipy.stats.ttest_rel), and the Wilcoxon signed-rank p (exact,
    scipy.stats.wilcoxon) when there are at least ``WILCOXON_MIN_PAIRS`` pairs. Undefined
    numbers are NaN.
    """
    from scipy import stats  # here: scipy.stats takes seconds to import
    seeds = sorted(set(values) & set(reference))
    a = np.array([values[s] for s in seeds], dtype=float)
    b = np.array([reference[s] for s in seeds], dtype=float)
    diff = a - b
    out = {"n_pairs": len(seeds), "diff_mean": float(diff.mean()) if len(seeds) else math.nan,
           "diff_std": float(diff.std(ddof=1)) if len(seeds) >= 2 else math.nan,
           "t": math.nan, "p_ttest": math.nan, "p_wilcoxon": math.nan}
    if len(seeds) < 2 or np.allclose(diff, diff[0]):
        return out  # no spread in the differences: the t statistic is undefined
    t = stats.ttest_rel(a, b)
    out["t"], out["p_ttest"] = float(t.statistic), float(t.pvalue)
    if len(seeds) >= WILCOXON_MIN_PAIRS and np.any(diff != 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ties/zeros: scipy switches to the normal approximation
            out["p_wilcoxon"] = float(stats.wilcoxon(a, b).pvalue)
    return out


def summarize(runs: pd.DataFrame, reference: str = "baseline",
              tested: tuple[str, ...] = TESTED) -> pd.DataFrame:
    """One row per (dataset, method): seeds, mean and std of every metric (in %), and for each
    method other than ``reference`` the gain over it with a paired test across seeds.

    Columns: dataset, method, n_seeds, seeds, ``<m>_mean``, ``<m>_std`` for each metric, then
    n_pairs and ``<m>_delta``, ``<m>_delta_std``, ``<m>_t``, ``<m>_p_ttest``, ``<m>_p_wilcoxon``
    for each tested metric (NaN on the reference's own rows).
    """
    if len(runs) == 0:   # else an empty table and empty figures would be written, as if compared
        raise ValueError("no finished runs to compare: no metrics.json under the results folder (a wrong "
                         "results_root, or no run has finished yet)")
    metrics = [m for m in METRIC_NAMES if m in runs and runs[m].notna().any()]
    rows = []
    for (dataset, method), group in runs.groupby(["dataset", "method"], sort=False):
        row = {"dataset": dataset, "method": method, "n_seeds": len(group),
               "seeds": ",".join(str(s) for s in sorted(group["seed"])), "protocol": _protocol(group)}
        for m in metrics:
            values = 100 * group[m].astype(float)
            row[f"{m}_mean"] = values.mean()
            row[f"{m}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
        ref = runs[(runs["dataset"] == dataset) & (runs["method"] == reference)]
        compare = method != reference and method not in NOT_COMPARED and len(ref) > 0
        paired = {}
        for m in tested:
            if compare and m in metrics:
                paired[m] = paired_test(_by_seed(group, m), _by_seed(ref, m))
        row["n_pairs"] = next(iter(paired.values()))["n_pairs"] if paired else math.nan
        for m in tested:
            test = paired.get(m)
            row[f"{m}_delta"] = row[f"{m}_mean"] - 100 * ref[m].astype(float).mean() if test else math.nan
            row[f"{m}_delta_std"] = test["diff_std"] if test else math.nan
            row[f"{m}_t"] = test["t"] if test else math.nan
            row[f"{m}_p_ttest"] = test["p_ttest"] if test else math.nan
            row[f"{m}_p_wilcoxon"] = test["p_wilcoxon"] if test else math.nan
        rows.append(row)
    summary = pd.DataFrame(rows)
    if len(summary):
        summary = summary.sort_values(["dataset", "method"], key=_sort_key).reset_index(drop=True)
    return summary


def _protocol(group: pd.DataFrame) -> str:
    """The evaluation protocol the runs name (runs from before it was recorded: the Market one)."""
    named = group["protocol"].dropna().unique().tolist() if "protocol" in group else []
    return " / ".join(named) if named else "Market-1501 protocol"


def protocol_notes(summary: pd.DataFrame) -> list[str]:
    """One line per data set: how its query/gallery were formed and which matches were left out."""
    if "protocol" not in summary or not len(summary):
        return []
    pairs = summary[["dataset", "protocol"]].drop_duplicates()
    return [f"- {row.dataset}: {row.protocol}" for row in pairs.itertuples()]


def _by_seed(group: pd.DataFrame, metric: str) -> dict:
    """seed -> metric in %; a seed run twice keeps its last value."""
    return {int(s): 100 * float(v) for s, v in zip(group["seed"], group[metric])}


# --------------------------------------------------------------------------- formatting

def _num(x: float, digits: int = 2, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def mean_std(mean: float, std: float, digits: int = 2) -> str:
    """'72.31 ± 0.52', or just the mean when there is a single seed."""
    if std is None or math.isnan(std):
        return _num(mean, digits)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_p(p: float) -> str:
    if p is None or math.isnan(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def format_gain(row: pd.Series, metric: str, digits: int = 2) -> str:
    """'+0.41 ± 0.30 (p=0.210)', with '*' when p < ALPHA and the Wilcoxon p when present."""
    delta = row[f"{metric}_delta"]
    if isinstance(delta, float) and math.isnan(delta):
        return "n/a"
    text = _num(delta, digits, sign=True)
    if not math.isnan(row[f"{metric}_delta_std"]):
        text += f" ± {row[f'{metric}_delta_std']:.{digits}f}"
    p = row[f"{metric}_p_ttest"]
    text += f" (p={format_p(p)})"
    if not math.isnan(p) and p < ALPHA:
        text += " *"
    if not math.isnan(row[f"{metric}_p_wilcoxon"]):
        text += f" [W p={format_p(row[f'{metric}_p_wilcoxon'])}]"
    return text


def comparison_table(summary: pd.DataFrame, method: str = "proposed", reference: str = "baseline",
                     tested: tuple[str, ...] = TESTED) -> pd.DataFrame:
    """The thesis-style table: one row per dataset with the reference's and the method's Rank-1
    and mAP (mean ± std, %), the number of seeds of each, and the gains with their paired test."""
    rows = []
    for dataset, group in summary.groupby("dataset", sort=False):  # summary rows are in table order
        ref = group[group["method"] == reference]
        new = group[group["method"] == method]
        if ref.empty or new.empty:
            continue
        ref, new = ref.iloc[0], new.iloc[0]
        row = {"Dataset": dataset, "Seeds": f"{ref['n_seeds']} / {new['n_seeds']}"}
        for who, r in ((reference, ref), (method, new)):
            for m in tested:
                row[f"{SHORT_NAMES.get(who, who)} {METRIC_NAMES[m]} (%)"] = mean_std(r[f"{m}_mean"], r[f"{m}_std"])
        for m in tested:
            row[f"Δ {METRIC_NAMES[m]} (pp)"] = format_gain(new, m)
        rows.append(row)
    return pd.DataFrame(rows)


def methods_table(summary: pd.DataFrame, metrics: tuple[str, ...] = ("rank1", "rank5", "mAP", "mINP")) -> pd.DataFrame:
    """Every (dataset, method) with its seeds and mean ± std of each metric (%)."""
    rows = []
    for _, r in summary.iterrows():
        seeds = "–" if r["method"] in NOT_COMPARED else r["seeds"]    # not trained: no seed
        row = {"Dataset": r["dataset"], "Method": method_label(r["method"]), "Seeds": seeds}
        for m in metrics:
            if f"{m}_mean" in r:
                row[f"{METRIC_NAMES[m]} (%)"] = mean_std(r[f"{m}_mean"], r[f"{m}_std"])
        rows.append(row)
    return pd.DataFrame(rows)


def frontier_table(summary: pd.DataFrame, reference: str = "baseline",
                   tested: tuple[str, ...] = TESTED) -> pd.DataFrame:
    """Every method of each data set against ``reference`` (CLIP-ReID): seeds, Rank-1 and mAP
    (mean ± std, %) and the gains with their paired test across seeds; the reference's own row first,
    without gains. The thesis table (:func:`comparison_table`) is the two-method view of the same."""
    rows = []
    for dataset, group in summary.groupby("dataset", sort=False):   # summary rows are in table order
        if reference not in set(group["method"]):
            continue
        for _, r in group[~group["method"].isin(NOT_COMPARED)].iterrows():
            row = {"Dataset": dataset, "Method": method_label(r["method"]), "Seeds": r["n_seeds"]}
            for m in tested:
                row[f"{METRIC_NAMES[m]} (%)"] = mean_std(r[f"{m}_mean"], r[f"{m}_std"])
            for m in tested:
                row[f"Δ {METRIC_NAMES[m]} (pp)"] = "" if r["method"] == reference else format_gain(r, m)
            rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table (without the optional 'tabulate' package)."""
    if df.empty:
        return "_(no runs)_"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(str(v) for v in row.values) + " |")
    return "\n".join(lines)


def summary_markdown(summary: pd.DataFrame, reference: str = "baseline",
                     title: str = "Baseline vs proposed") -> str:
    """The whole summary: one comparison table per method against the reference, the table of
    all methods, and the notes that say how the numbers were made."""
    parts = [f"# {title}", ""]
    methods = sorted(summary["method"].unique(), key=_method_sort_key) if len(summary) else []
    methods = [m for m in methods if m not in NOT_COMPARED]    # reference points: in "All runs" only
    # the thesis-style table for the thesis's variants (or for a single method against the reference);
    # with methods beyond the thesis, one methods table of them all against the reference as well
    beyond = [m for m in methods if m not in THESIS_METHODS]
    pairwise = [m for m in methods if m != reference and (m in THESIS_METHODS or len(methods) == 2)]
    for method in pairwise:
        table = comparison_table(summary, method, reference)
        if table.empty:
            continue
        parts += [f"## {method_label(method)} vs {method_label(reference)}", "",
                  f"Seeds: {SHORT_NAMES.get(reference, reference)} / "
                  f"{SHORT_NAMES.get(method, method)} runs. Δ: gain in percentage points "
                  "± std of the per-seed gains (p: paired t-test across seeds).", "",
                  to_markdown(table), ""]
    frontier = frontier_table(summary, reference) if beyond and len(methods) > 2 else pd.DataFrame()
    if not frontier.empty:
        parts += [f"## Every method vs {method_label(reference)}", "",
                  "Δ: gain over the reference in percentage points ± std of the per-seed gains (p: paired "
                  "t-test across seeds).", "", to_markdown(frontier), ""]
    parts += ["## All runs", "", to_markdown(methods_table(summary)), "", "## Notes", "", TEST_NOTE, ""]
    notes = protocol_notes(summary)
    if notes:
        parts += ["Evaluation protocol per data set:", "", *notes, ""]
    return "\n".join(parts)


def write_summary(summary: pd.DataFrame, out_dir: str | Path, reference: str = "baseline",
                  title: str = "Baseline vs proposed") -> dict[str, Path]:
    """``summary.md`` (the tables) and ``summary.csv`` (every number, full precision) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "summary.md", "csv": out / "summary.csv"}
    paths["md"].write_text(summary_markdown(summary, reference, title))
    summary.to_csv(paths["csv"], index=False)
    return paths


def headline_table(metrics: dict) -> pd.DataFrame:
    """One run's test metrics as a one-row table in % (what ``reidlib.train`` returns)."""
    row = {f"{name} (%)": round(100 * float(metrics[key]), 2) for key, name in METRIC_NAMES.items()
           if key in metrics}
    row.update({f"re-ranked {name} (%)": round(100 * float(metrics[f"rerank_{key}"]), 2)
                for key, name in METRIC_NAMES.items() if f"rerank_{key}" in metrics})
    if "num_valid_queries" in metrics:
        valid = float(metrics["num_valid_queries"])       # a mean over VehicleID's draws may be fractional
        row["valid queries"] = int(valid) if valid.is_integer() else round(valid, 1)
    if "num_trials" in metrics:
        row["draws"] = int(metrics["num_trials"])
    if "protocol" in metrics:
        row["protocol"] = metrics["protocol"]
    return pd.DataFrame([row])


# --------------------------------------------------------------------------- cross-data-set matrix

# Written by reidlib.experiments.cross into a run folder (the name is repeated here: tables import no torch).
CROSS_FILE = "cross_metrics.json"


def collect_cross(root: str | Path) -> pd.DataFrame:
    """One row per (trained_on, tested_on, method, seed), metrics as fractions: the diagonal
    (tested on the training data set) from each run's ``metrics.json``, the other cells from its
    ``cross_metrics.json`` (a sweep with ``--cross``). Runs under ``runs/`` and ``superseded/`` are
    left out, as in :func:`collect_metrics`."""
    root = Path(root)
    rows = [{"trained_on": r["dataset"], "tested_on": r["dataset"], "method": r["method"], "seed": int(r["seed"]),
             **{m: r[m] for m in METRIC_NAMES}} for _, r in collect_metrics(root).iterrows()]
    for path in sorted(root.rglob(CROSS_FILE)):
        if set(path.relative_to(root).parts[:-1]) & set(NOT_RUNS):
            continue
        record = read_metrics(path, ("trained_on", "method", "seed", "tested_on"))
        for target, metrics in record.get("tested_on", {}).items():
            if target != record["trained_on"]:  # the diagonal is the in-domain run itself
                rows.append({"trained_on": record["trained_on"], "tested_on": target, "method": record["method"],
                             "seed": int(record["seed"]), **{m: metrics.get(m) for m in METRIC_NAMES}})
    columns = ["trained_on", "tested_on", "method", "seed", *METRIC_NAMES]
    return pd.DataFrame(rows, columns=columns)


def cross_summary(cross: pd.DataFrame, metrics: tuple[str, ...] = TESTED) -> pd.DataFrame:
    """Mean ± std (ddof 1) over seeds, in %, per (method, trained_on, tested_on)."""
    rows = []
    for (method, train, test), group in cross.groupby(["method", "trained_on", "tested_on"], sort=False):
        row = {"method": method, "trained_on": train, "tested_on": test, "n_seeds": len(group)}
        for m in metrics:
            values = 100 * group[m].astype(float)
            row[f"{m}_mean"] = values.mean()
            row[f"{m}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def cross_matrix(summary: pd.DataFrame, method: str, value: str = "rank1_mean") -> pd.DataFrame:
    """The train-on-A (rows) / test-on-B (columns) matrix of one method: ``value`` is a column of
    :func:`cross_summary` (e.g. ``mAP_std``); data sets in the thesis table's order, NaN where a
    pair was not evaluated.

    Example::

        summary = cross_summary(collect_cross("results"))
        cross_matrix(summary, "baseline", "mAP_mean")     # 3 x 3 for three data sets
    """
    part = summary[summary["method"] == method]
    order = ordered_datasets(list(part["trained_on"]) + list(part["tested_on"]))
    matrix = part.pivot(index="trained_on", columns="tested_on", values=value)
    return matrix.reindex(index=order, columns=order)


def cross_markdown(summary: pd.DataFrame) -> str:
    """One table per method: rows 'trained on', columns 'tested on', cells Rank-1 / mAP (mean ±
    std over seeds, %); the diagonal is the in-domain result."""
    parts = ["# Cross-data-set evaluation", "",
             "Rows: the data set a model was trained on; columns: the data set it was tested on "
             "(query/gallery, no adaptation). Cells: Rank-1 / mAP in %, mean ± std over seeds (n). "
             "The diagonal is the in-domain result of the same runs.", ""]
    for method in sorted(summary["method"].unique(), key=_method_sort_key):
        cells = {}
        for _, r in summary[summary["method"] == method].iterrows():
            cells[r["trained_on"], r["tested_on"]] = (f"{mean_std(r['rank1_mean'], r['rank1_std'])} / "
                                                     f"{mean_std(r['mAP_mean'], r['mAP_std'])} ({r['n_seeds']})")
        order = ordered_datasets([k for pair in cells for k in pair])
        table = pd.DataFrame([{"trained on": a, **{f"tested on {b}": cells.get((a, b), "n/a") for b in order}}
                              for a in order])
        parts += [f"## {method_label(method)}", "", to_markdown(table), ""]
    return "\n".join(parts)


def write_cross_matrix(results_root: str | Path, out_dir: str | Path | None = None) -> str | None:
    """``cross.md`` and ``cross.csv`` (the matrices of :func:`cross_markdown`, every number in the
    csv) in ``out_dir`` (default ``results_root``); returns the markdown, or None when no run of
    ``results_root`` has cross-data-set results (nothing is written then)."""
    root = Path(results_root)
    if not any(not set(p.relative_to(root).parts[:-1]) & set(NOT_RUNS) for p in root.rglob(CROSS_FILE)):
        return None
    summary = cross_summary(collect_cross(root))
    out = Path(out_dir or root)
    out.mkdir(parents=True, exist_ok=True)
    text = cross_markdown(summary)
    (out / "cross.md").write_text(text)
    summary.to_csv(out / "cross.csv", index=False)
    return text


def cross_headlines(cross: dict) -> pd.DataFrame:
    """What :func:`~reidlib.experiments.cross.cross_evaluate` returns ({data set: metrics}) as one
    row per tested data set, in %."""
    frames = [headline_table(metrics).assign(**{"tested on": name}) for name, metrics in cross.items() if metrics]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
