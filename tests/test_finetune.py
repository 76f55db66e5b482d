"""Fine-tuning from a trained model: model.pretrained= naming a reidlib checkpoint."""
import json
import logging
import math

import pytest
import torch

import reidlib
from reidlib.config import load_config
from reidlib.model import build_model
from reidlib.storage import save_checkpoint
from reidlib.weights import model_record, read_trained

pytestmark = pytest.mark.usefixtures("one_thread")
IMAGES = torch.randn(3, 3, 128, 64, generator=torch.Generator().manual_seed(2))
PROPOSED = ["model.prompt=deep", "model.n_shared=2", "model.n_per_id=1", "model.depth=9", "model.lora.enabled=true"]


@pytest.fixture()
def trained(tmp_path):
    """A 'trained' tiny proposed model (deep prompts, LoRA with non-zero B) for 5 identities, saved."""
    cfg = load_config("tiny", PROPOSED)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=5, num_cameras=3).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name or name.startswith("prompts."):
                param.copy_(torch.randn_like(param) * 0.05)
        model.bottleneck.running_mean.normal_()
    return save_checkpoint(tmp_path / "trained.pt", model_record(model, cfg, 5, 3)), model


def test_encoders_are_taken_and_identity_parts_start_afresh(trained, caplog):
    path, source = trained
    for overrides in ([], PROPOSED):       # a baseline, and the same method again (fresh LoRA on top)
        cfg = load_config("tiny", [f"model.pretrained={path}", *overrides])
        torch.manual_seed(1)
        with caplog.at_level(logging.INFO, logger="reidlib"):
            model = build_model(cfg.model, num_classes=12, num_cameras=4).eval()
        with torch.no_grad():        # the LoRA update is folded in: the same image features
            assert torch.allclose(model.encode_image(IMAGES), source.encode_image(IMAGES), rtol=1e-5, atol=1e-5)
        assert model.classifier.weight.shape == (12, 64) and model.prompts.per_id.shape[0] == 12
        assert 0.0005 < model.classifier.weight.std() < 0.0015          # a fresh N(0, 0.001) init
        assert torch.equal(model.text.transformer.resblocks[3].mlp.c_fc.weight,
                           source.text.transformer.resblocks[3].mlp.c_fc.weight)
        message = [r.getMessage() for r in caplog.records if "trained.pt" in r.getMessage()][-1]
        assert "took image encoder" in message and "text encoder" in message
        assert "re-initialised for 12 identities: classifier.weight, classifier_proj.weight, prompts.per_id" in message
    # shared deep prompts carry over when the new model has them
    assert torch.equal(model.prompts.deep_shared, source.prompts.deep_shared)
    assert not torch.equal(model.prompts.per_id[:5], source.prompts.per_id)


def test_another_architecture_or_input_size_is_an_error(trained):
    path, _ = trained
    with pytest.raises(ValueError, match="holds a vit-tiny8 model .*model.name=vit-tiny8"):
        build_model(load_config("tiny", [f"model.pretrained={path}", "model.name=vit-tiny"]).model, num_classes=3)
    with pytest.raises(ValueError, match="positional_embedding is .*model.image_size"):
        build_model(load_config("tiny", [f"model.pretrained={path}", "model.image_size=[64,32]"]).model,
                    num_classes=3)


def test_fine_tuning_with_another_identity_count_trains(trained, synth_root, tmp_path):
    path, _ = trained
    out = tmp_path / "run"
    cfg = reidlib.method_config("baseline", [f"data.root={synth_root}", f"output_dir={out}", "device=cpu",
                                             f"model.pretrained={path}", "stage1.epochs=1", "stage2.epochs=1",
                                             "stage2.ims_per_batch=16"], base="tiny")
    metrics = reidlib.train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert {r.get("stage") for r in records if "loss" in r} == {1, 2}
    assert losses and all(math.isfinite(v) for v in losses)
    final = read_trained(out / "model")
    assert final["num_classes"] == 12 and final["model"]["classifier.weight"].shape == (12, 64)
    assert 0 <= metrics["mAP"] <= 1
