"""Saving figures: every figure reidlib writes is a 300 dpi PNG with a PDF of it beside (vector
lines and text, for a thesis or a paper), through :func:`save_figure`.

Example::

    fig = plot_gains(runs)
    save_figure(fig, "results/figures/gains.png")    # gains.png (300 dpi) and gains.pdf
"""
from __future__ import annotations

from pathlib import Path

DPI = 300


def save_figure(fig, path: str | Path | None, dpi: int = DPI) -> list[Path]:
    """Write ``fig`` to ``path`` and a PDF of it beside (``x.png`` -> ``x.png`` and ``x.pdf``;
    ``x.pdf`` or ``x`` -> both; another type, e.g. ``x.jpg``, with its PDF); rasters at ``dpi``
    (300), tight around what is drawn. Returns the written paths (none for ``path=None``).

    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt, tempfile, os
    >>> fig = plt.figure(figsize=(1, 1))
    >>> [p.name for p in save_figure(fig, os.path.join(tempfile.mkdtemp(), "f.png"))]
    ['f.png', 'f.pdf']
    """
    if path is None:
        return []
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if not suffix:                         # a stem: its PNG and PDF
        paths = [path.with_name(path.name + ".png"), path.with_name(path.name + ".pdf")]
    elif suffix == ".pdf":
        paths = [path.with_suffix(".png"), path]
    else:                                  # .png, .jpg, .svg, ...: that file and its PDF
        paths = [path, path.with_suffix(".pdf")]
    for target in paths:
        fig.savefig(target, dpi=dpi, bbox_inches="tight")
    return paths
