"""Command line: ``python -m reidlib COMMAND ...`` (also installed as ``reidlib``).

    train   CONFIG [key=value ...]                          the method's stages, then the final evaluation
    test    CONFIG weights=PATH [key=value ...] [--json]    evaluate a trained model (--json: every metric as JSON)
    extract CONFIG weights=PATH images=DIR out=feats.npz    features of a folder of images
    search  CONFIG weights=PATH query=IMG gallery=DIR|feats.npz [top=10] [grid=PNG]
    convert IN OUT [config=CONFIG] [key=value ...]          a reference state dict -> a reidlib checkpoint
    export  [weights=]PATH out=FILE|DIR [format=onnx|torchscript|hf] [half=true] [target=boxmot [camera=K]]
            [push=USER/NAME [private=true]] [config=CONFIG]   ONNX, TorchScript (.torchscript), BoxMOT, the hub
    info    weights=PATH [config=CONFIG]                    the model card (a reference file: what was detected)
    sweep   --datasets ... --methods ... --seeds ...        papermill runs of notebooks/train_eval.ipynb
    demo                                                    generated data -> baseline vs proposed -> table
    pretrain [--steps N ...]                                the miniature CLIP for the demo (cached by recipe)
    methods [NAME] [--plugins FILE.py ...]                  the registered methods, one line each (NAME: its settings)
    doctor  [--device cpu|cuda] [--data ROOT --dataset NAME] is this machine ready? versions, GPUs, memory, a smoke run
    explore RUN [RUN2] [--data-root DIR] [--port N] [--no-browser]  the retrieval explorer as a web page (Voila)

CONFIG is a YAML path or a shipped config name (vit_clipreid, vit_proposed, rn50_clipreid, tiny).
weights= takes a reidlib checkpoint or a state dict of the CLIP-ReID reference code; convert, export
and info use the checkpoint's own config (a reference file: vit_clipreid or rn50_clipreid) unless
config= names one.
Under torchrun, ``torchrun --nproc_per_node N -m reidlib train ...`` trains with DDP.
``reidlib train CONFIG --help`` lists the keys with that config's values.
"""
from __future__ import annotations

import logging
import os
import sys

from .config import help_text, load_config

COMMANDS = ("train", "test", "extract", "search", "sweep", "demo", "convert", "export", "info", "pretrain",
            "methods", "doctor", "explore")
# Command arguments that are not config keys, and the config keys some of them stand for.
ALIASES = {"weights": "test.weights"}
COMMAND_ARGS = {"extract": ("images", "out"), "search": ("query", "gallery", "top", "grid"),
                "convert": ("config",), "info": ("config",),
                "export": ("format", "out", "half", "config", "target", "camera", "view", "push", "private")}
# Commands about one weights file: CONFIG is optional (config=NAME), the file's own by default.
WEIGHTS_COMMANDS = ("convert", "export", "info")


def _usage(cfg=None, name: str | None = None) -> str:
    """The usage text with every config key: the defaults, or ``cfg``'s values (config ``name``)."""
    where = f"\nConfig keys of {name} (override with key=value):\n" if cfg is not None else \
        "\nConfig keys (override with key=value):\n"
    return (__doc__ or "") + where + help_text(cfg)


def split_arguments(command: str, args: list[str]) -> tuple[str | None, list[str], dict[str, str]]:
    """CONFIG, config overrides and command arguments (e.g. images=DIR) from the raw arguments."""
    config = None
    overrides, extra = [], {}
    for arg in args:
        if "=" not in arg:
            if config is not None:
                raise SystemExit(f"reidlib {command}: unexpected argument '{arg}' (want key=value)")
            config = arg
            continue
        key, value = arg.split("=", 1)
        if key in COMMAND_ARGS.get(command, ()):
            extra[key] = value
        else:
            overrides.append(f"{ALIASES.get(key, key)}={value}")
    return config, overrides, extra


def _require(extra: dict, command: str, *keys: str) -> None:
    missing = [k for k in keys if k not in extra]
    if missing:
        raise SystemExit(f"reidlib {command}: missing {', '.join(k + '=...' for k in missing)}")


def _top(text: str) -> int:
    """``top=N`` of search: a positive integer."""
    try:
        top = int(text)
    except ValueError:
        top = 0
    if top < 1:
        raise ValueError(f"top={text}: must be a positive number of results, e.g. top=10")
    return top


