"""Learnable text prompts and CLIP's frozen text encoder that reads them.

CLIP-ReID (Li et al., AAAI 2023) has no text labels, so each identity gets learnable token
vectors in the template "A photo of a X X X X person." (``clipreid``: per-identity vectors at the
input only). The thesis's deep prompts (MaPLe-style, Khattak et al., CVPR 2023) use
"A photo of a Y Y X person.": 2 shared (Y) and 1 per-identity (X) vectors at the input, and before
each of text blocks 1..depth-1 the hidden states at those slots are *replaced* by a new
layer-specific set (no positional embedding added). All vectors start N(0, 0.02) and stay fp32.

The text encoder is CLIP's, frozen: token + positional embedding, causal blocks, ``ln_final`` at
the EOT token, ``@ text_projection``. Because the mask is causal, nothing after EOT can reach the
EOT output, so sequences are cut right after EOT (12 tokens instead of 77): same result, faster.

Example::

    clip = load_clip("vit-tiny", "none")
    text = TextEncoder(clip)
    prompts = DeepPromptLearner(num_classes=10, width=text.width)    # thesis defaults: 2, 1, depth 9
    features = text(prompts.tokens, prompts(torch.tensor([0, 3])))   # [2, 32]
    prompts.template                                                 # 'A photo of a Y Y X person.'
"""
from __future__ import annotations

from collections.abc import Sequence

import open_clip
import torch
from torch import nn

# One injection: (first slot position, vectors [B, n, width]) spliced over positions start..start+n.
Injection = tuple[int, torch.Tensor]


class TextEncoder(nn.Module):
    """CLIP's text tower (open_clip's modules and weights), frozen, with per-layer injections."""

    def __init__(self, clip: open_clip.CLIP):
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask.clone(), persistent=False)
        self.width = self.token_embedding.embedding_dim
        self.depth = len(self.transformer.resblocks)
        self.requires_grad_(False)

    def forward(self, tokens: torch.Tensor, injections: Sequence[Injection | None] = (),
                cut_after_eot: bool = True, eot: int | None = None) -> torch.Tensor:
        """Text features [B, embed_dim] of token ids [B or 1, T].

        ``injections[0]`` replaces token embeddings (before the positional embedding is added);
        ``injections[i]`` (i >= 1) replaces the hidden states entering block i. With no
        injections this equals ``open_clip.CLIP.encode_text(tokens)``. ``eot``: the EOT position
        when every sequence has it at the same place and the caller knows it (a prompt
        learner's template); then nothing is read back from the device.
        """
        if len(injections) > self.depth:
            raise ValueError(f"{len(injections)} prompt layers but the text encoder has {self.depth} blocks")
        batch = max([tokens.shape[0]] + [inj[1].shape[0] for inj in injections if inj is not None])
        if eot is None:
            ends = tokens.argmax(dim=-1).expand(batch)                 # EOT has the largest id
            length = int(ends.max()) + 1 if cut_after_eot else tokens.shape[1]   # one host sync
            rows = (torch.arange(batch, device=tokens.device), ends)
        else:
            length, rows = (eot + 1 if cut_after_eot else tokens.shape[1]), (slice(None), eot)
        tokens = tokens[:, :length].expand(batch, -1)
        x = _splice(self.token_embedding(tokens), injections[0] if injections else None)
        x = x + self.positional_embedding[:length]
        mask = self.attn_mask[:length, :length]
        for i, block in enumerate(self.transformer.resblocks):
            if 0 < i < len(injections):
                x = _splice(x, injections[i])
            x = block(x, attn_mask=mask)
        x = self.ln_final(x[rows])
        return x @ self.text_projection


def _splice(x: torch.Tensor, injection: Injection | None) -> torch.Tensor:
    """Replace positions start..start+n of x [B, L, D] with the vectors [B, n, D] (differentiably)."""
    if injection is None:
        return x
    start, vectors = injection
    end = start + vectors.shape[1]
    return torch.cat([x[:, :start], vectors.to(x.dtype), x[:, end:]], dim=1)


def _vectors(*shape: int) -> nn.Parameter | None:
    """A learnable N(0, 0.02) fp32 tensor, or None when it would be empty."""
    if 0 in shape:
        return None
    return nn.Parameter(torch.randn(*shape) * 0.02)


