"""Trained weights in, features out: the one way reidlib turns images into re-ID features.

:class:`FeatureExtractor` takes file paths, PIL images, H×W×3 uint8 arrays (RGB, or BGR as OpenCV
gives them with ``bgr=True``) or an already preprocessed float batch, and returns float32 features
[N, D] in input order. ``extract``, ``search``, evaluation during and after training and the
notebooks all go through it, so every path applies the same test transform, flip averaging,
precision and camera handling.

Cameras and views: a model trained with SIE adds a learnt per-camera (or per-view, or per
camera-and-view) vector to its input, so its features depend on those ids. Calling such a model
without them is an error, unless the caller chose a default (``default_camera=K`` /
``default_view=K``, or ``test.default_camera`` / ``test.default_view`` in a config): never a
silently wrong row of the SIE table.
"""
from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..data import UnreadableImageError, build_transforms, read_image
from ..runtime import Runtime, gather_tensor, pick_device, shard
from .modes import eval_mode

log = logging.getLogger("reidlib")

# precision -> autocast dtype (None: plain fp32)
_AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision not in _AMP:
        raise ValueError(f"precision '{precision}': use fp32, bf16, fp16 or auto")
    return _AMP[precision]


class _TestImages(torch.utils.data.Dataset):
    """Test-time images; an unreadable file yields ``ok=False`` and is dropped after encoding
    (a test image must not be replaced by another one, as training does)."""

    def __init__(self, items, views, transform, image_size):
        self.items, self.transform, self.image_size = list(items), transform, image_size
        self.views = list(views) if views is not None else [-1] * len(self.items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, pid, camid = self.items[index]
        try:
            return self.transform(read_image(path)), pid, camid, self.views[index], True
        except UnreadableImageError as err:
            log.warning("%s; skipped", err)
            return torch.zeros(3, *self.image_size), pid, camid, self.views[index], False


class FeatureExtractor:
    """Re-ID features of images from a trained model (a reidlib checkpoint or a reference state dict).

    Example::

        from reidlib import FeatureExtractor
        extractor = FeatureExtractor("run/model", device="cuda", precision="bf16", batch_size=256)
        feats = extractor(["a.jpg", "b.jpg"], cameras=[0, 3])       # torch.float32 [2, D], input order
        feats = extractor(crops, bgr=True)                          # OpenCV H×W×3 uint8 crops
        feats = extractor(batch)                                    # [N, 3, H, W], already normalised
        extractor = FeatureExtractor.from_pretrained("someone/reid-vit-market")   # a model hub id

    ``config`` (a :class:`reidlib.Config`) supplies the test transform and, for a reference state
    dict, what the file cannot tell; by default a reidlib checkpoint's own config is used.
    ``flip`` averages each image's features with its mirror's (default: ``config.test.flip``).
    """

    def __init__(self, weights, device: str = "auto", precision: str = "fp32", batch_size: int = 64, *,
                 config=None, default_camera: int | None = None, default_view: int | None = None,
                 flip: bool | None = None, num_workers: int = 0):
        from ..methods.trained import load_trained_model
        torch_device = pick_device(device)
        model, cfg = load_trained_model(weights, config, device=torch_device)
        self._setup(model, cfg, Runtime(device=torch_device, amp_dtype=None, output_dir=None),
                    _amp_dtype(precision, torch_device), batch_size, (default_camera, default_view), flip,
                    num_workers)

    @classmethod
    def from_pretrained(cls, path_or_repo_id, revision: str | None = None, device: str = "auto", *,
                        token: str | None = None, **kwargs) -> "FeatureExtractor":
        """An extractor for a shared model: a local model folder (a run folder, or a legacy
        ``model_final.pt`` / reference file) loads directly; anything else is a model hub id
        (``USER/NAME``), whose ``model.safetensors``, ``config.json`` and ``README.md`` are fetched
        with ``huggingface_hub.snapshot_download`` (at ``revision``; cached, so offline use works
        once downloaded). ``kwargs`` are the constructor's (precision, batch_size, default_camera...).

        Example::

            extractor = FeatureExtractor.from_pretrained("someone/reid-vit-market", device="cuda")
            extractor = FeatureExtractor.from_pretrained("runs/market/model")     # a local folder
        """
        local = Path(path_or_repo_id)
        if local.exists() or not _looks_like_repo_id(str(path_or_repo_id)):
            from ..weights import final_model, has_final_model
            if local.is_dir() and not (local / "config.json").is_file() and has_final_model(local):
                local = final_model(local)     # a run folder: its trained model
            return cls(local, device=device, **kwargs)
        return cls(_download(str(path_or_repo_id), revision, token), device=device, **kwargs)

    @classmethod
    def from_model(cls, model, cfg, runtime: Runtime | None = None, precision: str | None = None,
                   batch_size: int | None = None, default_camera: int | None = None,
                   default_view: int | None = None) -> "FeatureExtractor":
        """An extractor around a model in memory (during training, or loaded by the caller).

        ``cfg`` gives the transform, ``test.batch_size``, ``test.flip``, ``test.precision``,
        ``test.default_camera`` and ``test.default_view``; ``runtime`` the device and, under
        torchrun, the shards.
        """
        self = cls.__new__(cls)
        runtime = runtime or Runtime(device=pick_device(cfg.device), amp_dtype=None, output_dir=None)
        if default_camera is None and getattr(cfg.test, "default_camera", -1) >= 0:
            default_camera = cfg.test.default_camera
        if default_view is None and getattr(cfg.test, "default_view", -1) >= 0:
            default_view = cfg.test.default_view
        self._setup(model, cfg, runtime, _amp_dtype(precision or cfg.test.precision, runtime.device),
                    batch_size or cfg.test.batch_size, (default_camera, default_view), None, cfg.data.num_workers)
        return self

    def _setup(self, model, cfg, runtime, amp_dtype, batch_size, defaults, flip, num_workers) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be a positive number of images")
        self.model, self.cfg, self.runtime, self.amp_dtype = model, cfg, runtime, amp_dtype
        self.batch_size, self.num_workers = batch_size, num_workers
        self.flip = cfg.test.flip if flip is None else flip
        self.image_size = tuple(int(s) for s in cfg.model.image_size)
        self.transform = build_transforms(cfg.data, self.image_size, train=False)
        self.num_cameras = getattr(model, "sie_cameras", 0)   # 0: features do not depend on cameras
        self.num_views = getattr(model, "sie_views", 0)       # 0: nor on views
        self.default_camera, self.default_view = defaults
        for what, default, count in (("camera", self.default_camera, self.num_cameras),
                                     ("view", self.default_view, self.num_views)):
            if default is not None and count and not 0 <= default < count:
                raise ValueError(f"default_{what}={default}: this model knows {what}s 0..{count - 1}")

    @property
    def feature_dim(self) -> int:
        return self.model.feature_dim

    @property
    def uses_sie(self) -> bool:
        """Whether features depend on camera or view ids (the model was trained with SIE)."""
        return self.num_cameras > 0 or self.num_views > 0

    # ------------------------------------------------------------------ images in memory

    def __call__(self, images, cameras=None, views=None, *, bgr: bool = False) -> torch.Tensor:
        """Features [N, D] (float32, CPU) of ``images``, in their order.

        ``images``: a path, a PIL image, an H×W×3 uint8 array, a list of those, an N×H×W×3 uint8
        array, or a float batch [N, 3, H, W] already resized and normalised. ``cameras`` / ``views``:
        one 0-based id per image (or one for all); needed when the model's SIE uses them, ignored
        otherwise. ``bgr``: the arrays are BGR (OpenCV) rather than RGB.
        """
        batch = _as_float_batch(images)
        if batch is not None:
            if tuple(batch.shape[1:]) != (3, *self.image_size):
                raise ValueError(f"a preprocessed batch must be [N, 3, {self.image_size[0]}, {self.image_size[1]}] "
                                 f"(resized and normalised); got {list(batch.shape)}")
            _check_finite_batch(batch)
            tensors = list(batch)
        else:
            tensors = [self.transform(_as_pil(image, bgr, i)) for i, image in enumerate(_as_list(images))]
        cams = self._side_ids(cameras, len(tensors), "camera", self.num_cameras, self.default_camera)
        views = self._side_ids(views, len(tensors), "view", self.num_views, self.default_view)
        part = lambda ids, i: None if ids is None else ids[i:i + self.batch_size]  # noqa: E731
        out = [self._encode(torch.stack(tensors[i:i + self.batch_size]), part(cams, i), part(views, i))
               for i in range(0, len(tensors), self.batch_size)]
        return torch.cat(out).cpu() if out else torch.zeros(0, self.feature_dim)

    @staticmethod
    def _side_ids(ids, n: int, what: str, count: int, default: int | None) -> torch.Tensor | None:
        """``ids`` (one per image, or one for all) as a checked long tensor; None when the model's
        SIE does not use this kind of id (``count`` 0)."""
        if not count:
            return None
        if ids is None:
            if default is None:
                raise ValueError(f"this model was trained with SIE over {count} {what}s: pass {what}s=[...] "
                                 f"(0-based, one per image), or choose a default with default_{what}=K")
            ids = default
        ids = _as_ids(ids, what)
        if ids.numel() == 1:
            ids = ids.expand(n)
        if ids.numel() != n:
            raise ValueError(f"{ids.numel()} {what} ids for {n} images: give one per image, or one for all")
        if n and not (0 <= int(ids.min()) and int(ids.max()) < count):
            raise ValueError(f"{what} ids must lie in 0..{count - 1} (0-based) for this model; "
                             f"got {int(ids.min())}..{int(ids.max())}")
        return ids

    @torch.no_grad()
    def _encode(self, images: torch.Tensor, cams: torch.Tensor | None,
                views: torch.Tensor | None = None) -> torch.Tensor:
        """Features of one batch on the model's device, float32; the mirror's averaged in with ``flip``."""
        device = self.runtime.device
        images = images.to(device, non_blocking=True)
        side = {"cams": None if cams is None else cams.to(device),
                "views": None if views is None else views.to(device)}
        amp = (contextlib.nullcontext() if self.amp_dtype is None
               else torch.autocast(device_type=device.type, dtype=self.amp_dtype))
        with eval_mode(self.model), amp:
            feats = self.model.encode_image(images, **side).float()
            if self.flip:
                feats = (feats + self.model.encode_image(images.flip(-1), **side).float()) / 2
        return feats

    # ------------------------------------------------------------------ images on disk

    def extract_items(self, items, desc: str = "features", progress: bool = True, views=None):
        """Features of (path, pid, camid) ``items`` with a DataLoader, for folders and data sets.

        Returns ``(features [K, D], pids [K], camids [K], kept [N] bool)``: unreadable images are
        skipped and counted in a warning. Under torchrun each rank encodes a contiguous shard, then
        the shards are gathered in order. ``views``: one view id per item (-1: none), for a model
        with view SIE (``ReIDDataset.view_ids(items)``). Items without a camera (camid < 0) or view
        take the default when the model's SIE uses them, and are an error when there is none.
        """
        items = list(items)
        views = [-1] * len(items) if views is None else list(views)
        if len(views) != len(items):
            raise ValueError(f"{desc}: {len(views)} view ids for {len(items)} images")
        self._check_side_ids(desc, [p for p, _, _ in items], [c for _, _, c in items], "camera",
                             self.num_cameras, self.default_camera,
                             "name them Market-style (PPPP_cC...) or set test.default_camera=K")
        self._check_side_ids(desc, [p for p, _, _ in items], views, "view", self.num_views, self.default_view,
                             "give view labels (VeRi: keypoint_train.txt / keypoint_test.txt) or set "
                             "test.default_view=K")
        feats, pids, camids, keep = self._extract_items(items, views, desc, progress)
        if not bool(keep.all()):
            log.warning("%s: %d unreadable image(s) skipped", desc, int((~keep).sum()))
        return feats[keep], pids[keep], camids[keep], keep

    @staticmethod
    def _check_side_ids(desc, paths, ids, what: str, count: int, default, fix: str) -> None:
        if not count:
            return
        unknown = [path for path, i in zip(paths, ids) if i < 0]
        if unknown and default is None:
            raise ValueError(f"{desc}: {len(unknown)} image(s) have no {what} id (e.g. {Path(unknown[0]).name}) and "
                             f"this model was trained with SIE over {count} {what}s; {fix} "
                             f"(FeatureExtractor(default_{what}=K))")
        too_high = [path for path, i in zip(paths, ids) if i >= count]
        if too_high:
            raise ValueError(f"{desc}: {what} ids up to {max(ids)} but this model knows "
                             f"{count} {what}s (e.g. {Path(too_high[0]).name})")

    @torch.no_grad()
    def _extract_items(self, items, views, desc, progress):
        runtime = self.runtime
        dataset = _TestImages(items, views, self.transform, self.image_size)
        local = Subset(dataset, list(shard(len(dataset), runtime)))
        loader = DataLoader(local, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                            pin_memory=runtime.device.type == "cuda")
        feats, pids, camids, oks = [], [], [], []
        bar = tqdm(loader, desc=desc, disable=not (progress and runtime.is_main), leave=False)
        for images, pid, camid, view, ok in bar:
            cams = _or_default(camid, self.default_camera) if self.num_cameras else None
            view = _or_default(view, self.default_view) if self.num_views else None
            feats.append(self._encode(images, cams, view))
            pids.append(pid)
            camids.append(camid)
            oks.append(ok.to(torch.uint8))
        out = torch.cat(feats) if feats else torch.zeros(0, self.feature_dim, device=runtime.device)
        out = gather_tensor(out, runtime).cpu()
        pid_t = gather_tensor(torch.cat(pids) if pids else torch.zeros(0, dtype=torch.long), runtime)
        cam_t = gather_tensor(torch.cat(camids) if camids else torch.zeros(0, dtype=torch.long), runtime)
        ok_t = gather_tensor(torch.cat(oks) if oks else torch.zeros(0, dtype=torch.uint8), runtime)
        return out, pid_t.cpu(), cam_t.cpu(), ok_t.cpu().bool()


HUB_FILES = ["model.safetensors", "config.json", "README.md"]   # a shared model folder, nothing else


def _looks_like_repo_id(text: str) -> bool:
    """``USER/NAME`` (one slash, hub characters, no file suffix of a weights file): a model hub id.

    >>> _looks_like_repo_id("someone/reid-vit"), _looks_like_repo_id("runs/x/model"), _looks_like_repo_id("a/m.pt")
    (True, False, False)
    """
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not text.endswith((".pt", ".pth", ".json",
                                                                                         ".safetensors"))


def _download(repo_id: str, revision: str | None, token: str | None) -> Path:
    """A hub model's folder in the local cache (downloaded when missing); one-line errors."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    at = f" at revision {revision}" if revision else ""
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=HUB_FILES,
                                        library_name="reidlib"))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"{repo_id}: no such local path, and the model hub cannot be reached (offline) "
                                f"and has no cached copy{at}; download it once online (huggingface-cli download "
                                f"{repo_id}) or pass a local model folder") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{repo_id}: the model hub has no revision {revision}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{repo_id}: no such local path, and no such model on the hub (or it is private: "
                                "log in with `huggingface-cli login` or pass token=...)") from None
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ValueError(f"{repo_id}{at} holds no reidlib model (model.safetensors + config.json); "
                         "was it pushed with reidlib.push_to_hub?")
    return folder


def _as_ids(ids, what: str) -> torch.Tensor:
    """Whole-number ids as a flat long tensor; 1.7 or True is refused (a cast would truncate it to
    camera 1 and give a silently wrong SIE row)."""
    try:
        raw = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{what} ids must be whole numbers, one per image; got {ids!r}") from None
    if raw.dtype == torch.bool or raw.is_complex():
        raise ValueError(f"{what} ids must be whole numbers, one per image; got {ids!r}")
    if raw.is_floating_point():
        whole = (torch.isfinite(raw) & (raw == raw.round())).reshape(-1)
        if not bool(whole.all()):
            raise ValueError(f"{what} ids must be whole numbers (0-based); got {raw.reshape(-1)[~whole][0].item()}")
    return raw.to(torch.long).reshape(-1)


def _check_finite_batch(batch: torch.Tensor) -> None:
    """NaN or inf pixels would give NaN features and a meaningless ranking: name the first image."""
    bad = ~torch.isfinite(batch.reshape(len(batch), -1)).all(dim=1)
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        raise ValueError(f"image {index} of the preprocessed batch holds NaN or infinite values "
                         f"({int(bad.sum())} such image(s) in all); fix the preprocessing")


def _or_default(ids: torch.Tensor, default: int | None) -> torch.Tensor:
    """Unknown ids (< 0) replaced by the default (checked to exist beforehand)."""
    return torch.where(ids < 0, torch.full_like(ids, default or 0), ids)


# --------------------------------------------------------------------------- input kinds

def _as_float_batch(images) -> torch.Tensor | None:
    """A preprocessed float batch [N, 3, H, W] (or one image [3, H, W]) as a tensor; None otherwise."""
    if isinstance(images, np.ndarray) and images.dtype.kind == "f":
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4:
            raise ValueError(f"a preprocessed batch must be [N, 3, H, W]; got {list(images.shape)}")
        return images.float()
    return None


def _as_list(images) -> list:
    if isinstance(images, (str, Path, Image.Image, bytes, bytearray)):
        return [images]
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    return list(images)


def _as_pil(image, bgr: bool, index: int = 0) -> Image.Image:
    """One image as an RGB PIL image: a path (decoded fully), a PIL image, or an H×W×3 uint8 array.
    ``index``: its place in the input, named in errors."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, (bytes, bytearray)):
        raise TypeError(f"image {index} is {type(image).__name__} (encoded file data?): decode it first, "
                        "e.g. PIL.Image.open(io.BytesIO(data)), or pass the file's path")
    if isinstance(image, Image.Image):
        _refuse_empty(image.height, image.width, index)
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {index}: an image array must be H×W×3 uint8 (0-255); got {image.dtype} "
                             f"{list(image.shape)} (a float batch must be [N, 3, H, W], already normalised)")
        _refuse_empty(image.shape[0], image.shape[1], index)
        return Image.fromarray(np.ascontiguousarray(image[:, :, ::-1] if bgr else image), "RGB")
    raise TypeError(f"image {index}: cannot read an image from a {type(image).__name__}: pass paths, PIL images, "
                    "H×W×3 uint8 arrays or a float batch [N, 3, H, W]")


def _refuse_empty(height: int, width: int, index: int) -> None:
    """A crop of an empty box (``frame[90:0, 10:20]``) would be resized into a black image, whose
    feature matches nothing: a detector's bug, said here rather than hidden in a ranking."""
    if height == 0 or width == 0:
        raise ValueError(f"image {index} is empty ({height}x{width} pixels); check the crop's box "
                         "(y1 > y0 and x1 > x0)")
