"""The retrieval explorer in a real browser: headless Chromium (Debian's package) driven by
Playwright opens notebooks/explore.ipynb in JupyterLab, runs it, and uses the widgets; then the
same on the Voila page of ``python -m reidlib explore``. The page must show what the plain logic
says (tests/test_explore_widgets.py's ``expected``): the query, each model's AP line, which gallery
images in which order, and frames drawn in the right colour.

Servers listen on 127.0.0.1 only, every wait is bounded, and every server process (and the kernels
it started) is stopped in a ``finally``. Screenshots go to the test's tmp folder. Without Chromium
or Playwright the whole file is skipped with one line saying how to run it.
"""
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

HOW = "install Chromium (apt-get install chromium; .ci/run does) and run `pytest -m browser`"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip(f"browser tests not run: no Chromium on this machine; {HOW}", allow_module_level=True)
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.skip(f"browser tests not run: Playwright is not installed (pip install -e '.[dev]'); {HOW}",
                allow_module_level=True)

import nbformat  # noqa: E402
from papermill.iorw import load_notebook_node  # noqa: E402
from papermill.parameterize import parameterize_notebook  # noqa: E402
from test_explore_widgets import expected  # noqa: E402

from reidlib.viz.explorer_models import ExploreData, ExploreModel, ExplorerSession  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
START_S, FIRST_PAGE_S, UPDATE_S = 120, 300, 60     # bounds on every wait (a busy 2-core machine)

# The page as data, read from the DOM: the same structure as test_explore_widgets' _Page, plus the
# colour each frame is drawn in and whether each image decoded.
READ_PAGE = """() => {
  const root = document.querySelector('.reid-explore');
  if (!root) return null;
  return {query: Number(root.dataset.query), mode: root.dataset.mode,
    models: [...root.querySelectorAll('.reid-model')].map(m => ({model: m.dataset.model,
      ap: m.querySelector('.reid-ap').innerText.trim(),
      matches: [...m.querySelectorAll('.reid-match')].map(c => {
        const img = c.querySelector('img');
        return [Number(c.dataset.gallery), c.dataset.colour, getComputedStyle(img).borderTopColor,
                img.complete && img.naturalWidth > 0];
      })}))};
}"""


def _rgb(colour: str) -> str:
    """'#1a9850' -> 'rgb(26, 152, 80)', as the browser reports a computed colour."""
    return "rgb({}, {}, {})".format(*(int(colour[i:i + 2], 16) for i in (1, 3, 5)))


def _shown(page) -> dict | None:
    """The page's state, with the drawn frames checked against the colours they should have."""
    state = page.evaluate(READ_PAGE)
    if state is None:
        return None
    for column in state["models"]:
        for gallery, colour, drawn, decoded in column["matches"]:
            assert drawn == _rgb(colour) and decoded, (gallery, colour, drawn, decoded)
        column["matches"] = [(gallery, colour) for gallery, colour, _, _ in column["matches"]]
    return state