def main(argv: list[str] | None = None) -> int:
    """Run a command; bad input (a missing file, an unknown key, a bad value) ends in one line on
    stderr and exit status 2 (REIDLIB_DEBUG=1 shows the traceback)."""
    try:
        return _main(argv)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as err:
        if os.environ.get("REIDLIB_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"reidlib: {type(err).__name__}: {message}", file=sys.stderr)
        return 2
    except SystemExit as err:
        if isinstance(err.code, str):   # SystemExit("message") would exit 1: a usage error exits 2
            print(err.code, file=sys.stderr)
            raise UsageExit(err.code) from None
        raise


class UsageExit(SystemExit):
    """Exit status 2 for a usage error whose line is already printed; ``str()`` is that line."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise SystemExit(f"reidlib: unknown command '{command}'; one of {', '.join(COMMANDS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if command == "sweep":
        from .experiments.sweep import main as sweep_main
        return sweep_main(rest)
    if command == "demo":
        from .demo.run import main as demo_main
        return demo_main(rest)
    if command == "pretrain":
        # Set before torch loads: waiting OpenMP threads then sleep instead of spinning. On a
        # busy 2-core machine a 2-thread step took 18.7 s spinning, 1.0 s sleeping (1 thread: 1.1 s).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from .demo.pretrain import main as pretrain_main
        return pretrain_main(rest)
    if command == "methods":
        return _methods_command(rest)
    if command == "doctor":
        from .doctor import main as doctor_main
        return doctor_main(rest)
    if command == "explore":
        from .explore_page import main as explore_main
        return explore_main(rest)
    if "-h" in rest or "--help" in rest:
        return _command_help(command, [arg for arg in rest if arg not in ("-h", "--help")])
    as_json = command == "test" and "--json" in rest
    rest = [arg for arg in rest if not (as_json and arg == "--json")]
    if command in WEIGHTS_COMMANDS:
        return _weights_command(command, rest)
    config, overrides, extra = split_arguments(command, rest)
    if config is None:
        raise SystemExit(f"reidlib {command}: give a CONFIG (a YAML path or a shipped name, e.g. vit_clipreid)")
    cfg = load_config(config, overrides)
    if command == "train":
        from .engine.trainer import train
        train(cfg)
    elif command == "test":
        from .engine.trainer import test
        metrics = test(cfg)
        if as_json:
            import json
            print(json.dumps(metrics, indent=1, default=str))
        else:
            print(metrics_table(metrics))
    elif command == "extract":
        _require(extra, command, "images", "out")
        from .search import extract_folder
        extract_folder(cfg, extra["images"], extra["out"])
    elif command == "search":
        _require(extra, command, "query", "gallery")
        from .search import search
        search(cfg, extra["query"], extra["gallery"], top=_top(extra.get("top", "10")),
               grid=extra.get("grid", "retrieval.png"))
    return 0


def _command_help(command: str, rest: list[str]) -> int:
    """``COMMAND CONFIG [key=value ...] --help``: the usage with that config's values (overrides
    applied); without a CONFIG (or for a weights command), the defaults."""
    config = None
    if command not in WEIGHTS_COMMANDS:
        config, overrides, _ = split_arguments(command, rest)
    if config is None:
        print(_usage())
        return 0
    print(_usage(load_config(config, overrides), config))
    return 0


# metrics.json key -> column of `reidlib test`'s table (values in %)
TABLE_COLUMNS = {"rank1": "R1", "rank5": "R5", "rank10": "R10", "mAP": "mAP", "mINP": "mINP"}


def metrics_table(metrics: dict) -> str:
    """A test's metrics as a small table in %: R1, R5, R10, mAP and mINP (those present), a row
    for the re-ranked ones when there are, and the protocol and number of scored queries.

    >>> print(metrics_table({"rank1": 0.5, "rank5": 0.75, "rank10": 0.9, "mAP": 0.4, "cmc": [0.5] * 50}))
                R1     R5    R10    mAP
    metrics  50.00  75.00  90.00  40.00
    """
    columns = [k for k in TABLE_COLUMNS if isinstance(metrics.get(k), (int, float))]
    rows = [("metrics", [100 * float(metrics[k]) for k in columns])]
    if all(isinstance(metrics.get(f"rerank_{k}"), (int, float)) for k in columns) and columns:
        rows.append(("re-ranked", [100 * float(metrics[f"rerank_{k}"]) for k in columns]))
    label = max(len(name) for name, _ in rows)
    lines = [" " * label + "".join(f"{TABLE_COLUMNS[k]:>7}" for k in columns)]
    lines += [f"{name:<{label}}" + "".join(f"{v:7.2f}" for v in values) for name, values in rows]
    notes = []
    if "num_valid_queries" in metrics:
        notes.append(f"{metrics['num_valid_queries']} queries scored")
    if metrics.get("num_trials"):
        notes.append(f"mean over {metrics['num_trials']} gallery draws")
    if metrics.get("protocol"):
        notes.append(str(metrics["protocol"]))
    if notes:
        lines.append("; ".join(notes))
    return "\n".join(lines)


def _methods_command(rest: list[str]) -> int:
    """``methods``: one line per registered method (its variants in brackets); ``methods NAME``:
    its summary, shipped config, stages and own options."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m reidlib methods")
    parser.add_argument("name", nargs="?", help="a method or variant to describe")
    parser.add_argument("--plugins", nargs="+", default=[], help="files or modules that register methods")
    args = parser.parse_args(rest)
    from .methods import find_variant, get_method, load_plugins, method_names
    load_plugins(args.plugins)
    if args.name is None:
        for name in method_names():
            method = get_method(name)
            variants = [v for v in method.variants if v != name]
            also = f" [{', '.join(variants)}]" if variants else ""
            print(f"{name:<12}{method.summary}{also}")
        return 0
    method, config, overrides = find_variant(args.name)
    print(f"{method.name}: {method.summary}")
    print(f"  config: {config or 'the defaults'}" + (f" + {' '.join(overrides)}" if overrides else ""))
    cfg = load_config(config, [f"method={method.name}", *overrides])
    for stage in method.stages(cfg):
        print(f"  stage {stage.number}: {stage.name}, {stage.epochs(cfg)} epochs")
    for line in method.describe_options():
        print(f"  {line}")
    return 0


