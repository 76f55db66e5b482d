"""Prompt templates, the frozen text encoder, the EOT cut, deep prompts and their invariants."""
import copy

import open_clip
import pytest
import torch

from reidlib.config import load_config
from reidlib.model import DeepPromptLearner, PromptLearner, TextEncoder, load_clip
from reidlib.model.prompts import build_prompt_learner

SOS, EOT = 49406, 49407


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip("vit-tiny", "none").eval()


@pytest.fixture(scope="module")
def text(clip):
    return TextEncoder(clip)


def _token(word):
    return int(open_clip.tokenize([word])[0, 1])


def _manual_deep(clip, learner, labels):
    """Deep prompts written out on open_clip's modules over all 77 tokens (no cut): replace slots, run."""
    tokens = open_clip.tokenize([learner.template])
    injections = learner(labels)
    x = clip.token_embedding(tokens).expand(len(labels), -1, -1).clone()
    start, vectors = injections[0]
    x[:, start:start + vectors.shape[1]] = vectors
    x = x + clip.positional_embedding
    for i, block in enumerate(clip.transformer.resblocks):
        if 0 < i < len(injections):
            start, vectors = injections[i]
            x = x.clone()
            x[:, start:start + vectors.shape[1]] = vectors
        x = block(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)[:, tokens.argmax()]
    return x @ clip.text_projection


# --------------------------------------------------------------------------- templates

def test_clipreid_template_tokens():
    learner = PromptLearner(num_classes=3, width=64)
    assert learner.template == "A photo of a X X X X person."
    x = _token("X")
    expected = [SOS, _token("a"), _token("photo"), _token("of"), _token("a"), x, x, x, x,
                _token("person"), _token("."), EOT]
    assert learner.tokens[0].tolist() == expected
    assert learner.start == 5 and learner.eot == 11                    # slots 5-8, EOT at 11
    assert learner.per_id.shape == (3, 4, 64) and learner.shared is None


def test_deep_template_tokens_and_thesis_defaults():
    learner = DeepPromptLearner(num_classes=3, width=64)
    assert learner.template == "A photo of a Y Y X person."
    y, x = _token("Y"), _token("X")
    assert learner.tokens[0].tolist()[5:8] == [y, y, x] and learner.tokens[0, 10] == EOT
    assert learner.start == 5 and learner.eot == 10 and learner.tokens.shape == (1, 11)
    assert learner.shared.shape == (2, 64) and learner.per_id.shape == (3, 1, 64)
    assert learner.deep_shared.shape == (8, 2, 64) and learner.deep_per_id.shape == (8, 3, 1, 64)
    assert all(p.dtype == torch.float32 for p in learner.parameters())
    assert 0.015 < torch.cat([p.flatten() for p in learner.parameters()]).std() < 0.025   # N(0, 0.02)
    assert DeepPromptLearner(3, 64, class_token="vehicle").template == "A photo of a Y Y X vehicle."


# --------------------------------------------------------------------------- text encoder

def test_text_encoder_without_prompts_equals_open_clip(clip, text):
    tokens = open_clip.tokenize(["a person in a red coat", "a photo of a man walking his dog", "hi"])
    with torch.no_grad():
        ours, theirs = text(tokens), clip.encode_text(tokens)
        uncut = text(tokens, cut_after_eot=False)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(ours, uncut, atol=1e-6)


@pytest.mark.parametrize("depth", [1, 3, 9])
def test_cut_after_eot_changes_nothing_with_prompts(text, depth):
    learner = DeepPromptLearner(num_classes=5, width=text.width, depth=depth)
    labels = torch.tensor([0, 4, 2])
    tokens77 = open_clip.tokenize([learner.template])
    with torch.no_grad():
        cut = text(learner.tokens, learner(labels))
        full = text(tokens77, learner(labels), cut_after_eot=False)
        # fp32 differs only by summation order; in fp64 the two agree to rounding: the cut is exact
        text64, learner64 = copy.deepcopy(text).double(), copy.deepcopy(learner).double()
        cut64 = text64(learner64.tokens, learner64(labels))
        full64 = text64(tokens77, learner64(labels), cut_after_eot=False)
    assert (cut - full).abs().max() <= 1e-5
    assert (cut64 - full64).abs().max() <= 1e-12


