"""Evaluation protocols: data without camera ids (only the query's own image is left out) and
VehicleID's drawn galleries (metrics averaged over draws), against an independent loop."""
import numpy as np
import pytest
import torch

from reidlib.config import load_config
from reidlib.data import ReIDDataset, load_dataset
from reidlib.eval.inference import (
    MARKET_PROTOCOL,
    SAME_IMAGE_PROTOCOL,
    check_valid_queries,
    evaluate_model,
    exclusion_labels,
    extract_features,
)
from reidlib.eval.metrics import evaluate
from reidlib.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_without_cameras_only_the_query_image_itself_is_left_out():
    # query "a" (id 1); gallery: "a" itself (closest), "c" (id 2), "b" (id 1, same unknown camera)
    query = [("a.jpg", 1, -1)]
    gallery = [("a.jpg", 1, -1), ("c.jpg", 2, -1), ("b.jpg", 1, -1)]
    qf = torch.tensor([[0.0, 0.0]])
    gf = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    q_labels, g_labels, protocol = exclusion_labels(query, gallery)
    assert protocol == SAME_IMAGE_PROTOCOL and q_labels == [0] and g_labels == [0, 1, 2]
    m = evaluate(qf, gf, [1], [1, 2, 1], q_labels, g_labels, normalize=False)
    # "a" is left out; ranking c, b: the match is 2nd -> R1 0, AP 1/2, and b counts although it
    # may be the query's own camera
    assert (m["rank1"], m["rank5"], m["mAP"]) == (0.0, 1.0, 0.5)
    # with camera ids the Market protocol applies: b from the query's camera is left out too
    with_cams = [(p, pid, 0) for p, pid, _ in gallery[1:]]
    q_labels, g_labels, protocol = exclusion_labels([("a.jpg", 1, 0)], with_cams + [("d.jpg", 1, 1)])
    assert protocol == MARKET_PROTOCOL and (q_labels, g_labels) == ([0], [0, 0, 1])


def _independent_scores(qf, gf, query, gallery):
    """R1 and mAP by a plain loop: squared distances of L2-normalised features, a stable sort,
    the query's own file (or, with cameras, same identity and camera) left out."""
    qf, gf = torch.nn.functional.normalize(qf, dim=1), torch.nn.functional.normalize(gf, dim=1)
    dist = torch.cdist(qf.double(), gf.double()).pow(2).numpy()
    r1, aps = [], []
    for i, (q_path, q_pid, q_cam) in enumerate(query):
        order = np.argsort(dist[i], kind="stable")
        keep = [j for j in order if not (gallery[j][0] == q_path
                                         or (q_cam >= 0 and gallery[j][1] == q_pid and gallery[j][2] == q_cam))]
        hits = [rank for rank, j in enumerate(keep) if gallery[j][1] == q_pid]
        if not hits:
            continue
        r1.append(float(hits[0] == 0))
        aps.append(np.mean([(n + 1) / (rank + 1) for n, rank in enumerate(hits)]))
    return float(np.mean(r1)), float(np.mean(aps))


@pytest.fixture(scope="module")
def model_and_cfg():
    cfg = load_config("tiny", ["device=cpu"])
    torch.manual_seed(0)
    return build_model(cfg.model, num_classes=4).eval(), cfg


def _without_cameras(items):
    return [(path, pid, -1) for path, pid, _ in items]


def test_camera_less_data_set_is_scored_under_the_same_image_protocol(synth_root, model_and_cfg):
    model, cfg = model_and_cfg
    market = load_dataset("synth", synth_root)
    query = _without_cameras(market.query)
    gallery = _without_cameras(market.gallery) + query[:5]    # some queries' own files in the gallery too
    ds = ReIDDataset("own", synth_root, _without_cameras(market.train), query, gallery)
    assert not ds.has_cameras and ds.num_train_cams == 0
    assert check_valid_queries(ds) == len(query)     # every query has another image of its identity
    metrics = evaluate_model(model, ds, cfg, progress=False)
    assert metrics["protocol"] == SAME_IMAGE_PROTOCOL
    qf, _, _ = extract_features(model, query, cfg, progress=False)
    gf, _, _ = extract_features(model, gallery, cfg, progress=False)
    r1, m_ap = _independent_scores(qf, gf, query, gallery)
    # float32 distances (the library's) may order near-ties other than float64 ones (this loop's)
    assert metrics["rank1"] == pytest.approx(r1, abs=1e-3) and metrics["mAP"] == pytest.approx(m_ap, abs=2e-4)
    # the same images with their cameras: the Market protocol, and other numbers
    with_cams = evaluate_model(model, ReIDDataset("synth", synth_root, market.train, market.query,
                                                  market.gallery), cfg, progress=False)
    assert with_cams["protocol"] == MARKET_PROTOCOL and with_cams["mAP"] != metrics["mAP"]


def test_drawn_galleries_are_scored_per_draw_and_averaged(synth_root, model_and_cfg):
    model, cfg = model_and_cfg
    cfg = load_config("tiny", ["device=cpu", "test.trials=3"])
    market = load_dataset("synth", synth_root)
    pool = _without_cameras(market.query + market.gallery)
    pool = [item for item in pool if item[1] > 0]       # identities only, as VehicleID's lists
    ds = ReIDDataset("pooled", synth_root, _without_cameras(market.train), [], [], test_pool=pool,
                     num_trials=cfg.test.trials, protocol="one image per identity in the gallery")
    metrics = evaluate_model(model, ds, cfg, progress=False)
    assert metrics["num_trials"] == 3 and len(metrics["trial_mAP"]) == 3
    assert metrics["protocol"].startswith("one image per identity in the gallery; no camera ids")
    feats, _, _ = extract_features(model, pool, cfg, progress=False)
    expected = []
    for k in range(3):
        q_idx, g_idx = ds.trial_indices(k)
        expected.append(_independent_scores(feats[q_idx], feats[g_idx], [pool[i] for i in q_idx],
                                            [pool[i] for i in g_idx]))
    assert metrics["trial_rank1"] == pytest.approx([r for r, _ in expected], abs=1e-3)
    assert metrics["trial_mAP"] == pytest.approx([m for _, m in expected], abs=2e-4)
    assert metrics["mAP"] == pytest.approx(np.mean(metrics["trial_mAP"]), abs=1e-12)
    assert metrics["rank1"] == pytest.approx(np.mean(metrics["trial_rank1"]), abs=1e-12)
    assert len(set(metrics["trial_mAP"])) > 1          # the draws differ
    assert len(metrics["cmc"]) == cfg.test.max_rank and metrics["cmc"][0] == pytest.approx(metrics["rank1"])
