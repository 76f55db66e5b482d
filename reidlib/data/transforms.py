"""Train and test transforms (spec §5), as torchvision pipelines and as a batched tensor path.

Train, in the reference's order (CLIP-ReID ``datasets/make_dataloader.py``): resize (bicubic),
horizontal flip, zero padding, random crop back to the input size, to tensor, normalise, random
erasing (timm's ``RandomErasing`` with ``mode='pixel'``: one box filled with per-pixel standard-normal
noise). Test: resize, to tensor, normalise.

The batched path does the same to a uint8 batch ``[B, 3, H, W]`` already resized (see
:class:`reidlib.data.TrainImageCache`) on whatever device it lives on, with no per-image Python loop.
With the same random draws it gives the same pixels as the torchvision pipeline (tests check this).

Example::

    from reidlib.data import build_transforms, gpu_train_augment
    train_tf = build_transforms(cfg.data, cfg.model.image_size, train=True)   # PIL -> tensor
    images = gpu_train_augment(cache.images[batch], cfg.data)                 # uint8 -> float
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torchvision.transforms import InterpolationMode

INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
}

# Random erasing as Zhong et al., "Random Erasing Data Augmentation" (AAAI 2020), with timm's
# parameters used by the reference: area fraction U(0.02, 1/3), log-uniform aspect 0.3..1/0.3,
# up to 10 attempts to fit the box, one box per image.
ERASE_AREA = (0.02, 1 / 3)
ERASE_ASPECT = (0.3, 1 / 0.3)
ERASE_ATTEMPTS = 10


def interpolation_mode(name: str) -> InterpolationMode:
    """``'bicubic'`` -> ``InterpolationMode.BICUBIC`` (also nearest, bilinear, lanczos, box, hamming)."""
    try:
        return INTERPOLATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown interpolation '{name}'; use one of {', '.join(INTERPOLATIONS)}") from None


def build_transforms(data_cfg, image_size, train: bool) -> T.Compose:
    """The torchvision pipeline for PIL images: train (augmented) or test.

    ``data_cfg`` is a :class:`reidlib.config.DataConfig` (``padding``, ``flip_prob``, ``erase_prob``,
    ``pixel_mean``, ``pixel_std``, ``interpolation``, ``test_interpolation``); ``image_size`` is
    ``(height, width)``.

    Example::

        tf = build_transforms(cfg.data, (256, 128), train=False)
        tf(read_image(path)).shape      # torch.Size([3, 256, 128])
    """
    size = (int(image_size[0]), int(image_size[1]))
    normalize = T.Normalize(mean=list(data_cfg.pixel_mean), std=list(data_cfg.pixel_std))
    if not train:
        return T.Compose([T.Resize(size, interpolation=interpolation_mode(data_cfg.test_interpolation)),
                          T.ToTensor(), normalize])
    steps = [T.Resize(size, interpolation=interpolation_mode(data_cfg.interpolation))]
    if data_cfg.flip_prob > 0:
        steps.append(T.RandomHorizontalFlip(p=data_cfg.flip_prob))
    if data_cfg.padding > 0:
        steps += [T.Pad(data_cfg.padding, fill=0), T.RandomCrop(size)]
    steps += [T.ToTensor(), normalize]
    if data_cfg.erase_prob > 0:
        steps.append(RandomErasing(data_cfg.erase_prob))
    return T.Compose(steps)


class RandomErasing:
    """Erase one random box of a normalised image tensor ``[C, H, W]`` with standard-normal noise.

    With probability ``p``; the box follows timm's ``RandomErasing(mode='pixel', max_count=1)``
    (see :func:`random_erase`). Draws from torch's global RNG, so DataLoader worker seeding applies.

    Example::

        erased = RandomErasing(0.5)(tensor)
    """

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return random_erase(image[None], self.p)[0]

    def __repr__(self) -> str:
        return f"RandomErasing(p={self.p}, mode='pixel', area={ERASE_AREA}, aspect={ERASE_ASPECT})"


# --------------------------------------------------------------------------- batched tensor path

def gpu_train_augment(images: torch.Tensor, data_cfg, generator: torch.Generator | None = None) -> torch.Tensor:
    """Augment a uint8 batch ``[B, 3, H, W]`` (already at the input size) on its own device.

    Same steps and distributions as the train pipeline of :func:`build_transforms`: flip with
    ``flip_prob``, zero-pad by ``padding`` and crop at an offset uniform in ``0..2*padding``,
    scale to [0, 1], normalise, random erasing with ``erase_prob``. Returns float32 ``[B, 3, H, W]``.
    ``generator`` (on the batch's device) makes the draws reproducible.

    Example::

        g = torch.Generator("cuda").manual_seed(0)
        x = gpu_train_augment(cache.images[idx], cfg.data, generator=g)
    """
    batch = images.shape[0]
    draw = _Draws(images.device, generator)
    flip = draw.uniform(batch) < data_cfg.flip_prob
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if data_cfg.padding > 0:
        top = draw.integers(2 * data_cfg.padding + 1, batch)
        left = draw.integers(2 * data_cfg.padding + 1, batch)
        images = pad_crop(images, data_cfg.padding, top, left)
    x = normalize(images, data_cfg.pixel_mean, data_cfg.pixel_std)
    if data_cfg.erase_prob > 0:
        x = random_erase(x, data_cfg.erase_prob, generator=generator)
    return x


def test_tensor_transform(images: torch.Tensor, data_cfg) -> torch.Tensor:
    """The test transform for a uint8 batch ``[B, 3, H, W]`` already resized: scale and normalise."""
    return normalize(images, data_cfg.pixel_mean, data_cfg.pixel_std)


test_tensor_transform.__test__ = False  # its name starts with "test": keep pytest from collecting it


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float32, with the same operations (and bits) as ToTensor + Normalize."""
    x = images.to(torch.float32).div(255)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub(mean).div(std)


def pad_crop(images: torch.Tensor, padding: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """Zero-pad each image by ``padding`` and crop its original size at offsets ``(top[b], left[b])``.

    Equal to torchvision's ``Pad(padding, fill=0)`` then ``RandomCrop`` landing at that offset; one
    gather for the whole batch.
    """
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = top[:, None] + torch.arange(height, device=images.device)   # [B, H] rows of the padded image
    cols = left[:, None] + torch.arange(width, device=images.device)   # [B, W]
    flat = (rows[:, :, None] * (width + 2 * padding) + cols[:, None, :]).view(batch, 1, height * width)
    out = padded.flatten(2).gather(2, flat.expand(batch, channels, height * width))
    return out.view(batch, channels, height, width)


def random_erase(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random erasing of a float batch ``[B, C, H, W]``, vectorised over the batch.

    Per image, as timm's ``RandomErasing(mode='pixel', max_count=1)``: with probability ``p``, try up
    to 10 boxes (area ``U(0.02, 1/3) * H * W``, aspect ``exp(U(log 0.3, log 1/0.3))``,
    ``h = round(sqrt(area * aspect))``, ``w = round(sqrt(area / aspect))``); the first that fits
    (``h < H`` and ``w < W``) is placed uniformly and filled with standard-normal noise.
    All 10 attempts are drawn at once and the first fitting one is kept.
    """
    batch, _, height, width = x.shape
    draw = _Draws(x.device, generator)
    erase = draw.uniform(batch) < p
    fraction = ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * draw.uniform(batch, ERASE_ATTEMPTS)
    area = fraction * height * width
    log_lo, log_hi = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draw.uniform(batch, ERASE_ATTEMPTS))
    box_h = torch.round(torch.sqrt(area * aspect)).long()
    box_w = torch.round(torch.sqrt(area / aspect)).long()
    fits = (box_h < height) & (box_w < width)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first fitting attempt
    erase &= fits.any(dim=1)
    box_h, box_w = box_h.gather(1, first)[:, 0], box_w.gather(1, first)[:, 0]
    top = (draw.uniform(batch) * (height - box_h + 1)).floor().long()
    left = (draw.uniform(batch) * (width - box_w + 1)).floor().long()
    rows = torch.arange(height, device=x.device)[None, :, None]
    cols = torch.arange(width, device=x.device)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + box_h)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + box_w)[:, None, None]))
    inside &= erase[:, None, None]
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.where(inside[:, None], noise, x)


class _Draws:
    """Uniform and integer draws on a device from an optional generator (float64 like Python's random)."""

    def __init__(self, device, generator):
        self.device, self.generator = device, generator

    def uniform(self, *shape) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=self.device, dtype=torch.float64)

    def integers(self, high: int, *shape) -> torch.Tensor:
        return torch.randint(high, shape, generator=self.generator, device=self.device)
