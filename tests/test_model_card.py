"""The trained model folder carries a model card: config, final metrics, data set and statistics, version, date."""
import json
from datetime import datetime, timedelta, timezone
from importlib import metadata

from reidlib.weights import describe_weights, read_trained


def test_model_final_carries_its_card(tiny_trained, capsys):
    from reidlib.__main__ import main
    cfg, out = tiny_trained
    state = read_trained(out / "model")
    summary = json.loads((out / "metrics.json").read_text())
    assert state["config"]["data"]["root"] == cfg.data.root
    assert state["metrics"]["mAP"] == summary["mAP"] and state["metrics"]["rank1"] == summary["rank1"]
    assert state["dataset"] == "market1501"
    assert state["dataset_stats"]["train"] == {"ids": 12, "images": state["dataset_stats"]["train"]["images"],
                                               "cameras": 3}
    assert state["dataset_stats"]["train"]["images"] > 0 and state["dataset_stats"]["query"]["ids"] == 12
    assert state["reidlib_version"] == metadata.version("reidlib")
    created = datetime.fromisoformat(state["created"])
    assert created.tzinfo is not None and abs(datetime.now(timezone.utc) - created) < timedelta(hours=1)
    card = describe_weights(out / "model")
    assert card["method"] == "baseline" and card["identities"] == 12 and card["LoRA"] == "off"
    assert main(["info", f"weights={out / 'model'}"]) == 0
    printed = capsys.readouterr().out
    assert f"mAP: {summary['mAP']}" in printed and "cmc" not in printed and "dataset_stats:" in printed