def test_deep_prompts_replace_hidden_states_before_blocks_1_to_depth_minus_1(clip, text):
    learner = DeepPromptLearner(num_classes=4, width=text.width, depth=3)
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        assert torch.allclose(text(learner.tokens, learner(labels)), _manual_deep(clip, learner, labels), atol=1e-6)
    injections = learner(labels)
    assert len(injections) == 3 and all(start == 5 and v.shape == (2, 3, 64) for start, v in injections)
    assert torch.equal(injections[2][1][:, :2], learner.deep_shared[1].expand(2, -1, -1))
    assert torch.equal(injections[2][1][:, 2:], learner.deep_per_id[1, labels])


def test_deep_at_depth_1_equals_shallow_learner(text):
    shallow = PromptLearner(num_classes=6, width=text.width, n_shared=2, n_per_id=1)
    deep = DeepPromptLearner(num_classes=6, width=text.width, n_shared=2, n_per_id=1, depth=1)
    deep.load_state_dict(shallow.state_dict())
    assert deep.template == shallow.template and deep.deep_shared is None and deep.deep_per_id is None
    labels = torch.arange(6)
    with torch.no_grad():
        assert torch.equal(text(deep.tokens, deep(labels)), text(shallow.tokens, shallow(labels)))


def test_deep_layers_matter_and_shallow_per_id_variant(text):
    learner = DeepPromptLearner(num_classes=4, width=text.width, depth=4, deep_per_id=False)
    assert learner.deep_per_id is None and learner.deep_shared.shape == (3, 2, 64)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        before = text(learner.tokens, learner(labels))
        assert all(v.shape == (2, 2, 64) for _, v in learner(labels)[1:])  # only shared slots replaced
        learner.deep_shared[2].add_(torch.randn(2, 64))     # not a constant shift: LayerNorm removes those
        after = text(learner.tokens, learner(labels))
    assert (after - before).abs().max() > 1e-2                               # block 3 reads layer-3 prompts


@pytest.mark.parametrize("make", [
    lambda w: PromptLearner(num_classes=5, width=w),
    lambda w: DeepPromptLearner(num_classes=5, width=w, depth=9),
    lambda w: DeepPromptLearner(num_classes=5, width=w, depth=4, deep_per_id=False),
])
def test_one_identity_vectors_never_change_another_identity_feature(text, make):
    learner = make(text.width)
    labels = torch.arange(5)
    with torch.no_grad():
        before = text(learner.tokens, learner(labels))
        learner.per_id[3].add_(torch.randn_like(learner.per_id[3]))
        if getattr(learner, "deep_per_id", None) is not None:
            learner.deep_per_id[:, 3].add_(torch.randn_like(learner.deep_per_id[:, 3]))
        after = text(learner.tokens, learner(labels))
    others = [0, 1, 2, 4]
    assert torch.equal(after[others], before[others])
    assert (after[3] - before[3]).abs().max() > 1e-2
    with torch.no_grad():                                              # a batch's make-up does not matter
        alone = text(learner.tokens, learner(torch.tensor([1])))
    assert torch.allclose(alone[0], after[1], atol=1e-6)


def test_gradients_reach_prompts_only(text):
    learner = DeepPromptLearner(num_classes=4, width=text.width, depth=3)
    labels = torch.tensor([0, 2])
    text(learner.tokens, learner(labels)).square().sum().backward()
    assert all(not p.requires_grad and p.grad is None for p in text.parameters())
    assert learner.per_id.grad[[0, 2]].abs().sum() > 0 and learner.per_id.grad[[1, 3]].abs().sum() == 0
    assert learner.deep_per_id.grad[:, [0, 2]].abs().sum() > 0 and learner.deep_shared.grad.abs().sum() > 0


# --------------------------------------------------------------------------- config

def test_build_prompt_learner_from_config(text):
    base = load_config("tiny").model
    assert type(build_prompt_learner(base, 5, text)) is PromptLearner
    deep = load_config("tiny", ["model.prompt=deep", "model.n_shared=2", "model.n_per_id=1", "model.depth=9"]).model
    learner = build_prompt_learner(deep, 5, text)
    assert isinstance(learner, DeepPromptLearner) and learner.depth == 9 and len(learner(torch.tensor([0]))) == 9
    with pytest.raises(ValueError, match="needs at least 13 text blocks"):
        build_prompt_learner(load_config("tiny", ["model.prompt=deep", "model.depth=13"]).model, 5, text)
    with pytest.raises(ValueError, match="input only"):
        build_prompt_learner(load_config("tiny", ["model.depth=3"]).model, 5, text)
    with pytest.raises(ValueError, match="nothing to inject"):
        DeepPromptLearner(5, 64, n_shared=0, n_per_id=2, depth=3, deep_per_id=False)
