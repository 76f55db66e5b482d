"""The retrieval explorer's plain logic (reidlib.viz.explorer_state): rankings under the protocol,
AP and first match as evaluation computes them, the query orders, the frames, the cache files."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reidlib.eval import compute_distance, evaluate
from reidlib.eval.protocol import excluded, exclusion_labels, ranked_gallery
from reidlib.viz.explorer_state import (
    CORRECT,
    UNKNOWN,
    WRONG,
    Rankings,
    cache_key,
    cached_arrays,
    filter_queries,
    load_arrays,
    query_view,
    rank_queries,
    read_captions,
    save_arrays,
    sort_queries,
    text_view,
)

ROOT = Path(__file__).resolve().parents[1]


def _problem(seed=0, num_query=40, num_gallery=300, ids=12, cams=4, dim=16, round_to=None, camera_less=False):
    """Clustered features with identities and cameras; ``round_to`` makes many distances tie."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(ids, dim, generator=gen)
    q_pids = torch.randint(0, ids, (num_query,), generator=gen)
    g_pids = torch.randint(0, ids, (num_gallery,), generator=gen)
    qf = centres[q_pids] + 0.8 * torch.randn(num_query, dim, generator=gen)
    gf = centres[g_pids] + 0.8 * torch.randn(num_gallery, dim, generator=gen)
    if round_to:
        qf, gf = (torch.round(x * round_to) / round_to for x in (qf, gf))
    q_cams = torch.randint(0, cams, (num_query,), generator=gen)
    g_cams = torch.randint(0, cams, (num_gallery,), generator=gen)
    if camera_less:   # own folder: no cameras, and the gallery holds the query images too
        query = [(f"q{i}.jpg", int(p), -1) for i, p in enumerate(q_pids)]
        gallery = [(f"g{i}.jpg", int(p), -1) for i, p in enumerate(g_pids)] + query
        gf = torch.cat([gf, qf])
    else:
        query = [(f"q{i}.jpg", int(p), int(c)) for i, (p, c) in enumerate(zip(q_pids, q_cams))]
        gallery = [(f"g{i}.jpg", int(p), int(c)) for i, (p, c) in enumerate(zip(g_pids, g_cams))]
    return qf, gf, query, gallery


@pytest.mark.parametrize("kind", ["cameras", "ties", "camera_less"])
def test_rankings_agree_with_evaluation(kind):
    """The explorer's APs average to evaluation's mAP, its first matches give rank-1, and its
    top lists are the protocol's rankings (excluded images left out, ties in gallery order)."""
    qf, gf, query, gallery = _problem(round_to=2 if kind == "ties" else None, camera_less=kind == "camera_less")
    dist = compute_distance(qf, gf)
    ranking = rank_queries(lambda rows: dist[rows], query, gallery, keep=30, chunk=7)
    q_labels, g_labels, _ = exclusion_labels(query, gallery)
    q_pids, g_pids = [p for _, p, _ in query], [p for _, p, _ in gallery]
    metrics = evaluate(qf, gf, q_pids, g_pids, q_labels, g_labels)
    assert ranking.mean_ap() == pytest.approx(metrics["mAP"], abs=1e-12)
    assert ranking.rank1() == pytest.approx(metrics["rank1"], abs=1e-12)
    assert int(np.isfinite(ranking.ap).sum()) == metrics["num_valid_queries"]
    mask = excluded(q_pids, q_labels, g_pids, g_labels)
    for i in range(len(query)):
        full = ranked_gallery(dist[i], mask[i])
        assert ranking.top[i].tolist() == (full + [-1] * 30)[:30]
        assert np.allclose(ranking.top_dist[i][:len(full[:30])], dist[i, full[:30]].numpy())
        flags = [g_pids[g] == q_pids[i] for g in full]
        first = flags.index(True) if any(flags) else -1
        assert ranking.first_hit[i] == first


def test_excluded_images_never_reach_the_view():
    """Market protocol: same identity and camera as the query is left out, other cameras stay."""
    query = [("q.jpg", 5, 2)]
    gallery = [("same_cam.jpg", 5, 2), ("other_cam.jpg", 5, 0), ("other_id.jpg", 6, 2)]
    dist = torch.tensor([[0.0, 0.2, 0.1]])
    view = query_view(rank_queries(lambda rows: dist[rows], query, gallery), 0, query, gallery, k=10)
    assert [m.path for m in view.matches] == ["other_id.jpg", "other_cam.jpg"]
    assert [m.colour for m in view.matches] == [WRONG, CORRECT]
    assert (view.ap, view.first_hit, view.summary()) == (0.5, 1, "AP 50.0%, first true match at rank 2")