def _wait_for(page, session: ExplorerSession, timeout: float = UPDATE_S) -> dict:
    """Wait (bounded) until the page shows the session's view; then return it."""
    want = {"query": session.query, "models": expected(session)}
    deadline, got = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        state = _shown(page)
        got = None if state is None else {"query": state["query"], "models": state["models"]}
        if got == want:
            return state
        time.sleep(0.25)
    assert got == want, "the page did not show the expected view in time"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Processes started by ``pid``, at any depth (kernels run in sessions of their own, so a
    process group does not hold them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM (Jupyter and Voila then shut their kernels down), bounded; then SIGKILL for the
    server's group and for whatever it started that is still there."""
    started = _descendants(process.pid)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    for pid in started:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _server(command: list[str], cwd: Path, env: dict, log: Path, ready):
    """Run a server until the block ends; ``ready()`` returns a value (e.g. its URL) once it serves."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            deadline = time.monotonic() + START_S
            while (value := ready()) is None:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{command[2:4]} did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.3)
            yield value
        finally:
            _stop(process)


def _answers(url: str):
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return None


def _environment(tmp: Path) -> dict:
    """Jupyter's settings, runtime files and IPython's folder in ``tmp``: nothing of the user's is
    read or written. JupyterLab's news and update checks are off (no network, no pop-up)."""
    settings = tmp / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                          "checkForUpdates": False}))
    return {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp / "config"), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(tmp / "lab-settings"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"),
            "IPYTHONDIR": str(tmp / "ipython"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def runs(tiny_trained, proposed_trained):
    return str(tiny_trained[1]), str(proposed_trained[1])


@pytest.fixture
def session(runs):
    """The explorer's logic on the same runs, to say what the page must show."""
    models = [ExploreModel(run) for run in runs]
    return ExplorerSession(models, ExploreData.from_config(models[0].cfg))


def _lab_notebook(folder: Path, runs, save_dir: Path) -> Path:
    """notebooks/explore.ipynb with the test's runs injected, as papermill injects parameters."""
    book = parameterize_notebook(load_notebook_node(str(ROOT / "notebooks" / "explore.ipynb")),
                                 {"run": runs[0], "run2": runs[1], "data_root": None, "save_dir": str(save_dir)})
    path = folder / "explore.ipynb"
    nbformat.write(book, path)
    return path


def test_jupyterlab_runs_the_notebook_and_the_widgets_work(browser, runs, session, tmp_path):
    notebook = _lab_notebook(tmp_path, runs, tmp_path / "figures")
    port, token = _free_port(), secrets.token_hex(16)
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", f"--ServerApp.ip={HOST}",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}"]
    command += ["--allow-root"] if os.geteuid() == 0 else []       # CI runs as root
    base = f"http://{HOST}:{port}"
    with _server(command, tmp_path, _environment(tmp_path), tmp_path / "jupyterlab.log",
                 lambda: _answers(f"{base}/api/status?token={token}")):
        page = browser.new_page(viewport={"width": 1500, "height": 2000})
        page.set_default_timeout(UPDATE_S * 1000)
        page.goto(f"{base}/lab/tree/{notebook.name}?reset&token={token}")
        page.get_by_text("| Idle").wait_for(timeout=START_S * 1000)         # the kernel is up
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        page.wait_for_selector(".reid-explore", timeout=FIRST_PAGE_S * 1000)
        first = _wait_for(page, session)
        assert [m["model"] for m in first["models"]] == ["baseline", "proposed"]
        assert all(len(m["matches"]) == 10 for m in first["models"])
        page.locator(".reid-explorer").screenshot(path=tmp_path / "jupyterlab_explorer.png")

        page.locator(".reid-next").click()                                   # the next query
        session.position = 1
        second = _wait_for(page, session)
        assert second["query"] != first["query"] and second["models"] != first["models"]

        page.locator(".reid-show button", has_text="proposed").click()       # model B alone
        session.shown = [1]
        assert [m["model"] for m in _wait_for(page, session)["models"]] == ["proposed"]

        page.locator(".reid-sort select").select_option(label="AP of B - A: B wins most")
        session.sort, session.position = "b_wins", 0
        _wait_for(page, session)
        page.screenshot(path=tmp_path / "jupyterlab_page.png", full_page=True)


def test_voila_page_of_the_command_line(browser, runs, session, tmp_path):
    port, log = _free_port(), tmp_path / "voila.log"
    command = [sys.executable, "-m", "reidlib", "explore", *runs, "--no-browser", f"--port={port}",
               "--save-dir", str(tmp_path / "figures")]

    def url():
        text = log.read_text() if log.exists() else ""
        found = re.search(r"retrieval explorer: (http://127\.0\.0\.1:\d+/\S+)", text)
        return found.group(1) if found else None
    with _server(command, tmp_path, _environment(tmp_path), log, url) as address:
        assert address.startswith(f"http://{HOST}:{port}/?token=")
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.set_default_timeout(UPDATE_S * 1000)
        page.goto(address)
        page.wait_for_selector(".reid-explore", timeout=FIRST_PAGE_S * 1000)
        first = _wait_for(page, session)

        page.locator(".reid-next").click()
        session.position = 1
        assert _wait_for(page, session)["models"] != first["models"]

        page.locator(".reid-show button", has_text="proposed").click()
        session.shown = [1]
        _wait_for(page, session)

        page.locator(".reid-rerank input").check()                           # re-ranked, same query
        session.reranked = True
        _wait_for(page, session)

        page.locator(".reid-save-name input").fill("voila_view")
        page.locator(".reid-save").click()
        page.wait_for_function("() => document.querySelector('.reid-status').innerText.includes('saved')")
        assert (tmp_path / "figures" / "voila_view.png").stat().st_size > 10_000
        assert (tmp_path / "figures" / "voila_view.pdf").read_bytes().startswith(b"%PDF")
        page.screenshot(path=tmp_path / "voila_page.png", full_page=True)
