"""Methods: what a method adds to the shared CLIP re-ID model, and how it trains.

A method is one file: a :class:`Method` subclass with a ``name``, the model it builds (the shared
CLIP backbone + BNNeck by default) and its :class:`Stage` list; ``@register_method`` makes it a
value of the ``method`` config key, a sweep name, and a row of the comparison table. The engine
runs its stages with resume, checkpoints, DDP, the non-finite watch and logging.

Built in: ``clipreid`` (:mod:`.clipreid`, the baseline), ``thesis`` (:mod:`.thesis`: deep prompts
and LoRA), ``pcl`` (:mod:`.pcl`, PCL-CLIP) and ``promptsg`` (:mod:`.promptsg`, PromptSG).
``python -m reidlib methods`` lists what is registered.

Example::

    from reidlib.methods import get_method, method_config
    cfg = method_config("proposed", ["data.root=data/synth"], base="tiny")
    [stage.name for stage in get_method(cfg.method).stages(cfg)]     # ['prompts', 'image encoder']
"""
# the built-in methods register themselves on import
from . import clipreid, thesis  # noqa: E402,F401,I001
from . import pcl, promptsg  # noqa: E402,F401,I001
from .base import ImageBatchStage, Method, Stage, StageContext, image_step, optimizer_step, wrap_for_training
from .registry import (
    find_variant,
    get_method,
    load_plugins,
    method_config,
    method_for,
    method_names,
    register_method,
    run_label,
    variant_names,
)


def build(cfg, num_classes: int, num_cameras: int = 0, num_views: int = 0):
    """The model ``cfg``'s method trains, for a data set of ``num_classes`` identities."""
    return method_for(cfg).build_model(cfg, num_classes, num_cameras, num_views)


__all__ = ["Method", "Stage", "ImageBatchStage", "StageContext", "image_step", "optimizer_step", "wrap_for_training",
           "register_method", "get_method", "method_names", "variant_names", "find_variant", "method_config",
           "run_label", "build", "load_plugins", "method_for"]