def test_a_query_without_a_true_match():
    query = [("q.jpg", 5, 2), ("r.jpg", 6, 0)]
    gallery = [("a.jpg", 5, 2), ("b.jpg", 6, 1)]          # q's only match is in its own camera
    dist = torch.tensor([[0.1, 0.2], [0.3, 0.1]])
    ranking = rank_queries(lambda rows: dist[rows], query, gallery)
    assert np.isnan(ranking.ap[0]) and ranking.first_hit[0] == -1 and ranking.ap[1] == 1.0
    assert "no true match" in query_view(ranking, 0, query, gallery).summary()
    assert sort_queries([0, 1], "ap", ranking.ap) == [1, 0]       # unscorable queries last


def test_query_orders_and_filters():
    ap_a = np.array([0.9, 0.2, 0.5, np.nan, 0.5])
    ap_b = np.array([0.4, 0.9, 0.6, 0.3, 0.5])
    assert sort_queries(range(5), "index") == [0, 1, 2, 3, 4]
    assert sort_queries(range(5), "ap", ap_a) == [1, 2, 4, 0, 3]          # worst first, ties in query order
    assert sort_queries(range(5), "b_wins", ap_a, ap_b) == [1, 2, 4, 0, 3]  # B - A: 0.7, 0.1, 0, -0.5
    assert sort_queries(range(5), "b_loses", ap_a, ap_b) == [0, 4, 2, 1, 3]
    assert sort_queries([4, 0], "b_wins", ap_a, ap_b) == [4, 0]
    with pytest.raises(ValueError, match="two models"):
        sort_queries(range(5), "b_wins", ap_a)
    query = [("a", 1, 0), ("b", 2, 1), ("c", 1, 1), ("d", 3, 1)]
    assert filter_queries(query, pid=1) == [0, 2]
    assert filter_queries(query, camera=1) == [1, 2, 3]
    assert filter_queries(query, pid=1, camera=1) == [2]


def test_text_view_ranks_by_similarity_and_frames_by_the_query_identity():
    gallery = [("a", 1, 0), ("b", 2, 0), ("c", 1, 1), ("d", 3, 1)]
    scores = torch.tensor([0.2, 0.9, 0.5, -0.1])
    view = text_view(scores, "red top", gallery, k=3, pid=1, model="m")
    assert [m.index for m in view.matches] == [1, 2, 0]
    assert [m.colour for m in view.matches] == [WRONG, CORRECT, CORRECT]
    assert view.ap == pytest.approx((1 / 2 + 2 / 3) / 2) and view.first_hit == 1 and view.caption == "red top"
    assert {m.colour for m in text_view(scores, "x", gallery, pid=None).matches} == {UNKNOWN}


def test_cache_files_are_written_whole_and_reused(tmp_path):
    arrays = Rankings(np.array([0.5]), np.array([2]), np.array([[3, 1]]), np.array([[0.1, 0.2]], np.float32)).arrays()
    path = tmp_path / "cache" / "rankings-x.npz"
    calls = []
    first, reused = cached_arrays(path, lambda: calls.append(1) or arrays)
    again, reused_again = cached_arrays(path, lambda: calls.append(1) or arrays)
    assert (reused, reused_again, len(calls)) == (False, True, 1)
    assert Rankings.from_arrays(again).top.tolist() == [[3, 1]]
    assert sorted(p.name for p in path.parent.iterdir()) == ["rankings-x.npz"]   # no temp file left
    path.write_bytes(b"half a file")                                              # e.g. a disk that filled up
    assert load_arrays(path) is None
    assert cached_arrays(path, lambda: arrays)[1] is False and load_arrays(path) is not None


def test_cache_is_skipped_where_it_cannot_be_written(tmp_path):
    """The cache only saves time: a folder that cannot be made (here a file is in the way; a
    read-only run folder alike) means computing again, not an error."""
    (tmp_path / "run").write_text("a file, not a folder")
    assert save_arrays(tmp_path / "run" / "explore_cache" / "x.npz", {"a": np.ones(1)}) is None
    assert cached_arrays(tmp_path / "run" / "explore_cache" / "x.npz", lambda: {"a": np.ones(1)})[1] is False


def test_cache_keys_tell_settings_apart():
    items = [("q.jpg", 1, 0)]
    assert cache_key("w", items, False) == cache_key("w", list(items), False)
    assert len({cache_key("w", items, False), cache_key("w", items, True), cache_key("v", items, False),
                cache_key("w", [("q.jpg", 2, 0)], False)}) == 4


def test_captions_are_read_from_the_data_set(tmp_path):
    (tmp_path / "captions.csv").write_text('path,caption\nquery/a.jpg,"a red top, blue jeans"\n')
    assert read_captions(tmp_path) == {str(tmp_path / "query" / "a.jpg"): "a red top, blue jeans"}
    assert read_captions(tmp_path / "missing") == {} and read_captions(None) == {}


def test_explore_bench_tiny_runs():
    """bench/explore_bench.py end to end on a small problem (its figures: bench/README.md)."""
    done = subprocess.run([sys.executable, "bench/explore_bench.py", "--tiny"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "query slider moved" in done.stdout and "largest difference" in done.stdout
    gap = float(done.stdout.split("largest difference")[1].split()[0])
    assert gap < 1e-9
