"""Data: data sets (person: Market-1501, DukeMTMC-reID, MSMT17, IUST, Occluded-Duke, your own;
vehicles: VeRi-776, VehicleID), image reading, P x K sampling, transforms, the device image cache,
(the generated data sets are in :mod:`reidlib.demo.synth`).

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
from .images import ImageDataset, UnreadableImageError, cpu_cores, read_image, usable_workers
from .sampler import DistributedIdentitySampler, RandomIdentitySampler
from .transforms import RandomErasing, build_transforms, gpu_train_augment, interpolation_mode, test_tensor_transform

__all__ = [
    "Item", "ReIDDataset", "dataset_names", "load_dataset", "register_dataset", "dataset_from_config",
    "IMAGE_EXTENSIONS", "list_image_folder", "parse_market_name", "parse_identity_name",
    "ImageDataset", "UnreadableImageError", "read_image", "usable_workers", "cpu_cores",
    "TrainImageCache", "TrainBatches", "make_image_cache",
    "RandomIdentitySampler", "DistributedIdentitySampler",
    "RandomErasing", "build_transforms", "gpu_train_augment", "interpolation_mode", "test_tensor_transform",
]



def __getattr__(name):
    if name == "generate_market":   # moved with the rest of the demo's machinery
        raise AttributeError("reidlib.data.generate_market moved: use reidlib.demo.synth.generate_market")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
