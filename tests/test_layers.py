"""The package's layers only look down, and no modules import each other in a circle.

Bottom to top: config; runtime (device, precision, distributed helpers, safe files); data; weights
(every file format in and out); model (the modules); losses; optim (LR schedules, the non-finite
watch); methods (what each method adds and
trains, and the registry that builds a model from its config); eval; engine; viz; experiments
(sweeps, claims, launchers, run layout, cross-data-set tests); demo (generated data, the
miniature); the face (the public API, the CLI, search, export). Every import of a reidlib module is
read from the source, also the ones inside functions, so a lazy import cannot hide a dependency
that runs up the stack. The core (everything below experiments) imports neither experiments nor demo.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "reidlib"

LAYERS = ["config", "runtime", "data", "weights", "model", "losses", "optim", "methods", "eval", "engine", "viz",
          "experiments", "demo", "face"]
# first dotted part under reidlib -> layer; what is not listed here is the face
LAYER_OF = {"config": "config", "runtime": "runtime", "storage": "runtime", "data": "data", "weights": "weights",
            "model": "model", "losses": "losses", "optim": "optim", "methods": "methods", "eval": "eval",
            "engine": "engine", "viz": "viz", "experiments": "experiments", "demo": "demo"}
CORE = LAYERS[: LAYERS.index("experiments")]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    parts = module.split(".")
    return LAYER_OF.get(parts[1], "face") if len(parts) > 1 else "face"


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """Every reidlib module ``module`` imports (``from pkg import sub`` counts as importing sub)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known}
    return {m for m in found if m in known and m != module}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    assert {"reidlib.config", "reidlib.runtime", "reidlib.data.datasets", "reidlib.methods.trained", "reidlib.losses",
            "reidlib.eval.metrics", "reidlib.engine.trainer", "reidlib.viz.tables", "reidlib.experiments.sweep",
            "reidlib.demo.synth", "reidlib.methods.clipreid", "reidlib.engine.loop"} <= set(graph)
    assert layer("reidlib.storage") == "runtime" and layer("reidlib.search") == "face"


def test_imports_only_look_down(graph):
    upward = [f"{src} ({layer(src)}) imports {dst} ({layer(dst)})"
              for src, targets in graph.items() for dst in sorted(targets)
              if LAYERS.index(layer(dst)) > LAYERS.index(layer(src))]
    assert upward == []


def test_the_core_imports_neither_experiments_nor_demo(graph):
    """Said twice on purpose: the layer order implies it, and this names the rule the issue set."""
    leaks = [f"{src} imports {dst}" for src, targets in graph.items() for dst in sorted(targets)
             if layer(src) in CORE and layer(dst) in ("experiments", "demo")]
    assert leaks == []
    assert {"experiments", "demo"} <= {layer(m) for m in graph}


def test_no_import_cycles(graph):
    cycles = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_checker_sees_an_upward_import(tmp_path):
    """The parser resolves relative imports: a model file importing the engine is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from ..engine.trainer import train\nfrom . import io\n")
    known = {"reidlib.engine.trainer", "reidlib.model.io", "reidlib.model"}
    # read as if it were reidlib/model/bad.py
    found = imported_modules("reidlib.model.bad", bad, known)
    assert found == {"reidlib.engine.trainer", "reidlib.model.io", "reidlib.model"}
    assert layer("reidlib.engine.trainer") == "engine" and layer("reidlib.model.bad") == "model"


def test_every_import_resolves(graph):
    """Imports inside functions (kept lazy for start-up time) name things that exist: a moved
    function must not leave a lazy import behind that fails only when that code path runs."""
    import importlib

    broken = []
    for module, path in all_modules().items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or not (node.level or (node.module or "").startswith("reidlib")):
                continue
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            imported = importlib.import_module(target)
            for alias in node.names:
                if not hasattr(imported, alias.name) and f"{target}.{alias.name}" not in graph:
                    broken.append(f"{module}:{node.lineno} from {target} import {alias.name}")
    assert broken == []
