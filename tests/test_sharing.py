"""Models that travel: the model folder's README.md model card, FeatureExtractor.from_pretrained
(a local folder; a hub id through a stubbed snapshot_download; offline), `export format=hf` and
push_to_hub (HfApi stubbed). Nothing here reaches the network."""
import fnmatch
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import reidlib
from reidlib.config import load_config
from reidlib.eval.extractor import HUB_FILES
from reidlib.export import export_model, push_to_hub
from reidlib.model import build_model
from reidlib.storage import CheckpointError, save_checkpoint
from reidlib.weights import model_record, read_card, read_trained
from reidlib.weights.trained import model_card

pytestmark = pytest.mark.usefixtures("one_thread")
CROPS = torch.randn(3, 3, 128, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def folder(tiny_trained):
    """The tiny trained baseline's model folder (with its final metrics)."""
    return tiny_trained[1] / "model"


def _front_matter(text: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "README.md must start with YAML front matter"
    return yaml.safe_load(match.group(1))


def _features(extractor):
    return extractor(CROPS)


def test_the_folder_carries_a_readme_that_agrees_with_its_card(folder):
    card = read_card(folder)
    text = (folder / "README.md").read_text()
    assert text == model_card(card)                                     # generated from config.json
    front = _front_matter(text)
    assert front["library_name"] == "reidlib" and front["license"] == "mit"
    assert {"person-reid", "clip", "clipreid", "baseline"} <= set(front["tags"])
    assert front["datasets"] == ["market1501"] and "base_model" not in front      # tiny: no CLIP weights
    metrics = {m["type"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"mAP": round(100 * card["metrics"]["mAP"], 2),
                       "Rank-1": round(100 * card["metrics"]["rank1"], 2)}
    assert f"| {100 * card['metrics']['mAP']:.2f} | {100 * card['metrics']['rank1']:.2f} |" in text
    assert "re-ranking" in text and card["metrics"]["protocol"] in text
    assert "resized to 128×64" in text and "mean [0.5, 0.5, 0.5] and std [0.5, 0.5, 0.5]" in text
    assert "CLIP-ReID: Exploiting Vision-Language Model" in text
    usage = re.search(r"## Usage\n\n```python\n(.*?)```", text, re.S).group(1)
    assert len(usage.strip().splitlines()) == 5 and "FeatureExtractor.from_pretrained" in usage


def test_a_card_without_metrics_says_so():
    cfg = load_config("vit_clipreid")
    from reidlib.config import to_dict
    text = model_card({"config": to_dict(cfg), "num_classes": 751, "num_cameras": 6, "dataset": "market1501"})
    front = _front_matter(text)
    assert "model-index" not in front and "metrics" not in front
    assert front["base_model"] == "openai/clip-vit-base-patch16" and "No evaluation is recorded" in text


def test_the_readme_usage_lines_run(folder, tmp_path, monkeypatch):
    """The card's five lines, as written, with the hub id answered by the local folder."""
    import huggingface_hub
    code = re.search(r"## Usage\n\n```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(folder))
    from PIL import Image
    for name in ("query.jpg", "gallery1.jpg", "gallery2.jpg"):
        Image.new("RGB", (64, 128), (30 * len(name), 90, 140)).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["feats"].shape[0] == 3 and torch.allclose(namespace["feats"].norm(dim=1), torch.ones(3))


def test_from_pretrained_loads_a_local_folder_a_run_folder_and_a_legacy_file(folder, tmp_path):
    expected = _features(reidlib.FeatureExtractor(folder, device="cpu"))
    assert torch.equal(_features(reidlib.FeatureExtractor.from_pretrained(str(folder), device="cpu")), expected)
    assert torch.equal(_features(reidlib.FeatureExtractor.from_pretrained(folder.parent, device="cpu")), expected)
    state = read_trained(folder)
    legacy = save_checkpoint(tmp_path / "model_final.pt", state)
    assert torch.equal(_features(reidlib.FeatureExtractor.from_pretrained(legacy, device="cpu")), expected)


def test_from_pretrained_downloads_a_hub_id(folder, tmp_path, monkeypatch):
    import huggingface_hub
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        cache = tmp_path / "cache" / repo_id.replace("/", "--")
        if not cache.exists():
            cache.mkdir(parents=True)
            for name in kwargs["allow_patterns"]:
                shutil.copyfile(folder / name, cache / name)
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    extractor = reidlib.FeatureExtractor.from_pretrained("someone/reid-tiny", revision="v1", device="cpu",
                                                         batch_size=2)
    assert torch.equal(_features(extractor), _features(reidlib.FeatureExtractor(folder, device="cpu", batch_size=2)))
    (repo_id, kwargs), = calls
    assert repo_id == "someone/reid-tiny" and kwargs["revision"] == "v1"
    assert sorted(kwargs["allow_patterns"]) == sorted(HUB_FILES) == ["README.md", "config.json", "model.safetensors"]
    assert extractor.batch_size == 2


def test_from_pretrained_offline_without_a_cache_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder ... HF_HUB_OFFLINE")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError) as err:
        reidlib.FeatureExtractor.from_pretrained("someone/not-downloaded", device="cpu")
    message = str(err.value)
    assert "\n" not in message and "someone/not-downloaded" in message
    assert "huggingface-cli download someone/not-downloaded" in message and "local model folder" in message


def test_from_pretrained_really_offline(tmp_path, monkeypatch):
    """huggingface_hub's own answer with HF_HUB_OFFLINE=1 (conftest) and an empty cache."""
    import huggingface_hub.constants as hub_constants
    if not hub_constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE was not set when huggingface_hub was imported")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(FileNotFoundError, match=r"reidlib-tests/absent: no such local path.*offline"):
        reidlib.FeatureExtractor.from_pretrained("reidlib-tests/absent", device="cpu")
    with pytest.raises(FileNotFoundError):       # a local path that does not exist stays a local error
        reidlib.FeatureExtractor.from_pretrained(str(tmp_path / "no" / "such" / "model"), device="cpu")


def test_export_hf_copies_the_folder_with_a_readme_and_the_umask_mode(folder, tmp_path):
    old = os.umask(0o022)
    try:
        out = export_model(folder, tmp_path / "share" / "reid-tiny", format="hf")
    finally:
        os.umask(old)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors", "README.md"):
        assert (out / name).read_bytes() == (folder / name).read_bytes(), name
        assert (out / name).stat().st_mode & 0o777 == 0o644
    assert out.stat().st_mode & 0o777 == 0o755
    with pytest.raises(ValueError, match="format=hf writes a folder"):
        export_model(folder, tmp_path / "x.onnx", format="hf")


def test_an_older_folder_without_readme_loads_and_gets_one_when_exported(folder, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    (old / "README.md").unlink()
    assert read_trained(old)["num_classes"] == read_card(folder)["num_classes"]
    assert torch.equal(_features(reidlib.FeatureExtractor(old, device="cpu")),
                       _features(reidlib.FeatureExtractor(folder, device="cpu")))
    out = export_model(old, tmp_path / "new", format="hf")
    assert (out / "README.md").read_text() == model_card(read_card(old))


def test_export_hf_converts_a_legacy_file(tmp_path):
    cfg = load_config("tiny", ["device=cpu"])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=5, num_cameras=3).eval()
    legacy = save_checkpoint(tmp_path / "model_final.pt", model_record(model, cfg, 5, 3))
    out = export_model(legacy, tmp_path / "shared", format="hf")
    assert (out / "README.md").read_text() == model_card(read_card(out))
    assert "No evaluation is recorded" in (out / "README.md").read_text()


class FakeApi:
    """huggingface_hub.HfApi as push_to_hub uses it: records what would be created and uploaded."""
    instances: list = []

    def __init__(self, token=None):
        self.token, self.repos, self.uploaded = token, [], []
        FakeApi.instances.append(self)

    def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None, **kwargs):
        self.repos.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok, "repo_type": repo_type})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, **kwargs):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()
                 if p.is_file() and any(fnmatch.fnmatch(p.name, pattern) for pattern in allow_patterns)}
        self.uploaded.append({"repo_id": repo_id, "files": files, **kwargs})


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub
    FakeApi.instances = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi.instances


