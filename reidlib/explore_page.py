"""``python -m reidlib explore RUN [RUN2]``: the retrieval explorer (:func:`reidlib.viz.explore`) as
a stand-alone web page, for people who do not use notebooks.

It writes a one-cell notebook that calls :func:`reidlib.viz.explore` into a temporary folder and
serves it with Voila (which runs the notebook in a kernel and shows only its widgets), on
127.0.0.1 only, behind a random token; the URL is printed, and opened in a browser unless
``--no-browser``. Ctrl-C stops the server and removes the folder.

Example::

    python -m reidlib explore results/demo/pretrained/synth/baseline/seed0 \\
        results/demo/pretrained/synth/proposed/seed0 --data-root data/synth --port 8866
"""
from __future__ import annotations

import argparse
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import webbrowser
from pathlib import Path

HOST = "127.0.0.1"


def explorer_notebook(runs: list[str], *, data_root: str | None = None, dataset: str | None = None,
                      device: str = "cpu", k: int = 10, save_dir: str | None = None):
    """The notebook Voila serves: one cell, the :func:`reidlib.viz.explore` call (paths absolute,
    since the kernel runs in the temporary folder).

    >>> book = explorer_notebook(["/r/a"], k=5)
    >>> book.cells[-1].source.splitlines()[-1]
    "explore('/r/a', None, data_root=None, dataset=None, device='cpu', k=5, save_dir='figures')"
    """
    import nbformat
    absolute = lambda p: None if p is None else str(Path(p).expanduser().absolute())  # noqa: E731
    run, run2 = absolute(runs[0]), absolute(runs[1]) if len(runs) > 1 else None
    call = (f"explore({run!r}, {run2!r}, data_root={absolute(data_root)!r}, dataset={dataset!r}, "
            f"device={device!r}, k={k}, save_dir={absolute(save_dir) or 'figures'!r})")
    book = nbformat.v4.new_notebook()
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    book.cells = [nbformat.v4.new_markdown_cell("# Retrieval explorer"),
                  nbformat.v4.new_code_cell("from reidlib.viz import explore\n" + call)]
    return book


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def voila_command(notebook: Path, port: int, token: str) -> list[str]:
    """Voila on ``notebook``, on 127.0.0.1:``port``, behind ``token``, opening no browser itself,
    with no time limit on the cell (the first call computes the features)."""
    return [sys.executable, "-m", "voila", str(notebook), f"--port={port}", "--no-browser",
            f"--Voila.ip={HOST}", f"--token={token}", "--VoilaExecutor.timeout=-1", "--show_tracebacks=True"]


def wait_for(url: str, process: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Whether ``url`` answers within ``timeout`` seconds (False as soon as ``process`` ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True          # it answers (e.g. 403 without the token)
        except OSError:
            time.sleep(0.25)
    return False


def serve(runs: list[str], *, port: int | None = None, browser: bool = True, **explore_args) -> int:
    """Serve the explorer over ``runs`` (one or two) until Ctrl-C; the exit status of Voila."""
    import importlib.util
    missing = [name for name in ("voila", "ipywidgets") if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(f"the explorer's page needs {' and '.join(missing)}: pip install 'reidlib[explore]'")
    folder = Path(tempfile.mkdtemp(prefix="reidlib-explore-"))
    import nbformat
    notebook = folder / "explore.ipynb"
    nbformat.write(explorer_notebook(runs, **explore_args), notebook)
    port = port or free_port()
    token = secrets.token_urlsafe(16)
    url = f"http://{HOST}:{port}/?token={token}"
    process = subprocess.Popen(voila_command(notebook, port, token), cwd=folder)
    try:
        if not wait_for(f"http://{HOST}:{port}/api/status", process):
            raise RuntimeError(f"Voila did not start on port {port} (is the port taken? try --port)")
        print(f"retrieval explorer: {url}\n(the first visit computes the features; Ctrl-C stops the server)",
              flush=True)
        if browser:
            webbrowser.open(url)
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m reidlib explore RUN [RUN2] [--data-root DIR] [--dataset NAME] [--port N] [--no-browser]``."""
    parser = argparse.ArgumentParser(prog="python -m reidlib explore",
                                     description="The retrieval explorer of one or two trained runs, as a web page.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (model/ + config.yaml) or weights; two "
                        "are shown side by side")
    parser.add_argument("--data-root", help="the data set's folder (default: the first run's data.root)")
    parser.add_argument("--dataset", help="the data set's name (default: the first run's data.dataset)")
    parser.add_argument("--device", default="cpu", help="default cpu")
    parser.add_argument("--k", type=int, default=10, help="matches shown at first (default 10)")
    parser.add_argument("--save-dir", help="where 'save' writes figures (default: figures/ here)")
    parser.add_argument("--port", type=int, help="default: a free port")
    parser.add_argument("--no-browser", action="store_true", help="only print the URL")
    args = parser.parse_args(argv)
    if len(args.runs) > 2:
        parser.error("give one or two runs")
    for run in args.runs:
        if not Path(run).exists():
            raise FileNotFoundError(f"{run}: no such run folder or weights file")
    return serve(args.runs, port=args.port, browser=not args.no_browser, data_root=args.data_root,
                 dataset=args.dataset, device=args.device, k=args.k,
                 save_dir=args.save_dir or str(Path("figures").absolute()))