def _weights_command(command: str, rest: list[str]) -> int:
    """convert, export, info: one weights file, its own config unless config= names another."""
    positional = [arg for arg in rest if "=" not in arg]
    _, overrides, extra = split_arguments(command, [arg for arg in rest if "=" in arg])
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("test.weights=")]
    overrides = [o for o in overrides if not o.startswith("test.weights=")]
    if command == "convert":
        if len(positional) != 2 or given:
            raise SystemExit("reidlib convert: give IN OUT (the weights to read; the reidlib model folder "
                             "to write, or a .pt file)")
        weights = positional[0]
        _check_convert_output(weights, positional[1])
    elif command == "export" and len(positional) == 1 and not given:
        weights = positional[0]            # `export RUN/model out=...` reads as well as weights=RUN/model
    elif positional or not given:
        raise SystemExit(f"reidlib {command}: give weights=PATH" + (f", not '{positional[0]}'" if positional else ""))
    else:
        weights = given[0]
    from .weights import weights_config
    cfg = load_config(extra["config"], overrides) if "config" in extra else weights_config(weights, overrides)
    if command == "convert":
        from .methods.trained import convert_weights
        named = any(o.startswith("data.dataset=") for o in overrides) or "config" in extra
        convert_weights(weights, positional[1], cfg, dataset=cfg.data.dataset if named else None)
    elif command == "export":
        _require(extra, command, "out")
        from .export import export_command
        export_command(weights, extra, cfg)
    else:
        _print_card(weights, cfg)
    return 0


def _check_convert_output(source: str, out: str) -> None:
    """Before any weights are read: OUT must not be IN (the source would be replaced by its own
    conversion, or half of it) and must be writable."""
    from pathlib import Path

    from .storage import check_writable
    if Path(out).resolve() == Path(source).resolve():
        raise ValueError(f"convert: OUT is IN ({source}); write the converted model to another path")
    check_writable(Path(out).resolve().parent, "OUT")


def _print_card(weights: str, cfg) -> None:
    import json

    import yaml

    from .weights import describe_weights
    card = describe_weights(weights, cfg)
    if isinstance(card.get("metrics"), dict):   # the CMC curve is 50 numbers: rank-1/5/10 are listed anyway
        card["metrics"] = {k: v for k, v in card["metrics"].items() if k != "cmc"}
    print(yaml.safe_dump(json.loads(json.dumps(card, default=str)), sort_keys=False, allow_unicode=True), end="")


if __name__ == "__main__":
    sys.exit(main())
