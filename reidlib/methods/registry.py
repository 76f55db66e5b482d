"""The methods by name, and the configs of their variants.

``register_method`` adds a :class:`~reidlib.methods.base.Method` subclass (or instance) under its
``name``; a method defined in a user's file or a notebook cell registers the same way as the
built-in ones. A sweep names runs by *variant*: every method's own name, plus the names in its
``variants`` (``baseline`` for CLIP-ReID; ``proposed``, ``deep_only``, ``lora_only`` for the thesis).

Example::

    get_method("thesis").stages(cfg)                    # [PromptStage, ImageEncoderStage]
    cfg = method_config("proposed", ["seed=1"], base="tiny")
    cfg.method, cfg.model.prompt                        # ('thesis', 'deep')
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from ..config import BASE_OWNED_KEYS, CONFIG_DIR, Config, load_config, read_config_keys

_METHODS: dict = {}


def register_method(method):
    """Register a :class:`Method` subclass or instance under its ``name`` (a decorator); a later
    registration under the same name replaces the earlier one (re-running a notebook cell)."""
    instance = method() if isinstance(method, type) else method
    if not instance.name or not instance.name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"a method needs a name of letters, digits, - and _, got {instance.name!r}")
    _METHODS[instance.name] = instance
    return method


def load_plugins(plugins) -> None:
    """Import each plug-in (a ``.py`` file or a module name) once, so that its methods register.

    A file is imported under a name made from its resolved path, so the same file is imported once
    per process however it is spelled, and two files of the same name do not collide."""
    for plugin in plugins or []:
        plugin = str(plugin)
        if not plugin.endswith(".py"):
            importlib.import_module(plugin)
            continue
        path = Path(plugin).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"plugins: {plugin} not found; give a .py file that registers a method, "
                                    "or an importable module name")
        name = f"reidlib_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module      # before running it: dataclasses look their module up
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise


def method_for(cfg: Config):
    """The method ``cfg`` trains, after importing ``cfg.plugins``."""
    load_plugins(cfg.plugins)
    return get_method(cfg.method)


def method_names() -> list[str]:
    """The registered methods, built-in ones first."""
    return list(_METHODS)


def get_method(name: str):
    """The registered method ``name``; a one-line error with the registered names otherwise."""
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(f"unknown method '{name}': {hint}registered: {', '.join(_METHODS)} (a method of "
                         "your own must be imported, so that register_method runs, before it trains)")
    return _METHODS[name]


def variant_names() -> list[str]:
    """Every name a sweep accepts: each variant, then each method's own name."""
    names = [v for m in _METHODS.values() for v in m.variants]
    return names + [m for m in _METHODS if m not in names]


def find_variant(name: str):
    """(method, YAML or None, overrides) of a variant or method name."""
    for method in _METHODS.values():
        if name in method.variants:
            config, overrides = method.variants[name]
            return method, config or method.config, list(overrides)
    if name in _METHODS:
        return _METHODS[name], _METHODS[name].config, []
    close = difflib.get_close_matches(name, variant_names(), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ValueError(f"unknown method '{name}'{hint} choose from {', '.join(variant_names())}")


def method_config(name: str, overrides: list[str] | None = None, base: str | None = None) -> Config:
    """The config of a method or variant (``baseline | proposed | deep_only | lora_only | <your
    method>``), with ``key=value`` overrides.

    ``base`` replaces the variant's YAML (``tiny`` for tests and the demo) while keeping the
    method's model and ``options`` settings, applied on top of it; the architecture, weights and
    LoRA learning rate stay the base's. Where ``<base>_<method>.yaml`` is shipped (``tiny_pcl``),
    it is used instead, as it is: a method whose full-scale settings do not carry over to the
    small model states its small-scale ones there.
    """
    plugins = [o.split("=", 1)[1] for o in overrides or [] if o.split("=", 1)[0].strip() == "plugins"]
    if plugins:     # a method of the user's own must be registered before its name is looked up
        load_plugins(load_config(None, [f"plugins={plugins[-1]}"]).plugins)
    method, config, extra = find_variant(name)
    chosen = [f"method={method.name}"] + extra + list(overrides or [])
    if base is None:
        return load_config(config, chosen)
    if (CONFIG_DIR / f"{base}_{method.name}.yaml").is_file():
        # the base's own version for this method (tiny_pcl.yaml: the tiny model with PCL-CLIP's
        # settings sized for it), which holds the method's keys itself
        return load_config(f"{base}_{method.name}", chosen)
    own = read_config_keys(config) if config else {}
    method_keys = [f"{k}={v}" for k, v in own.items()
                   if k.startswith(("model.", "options")) and k not in BASE_OWNED_KEYS]
    return load_config(base, method_keys + chosen)


def run_label(cfg: Config) -> str:
    """What a run of ``cfg`` is called in tables and ``metrics.json``: its variant's name."""
    return method_for(cfg).run_label(cfg)
