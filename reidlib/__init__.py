"""reidlib: person re-identification by fine-tuning CLIP.

CLIP-ReID's two stages (learn identity prompts with CLIP frozen, then fine-tune the image encoder
with ID, triplet and image-to-text losses), the thesis's deep textual prompts and LoRA, exact and
fast evaluation, and notebooks that reproduce the baseline-vs-proposed table.

Five lines::

    import reidlib
    cfg = reidlib.load_config("vit_proposed", ["data.root=/data/market1501"])
    metrics = reidlib.train(cfg)                  # stage 1 + stage 2 + final evaluation
    print(metrics["rank1"], metrics["mAP"])
"""
import sys as _sys

from .config import Config, help_text, load_config


def _quiet_notebook_bars() -> None:
    """In a notebook without ipywidgets (a core install has none), ``tqdm.auto`` warns once when it
    is first imported ("IProgress not found", a TqdmWarning) and falls back to text bars, which
    read fine there. It is imported once here without that warning; the bars stay as they are."""
    if "ipykernel" not in _sys.modules or "tqdm.auto" in _sys.modules:
        return
    import warnings

    from tqdm import TqdmWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TqdmWarning)
        import tqdm.auto  # noqa: F401


_quiet_notebook_bars()

__version__ = "0.3.0"

__all__ = ["Config", "load_config", "method_config", "help_text", "build_model", "load_dataset",
           "dataset_from_config",
           "train", "test", "evaluate", "rerank", "extract_features", "load_trained_model", "FeatureExtractor",
           "export_model", "push_to_hub", "build_miniature", "register_method", "get_method", "Method", "Stage",
           "ImageBatchStage"]


def __getattr__(name):
    # Heavy modules (torch, open_clip) load on first use, so `import reidlib` and the CLI's
    # --help stay fast.
    if name in ("method_config", "register_method", "get_method", "Method", "Stage", "ImageBatchStage"):
        from . import methods
        return getattr(methods, name)
    if name == "build_model":
        from .model import build_model
        return build_model
    if name in ("load_dataset", "dataset_from_config"):
        from . import data
        return getattr(data, name)
    if name in ("train", "test"):
        from .engine import trainer
        return getattr(trainer, name)
    if name == "build_miniature":
        from .demo.pretrain import build_miniature
        return build_miniature
    if name == "load_trained_model":
        from .methods.trained import load_trained_model
        return load_trained_model
    if name in ("evaluate", "rerank"):
        from . import eval as evaluation
        return getattr(evaluation, name)
    if name == "FeatureExtractor":
        from .eval.extractor import FeatureExtractor
        return FeatureExtractor
    if name in ("export_model", "push_to_hub"):
        from . import export
        return getattr(export, name)
    if name == "extract_features":
        from .eval.inference import extract_features
        return extract_features
    raise AttributeError(f"module 'reidlib' has no attribute '{name}'")
