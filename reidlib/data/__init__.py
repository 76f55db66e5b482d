"""Data: data sets (person: Market-1501, DukeMTMC-reID, MSMT17, IUST, Occluded-Duke, your own;
vehicles: VeRi-776, VehicleID), image reading, P x K sampling, transforms, the device image cache,
and a generated data set.

Example::

    from reidlib.data import load_dataset, ImageDataset, RandomIdentitySampler, build_transforms
    ds = load_dataset("market1501", "data")
    train = ImageDataset(ds.train, build_transforms(cfg.data, cfg.model.image_size, train=True))
    sampler = RandomIdentitySampler(ds.train, batch_size=64, num_instance=4, seed=0)
"""
from . import vehicles  # noqa: F401  (registers veri and vehicleid)
from .cache import TrainBatches, TrainImageCache, make_image_cache
from .datasets import (
    IMAGE_EXTENSIONS,
    Item,
    ReIDDataset,
    dataset_from_config,
    dataset_names,
    list_image_folder,
    load_dataset,
    parse_identity_name,
    parse_market_name,
    register_dataset,
)
from .images import ImageDataset, UnreadableImageError, read_image
from .sampler import DistributedIdentitySampler, RandomIdentitySampler
from .transforms import RandomErasing, build_transforms, gpu_train_augment, interpolation_mode, test_tensor_transform

__all__ = [
    "Item", "ReIDDataset", "dataset_names", "load_dataset", "register_dataset", "dataset_from_config",
    "IMAGE_EXTENSIONS", "list_image_folder", "parse_market_name", "parse_identity_name",
    "ImageDataset", "UnreadableImageError", "read_image", "TrainImageCache", "TrainBatches", "make_image_cache",
    "RandomIdentitySampler", "DistributedIdentitySampler",
    "RandomErasing", "build_transforms", "gpu_train_augment", "interpolation_mode", "test_tensor_transform",
    "generate_market",
]


def __getattr__(name):
    # The generator is imported on first use, so that `python -m reidlib.data.synth` runs it fresh.
    if name == "generate_market":
        from .synth import generate_market
        return generate_market
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
