"""The retrieval explorer's models and session, without widgets: a trained run's features and
rankings (computed once, cached in the run folder), caption search with the model's text tower,
attention overlays, and :class:`ExplorerSession`, which holds what the explorer's controls set and
gives the views and the figure. :mod:`reidlib.viz.explorer` puts widgets on it.

Example::

    a = ExploreModel("results/market1501/baseline/seed0")          # a run folder: model/ + config.yaml
    b = ExploreModel("results/market1501/proposed/seed0")
    session = ExplorerSession([a, b], ExploreData.from_config(a.cfg))
    session.sort = "b_wins"                                           # where the proposed model wins most
    view_a, view_b = session.views()
    view_a.summary()                                                  # 'AP 12.5%, first true match at rank 6'
    session.save("figures/explore_q0")                               # .png (300 dpi) and .pdf
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import build_transforms, dataset_from_config, read_image
from ..eval.distance import GalleryDistance
from ..eval.inference import extract_features
from ..eval.rerank import rerank
from .explorer_state import (
    QUERY,
    SORTS,
    QueryView,
    Rankings,
    cache_key,
    cached_arrays,
    file_digest,
    filter_queries,
    query_view,
    rank_queries,
    read_captions,
    sort_queries,
    text_view,
)

log = logging.getLogger("reidlib")

ATTENTION_MODES = {"off": "off", "rollout": "attention rollout", "last": "last-layer CLS attention"}
# Cache format: bump when what the files hold changes, so old files are not read.
CACHE_VERSION = 1


# --------------------------------------------------------------------------- data

@dataclass
class ExploreData:
    """The query and gallery the explorer ranks: ``(path, pid, camid)`` items, their view ids
    (VeRi; None elsewhere) and captions (path -> text, from ``captions.csv`` when the data set
    has one)."""

    name: str
    root: str
    query: list
    gallery: list
    q_views: list | None = None
    g_views: list | None = None
    captions: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dataset(cls, dataset) -> "ExploreData":
        """From a loaded :class:`reidlib.data.ReIDDataset` (VehicleID: its first draw)."""
        views = bool(getattr(dataset, "views", None))
        return cls(dataset.name, str(dataset.root), list(dataset.query), list(dataset.gallery),
                   dataset.view_ids(dataset.query) if views else None,
                   dataset.view_ids(dataset.gallery) if views else None, read_captions(dataset.root))

    @classmethod
    def from_config(cls, cfg) -> "ExploreData":
        """The data set ``cfg.data`` names (``data.dataset`` under ``data.root``)."""
        return cls.from_dataset(dataset_from_config(cfg))

    def digest(self) -> str:
        """What the cache files are keyed by: the data set's two lists."""
        return cache_key(self.name, self.query, self.gallery, self.q_views, self.g_views)

    def readable(self, q_kept: np.ndarray, g_kept: np.ndarray) -> "ExploreData":
        """The same data without the images that could not be read (as evaluation skips them)."""
        pick = lambda items, kept: None if items is None else [x for x, k in zip(items, kept) if k]  # noqa: E731
        return dataclasses.replace(self, query=pick(self.query, q_kept), gallery=pick(self.gallery, g_kept),
                                   q_views=pick(self.q_views, q_kept), g_views=pick(self.g_views, g_kept))


# --------------------------------------------------------------------------- one model

def resolve_run(source: str | Path) -> tuple[Path, Path | None, Path]:
    """``(weights, config.yaml or None, cache folder)`` of a run folder (``model/`` and
    ``config.yaml``), a model folder (``model.safetensors``) or a weights file. The cache is
    ``explore_cache/`` in the run folder (beside the weights otherwise)."""
    path = Path(source).expanduser()
    if path.is_dir() and (path / "model").is_dir():
        config = path / "config.yaml"
        return path / "model", config if config.is_file() else None, path / "explore_cache"
    if path.is_dir() and (path / "model.safetensors").is_file():
        config = path.parent / "config.yaml"
        return path, config if config.is_file() else None, path.parent / "explore_cache"
    if path.is_file():
        return path, None, path.parent / "explore_cache"
    raise FileNotFoundError(f"{source}: not a run folder (model/ and config.yaml), a model folder "
                            "(model.safetensors) or a weights file")


def _weights_file(weights: Path) -> Path:
    return weights / "model.safetensors" if weights.is_dir() else weights


