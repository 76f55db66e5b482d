"""Every weights format in and out, as tensors and dicts: no model is built here.

* :mod:`~reidlib.weights.clip`: CLIP's weights (the ``openai`` tag, OpenAI's JIT or state-dict
  files, open_clip checkpoints, ``none``) and the tiny test architectures;
* :mod:`~reidlib.weights.trained`: reidlib's trained model, a folder of ``model.safetensors`` and a
  JSON model card (read without pickle, hash-checked), and the legacy ``model_final.pt``;
* :mod:`~reidlib.weights.card`: what the card records and what ``reidlib info`` shows;
* :mod:`~reidlib.weights.detect`: which kind a path holds, and the config it implies;
* :mod:`~reidlib.weights.reference`: state dicts of the CLIP-ReID reference and the thesis fork;
* :mod:`~reidlib.weights.finetune`: the tensors a new model takes from a trained one;
* :mod:`~reidlib.weights.lora`: folding LoRA adapters into plain weights.

The model package imports this one, never the other way round.

Example::

    from reidlib import weights
    weights.save_trained("runs/market/model", record.pop("model"), record)
    state = weights.read_trained("runs/market/model")
    weights.preprocessing(state)        # {'image_size': [256, 128], 'pixel_mean': [...], ...}
"""
from .card import describe_weights, model_record, reidlib_version, uses_quick_gelu
from .clip import TINY_CONFIGS, load_clip, read_state_dict
from .detect import read_weights, reference_config, weights_config
from .finetune import TrainedSource, check_source, read_trained_source, take_trained_weights
from .lora import fold_lora_state, lora_scaling
from .reference import ReferenceWeights, convert_reference, is_reference_state
from .trained import (
    final_model,
    has_final_model,
    preprocessing,
    read_card,
    read_trained,
    save_trained,
    trained_folder,
)

__all__ = [
    "load_clip", "read_state_dict", "TINY_CONFIGS",
    "save_trained", "read_trained", "read_card", "trained_folder", "preprocessing", "final_model",
    "has_final_model",
    "model_record", "describe_weights", "uses_quick_gelu", "reidlib_version",
    "read_weights", "reference_config", "weights_config",
    "convert_reference", "is_reference_state", "ReferenceWeights",
    "read_trained_source", "check_source", "take_trained_weights", "TrainedSource",
    "fold_lora_state", "lora_scaling",
]
