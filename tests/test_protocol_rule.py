"""The evaluation protocol stated once (reidlib.eval.protocol) and its users: the metrics, search and
the retrieval grids; the shared distance kernel; the eval-mode context."""
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import reidlib.eval.inference
import reidlib.search
import reidlib.viz.retrieval
from reidlib.eval import evaluate, rerank
from reidlib.eval.distance import GalleryDistance, compute_distance
from reidlib.eval.modes import eval_mode
from reidlib.eval.protocol import (
    MARKET_DROPPED_REASON,
    MARKET_PROTOCOL,
    SAME_IMAGE_PROTOCOL,
    SAME_IMAGE_REASON,
    GalleryIdentities,
    check_valid_queries,
    dropped_reason,
    excluded,
    exclusion_labels,
    ranked_gallery,
    scorable_queries,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- the rule, by hand

def test_standard_rule_excludes_same_identity_and_same_camera():
    # query: id 1 from camera 0; gallery (id, cam): (1, 0) (1, 1) (2, 0) (1, 0)
    query, gallery = [("q.jpg", 1, 0)], [("a.jpg", 1, 0), ("b.jpg", 1, 1), ("c.jpg", 2, 0), ("d.jpg", 1, 0)]
    q_labels, g_labels, protocol = exclusion_labels(query, gallery)
    assert protocol == MARKET_PROTOCOL and (q_labels, g_labels) == ([0], [0, 1, 0, 0])
    assert excluded([1], q_labels, [1, 1, 2, 1], g_labels).tolist() == [[True, False, False, True]]
    assert scorable_queries([1], q_labels, [1, 1, 2, 1], g_labels).tolist() == [True]
    # without b (the only other camera) nothing is left to find
    assert scorable_queries([1], [0], [1, 2, 1], [0, 0, 0]).tolist() == [False]


def test_camera_less_rule_excludes_only_the_own_image():
    query = [("a.jpg", 1, -1), ("z.jpg", 3, -1)]
    gallery = [("a.jpg", 1, -1), ("b.jpg", 1, -1), ("c.jpg", 2, -1), ("z.jpg", 3, -1)]
    q_labels, g_labels, protocol = exclusion_labels(query, gallery)
    assert protocol == SAME_IMAGE_PROTOCOL and (q_labels, g_labels) == ([0, 1], [0, 2, 3, 1])
    g_pids = [1, 1, 2, 3]
    assert excluded([1, 3], q_labels, g_pids, g_labels).tolist() == [[True, False, False, False],
                                                                     [False, False, False, True]]
    # z's only gallery image of its identity is itself: not scorable
    assert scorable_queries([1, 3], q_labels, g_pids, g_labels).tolist() == [True, False]
    # a: own image (distance 0) left out, c (id 2) at 1, b (id 1) at 2 -> first match 2nd, AP 1/2
    m = evaluate(distmat=[[0.0, 2.0, 1.0, 3.0], [3.0, 3.0, 3.0, 0.0]], q_pids=[1, 3], g_pids=g_pids,
                 q_camids=q_labels, g_camids=g_labels)
    assert (m["rank1"], m["rank5"], m["mAP"], m["num_valid_queries"]) == (0.0, 1.0, 0.5, 1)


def test_mixed_cameras_fall_back_to_the_own_image_rule():
    # the query and one gallery image have camera 0, another gallery image has none
    query, gallery = [("a.jpg", 1, 0)], [("a.jpg", 1, 0), ("b.jpg", 1, 0), ("c.jpg", 1, -1)]
    q_labels, g_labels, protocol = exclusion_labels(query, gallery)
    assert protocol == SAME_IMAGE_PROTOCOL
    # b, same identity and camera, counts: only a (the same file) is left out
    assert excluded([1], q_labels, [1, 1, 1], g_labels).tolist() == [[True, False, False]]


def test_protocol_names_and_reasons_are_unchanged():
    assert MARKET_PROTOCOL == ("same-identity gallery images from the query's own camera are excluded "
                               "(Market-1501 protocol)")
    assert SAME_IMAGE_PROTOCOL == ("no camera ids: only the query's own image is excluded, so same-camera "
                                   "matches count (scores run higher than under the Market-1501 protocol)")
    assert dropped_reason(MARKET_PROTOCOL) == MARKET_DROPPED_REASON
    assert dropped_reason(SAME_IMAGE_PROTOCOL) == SAME_IMAGE_REASON
    assert reidlib.eval.inference.exclusion_labels is exclusion_labels   # one rule, also where it was


def test_sparse_and_dense_forms_of_the_rule_agree():
    rng = np.random.default_rng(0)
    for _ in range(30):
        q_pids, g_pids = rng.integers(0, 5, 12), rng.integers(0, 5, 40)
        q_labels, g_labels = rng.integers(-1, 3, 12), rng.integers(-1, 3, 40)
        mask = excluded(q_pids, q_labels, g_pids, g_labels)
        same = torch.from_numpy(q_pids[:, None] == g_pids[None, :])
        assert torch.equal((same & ~mask).any(1), scorable_queries(q_pids, q_labels, g_pids, g_labels))
        index, real, excl = GalleryIdentities(g_pids, g_labels).same_identity(
            torch.from_numpy(q_pids), torch.from_numpy(q_labels))
        for i in range(12):
            assert index[i][real[i]].tolist() == np.flatnonzero(same[i].numpy()).tolist()
            assert excl[i][real[i]].tolist() == mask[i][index[i][real[i]]].tolist()


def test_ranking_is_stable_and_leaves_out_the_excluded():
    assert ranked_gallery([0.5, 0.1, 0.5, 0.0], [False, False, False, True]) == [1, 0, 2]
    assert ranked_gallery(np.array([0.5, 0.1, 0.5, 0.0]), torch.tensor([False, False, True, True]), top=2) == [1, 0]


def test_the_preflight_check_uses_the_protocol():
    own_only = SimpleNamespace(name="own", root="/d", query=[("a.jpg", 1, -1)],
                               gallery=[("a.jpg", 1, -1), ("b.jpg", 2, -1)])
    with pytest.raises(ValueError, match="none of its 1 queries can be scored .no other gallery image"):
        check_valid_queries(own_only)
    own_only.gallery.append(("c.jpg", 1, -1))
    assert check_valid_queries(own_only) == 1
    from reidlib.engine import preflight
    assert preflight.check_valid_queries is check_valid_queries


# --------------------------------------------------------------------------- search

class _FakeExtractor:
    """Features looked up by file name, instead of a trained model."""

    def __init__(self, features: dict):
        self.features = features

    def extract_items(self, items, desc="features", progress=True, views=None):
        feats = torch.tensor([self.features[Path(p).name] for p, _, _ in items], dtype=torch.float32)
        pids = torch.tensor([pid for _, pid, _ in items])
        cams = torch.tensor([cam for _, _, cam in items])
        return feats, pids, cams, torch.ones(len(items), dtype=torch.bool)


def _search(monkeypatch, tmp_path, query_name, gallery, features, top=5):
    """search() of ``query_name`` (a file in the gallery folder, named relative to the working
    folder) against a .npz gallery of (name, pid, camid) entries."""
    folder = tmp_path / "gallery"
    folder.mkdir(exist_ok=True)
    (folder / query_name).write_bytes(b"")
    npz = tmp_path / "g.npz"
    np.savez(npz, features=np.array([features[n] for n, _, _ in gallery], dtype=np.float32),
             paths=np.array([str(folder / n) for n, _, _ in gallery]),
             pids=np.array([p for _, p, _ in gallery]), camids=np.array([c for _, _, c in gallery]))
    monkeypatch.setattr(reidlib.search, "_require_weights", lambda cfg: None)
    monkeypatch.setattr(reidlib.search, "_extractor_for", lambda cfg: _FakeExtractor(features))
    monkeypatch.chdir(tmp_path)
    cfg = SimpleNamespace(test=SimpleNamespace(metric="euclidean", feat_norm=False))
    ranked = reidlib.search.search(cfg, Path("gallery") / query_name, npz, top=top, grid=None)
    return [Path(p).name for p, _ in ranked]


def test_search_never_shows_the_query_its_own_image_on_camera_less_data(monkeypatch, tmp_path, capsys):
    features = {"0001_a.jpg": [0.0, 0.0], "0001_b.jpg": [2.0, 0.0], "0002_c.jpg": [1.0, 0.0]}
    gallery = [("0001_a.jpg", 1, -1), ("0001_b.jpg", 1, -1), ("0002_c.jpg", 2, -1)]
    assert _search(monkeypatch, tmp_path, "0001_a.jpg", gallery, features) == ["0002_c.jpg", "0001_b.jpg"]


def test_search_follows_the_protocol_in_its_edge_cases(monkeypatch, tmp_path, capsys):
    features = {"0001_c1_q.jpg": [0.0, 0.0], "0001_c1_x.jpg": [1.0, 0.0], "0001_c2_y.jpg": [2.0, 0.0],
                "0002_z.jpg": [3.0, 0.0], "-1_c1_q.jpg": [0.0, 0.0], "-1_c1_g.jpg": [1.0, 0.0],
                "-1_c2_h.jpg": [2.0, 0.0]}
    with_cameras = [("0001_c1_q.jpg", 1, 0), ("0001_c1_x.jpg", 1, 0), ("0001_c2_y.jpg", 1, 1)]
    # standard: the same identity from the query's camera is left out, as is its own file
    assert _search(monkeypatch, tmp_path, "0001_c1_q.jpg", with_cameras, features) == ["0001_c2_y.jpg"]
    # a gallery mixing images with and without cameras: only the own file is left out
    mixed = with_cameras + [("0002_z.jpg", 2, -1)]
    assert _search(monkeypatch, tmp_path, "0001_c1_q.jpg", mixed, features) == [
        "0001_c1_x.jpg", "0001_c2_y.jpg", "0002_z.jpg"]
    # identity -1 is a label like any other: -1 from the query's camera is left out
    unknown = [("-1_c1_q.jpg", -1, 0), ("-1_c1_g.jpg", -1, 0), ("-1_c2_h.jpg", -1, 1)]
    assert _search(monkeypatch, tmp_path, "-1_c1_q.jpg", unknown, features) == ["-1_c2_h.jpg"]


# --------------------------------------------------------------------------- retrieval grids

def _retrieval_rows(monkeypatch, query, gallery, features, unreadable=()):
    """The rows retrieval_figure would draw, with features looked up by path."""
    def fake_extract(model, items, cfg, progress=True, return_kept=False, **kwargs):
        kept = torch.tensor([p not in unreadable for p, _, _ in items])
        readable = [item for item, k in zip(items, kept.tolist()) if k]
        feats = torch.tensor([features[p] for p, _, _ in readable], dtype=torch.float32).reshape(-1, 2)
        pids = torch.tensor([pid for _, pid, _ in readable], dtype=torch.long)
        cams = torch.tensor([cam for _, _, cam in readable], dtype=torch.long)
        return (feats, pids, cams, kept) if return_kept else (feats, pids, cams)

    drawn = []
    monkeypatch.setattr(reidlib.eval.inference, "extract_features", fake_extract)
    monkeypatch.setattr(reidlib.viz.retrieval, "retrieval_rows", lambda rows, *a, **k: drawn.extend(rows))
    cfg = SimpleNamespace(test=SimpleNamespace(metric="euclidean", feat_norm=False))
    dataset = SimpleNamespace(name="own", query=query, gallery=gallery)
    reidlib.viz.retrieval.retrieval_figure({"m": (None, cfg)}, dataset, [0], top=5)
    return drawn


def test_retrieval_grid_never_shows_the_query_its_own_image_on_camera_less_data(monkeypatch):
    query = [("q/0001_a.jpg", 1, -1)]
    gallery = [("g/0001_b.jpg", 1, -1), ("q/0001_a.jpg", 1, -1), ("g/0002_c.jpg", 2, -1)]
    features = {"q/0001_a.jpg": [0.0, 0.0], "g/0001_b.jpg": [2.0, 0.0], "g/0002_c.jpg": [1.0, 0.0]}
    [row] = _retrieval_rows(monkeypatch, query, gallery, features)
    # the own image (distance 0) is left out; the other image of identity 1 counts as a match
    assert row["gallery"] == ["g/0002_c.jpg", "g/0001_b.jpg"] and row["correct"] == [False, True]


def test_retrieval_grid_uses_the_standard_rule_with_cameras_and_skips_unreadable_images(monkeypatch):
    query = [("q/0001_c1.jpg", 1, 0)]
    gallery = [("g/0001_c1.jpg", 1, 0), ("g/bad.jpg", 3, 1), ("g/0001_c2.jpg", 1, 1), ("g/0002_c1.jpg", 2, 0)]
    features = {"q/0001_c1.jpg": [0.0, 0.0], "g/0001_c1.jpg": [0.5, 0.0], "g/0001_c2.jpg": [2.0, 0.0],
                "g/0002_c1.jpg": [1.0, 0.0]}
    [row] = _retrieval_rows(monkeypatch, query, gallery, features, unreadable={"g/bad.jpg"})
    assert row["gallery"] == ["g/0002_c1.jpg", "g/0001_c2.jpg"] and row["correct"] == [False, True]
    assert row["captions"] == ["id 2, cam 0", "id 1, cam 1"]


# --------------------------------------------------------------------------- one distance kernel

@pytest.mark.parametrize("metric, normalize", [("euclidean", True), ("euclidean", False), ("cosine", True)])
def test_kernel_pairs_equal_the_full_rows(metric, normalize):
    gen = torch.Generator().manual_seed(0)
    qf, gf = torch.randn(7, 16, generator=gen) * 3, torch.randn(30, 16, generator=gen) * 3
    kernel = GalleryDistance(gf, metric, normalize)
    full = kernel(qf)
    assert torch.equal(full, compute_distance(qf, gf, metric, normalize))
    i, j = torch.randint(0, 7, (50,), generator=gen), torch.randint(0, 30, (50,), generator=gen)
    assert torch.allclose(kernel.pairs(qf, i, j, step=8), full[i, j], atol=1e-5)


def test_rerank_keeps_cpu_inputs_on_the_cpu(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    qf, gf = torch.randn(5, 8, generator=gen), torch.randn(30, 8, generator=gen)
    expected = rerank(qf, gf, k1=5, k2=3, device="cpu")

    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA used for CPU inputs")

    # as on a machine with a GPU: the inputs' device decides, not the GPU's presence
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", no_cuda)
    got = rerank(qf, gf, k1=5, k2=3)
    assert got.device.type == "cpu" and torch.equal(got, expected)
    got_np = rerank(qf.numpy(), gf.numpy(), k1=5, k2=3)
    assert isinstance(got_np, np.ndarray) and np.array_equal(got_np, expected.numpy())


def test_rerank_and_evaluation_share_the_kernel():
    rerank_module = sys.modules["reidlib.eval.rerank"]
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(2))
    rows = rerank_module._RowDistance(x)
    assert isinstance(rows.kernel, GalleryDistance)
    assert torch.equal(rows.to_all(slice(0, 12)), compute_distance(x, x, normalize=False))


# --------------------------------------------------------------------------- eval mode

def test_eval_mode_restores_training_mode_after_an_exception():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(2))
    net[2].eval()  # a frozen part of a training model
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(net) as inside:
            assert inside is net and not any(m.training for m in net.modules())
            raise RuntimeError("inside")
    assert [m.training for m in net.modules()] == [True, True, True, False]
    net.eval()
    with eval_mode(net):
        pass
    assert not any(m.training for m in net.modules())