def _run_label(run: Path, cfg) -> str:
    """The method's name as the run's tables call it (``metrics.json``), else the method's label."""
    metrics = run / "metrics.json" if run.is_dir() else None
    if metrics is not None and metrics.is_file():
        try:
            return str(json.loads(metrics.read_text())["method"])
        except (ValueError, KeyError, TypeError):
            pass
    from ..methods.registry import method_for
    try:
        return method_for(cfg).run_label(cfg)
    except (KeyError, ValueError):
        return cfg.method


class ExploreModel:
    """One trained model: its weights, config, and features and rankings of an :class:`ExploreData`,
    each computed once per setting and kept in memory and in ``RUN/explore_cache/*.npz``.

    ``source``: a run folder, a model folder or a weights file; ``data_root`` / ``dataset`` replace
    the run's ``data.root`` / ``data.dataset``; ``cache``: False keeps nothing on disk.
    """

    def __init__(self, source, *, device: str = "cpu", label: str | None = None, data_root=None,
                 dataset: str | None = None, cache: bool = True):
        from ..config import load_config
        from ..methods.trained import load_trained_model
        self.source = Path(source)
        self.weights, config, cache_dir = resolve_run(source)
        run_cfg = load_config(str(config)) if config is not None else None
        self.model, cfg = load_trained_model(self.weights, run_cfg, device=device)
        data = cfg.data
        if data_root is not None:
            data = dataclasses.replace(data, root=str(data_root))
        if dataset is not None:
            data = dataclasses.replace(data, dataset=dataset)
        self.cfg = dataclasses.replace(cfg, data=data, device=device)
        self.label = label or _run_label(self.source, self.cfg)
        self.cache_dir = cache_dir if cache else None
        self._memory: dict = {}
        self.reused: list[str] = []   # the cache files read instead of computed (the tests look)

    # -- features and rankings

    def _features_key(self, data: ExploreData, flip: bool) -> str:
        t, m = self.cfg.test, self.cfg.model
        preprocessing = (list(m.image_size), m.neck_feat, t.precision, list(self.cfg.data.pixel_mean),
                         list(self.cfg.data.pixel_std), self.cfg.data.test_interpolation,
                         t.default_camera, t.default_view)
        return cache_key(CACHE_VERSION, file_digest(_weights_file(self.weights)), data.digest(), flip, preprocessing)

    def _cached(self, name: str, key: str, compute) -> dict:
        if (name, key) not in self._memory:
            path = None if self.cache_dir is None else self.cache_dir / f"{name}-{key}.npz"
            arrays, reused = cached_arrays(path, compute)
            if reused:
                self.reused.append(path.name)
            self._memory[name, key] = arrays
        return self._memory[name, key]

    def features(self, data: ExploreData, flip: bool) -> dict:
        """``{"qf", "gf", "q_kept", "g_kept"}``: test features of the readable query and gallery
        images (``test.flip`` set to ``flip``: the mirror's features averaged in) and which were."""
        cfg = dataclasses.replace(self.cfg, test=dataclasses.replace(self.cfg.test, flip=flip))

        def compute():
            qf, _, _, q_kept = extract_features(self.model, data.query, cfg, progress=False, return_kept=True,
                                                views=data.q_views)
            gf, _, _, g_kept = extract_features(self.model, data.gallery, cfg, progress=False, return_kept=True,
                                                views=data.g_views)
            return {"qf": qf.numpy(), "gf": gf.numpy(), "q_kept": q_kept.numpy(), "g_kept": g_kept.numpy()}
        return self._cached("features", self._features_key(data, flip), compute)

    def rankings(self, data: ExploreData, flip: bool, reranked: bool, keep: int = 50) -> Rankings:
        """Every query's ranking under this model: plain distances (``test.metric``,
        ``test.feat_norm``) or k-reciprocal re-ranked ones (Zhong et al., "Re-ranking Person
        Re-identification with k-reciprocal Encoding", CVPR 2017; ``test.k1``, ``k2``,
        ``lambda_value``), as evaluation scores them."""
        t = self.cfg.test
        setting = ("rerank", t.k1, t.k2, t.lambda_value) if reranked else ("plain",)
        key = cache_key(self._features_key(data, flip), t.metric, t.feat_norm, setting, keep)

        def compute():
            feats = self.features(data, flip)
            shown = data.readable(feats["q_kept"], feats["g_kept"])
            qf, gf = torch.from_numpy(feats["qf"]), torch.from_numpy(feats["gf"])
            if reranked:
                if t.feat_norm:   # as evaluation: re-rank the normalised features
                    qf, gf = F.normalize(qf, dim=1), F.normalize(gf, dim=1)
                dist = rerank(qf, gf, k1=t.k1, k2=t.k2, lambda_value=t.lambda_value)
                rows = lambda r: dist[r]  # noqa: E731
            else:
                kernel = GalleryDistance(gf, t.metric, t.feat_norm)
                rows = lambda r: kernel(qf[r])  # noqa: E731
            return rank_queries(rows, shown.query, shown.gallery, keep=keep).arrays()
        return Rankings.from_arrays(self._cached("rankings", key, compute))

    # -- captions

    def text_support(self) -> tuple[bool, str]:
        """Whether captions can rank the gallery with this model, and a line saying how well."""
        model = self.model
        if getattr(model, "text", None) is None:
            return False, f"{self.label}: no text tower, so no caption search"
        if not hasattr(model, "image_proj_features"):
            return False, (f"{self.label}: its method gives no image feature in the text space (f_proj) to "
                           "compare captions with, so no caption search")
        if str(self.cfg.model.pretrained).lower() in ("none", ""):
            return True, (f"{self.label}: the text tower has random weights (trained from model.pretrained=none; "
                          "re-ID training never trains it), so captions rank the gallery at random")
        tokens = model.text.positional_embedding.shape[0]
        return True, (f"{self.label}: captions go through CLIP's frozen text tower (open_clip's tokenizer, at most "
                      f"{tokens} tokens) and are compared with the images' f_proj; re-ID training aligned f_proj "
                      "with learnt identity prompts, not with free text, so read the ranking as approximate")

    @torch.no_grad()
    def text_scores(self, caption: str, data: ExploreData, flip: bool) -> torch.Tensor:
        """Cosine similarity [G] of the caption's text feature to each readable gallery image's
        ``f_proj`` (the image feature in the text space, CLIP's ``encode_image``)."""
        import open_clip
        model = self.model
        length = model.text.positional_embedding.shape[0]
        device = model.text.positional_embedding.device
        # No prompt injections: the text tower then is CLIP's encode_text (reidlib.model.prompts).
        text = model.text(open_clip.tokenize([caption], context_length=length).to(device)).float().cpu()
        gf = torch.from_numpy(self.features(data, flip)["gf"])
        f_proj = gf[:, -model.embed_dim:]
        if model.neck_feat == "after":   # test features after the BNNeck: undo it to get f_proj back
            bn = model.bottleneck_proj
            f_proj = ((f_proj - bn.bias.cpu()) / bn.weight.cpu() * torch.sqrt(bn.running_var.cpu() + bn.eps)
                      + bn.running_mean.cpu())
        return F.normalize(f_proj, dim=1) @ F.normalize(text, dim=1)[0]

    # -- attention

    def attention_available(self) -> bool:
        from .attention import vision_blocks
        try:
            vision_blocks(self.model)
            return True
        except ValueError:
            return False

    def attention(self, items: list, mode: str) -> np.ndarray:
        """``[B, H, W]`` attention maps (rollout or last layer, each max 1) of ``(path, pid, camid)``
        items at the model's input size."""
        from .attention import attention_maps
        height, width = self.cfg.model.image_size
        transform = build_transforms(self.cfg.data, (height, width), train=False)
        device = next(self.model.parameters()).device
        batch = torch.stack([transform(read_image(path)) for path, _, _ in items]).to(device)
        cams = torch.tensor([max(c, 0) for _, _, c in items], device=device)
        maps = attention_maps(self.model, batch, mode, cams)
        maps = F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)
        return maps[:, 0].cpu().numpy()


