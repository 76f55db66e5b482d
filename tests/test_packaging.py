"""The install recipe: pyproject and environment.yml declare the same packages, pins live in one file."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_requirements() -> dict[str, str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = meta["dependencies"] + meta["optional-dependencies"]["dev"]
    return {_name(r): r.replace(" ", "") for r in reqs}


def _conda_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_list = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return {_name(r): r.replace(" ", "") for r in pip_list}


def test_environment_yml_matches_pyproject():
    assert _conda_requirements() == _pyproject_requirements()


def test_required_packages_declared():
    names = set(_pyproject_requirements())
    for pkg in ["torch", "open-clip-torch", "peft", "papermill", "ipykernel", "jupyterlab",
                "matplotlib", "pandas", "seaborn", "tqdm", "pyyaml", "pytest"]:
        assert pkg in names, pkg


def test_pins_satisfy_pyproject_ranges():
    """Every exact pin in constraints.txt names a declared package (one place for versions)."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[_name(name)] = version
    assert {"torch", "torchvision", "open-clip-torch"} <= set(pins)
    assert set(pins) <= set(_pyproject_requirements())


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme and "make demo" in readme
