"""Command line: ``python -m reidlib COMMAND ...`` (also installed as ``reidlib``).

    train   CONFIG [key=value ...]                          both stages, then the final evaluation
    test    CONFIG weights=PATH [key=value ...]             evaluate a trained model
    extract CONFIG weights=PATH images=DIR out=feats.npz    features of a folder of images
    search  CONFIG weights=PATH query=IMG gallery=DIR|feats.npz [top=10] [grid=PNG]
    sweep   --datasets ... --methods ... --seeds ...        papermill runs of notebooks/train_eval.ipynb
    demo                                                    generated data -> baseline vs proposed -> table

CONFIG is a YAML path or a shipped config name (vit_clipreid, vit_proposed, rn50_clipreid, tiny).
Under torchrun, ``torchrun --nproc_per_node N -m reidlib train ...`` trains with DDP.
"""
from __future__ import annotations

import logging
import os
import sys

from .config import help_text, load_config

COMMANDS = ("train", "test", "extract", "search", "sweep", "demo")
# Command arguments that are not config keys, and the config keys some of them stand for.
ALIASES = {"weights": "test.weights"}
COMMAND_ARGS = {"extract": ("images", "out"), "search": ("query", "gallery", "top", "grid")}


def _usage() -> str:
    return (__doc__ or "") + "\nConfig keys (override with key=value):\n" + help_text()


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
        from .sweep import main as sweep_main
        return sweep_main(rest)
    if command == "demo":
        from .demo import main as demo_main
        return demo_main(rest)
    if "-h" in rest or "--help" in rest:
        print(_usage())
        return 0
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
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items() if k != "cmc"})
    elif command == "extract":
        _require(extra, command, "images", "out")
        from .search import extract_folder
        extract_folder(cfg, extra["images"], extra["out"])
    elif command == "search":
        _require(extra, command, "query", "gallery")
        from .search import search
        search(cfg, extra["query"], extra["gallery"], top=int(extra.get("top", 10)),
               grid=extra.get("grid", "retrieval.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
