"""Zero-shot use of a CLIP (an ``open_clip.CLIP``): caption retrieval and text-to-image search.

What a pretrained CLIP can do before any re-ID training (Radford et al., ICML 2021): embed images
and captions in one space, where an image's own caption is nearer than other captions. Used to
check the pretrained miniature (:mod:`reidlib.demo.pretrain`) on people it never saw, and for the
demo's text-to-image search figure. Images come as uint8 tensors
(:func:`reidlib.data.cache.decode_images`); captions as strings, tokenised by open_clip.

Example::

    images, _ = decode_images(paths, clip.visual.image_size)
    caption_retrieval(clip, images, captions)        # {'image_to_text_rank1': 0.41, ..., 'chance': 0.005}
    search_by_text(clip, ["a red cap, ..."], gallery_images, top=5)   # [[12, 40, 3, 7, 99]]
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from ..data.cache import decode_images
from ..data.transforms import normalize
from ..eval.modes import eval_mode

# The tiny config's data.pixel_mean / pixel_std (CLIP-ReID's normalisation for ViTs): the
# miniature is pretrained with them, so that re-ID training feeds it images as it learned them.
PIXEL_MEAN = PIXEL_STD = (0.5, 0.5, 0.5)


@torch.no_grad()
def image_embeddings(clip, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings [N, D] of uint8 images [N, 3, H, W] at the tower's input size."""
    device = next(clip.parameters()).device
    with eval_mode(clip):
        out = [clip.encode_image(normalize(batch.to(device), PIXEL_MEAN, PIXEL_STD)).float()
               for batch in images.split(batch_size)]
    return F.normalize(torch.cat(out), dim=-1) if out else torch.zeros(0, clip.text_projection.shape[1])


@torch.no_grad()
def text_embeddings(clip, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised caption embeddings [N, D] (open_clip's tokenizer and ``encode_text``)."""
    device = next(clip.parameters()).device
    with eval_mode(clip):
        out = [clip.encode_text(open_clip.tokenize(captions[i:i + batch_size]).to(device)).float()
               for i in range(0, len(captions), batch_size)]
    return F.normalize(torch.cat(out), dim=-1) if out else torch.zeros(0, clip.text_projection.shape[1])


def caption_retrieval(clip, images: torch.Tensor, captions: list[str]) -> dict:
    """How often image i's own caption is the nearest of all ``captions`` (``image_to_text_rank1``)
    and caption i's own image the nearest of all images (``text_to_image_rank1``), with ``chance``
    (1 / N) to compare with.

    >>> from reidlib.model import load_clip
    >>> clip = load_clip("vit-tiny8", "none")      # random weights: near chance
    >>> result = caption_retrieval(clip, torch.zeros(2, 3, 128, 64, dtype=torch.uint8), ["a", "b"])
    >>> result["chance"], result["n"]
    (0.5, 2)
    """
    if len(images) != len(captions) or not len(captions):
        raise ValueError(f"caption_retrieval wants one caption per image, got {len(images)} images "
                         f"and {len(captions)} captions")
    similarity = image_embeddings(clip, images) @ text_embeddings(clip, captions).T
    truth = torch.arange(len(captions), device=similarity.device)   # beside the model's similarities
    return {"image_to_text_rank1": (similarity.argmax(1) == truth).float().mean().item(),
            "text_to_image_rank1": (similarity.argmax(0) == truth).float().mean().item(),
            "chance": 1 / len(captions), "n": len(captions)}


def search_by_text(clip, captions: list[str], gallery: torch.Tensor, top: int = 5) -> list[list[int]]:
    """For each caption, the indices of the ``top`` gallery images nearest to it, best first."""
    similarity = text_embeddings(clip, captions) @ image_embeddings(clip, gallery).T
    return similarity.topk(min(top, similarity.shape[1]), dim=1).indices.tolist()


def text_search_figure(clip, queries: list[tuple[str, int]], dataset, out_png: str | Path | None = None,
                       top: int = 5, title: str | None = None):
    """Zero-shot text-to-image search with a CLIP: for each ``(caption, pid)`` of ``queries``, the
    ``top`` gallery images of ``dataset`` nearest to the caption, framed green when they show
    person ``pid`` and red when not. ``clip``: an ``open_clip.CLIP`` (no re-ID training needed).

    Example::

        clip = load_clip("vit-tiny8", "data/miniature/clip-vit-tiny8-....pt")
        text_search_figure(clip, [("a red cap, a blue long-sleeved top, ...", 17)], data, "search.png")
    """
    from ..viz.retrieval import retrieval_rows
    g_paths = [path for path, _, _ in dataset.gallery]
    gallery, skipped = decode_images(g_paths, clip.visual.image_size)
    kept = sorted(set(range(len(g_paths))) - set(skipped))
    ranked = search_by_text(clip, [caption for caption, _ in queries], gallery, top)
    rows = []
    for (caption, pid), order in zip(queries, ranked):
        hits = [dataset.gallery[kept[j]] for j in order]
        rows.append({"query_text": caption, "gallery": [path for path, _, _ in hits],
                     "correct": [hit_pid == pid for _, hit_pid, _ in hits],
                     "captions": [f"id {hit_pid}, cam {cam}" for _, hit_pid, cam in hits]})
    return retrieval_rows(rows, out_png, title or f"Text-to-image search, top {top} ({dataset.name})")
