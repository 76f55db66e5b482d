"""The retrieval explorer on two briefly trained tiny runs, without a browser: the session agrees
with evaluation, the cache is reused, and every widget changes the page as it should (which
images, which frames, which AP). tests/test_explore_browser.py does the same in Chromium."""
import dataclasses
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest
from PIL import Image

from reidlib.data import dataset_from_config
from reidlib.eval.inference import evaluate_model
from reidlib.explore_page import explorer_notebook, voila_command
from reidlib.viz import explore
from reidlib.viz.explorer_models import ExploreData, ExploreModel, ExplorerSession
from reidlib.viz.explorer_state import CORRECT, WRONG, query_view

ROOT = Path(__file__).resolve().parents[1]


class _Page(HTMLParser):
    """The explorer's page as data: per model column, its name, AP line and (gallery index, frame)."""

    def __init__(self, text: str):
        super().__init__()
        self.models, self.query, self.mode, self._in_ap = [], None, None, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if "reid-explore" in classes:
            self.query, self.mode = int(attrs["data-query"]), attrs.get("data-mode")
        if "reid-model" in classes:
            self.models.append({"model": attrs["data-model"], "ap": "", "matches": []})
        if "reid-ap" in classes:
            self._in_ap = True
        if "reid-match" in classes:
            self.models[-1]["matches"].append((int(attrs["data-gallery"]), attrs["data-colour"]))

    def handle_data(self, data):
        if self._in_ap:
            self.models[-1]["ap"] += data

    def handle_endtag(self, tag):
        self._in_ap = False


def expected(session: ExplorerSession) -> list[dict]:
    """What the page must show for the session's settings, from the plain logic."""
    out = []
    for m, view in zip(session.shown, session.views()):
        out.append({"model": view.model, "ap": view.summary(), "matches": [(x.index, x.colour) for x in view.matches]})
    return out


@pytest.fixture(scope="module")
def runs(tiny_trained, proposed_trained):
    return tiny_trained[1], proposed_trained[1]


@pytest.fixture(scope="module")
def explorer(runs, tmp_path_factory, one_thread):
    return explore(*runs, save_dir=tmp_path_factory.mktemp("figures"))


def test_the_sessions_scores_are_evaluations(runs, one_thread):
    """Mean AP and rank-1 of the explorer's rankings are the run's metrics, plain and re-ranked."""
    model = ExploreModel(runs[1])
    data = ExploreData.from_config(model.cfg)
    cfg = dataclasses.replace(model.cfg, test=dataclasses.replace(model.cfg.test, rerank=True))
    metrics = evaluate_model(model.model, dataset_from_config(cfg), cfg, progress=False)
    plain, reranked = model.rankings(data, False, False), model.rankings(data, False, True)
    assert plain.mean_ap() == pytest.approx(metrics["mAP"], abs=1e-9)
    assert plain.rank1() == pytest.approx(metrics["rank1"], abs=1e-9)
    assert reranked.mean_ap() == pytest.approx(metrics["rerank_mAP"], abs=1e-9)
    assert reranked.rank1() == pytest.approx(metrics["rerank_rank1"], abs=1e-9)
    assert json.loads((Path(runs[1]) / "metrics.json").read_text())["mAP"] == pytest.approx(metrics["mAP"], abs=1e-6)


def test_features_and_rankings_are_cached_in_the_run_folder(runs, one_thread):
    first = ExploreModel(runs[0])
    data = ExploreData.from_config(first.cfg)
    first.rankings(data, False, False)
    again = ExploreModel(runs[0])
    again.rankings(data, False, False)
    assert [name.split("-")[0] for name in again.reused] == ["rankings"]    # the features were not needed
    files = sorted(p.name.split("-")[0] for p in (Path(runs[0]) / "explore_cache").glob("*.npz"))
    assert files.count("features") >= 1 and files.count("rankings") >= 1
    flipped = again.features(data, True)                        # another flip: other features, another file
    assert not any("features" in name for name in again.reused)
    assert flipped["qf"].shape == again.features(data, False)["qf"].shape
    assert (flipped["qf"] != again.features(data, False)["qf"]).any()


