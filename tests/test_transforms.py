"""Train/test transforms, and the batched tensor path against the torchvision one."""
import importlib.util
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from reidlib.config import DataConfig
from reidlib.data import (
    RandomErasing,
    TrainImageCache,
    build_transforms,
    gpu_train_augment,
    interpolation_mode,
    test_tensor_transform,
)
from reidlib.data.transforms import normalize, pad_crop, random_erase

CFG = DataConfig()
SIZE = (32, 16)


def photo(tmp_path, size=(23, 50), seed=0):
    """A random RGB image file of another size than SIZE, so that resizing matters."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path = tmp_path / f"photo{seed}.png"
    Image.fromarray(pixels).save(path)
    return path


def test_shapes_dtypes_and_ranges(tmp_path):
    image = Image.open(photo(tmp_path))
    for train in (True, False):
        x = build_transforms(CFG, [256, 128], train=train)(image)
        assert x.shape == (3, 256, 128) and x.dtype == torch.float32
    x = build_transforms(CFG, [256, 128], train=False)(image)
    assert x.min() >= -1 and x.max() <= 1
    y = gpu_train_augment(torch.randint(0, 256, (5, 3, *SIZE), dtype=torch.uint8), CFG)
    assert y.shape == (5, 3, *SIZE) and y.dtype == torch.float32


def test_pipeline_follows_the_reference_order():
    names = [type(t).__name__ for t in build_transforms(CFG, SIZE, train=True).transforms]
    assert names == ["Resize", "RandomHorizontalFlip", "Pad", "RandomCrop", "ToTensor", "Normalize",
                     "RandomErasing"]
    off = replace(CFG, flip_prob=0.0, padding=0, erase_prob=0.0)
    assert [type(t).__name__ for t in build_transforms(off, SIZE, train=True).transforms] == [
        "Resize", "ToTensor", "Normalize"]
    test = build_transforms(replace(CFG, test_interpolation="bilinear"), SIZE, train=False)
    assert test.transforms[0].interpolation == interpolation_mode("bilinear")


def test_interpolation_names():
    assert interpolation_mode("BICUBIC") == TF.InterpolationMode.BICUBIC
    with pytest.raises(ValueError, match="bicubic"):
        interpolation_mode("cubic")


# --------------------------------------------------------------------------- same pixels

def test_batched_path_equals_torchvision_pixel_for_pixel(tmp_path):
    paths = [photo(tmp_path, seed=s) for s in range(3)]
    cache = TrainImageCache([(str(p), 0, 0) for p in paths], SIZE, "bicubic")
    fixed = replace(CFG, flip_prob=1.0, padding=0, erase_prob=0.0)  # no random draw left
    expected = torch.stack([build_transforms(fixed, SIZE, train=True)(Image.open(p).convert("RGB"))
                            for p in paths])
    assert torch.equal(gpu_train_augment(cache.images, fixed), expected)
    test = torch.stack([build_transforms(CFG, SIZE, train=False)(Image.open(p).convert("RGB")) for p in paths])
    assert torch.equal(test_tensor_transform(cache.images, CFG), test)


def test_pad_crop_equals_torchvision_pad_then_crop(tmp_path):
    image = TF.resize(Image.open(photo(tmp_path)).convert("RGB"), list(SIZE),
                      interpolation=interpolation_mode("bicubic"))
    batch = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].repeat(4, 1, 1, 1)
    top, left = torch.tensor([0, 3, 10, 20]), torch.tensor([20, 0, 7, 10])
    ours = normalize(pad_crop(batch, 10, top, left), CFG.pixel_mean, CFG.pixel_std)
    for b in range(4):
        cropped = TF.crop(TF.pad(image, 10, fill=0), int(top[b]), int(left[b]), *SIZE)
        assert torch.equal(ours[b], TF.normalize(TF.to_tensor(cropped), CFG.pixel_mean, CFG.pixel_std))


def test_generator_makes_it_reproducible():
    images = torch.randint(0, 256, (8, 3, *SIZE), dtype=torch.uint8)
    a = gpu_train_augment(images, CFG, generator=torch.Generator().manual_seed(1))
    b = gpu_train_augment(images, CFG, generator=torch.Generator().manual_seed(1))
    c = gpu_train_augment(images, CFG, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------- same distributions

def coordinate_image(height=32, width=16):
    """Red encodes the row, green the column, blue marks real (non-padding) pixels."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([rows * 7 + 10, cols * 14 + 10, np.full_like(rows, 255)], -1).astype(np.uint8)


