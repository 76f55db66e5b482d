"""Checks a run makes before any training, so that a setting or a data set that cannot work fails
in seconds, naming the key and the fix, instead of after stage 1 or after all training.

Checked here: stage 2's P x K sampler can fill a batch (enough training identities for
P = ims_per_batch / num_instance, and P splits over the processes), SIE's camera and view ids
exist, and at least one query can be scored (under the data set's protocol, as
:mod:`reidlib.eval.protocol` states it). The output folder is checked where
it is made (:func:`reidlib.runtime.setup_runtime`), the config values when the config is loaded.
:func:`reidlib.train` runs these checks before it writes anything, the run folder included.

Example::

    check_before_training(cfg, dataset, world_size=1)  # raises ValueError, or returns the valid queries
"""
from __future__ import annotations

from ..eval.protocol import check_valid_queries


def check_sampler(cfg, num_train_ids: int, world_size: int = 1) -> None:
    """Raise ValueError when stage 2's P x K batches cannot be formed from ``num_train_ids``.

    >>> from reidlib.config import load_config
    >>> check_sampler(load_config("tiny"), num_train_ids=5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: stage2.ims_per_batch=32 / stage2.num_instance=4 asks for 8 identities per batch, ...
    """
    s = cfg.stage2
    per_batch = s.ims_per_batch // s.num_instance
    if num_train_ids < per_batch:
        raise ValueError(
            f"stage2.ims_per_batch={s.ims_per_batch} / stage2.num_instance={s.num_instance} asks for "
            f"{per_batch} identities per batch, but the training set has {num_train_ids}; set "
            f"stage2.ims_per_batch to at most {num_train_ids * s.num_instance} (a multiple of "
            "stage2.num_instance)")
    if per_batch % world_size:
        raise ValueError(
            f"stage2.ims_per_batch={s.ims_per_batch} / stage2.num_instance={s.num_instance} = {per_batch} "
            f"identities per batch do not split over {world_size} processes; make it a multiple of "
            f"{world_size}")


def check_side_information(cfg, dataset) -> None:
    """Raise ValueError when SIE asks for camera or view ids the data set does not have: no camera
    ids at all (``model.sie_camera``), or images without a view label (``model.sie_view``)."""
    if cfg.model.sie_camera and not dataset.has_cameras:
        raise ValueError(f"model.sie_camera=true, but data set {dataset.name} at {dataset.root} has no camera ids; "
                         "set model.sie_camera=false")
    if not cfg.model.sie_view:
        return
    test_items = dataset.test_pool if dataset.test_pool is not None else dataset.query + dataset.gallery
    for split, items in (("train", dataset.train), ("test", test_items)):
        missing = [path for path, view in zip((p for p, _, _ in items), dataset.view_ids(items)) if view < 0]
        if missing:
            raise ValueError(f"model.sie_view=true, but {len(missing)} of {len(items)} {split} images of data set "
                             f"{dataset.name} have no view label (e.g. {missing[0]}); give them labels "
                             "(VeRi: keypoint_train.txt / keypoint_test.txt) or set model.sie_view=false")


def check_before_training(cfg, dataset, world_size: int = 1) -> int:
    """All the checks above for a run of ``world_size`` processes; returns the number of queries the
    final evaluation will score."""
    check_sampler(cfg, dataset.num_train_pids, world_size)
    check_side_information(cfg, dataset)
    return check_valid_queries(dataset)