def test_first_page_and_stepping_through_queries(explorer):
    s = explorer.session
    page = _Page(explorer.html())
    assert (page.query, page.mode) == (0, "image")
    assert page.models == expected(s) and [m["model"] for m in page.models] == ["baseline", "proposed"]
    assert all(len(m["matches"]) == 10 for m in page.models)
    explorer.next.click()
    page = _Page(explorer.html())
    assert page.query == 1 and page.models == expected(s)
    assert explorer.index.value == 1 and "query 1:" in explorer.label.value
    explorer.index.value = 5                           # pick by index
    assert _Page(explorer.html()).query == 5 and explorer.query.value == 5
    explorer.prev.click()
    assert _Page(explorer.html()).query == 4


def test_frames_follow_identity_and_the_protocol(explorer):
    """Green exactly where the match has the query's identity; no image of the query's identity
    and camera (the Market protocol) anywhere on the page."""
    s = explorer.session
    explorer.k.value = 50
    try:
        for i in range(len(s.data.query)):
            explorer.index.value = i
            _, pid, cam = s.data.query[i]
            for column in _Page(explorer.html()).models:
                for g, colour in column["matches"]:
                    _, g_pid, g_cam = s.data.gallery[g]
                    assert colour == (CORRECT if g_pid == pid else WRONG)
                    assert not (g_pid == pid and g_cam == cam)
    finally:
        explorer.k.value = 10


def test_model_choice_and_top_k(explorer):
    s = explorer.session
    explorer.show.value = (1,)
    page = _Page(explorer.html())
    assert [m["model"] for m in page.models] == ["proposed"] and page.models == expected(s)
    explorer.k.value = 3
    assert len(_Page(explorer.html()).models[0]["matches"]) == 3
    explorer.k.value, explorer.show.value = 10, (0, 1)
    assert len(_Page(explorer.html()).models) == 2


def test_orders_and_filters(explorer):
    s = explorer.session
    a, b = s.rankings(0).ap, s.rankings(1).ap
    explorer.sort.value = "b_wins"
    assert explorer.query.value == 0
    first = _Page(explorer.html()).query
    finite = [i for i in range(len(a)) if a[i] == a[i] and b[i] == b[i]]
    assert b[first] - a[first] == pytest.approx(max(b[i] - a[i] for i in finite))
    explorer.sort.value = "b_loses"
    first = _Page(explorer.html()).query
    assert b[first] - a[first] == pytest.approx(min(b[i] - a[i] for i in finite))
    explorer.sort.value = "ap"
    assert a[_Page(explorer.html()).query] == pytest.approx(min(a[i] for i in finite))
    explorer.sort.value = "index"
    pid = s.data.query[3][1]
    explorer.identity.value = pid
    shown = []
    for position in range(explorer.query.max + 1):
        explorer.query.value = position
        shown.append(_Page(explorer.html()).query)
    assert shown == [i for i, (_, p, _) in enumerate(s.data.query) if p == pid]
    explorer.identity.value = "all"
    cam = s.data.query[0][2]
    explorer.camera.value = cam
    assert all(s.data.query[i][2] == cam for i in s.order()) and explorer.query.max == len(s.order()) - 1
    explorer.camera.value = "all"
    assert s.pid is None and s.camera is None and len(s.order()) == len(s.data.query)
    explorer.rerank.value = True                         # a redraw keeps "all" selected (not an empty box)
    assert (explorer.identity.label, explorer.camera.label) == ("all", "all")
    explorer.rerank.value = False


def test_rerank_and_flip_toggles_change_the_scores(explorer):
    s = explorer.session
    explorer.index.value = 2
    plain = _Page(explorer.html()).models
    explorer.rerank.value = True
    page = _Page(explorer.html())
    assert page.query == 2 and page.models == expected(s)         # the same query, re-ranked
    assert page.models[0]["ap"] == query_view(s.rankings(0), 2, s.data.query, s.data.gallery).summary()
    assert "mAP" in explorer.header.value
    explorer.rerank.value = False
    assert _Page(explorer.html()).models == plain
    explorer.flip.value = True
    assert s.flip and _Page(explorer.html()).models == expected(s)
    explorer.flip.value = False
    assert _Page(explorer.html()).models == plain