def offsets_and_flips(x: torch.Tensor, pad: int):
    """Crop offsets (top, left) in 0..2*pad and whether flipped, read back from coordinate images."""
    values = torch.round((x * 0.5 + 0.5) * 255).long()  # undo Normalize(0.5, 0.5) and ToTensor
    y, c = x.shape[-2] // 2, x.shape[-1] // 2
    row = (values[:, 0, y, c] - 10) // 7
    col, next_col = (values[:, 1, y, c] - 10) // 14, (values[:, 1, y, c + 1] - 10) // 14
    flipped = next_col < col
    width = x.shape[-1]
    col = torch.where(flipped, width - 1 - col, col)  # the column in the flipped image
    return row - y + pad, col - c + pad, flipped


def test_flip_and_crop_statistics_match(tmp_path):
    pad, n = 4, 1000
    cfg = replace(CFG, padding=pad, erase_prob=0.0)
    source = coordinate_image()
    torch.manual_seed(0)
    pil_tf = build_transforms(cfg, SIZE, train=True)
    pil = torch.stack([pil_tf(Image.fromarray(source)) for _ in range(n)])
    batch = gpu_train_augment(torch.from_numpy(source).permute(2, 0, 1)[None].repeat(n, 1, 1, 1), cfg,
                              generator=torch.Generator().manual_seed(0))
    expected = n / (2 * pad + 1)
    for x in (pil, batch):
        top, left, flipped = offsets_and_flips(x, pad)
        assert abs(flipped.float().mean().item() - 0.5) < 0.05
        for offsets in (top, left):
            counts = torch.bincount(offsets, minlength=2 * pad + 1).float()
            assert len(counts) == 2 * pad + 1  # never outside 0..2*pad
            chi2 = ((counts - expected) ** 2 / expected).sum().item()
            assert chi2 < 26.1  # uniform: chi-square with 8 degrees of freedom, p = 0.001


def erased_stats(x: torch.Tensor, background: float):
    """Erase rate, mean erased area fraction, and whether every erased region is one full box."""
    mask = (x != background).any(1)  # noise never hits the constant exactly
    erased = mask.flatten(1).any(1)
    boxes = []
    for m in mask[erased]:
        rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
        boxes.append(m[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all().item())
    fraction = mask.flatten(1).float().mean(1)[erased]
    return erased.float().mean().item(), fraction.mean().item(), all(boxes)


def load_timm_random_erasing():
    """timm's random_erasing.py alone (it needs only torch): importing timm itself takes seconds."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "random_erasing.py"
    module_spec = importlib.util.spec_from_file_location("timm_random_erasing", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_random_erasing_matches_timm():
    timm_erasing = load_timm_random_erasing()
    n, height, width = 1500, 64, 32
    flat = test_tensor_transform(torch.full((n, 3, height, width), 128, dtype=torch.uint8), CFG)
    background = flat[0, 0, 0, 0].item()
    random.seed(0)
    oracle = timm_erasing.RandomErasing(probability=0.5, mode="pixel", max_count=1, device="cpu")
    reference = torch.stack([oracle(img.clone()) for img in flat])
    torch.manual_seed(0)
    single = torch.stack([RandomErasing(0.5)(img) for img in flat[:600]])
    batched = random_erase(flat, 0.5, generator=torch.Generator().manual_seed(0))
    rate, area, _ = erased_stats(reference, background)
    for x in (batched, single):
        got_rate, got_area, one_box = erased_stats(x, background)
        assert one_box
        assert abs(got_rate - rate) < 0.06 and abs(got_area - area) < 0.02
    assert 0.1 < area < 0.2
    erased = batched[(batched != background).any(1).flatten(1).any(1)]
    noise = erased[erased != background]
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02  # standard normal


def test_erasing_through_the_full_batched_path():
    cfg = replace(CFG, flip_prob=0.0, padding=0, erase_prob=1.0)
    images = torch.full((400, 3, 64, 32), 128, dtype=torch.uint8)
    x = gpu_train_augment(images, cfg, generator=torch.Generator().manual_seed(0))
    rate, area, one_box = erased_stats(x, test_tensor_transform(images[:1], cfg)[0, 0, 0, 0].item())
    assert rate > 0.97 and one_box and 0.1 < area < 0.2
    assert torch.equal(gpu_train_augment(images, replace(cfg, erase_prob=0.0)),
                       test_tensor_transform(images, cfg))
