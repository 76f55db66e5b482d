"""SIE over cameras and viewpoints: the table row of each image, the camera-only case, the extractor."""
from pathlib import Path

import pytest
import torch

import reidlib
from reidlib.config import load_config
from reidlib.data import list_image_folder
from reidlib.model import build_model
from reidlib.storage import save_checkpoint
from reidlib.weights import describe_weights, model_record

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGES = torch.randn(4, 3, 128, 64, generator=torch.Generator().manual_seed(2))
CAMS = torch.tensor([0, 2, 1, 2])
VIEWS = torch.tensor([3, 0, 1, 2])


def _tiny(*overrides, cameras=3, views=4, seed=0):
    torch.manual_seed(seed)
    return build_model(load_config("tiny", list(overrides)).model, num_classes=5, num_cameras=cameras,
                       num_views=views).eval()


def _expected(model, rows):
    """The test feature with the CLS token moved by coefficient x the given table rows (the spec's formula)."""
    with torch.no_grad():
        _, f, f_proj = model.visual(IMAGES, model.sie_coe * model.sie_embed[rows])
    return torch.cat([f, f_proj], 1)


def test_camera_and_view_pick_row_camera_times_views_plus_view():
    model = _tiny("model.sie_camera=true", "model.sie_view=true", "model.sie_coe=1.5")
    assert model.sie_embed.shape == (3 * 4, 64) and model.uses_sie
    rows = torch.tensor([c * 4 + v for c, v in zip(CAMS.tolist(), VIEWS.tolist())])   # [3, 8, 5, 10]
    with torch.no_grad():
        feats = model.encode_image(IMAGES, CAMS, VIEWS)
    assert torch.equal(feats, _expected(model, rows))
    # another row gives another feature: the table is really indexed by both ids
    with torch.no_grad():
        assert not torch.allclose(feats, model.encode_image(IMAGES, CAMS, (VIEWS + 1) % 4))
        assert not torch.allclose(feats, model.encode_image(IMAGES, (CAMS + 1) % 3, VIEWS))
    with pytest.raises(ValueError, match="pass the view ids"):
        model.encode_image(IMAGES, CAMS)
    with pytest.raises(ValueError, match="pass the camera ids"):
        model.encode_image(IMAGES, views=VIEWS)


def test_view_only_table_is_indexed_by_view():
    model = _tiny("model.sie_view=true")
    assert model.sie_embed.shape == (4, 64) and model.sie_cameras == 0
    with torch.no_grad():
        assert torch.equal(model.encode_image(IMAGES, views=VIEWS), _expected(model, VIEWS))
        assert torch.equal(model.encode_image(IMAGES, CAMS, VIEWS), _expected(model, VIEWS))   # cameras unused


def test_a_table_without_view_differences_equals_the_camera_only_model():
    camera_only = _tiny("model.sie_camera=true")
    joint = _tiny("model.sie_camera=true", "model.sie_view=true")
    assert camera_only.sie_embed.shape == (3, 64)
    state = camera_only.state_dict()
    # every view row of camera c holds the camera-only row c: the view part of the table is zero
    state["sie_embed"] = camera_only.sie_embed.detach().repeat_interleave(4, dim=0)
    joint.load_state_dict(state)
    with torch.no_grad():
        expected = camera_only.encode_image(IMAGES, CAMS)
        for views in (VIEWS, torch.zeros_like(VIEWS), torch.full_like(VIEWS, 3)):
            assert torch.equal(joint.encode_image(IMAGES, CAMS, views), expected)


def test_sie_needs_the_ids_the_data_set_has():
    with pytest.raises(ValueError, match="view labels.*sie_view=false"):
        _tiny("model.sie_view=true", views=0)
    with pytest.raises(ValueError, match="camera ids.*sie_camera=false"):
        _tiny("model.sie_camera=true", cameras=0)
    with pytest.raises(ValueError, match="ViT image encoders only"):
        _tiny("model.name=rn-tiny", "model.sie_view=true")
    assert not _tiny(views=8).uses_sie            # views known, but SIE off: no table


def test_extractor_takes_views_and_checkpoints_keep_the_view_count(tmp_path, synth_root):
    cfg = load_config("tiny", ["device=cpu", "model.sie_camera=true", "model.sie_view=true"])
    model = _tiny("model.sie_camera=true", "model.sie_view=true")
    path = save_checkpoint(tmp_path / "m.pt", model_record(model, cfg, 5, 3, num_views=4))
    card = describe_weights(path)
    assert card["SIE"] == "3 cameras x 4 views, coefficient 3.0"
    extractor = reidlib.FeatureExtractor(path, device="cpu")
    assert (extractor.num_cameras, extractor.num_views) == (3, 4)
    assert torch.allclose(extractor(IMAGES, cameras=CAMS, views=VIEWS), _expected(model, CAMS * 4 + VIEWS),
                          rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="SIE over 4 views: pass views="):
        extractor(IMAGES, cameras=CAMS)
    with pytest.raises(ValueError, match=r"view ids must lie in 0\.\.3"):
        extractor(IMAGES, cameras=CAMS, views=4)
    with pytest.raises(ValueError, match="default_view=4"):
        reidlib.FeatureExtractor(path, device="cpu", default_view=4)
    fixed = reidlib.FeatureExtractor(path, device="cpu", default_view=2)
    assert torch.equal(fixed(IMAGES, cameras=CAMS), extractor(IMAGES, cameras=CAMS, views=2))
    # items from a folder: views given per item, or the default; none is an error naming the fix
    items = list_image_folder(Path(synth_root) / "query")[:3]
    with pytest.raises(ValueError, match="have no view id.*test.default_view"):
        extractor.extract_items(items, progress=False)
    with_views, _, _, kept = extractor.extract_items(items, progress=False, views=[1, 1, 1])
    by_default, _, _, _ = fixed.extract_items(items, progress=False)
    assert bool(kept.all()) and not torch.allclose(with_views, by_default)
    assert torch.allclose(fixed.extract_items(items, progress=False, views=[2, 2, 2])[0], by_default)