def overlay(image: np.ndarray, heat: np.ndarray | None, alpha: float = 0.55) -> np.ndarray:
    """``image`` (H x W x 3 uint8) with ``heat`` (h x w in [0, 1], resized) blended over it in the
    inferno colour map; the image itself when ``heat`` is None.

    >>> overlay(np.zeros((4, 2, 3), np.uint8), np.ones((2, 1))).shape
    (4, 2, 3)
    """
    if heat is None:
        return image
    from matplotlib import colormaps
    from PIL import Image
    resized = np.asarray(Image.fromarray((np.clip(heat, 0, 1) * 255).astype(np.uint8)).resize(
        (image.shape[1], image.shape[0]), Image.BILINEAR), dtype=np.float32) / 255
    colour = colormaps["inferno"](resized)[..., :3] * 255
    return (image * (1 - alpha) + colour * alpha).astype(np.uint8)


def load_picture(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image file as H x W x 3 uint8 RGB, resized to ``size`` = (height, width) when given."""
    picture = read_image(path).convert("RGB")
    if size is not None:
        picture = picture.resize((size[1], size[0]))
    return np.asarray(picture)


# --------------------------------------------------------------------------- the session

class ExplorerSession:
    """What the explorer's controls set, and what they show: one or two models over one data set.

    Settings (plain attributes): ``sort`` (a key of :data:`SORTS`), ``pid`` / ``camera`` (query
    filters, None: all), ``position`` (in the filtered, sorted list), ``shown`` (model indices shown
    side by side), ``k``, ``flip``, ``reranked``, ``attention`` (a key of
    :data:`ATTENTION_MODES`), ``caption`` (None: the query image ranks the gallery).
    """

    def __init__(self, models: list[ExploreModel], data: ExploreData, k: int = 10, flip: bool | None = None,
                 keep: int = 50):
        if not 1 <= len(models) <= 2:
            raise ValueError(f"the explorer compares one or two models, got {len(models)}")
        self.models, self.full_data, self.keep = list(models), data, keep
        self.flip = models[0].cfg.test.flip if flip is None else flip
        self.reranked, self.attention, self.caption = False, "off", None
        self.sort, self.pid, self.camera, self.position = "index", None, None, 0
        self.shown = list(range(len(models)))
        kept = [(f["q_kept"], f["g_kept"]) for f in (m.features(data, self.flip) for m in models)]
        if any(not (np.array_equal(q, kept[0][0]) and np.array_equal(g, kept[0][1])) for q, g in kept):
            raise ValueError("the two models could not read the same images of the data set")
        self.data = data.readable(*kept[0])
        self.k = max(1, min(k, keep, len(self.data.gallery)))
        self._heat: dict = {}
        self._order: tuple = (None, [])

    # -- what is selected

    def rankings(self, m: int) -> Rankings:
        """Model ``m``'s rankings under the current flip and re-ranking settings."""
        return self.models[m].rankings(self.full_data, self.flip, self.reranked, self.keep)

    def order(self) -> list[int]:
        """The query indices the query control steps through: filtered, then sorted (remembered
        per setting: every redraw asks for it several times)."""
        key = (self.pid, self.camera, self.sort, self.flip, self.reranked)
        if self._order[0] != key:
            indices = filter_queries(self.data.query, self.pid, self.camera)
            if self.sort != "index":
                ap_b = self.rankings(1).ap if len(self.models) > 1 else None
                indices = sort_queries(indices, self.sort, self.rankings(0).ap, ap_b)
            self._order = (key, indices)
        return self._order[1]

    def sorts(self) -> dict:
        """The sort orders that apply: the AP differences need two models."""
        return {k: v for k, v in SORTS.items() if len(self.models) > 1 or not k.startswith("b_")}

    @property
    def query(self) -> int:
        """The selected query's index in the data set's query list (-1 when the filters leave none)."""
        order = self.order()
        return order[min(self.position, len(order) - 1)] if order else -1

    def select(self, index: int) -> None:
        """Select query ``index`` (of the data set's query list); filters that hide it are cleared."""
        if not 0 <= index < len(self.data.query):
            raise ValueError(f"query {index}: the data set has queries 0..{len(self.data.query) - 1}")
        if index not in self.order():
            self.pid = self.camera = None
        self.position = self.order().index(index)

    # -- what is shown

    def views(self) -> list[QueryView]:
        """One view per shown model: the query's (or the caption's) top ``k``."""
        i = self.query
        if i < 0:
            return []
        out = []
        for m in self.shown:
            label = self.models[m].label
            if self.caption:
                scores = self.models[m].text_scores(self.caption, self.full_data, self.flip)
                out.append(text_view(scores, self.caption, self.data.gallery, self.k, self.data.query[i][1], label))
            else:
                out.append(query_view(self.rankings(m), i, self.data.query, self.data.gallery, self.k, label))
        return out

    def query_caption(self) -> str:
        """The selected query's caption from the data set's ``captions.csv`` ('' when none)."""
        i = self.query
        return "" if i < 0 else self.data.captions.get(str(Path(self.data.query[i][0]).absolute()), "")

    def heat(self, m: int, items: list) -> list:
        """Attention maps of model ``m`` over ``items`` (None each when attention is off or the
        model has no ViT), remembered per image."""
        if self.attention == "off" or not self.models[m].attention_available():
            return [None] * len(items)
        missing = [x for x in items if (m, self.attention, x[0]) not in self._heat]
        if missing:
            for x, heat in zip(missing, self.models[m].attention(missing, self.attention)):
                self._heat[m, self.attention, x[0]] = heat
        return [self._heat[m, self.attention, x[0]] for x in items]

    def pictures(self, m: int, view: QueryView) -> tuple[np.ndarray | None, list[np.ndarray]]:
        """The view's query image and matches as arrays, with attention overlays when on."""
        size = tuple(self.models[m].cfg.model.image_size)
        items = ([] if view.caption else [self.data.query[view.query]]) + \
                [(x.path, x.pid, x.camera) for x in view.matches]
        arrays = [overlay(load_picture(x[0], size), h) for x, h in zip(items, self.heat(m, items))]
        return (None if view.caption else arrays[0]), arrays[0 if view.caption else 1:]

    def title(self) -> str:
        """What the current view is, in one line (the figure's title)."""
        if self.caption:
            parts = ["cosine similarity to the caption", f"green: id {self.data.query[self.query][1]}"]
        else:
            parts = ["re-ranked (Zhong et al., CVPR 2017)" if self.reranked else "plain distances"]
        parts.append("flip on" if self.flip else "flip off")
        if self.attention != "off":
            parts.append(ATTENTION_MODES[self.attention])
        what = f'caption "{self.caption}"' if self.caption else f"query {self.query}"
        return f"{self.data.name}: {what}, top {self.k}; " + ", ".join(parts)

    def figure(self):
        """The current view as a matplotlib figure: a row per shown model, the query then its
        matches, framed as in the widget."""
        import matplotlib.pyplot as plt
        views = self.views()
        columns = 1 + max((len(v.matches) for v in views), default=0)
        fig, axes = plt.subplots(max(1, len(views)), columns, squeeze=False,
                                 figsize=(1.2 * columns + 0.4, 2.7 * max(1, len(views)) + 0.6))
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.axis("off")
        for row, (m, view) in enumerate(zip(self.shown, views)):
            query, matches = self.pictures(m, view)
            head = "caption" if view.caption else f"query\nid {view.pid}, cam {view.camera}"
            _frame(axes[row, 0], query, QUERY, head, view.caption)
            for col, (match, picture) in enumerate(zip(view.matches, matches), start=1):
                mark = "" if match.correct is None else (" ✓" if match.correct else " ✗")
                label = f"{match.rank + 1}{mark}\nid {match.pid}, cam {match.camera}"
                _frame(axes[row, col], picture, match.colour, label)
            axes[row, 0].text(-0.1, 0.5, f"{view.model}\n{view.summary()}", transform=axes[row, 0].transAxes,
                              rotation=90, ha="right", va="center", fontsize=7)
        fig.suptitle(self.title(), fontsize=9)
        fig.tight_layout()
        return fig

    def save(self, stem: str | Path) -> list[Path]:
        """The current view as ``stem.png`` (300 dpi) and ``stem.pdf``; returns both paths."""
        import matplotlib.pyplot as plt

        from .figures import save_figure
        stem = Path(stem)
        stem = stem.with_suffix("") if stem.suffix.lower() in (".png", ".pdf") else stem
        fig = self.figure()
        try:
            return save_figure(fig, stem)
        finally:
            plt.close(fig)


def _frame(ax, picture, colour: str, label: str, text: str | None = None) -> None:
    """One cell of the figure: the picture (or a caption's text) in a coloured frame."""
    ax.axis("on")
    if picture is None:
        import textwrap
        ax.text(0.5, 0.5, textwrap.fill(text or "", 16), ha="center", va="center", fontsize=6, transform=ax.transAxes)
    else:
        ax.imshow(picture, aspect="auto")
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(4)
    ax.set_title(label, fontsize=6.5, color="black")


def mean_ap_line(session: ExplorerSession) -> str:
    """mAP and rank-1 of each model under the session's settings, for the explorer's header."""
    parts = []
    for m, model in enumerate(session.models):
        r = session.rankings(m)
        parts.append(f"{model.label}: mAP {100 * r.mean_ap():.1f}%, rank-1 {100 * r.rank1():.1f}%"
                     if not math.isnan(r.mean_ap()) else f"{model.label}: no scorable query")
    return "; ".join(parts)
