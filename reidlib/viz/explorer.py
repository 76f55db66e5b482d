"""An interactive retrieval explorer (ipywidgets) over one or two trained runs, in JupyterLab or
as a web page (``python -m reidlib explore RUN [RUN2]``, through Voila).

For a query: its top-k gallery images, framed green (same identity) or red (another), with the
images the evaluation protocol excludes left out (:mod:`reidlib.eval.protocol`), its AP and the
rank of its first true match, under one model or two side by side. Controls:

- the query: a slider over the current order, previous / next, its index, filters by identity and
  by camera; orders: query order, AP worst first, or the AP difference of the two models (where B
  wins most, where it loses most);
- top k; k-reciprocal re-ranking (Zhong et al., CVPR 2017) on/off; test-time flip on/off;
  attention overlay (rollout or last layer) on the query and its matches; which model(s) to show;
- a caption box that ranks the gallery by text (models with a text tower; the line under it says
  how far to trust it);
- save the view as a figure (PNG at 300 dpi and PDF).

Features and rankings are computed once per model and setting and kept in ``RUN/explore_cache/``
(keyed by a hash of the weights file, the data set's lists and the flip), so moving between
queries only looks up arrays.

Example (a notebook cell; the demo's runs after ``make demo``)::

    from reidlib.viz import explore
    explore("../results/demo/pretrained/synth/baseline/seed0",
            "../results/demo/pretrained/synth/proposed/seed0", data_root="../data/synth")
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from .explorer_models import ATTENTION_MODES, ExploreData, ExploreModel, ExplorerSession, mean_ap_line
from .explorer_state import QUERY, QueryView

try:
    import ipywidgets as w
except ImportError as err:   # an optional dependency: say which extra brings it
    raise ImportError("the retrieval explorer needs ipywidgets: pip install 'reidlib[explore]'") from err

CELL_HEIGHT = 128   # pixels per image in the page (person crops are 2:1)
PER_ROW = 5         # matches per line within a model's column
ALL = "all"         # the filters' "no filter" value


def explore(run, run2=None, *, data_root=None, dataset: str | None = None, device: str = "cpu", k: int = 10,
            flip: bool | None = None, labels: tuple | None = None, keep: int = 50, save_dir="figures",
            cache: bool = True) -> "Explorer":
    """The explorer over ``run`` (and ``run2``, side by side): run folders (``model/`` and
    ``config.yaml``), model folders or weights files. The data set is the first run's
    (``data.dataset`` under ``data.root``) unless ``dataset`` / ``data_root`` say otherwise;
    ``flip`` defaults to the run's ``test.flip``; ``labels`` name the models (default: their
    methods); figures are saved under ``save_dir``; ``cache=False`` writes no cache files.
    Displays itself as a notebook cell's value.

    Example::

        explore("results/market1501/baseline/seed0", "results/market1501/proposed/seed0")
    """
    sources = [run] + ([run2] if run2 is not None else [])
    labels = list(labels or [None] * len(sources))
    models = [ExploreModel(s, device=device, label=label, data_root=data_root, dataset=dataset, cache=cache)
              for s, label in zip(sources, labels)]
    if len(models) == 2 and models[0].label == models[1].label:
        models[0].label, models[1].label = f"{models[0].label} (A)", f"{models[1].label} (B)"
    data = ExploreData.from_config(models[0].cfg)
    return Explorer(ExplorerSession(models, data, k=k, flip=flip, keep=keep), save_dir=save_dir)


# --------------------------------------------------------------------------- the page

def _data_uri(picture: np.ndarray, height: int = CELL_HEIGHT) -> str:
    image = Image.fromarray(picture)
    width = max(1, round(image.width * height / image.height))
    buffer = io.BytesIO()
    # JPEG: a tenth of PNG's bytes for photos, and every redraw sends all of them to the browser.
    image.resize((width, height)).save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _cell(picture, colour: str, label: str, classes: str, attributes: str = "", text: str | None = None) -> str:
    """One framed image (or a caption's text in a frame of the same size)."""
    style = f"border:4px solid {colour};height:{CELL_HEIGHT}px;display:block"
    if picture is None:
        inner = (f'<div class="reid-caption-box" style="{style};width:{CELL_HEIGHT // 2 + 16}px;font-size:10px;'
                 f'overflow:auto;padding:2px">{html.escape(text or "")}</div>')
    else:
        inner = f'<img src="{_data_uri(picture)}" style="{style}">'
    return (f'<div class="reid-cell {classes}" data-colour="{colour}" {attributes} '
            'style="margin:2px;text-align:center">'
            f'{inner}<div style="font-size:10px;line-height:1.2">{label}</div></div>')


def render_view(session: ExplorerSession, m: int, view: QueryView) -> str:
    """One model's column: its name, the AP line, the query and its framed matches."""
    query, matches = session.pictures(m, view)
    if view.caption:
        head = _cell(None, QUERY, f"caption<br>green: id {view.pid}", "reid-query", text=view.caption)
    else:
        head = _cell(query, QUERY, f"query {view.query}<br>id {view.pid}, cam {view.camera}", "reid-query",
                     f'data-query="{view.query}"')
    cells = []
    for match, picture in zip(view.matches, matches):
        mark = "" if match.correct is None else (" ✓" if match.correct else " ✗")
        kind = "reid-unknown" if match.correct is None else ("reid-correct" if match.correct else "reid-wrong")
        cells.append(_cell(picture, match.colour, f"{match.rank + 1}{mark}<br>id {match.pid}, cam {match.camera}",
                           f"reid-match {kind}", f'data-gallery="{match.index}" title="{html.escape(match.path)}"'))
    grid = (f'<div style="display:grid;grid-template-columns:repeat({min(PER_ROW, max(1, len(cells)))},auto);'
            f'justify-content:start">{"".join(cells)}</div>')
    return (f'<div class="reid-model" data-model="{html.escape(view.model)}" style="margin-right:24px">'
            f'<div style="font-weight:bold">{html.escape(view.model)}</div>'
            f'<div class="reid-ap">{html.escape(view.summary())}</div>'
            f'<div style="display:flex;align-items:flex-start">{head}{grid}</div></div>')


def render(session: ExplorerSession) -> str:
    """The explorer's page for the session's current settings: the shown models side by side."""
    views = session.views()
    if not views:
        return '<div class="reid-explore" data-query="-1">no query matches these filters</div>'
    columns = "".join(render_view(session, m, v) for m, v in zip(session.shown, views))
    mode = "caption" if session.caption else "image"
    return (f'<div class="reid-explore" data-query="{session.query}" data-mode="{mode}">'
            f'<div style="display:flex;flex-wrap:wrap">{columns}</div></div>')


# --------------------------------------------------------------------------- the controls

class Explorer:
    """The widgets around an :class:`ExplorerSession`; ``.widget`` is the whole view, and the object
    displays itself in a notebook. The tests drive the controls by their CSS classes (``reid-*``)."""

    def __init__(self, session: ExplorerSession, save_dir="figures"):
        self.session, self.save_dir = session, Path(save_dir)
        self._busy = False
        self._query_controls()
        self._view_controls()
        self._caption_controls()
        self.save_name = w.Text(description="file", layout=w.Layout(width="40%"))
        self.save = w.Button(description="save PNG + PDF")
        self.status, self.label, self.header, self.page = w.HTML(), w.HTML(), w.HTML(), w.HTML()
        for name in ("query", "prev", "next", "index", "identity", "camera", "sort", "show", "k", "rerank", "flip",
                     "attention", "caption", "search", "fill", "clear", "save_name", "save", "status", "label",
                     "header", "page"):
            getattr(self, name).add_class(f"reid-{name.replace('_', '-')}")
        self._connect()
        self.widget = w.VBox([
            self.header,
            w.HBox([self.prev, self.query, self.next, self.index]), self.label,
            w.HBox([self.identity, self.camera, self.sort]),
            w.HBox([self.show, self.k]),
            w.HBox([self.attention, self.rerank, self.flip], layout=w.Layout(align_items="center")),
            w.HBox([self.caption, self.search, self.fill, self.clear]), self.text_note,
            w.HBox([self.save_name, self.save]), self.status,
            self.page])
        self.widget.add_class("reid-explorer")
        self.refresh()

    def _query_controls(self) -> None:
        """Which query: slider over the order, previous / next, index, filters, order."""
        s, data = self.session, self.session.data
        self.query = w.IntSlider(0, 0, max(0, len(s.order()) - 1), description="query", continuous_update=False)
        self.prev, self.next = w.Button(description="◀ previous"), w.Button(description="next ▶")
        self.index = w.BoundedIntText(s.query, min=0, max=len(data.query) - 1, description="index")
        pids, cams = sorted({p for _, p, _ in data.query}), sorted({c for _, _, c in data.query})
        # "all" stands for no filter: a Dropdown's value None means "nothing selected".
        self.identity = w.Dropdown(options=[("all", ALL)] + [(str(p), p) for p in pids], description="identity")
        self.camera = w.Dropdown(options=[("all", ALL)] + [(str(c), c) for c in cams], description="camera")
        self.sort = w.Dropdown(options=[(v, k) for k, v in s.sorts().items()], description="order")

    def _view_controls(self) -> None:
        """How it is shown: which model(s), top k, attention, re-ranking, flip."""
        s = self.session
        labels = [m.label for m in s.models]
        shows = [(label, (m,)) for m, label in enumerate(labels)] + ([("both", (0, 1))] if len(labels) > 1 else [])
        auto = {"button_width": "auto", "description_width": "initial"}   # labels whole, not cut to a width
        self.show = w.ToggleButtons(options=shows, value=tuple(s.shown), description="model", style=auto)
        self.k = w.IntSlider(s.k, 1, min(s.keep, len(s.data.gallery)), description="top k", continuous_update=False)
        self.attention = w.ToggleButtons(options=[(v, k) for k, v in ATTENTION_MODES.items()], value="off",
                                         description="attention", disabled=not s.models[0].attention_available(),
                                         style=auto)
        beside = w.Layout(width="auto", margin="0 0 0 16px")
        self.rerank = w.Checkbox(False, description="k-reciprocal re-ranking (Zhong et al., CVPR 2017)", indent=False,
                                 layout=beside)
        self.flip = w.Checkbox(s.flip, description="flip (average with the mirror image)", indent=False, layout=beside)

    def _caption_controls(self) -> None:
        """Caption search, off when a model has no text tower; the note says how far to trust it."""
        support = [m.text_support() for m in self.session.models]
        off = not all(ok for ok, _ in support)
        self.caption = w.Text(placeholder="a caption, e.g. a red short-sleeved top, blue trousers",
                              description="caption", layout=w.Layout(flex="1 1 auto", min_width="30%"), disabled=off)
        whole = w.Layout(width="auto", flex="0 0 auto")   # buttons keep their labels whole in a narrow page
        self.search = w.Button(description="rank by caption", disabled=off, layout=whole)
        self.fill = w.Button(description="query's caption", disabled=off or not self.session.data.captions,
                             layout=whole)
        self.clear = w.Button(description="back to the query image", layout=whole)
        self.text_note = w.HTML(f'<div style="font-size:11px">{"<br>".join(html.escape(n) for _, n in support)}</div>')

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _connect(self) -> None:
        on = lambda control, fn: control.observe(lambda change: self._guard(fn, change["new"]), names="value")  # noqa: E731
        on(self.query, self._set_position)
        on(self.index, self._select)
        on(self.identity, lambda v: self._filter("pid", None if v == ALL else v))
        on(self.camera, lambda v: self._filter("camera", None if v == ALL else v))
        on(self.sort, lambda v: self._filter("sort", v))
        on(self.show, lambda v: self._set("shown", list(v)))
        on(self.k, lambda v: self._set("k", v))
        on(self.rerank, lambda v: self._setting(self.rerank, "reranked", v, "re-ranking the gallery for every query"))
        on(self.flip, lambda v: self._setting(self.flip, "flip", v, "computing the features with flip"))
        on(self.attention, lambda v: self._set("attention", v))
        self.prev.on_click(lambda _: self._step(-1))
        self.next.on_click(lambda _: self._step(1))
        self.search.on_click(lambda _: self._guard(self._set, "caption", self.caption.value.strip() or None))
        self.fill.on_click(lambda _: self._fill_caption())
        self.clear.on_click(lambda _: self._guard(self._set, "caption", None))
        self.save.on_click(lambda _: self._save())

    # -- handlers: each changes the session, then redraws

    def _guard(self, fn, *args) -> None:
        """Run a handler unless the widgets are being synchronised (no loops); errors go to the
        status line instead of vanishing into the kernel's log."""
        if self._busy:
            return
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - shown to the user
            message = html.escape(f"{type(err).__name__}: {err}")
            self.status.value = f'<span style="color:#d73027">{message}</span>'

    def _set(self, name: str, value) -> None:
        setattr(self.session, name, value)
        self.refresh()

    def _setting(self, control, name: str, value, what: str) -> None:
        """A setting that may compute for a while (then cached), keeping the selected query; when
        the computation fails (e.g. out of memory), the setting and its control go back."""
        index, before = self.session.query, getattr(self.session, name)
        self.status.value = f"{what}… (once; then cached in the run folder)"
        setattr(self.session, name, value)
        try:
            if index >= 0:
                self.session.select(index)      # sorts by the new scores when the order needs them
            self.refresh()
        except Exception:
            setattr(self.session, name, before)
            self._busy = True
            control.value = before
            self._busy = False
            self.refresh()
            raise
        self.status.value = ""

    def _set_position(self, position: int) -> None:
        self.session.position = position
        self.refresh()

    def _step(self, step: int) -> None:
        self.query.value = int(np.clip(self.query.value + step, self.query.min, self.query.max))

    def _select(self, index: int) -> None:
        self.session.select(index)
        self.refresh()

    def _filter(self, name: str, value) -> None:
        setattr(self.session, name, value)
        self.session.position = 0
        self.refresh()

    def _fill_caption(self) -> None:
        self.caption.value = self.session.query_caption()

    def _save(self) -> None:
        stem = self.save_name.value.strip() or self._default_name()
        path = Path(stem) if Path(stem).is_absolute() else self.save_dir / stem
        written = self.session.save(path)
        self.status.value = "saved " + ", ".join(html.escape(str(p)) for p in written)

    def _default_name(self) -> str:
        s = self.session
        names = "_".join(s.models[m].label.replace(" ", "") for m in s.shown)
        return f"explore_{s.data.name}_q{s.query}_{names}" + ("_rerank" if s.reranked else "")

    # -- drawing

    def refresh(self) -> None:
        """Bring every control in line with the session, then draw the page."""
        s = self.session
        order = s.order()
        self._busy = True
        try:
            self.query.max = max(0, len(order) - 1)
            self.query.value = min(s.position, self.query.max)
            if s.query >= 0:
                self.index.value = s.query
            self.identity.value = ALL if s.pid is None else s.pid
            self.camera.value = ALL if s.camera is None else s.camera
            self.sort.value = s.sort
            self.save_name.placeholder = self._default_name()
        finally:
            self._busy = False
        if s.query >= 0:
            path, pid, cam = s.data.query[s.query]
            self.label.value = (f'<span class="reid-where">query {s.query}: id {pid}, cam {cam}, {Path(path).name} '
                                f"({s.position + 1} of {len(order)} in this order)</span>")
        else:
            self.label.value = "no query matches these filters"
        self.header.value = (f"<b>{html.escape(s.data.name)}</b>: {len(s.data.query)} queries, "
                             f"{len(s.data.gallery)} gallery images; {html.escape(mean_ap_line(s))}")
        self.page.value = render(s)

    def html(self) -> str:
        """The page as drawn now."""
        return self.page.value
