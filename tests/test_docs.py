"""The README stays a newcomer's page, and every link in it and in docs/ leads somewhere."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "notebooks" / "README.md"]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_is_short_and_has_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert "make demo" in text and "make test" in text
    for heading in ("## Two commands", "## Five lines", "## Train on your data", "## Use your model",
                    "## Where to go next"):
        assert heading in text, heading


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to a missing {target}"


def test_every_doc_page_is_reachable_from_the_readme_or_the_docs():
    linked = set()
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            path = (page.parent / target).resolve()
            linked.add(path)
            if path.is_dir():
                linked.update(p.resolve() for p in path.glob("*.md"))
    for page in (ROOT / "docs").rglob("*.md"):
        assert page.resolve() in linked, f"{page.relative_to(ROOT)} is linked from nowhere"


def test_readme_use_your_model_lines_run(tiny_trained, synth_root):
    """The README's "Use your model" lines, as written, on a trained run's model folder and two crops."""
    import torch

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use your model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    _, run = tiny_trained
    crops = sorted(str(p) for p in (synth_root / "query").glob("*.jpg"))[:2]
    code = code.replace('"results/runs/my_run/model"', repr(str(run / "model")))
    code = code.replace('["crop1.jpg", "crop2.jpg"]', repr(crops))
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    feats = namespace["feats"]
    assert feats.dtype == torch.float32 and feats.shape[0] == 2 and torch.isfinite(feats).all()
