"""The re-ID model: CLIP (open_clip) with prompts, SIE, BNNeck, classifiers and optional LoRA.

Example::

    from reidlib.model import build_model, set_trainable, parameter_table
    model = build_model(cfg.model, num_classes=751, num_cameras=6)
    set_trainable(model, "stage1")                      # prompts only
    print(parameter_table(model))
    features = model.eval().encode_image(images)        # [B, 1280] for ViT-B/16
"""
from ..weights.clip import TINY_CONFIGS, load_clip, read_state_dict
from .attention import SplitAttention, split_attention
from .backbone import resize_grid_embedding
from .lora import apply_lora, merge_lora
from .prompts import DeepPromptLearner, PromptLearner, TextEncoder
from .reid import ReIDModel, build_model
from .trainable import parameter_table, set_trainable, trainable_parameters

__all__ = [
    "build_model", "ReIDModel", "load_clip", "read_state_dict", "resize_grid_embedding", "TINY_CONFIGS",
    "SplitAttention", "split_attention", "apply_lora", "merge_lora",
    "set_trainable", "trainable_parameters", "parameter_table",
    "PromptLearner", "DeepPromptLearner", "TextEncoder",
]