def test_push_to_hub_uploads_the_three_files(folder, tmp_path, fake_hub):
    shared = tmp_path / "shared"
    shutil.copytree(folder, shared)
    (shared / "README.md").unlink()                        # an older folder: the card is written first
    (shared / "notes.txt").write_text("not for the hub")
    url = reidlib.push_to_hub(shared, "someone/reid-tiny", private=True, token="hf_x")
    api, = fake_hub
    assert url == "https://huggingface.co/someone/reid-tiny" and api.token == "hf_x"
    assert api.repos == [{"repo_id": "someone/reid-tiny", "private": True, "exist_ok": True, "repo_type": "model"}]
    upload, = api.uploaded
    assert sorted(upload["files"]) == ["README.md", "config.json", "model.safetensors"]
    assert upload["files"]["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert upload["files"]["README.md"].decode() == model_card(read_card(folder))
    assert upload["repo_type"] == "model" and "baseline" in upload["commit_message"]


def test_push_refuses_a_damaged_folder_before_any_upload(folder, tmp_path, fake_hub):
    shared = tmp_path / "shared"
    shutil.copytree(folder, shared)
    card = json.loads((shared / "config.json").read_text())
    card["num_classes"] += 1
    (shared / "config.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="is damaged"):
        push_to_hub(shared, "someone/reid-tiny")
    with pytest.raises(ValueError, match="not a reidlib model folder"):
        push_to_hub(tmp_path, "someone/reid-tiny")
    assert fake_hub == []


def test_cli_export_hf_and_push(folder, tmp_path, fake_hub, capsys):
    from reidlib.__main__ import main
    out = tmp_path / "cli_share"
    assert main(["export", f"weights={folder}", f"out={out}", "push=someone/reid-cli", "private=true"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    api, = fake_hub
    assert api.repos[0]["private"] is True and sorted(api.uploaded[0]["files"]) == sorted(HUB_FILES)
    assert main(["export", f"weights={folder}", f"out={tmp_path / 'x.onnx'}", "push=someone/x",
                 "format=onnx"]) == 2
    assert "push=someone/x uploads a model folder: use format=hf" in capsys.readouterr().err