class PromptLearner(nn.Module):
    """Input-layer prompts (``clipreid``): ``n_shared`` shared and ``n_per_id`` per-identity slots.

    Template "A photo of a" + " Y" * n_shared + " X" * n_per_id + " person.". The placeholder
    letters only fix the token count; their embeddings are replaced.
    """

    def __init__(self, num_classes: int, width: int, n_shared: int = 0, n_per_id: int = 4,
                 class_token: str = "person", context_length: int = 77):
        super().__init__()
        if n_shared < 0 or n_per_id < 0 or n_shared + n_per_id < 1:
            raise ValueError("prompts need n_shared + n_per_id >= 1 learnable slots")
        self.num_classes, self.n_shared, self.n_per_id = num_classes, n_shared, n_per_id
        self.template = " ".join(["A photo of a"] + ["Y"] * n_shared + ["X"] * n_per_id + [f"{class_token}."])
        tokens = open_clip.tokenize([self.template], context_length=context_length)
        # first slot = where EOT sits when the prefix is tokenised alone (5: SOS a photo of a)
        self.start = int(open_clip.tokenize(["A photo of a"], context_length=context_length).argmax())
        self.eot = int(tokens.argmax())
        self._check_slots(tokens[0], context_length)
        self.register_buffer("tokens", tokens[:, :self.eot + 1], persistent=False)
        self.shared = _vectors(n_shared, width)
        self.per_id = _vectors(num_classes, n_per_id, width)

    def _check_slots(self, tokens: torch.Tensor, context_length: int) -> None:
        y, x = (int(open_clip.tokenize([c], context_length=context_length)[0, 1]) for c in "YX")
        expected = [y] * self.n_shared + [x] * self.n_per_id
        found = tokens[self.start:self.start + len(expected)].tolist()
        if found != expected:
            raise RuntimeError(f"template '{self.template}' did not tokenise to one token per slot")

    def input_vectors(self, labels: torch.Tensor) -> torch.Tensor:
        """The input-layer slot vectors [B, n_shared + n_per_id, width] of these identities."""
        parts = []
        if self.shared is not None:
            parts.append(self.shared.expand(labels.shape[0], -1, -1))
        if self.per_id is not None:
            parts.append(self.per_id[labels])
        return torch.cat(parts, dim=1)

    def forward(self, labels: torch.Tensor) -> list[Injection | None]:
        """Per-layer injections for :class:`TextEncoder` (here: the input layer only)."""
        return [(self.start, self.input_vectors(labels))]


class DeepPromptLearner(PromptLearner):
    """Deep prompts (the thesis): input slots plus a new set before text blocks 1..depth-1.

    Defaults are the thesis's: 2 shared + 1 per-identity slot, depth 9 (input + 8 blocks). With
    ``deep_per_id=False`` only the shared slots are replaced in deep layers (per-ID at the input
    only, the thesis's "shallow" figure variant). Depth 1 is exactly :class:`PromptLearner`.
    """

    def __init__(self, num_classes: int, width: int, n_shared: int = 2, n_per_id: int = 1, depth: int = 9,
                 deep_per_id: bool = True, class_token: str = "person", context_length: int = 77):
        super().__init__(num_classes, width, n_shared, n_per_id, class_token, context_length)
        if depth < 1:
            raise ValueError("prompt depth must be >= 1 (1 = input layer only)")
        if depth > 1 and n_shared == 0 and not deep_per_id:
            raise ValueError("deep prompts with n_shared=0 and deep_per_id=false have nothing to inject")
        self.depth = depth
        self.deep_shared = _vectors(depth - 1, n_shared, width)
        self.deep_per_id = _vectors(depth - 1, num_classes, n_per_id, width) if deep_per_id else None

    def forward(self, labels: torch.Tensor) -> list[Injection | None]:
        injections: list[Injection | None] = [(self.start, self.input_vectors(labels))]
        per_id = self.deep_per_id[:, labels] if self.deep_per_id is not None else None
        for layer in range(self.depth - 1):
            parts = []
            if self.deep_shared is not None:
                parts.append(self.deep_shared[layer].expand(labels.shape[0], -1, -1))
            if per_id is not None:
                parts.append(per_id[layer])
            injections.append((self.start, torch.cat(parts, dim=1)))
        return injections


def build_prompt_learner(cfg, num_classes: int, text: TextEncoder) -> PromptLearner:
    """The prompt learner that ``cfg`` (a ``ModelConfig``) asks for, checked against the encoder."""
    common = dict(num_classes=num_classes, width=text.width, n_shared=cfg.n_shared, n_per_id=cfg.n_per_id,
                  class_token=cfg.class_token, context_length=text.positional_embedding.shape[0])
    if cfg.prompt == "clipreid":
        if cfg.depth != 1:
            raise ValueError("model.prompt=clipreid puts prompts at the input only: use model.depth=1, "
                             "or model.prompt=deep for deeper layers")
        return PromptLearner(**common)
    if cfg.prompt == "deep":
        if cfg.depth > text.depth:
            raise ValueError(f"model.depth={cfg.depth} needs at least {cfg.depth} text blocks; "
                             f"'{cfg.name}' has {text.depth}")
        return DeepPromptLearner(**common, depth=cfg.depth, deep_per_id=cfg.deep_per_id)
    raise ValueError(f"model.prompt '{cfg.prompt}': use clipreid or deep")