def test_attention_overlay_changes_the_pictures(explorer):
    before = explorer.html()
    explorer.attention.value = "rollout"
    rollout = explorer.html()
    explorer.attention.value = "last"
    last = explorer.html()
    explorer.attention.value = "off"
    assert len({before, rollout, last}) == 3 and explorer.html() == before
    assert _Page(rollout).models == _Page(before).models         # same matches, other pictures


def test_caption_search(explorer):
    s = explorer.session
    assert explorer.text_note.value.count("random weights") == 2       # tiny runs: model.pretrained=none
    explorer.fill.click()
    assert explorer.caption.value == s.query_caption() and explorer.caption.value
    explorer.search.click()
    page = _Page(explorer.html())
    assert page.mode == "caption" and page.models == expected(s)
    pid = s.data.query[s.query][1]
    assert all((colour == CORRECT) == (s.data.gallery[g][1] == pid) for g, colour in page.models[0]["matches"])
    explorer.clear.click()
    assert _Page(explorer.html()).mode == "image"


def test_save_writes_png_at_300_dpi_and_pdf(explorer):
    explorer.save_name.value = "view"
    explorer.save.click()
    png, pdf = explorer.save_dir / "view.png", explorer.save_dir / "view.pdf"
    assert "saved" in explorer.status.value, explorer.status.value
    assert pdf.read_bytes().startswith(b"%PDF")
    assert round(Image.open(png).info["dpi"][0]) == 300


def test_one_run_has_no_comparison_orders(runs, tmp_path, one_thread):
    single = explore(runs[0], save_dir=tmp_path)
    assert [v for _, v in single.sort.options] == ["index", "ap"]
    assert [m["model"] for m in _Page(single.html()).models] == ["baseline"]


def test_the_notebook_only_calls_explore():
    book = nbformat.read(ROOT / "notebooks" / "explore.ipynb", as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code[0].metadata.get("tags") == ["parameters"]
    params = {}
    exec(code[0].source, params)
    assert params["run"] == "../results/demo/pretrained/synth/baseline/seed0"
    assert params["run2"] == "../results/demo/pretrained/synth/proposed/seed0"
    assert params["data_root"] == "../data/synth"
    assert [c.source.strip().splitlines()[-1].split("(")[0] for c in code[1:]] == ["explore"]


def test_the_web_page_command(runs, tmp_path):
    book = explorer_notebook([str(runs[0]), str(runs[1])], data_root="data", k=5)
    call = book.cells[-1].source
    assert call.startswith("from reidlib.viz import explore") and str(Path("data").absolute()) in call
    command = voila_command(tmp_path / "explore.ipynb", 8123, "secret")
    assert "--Voila.ip=127.0.0.1" in command and "--port=8123" in command and "--token=secret" in command
    done = subprocess.run([sys.executable, "-m", "reidlib", "explore", str(tmp_path / "nothing")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "no such run folder" in done.stderr


def test_a_setting_that_fails_goes_back(explorer, monkeypatch):
    """Re-ranking a large gallery can run out of memory: the error is shown, nothing half-set."""
    model, index = explorer.session.models[0], explorer.session.query
    original = model.rankings

    def rankings(data, flip, reranked, keep=50):
        if reranked:
            raise MemoryError("re-ranking would need 9.1 GB")
        return original(data, flip, reranked, keep)
    monkeypatch.setattr(model, "rankings", rankings)
    before = explorer.html()
    explorer.rerank.value = True
    assert "MemoryError: re-ranking would need 9.1 GB" in explorer.status.value
    assert (explorer.rerank.value, explorer.session.reranked, explorer.session.query) == (False, False, index)
    assert explorer.html() == before
