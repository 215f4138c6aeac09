"""selfprompt: Self-Prompt Tuning (SPT), visual prompt tuning and other PETL methods for timm Vision
Transformers.

The names below are imported on first use (``selfprompt.PromptedViT``, ``from selfprompt import LoRA``), so
``import selfprompt`` alone imports neither torch nor timm. What importing it arranges at once, cheaply: the
torchvision guard (:mod:`selfprompt._torchvision_compat`) runs just before torchvision is first imported, and
the zoo is registered with timm (:mod:`selfprompt.zoo.models`) as soon as timm is imported, or now if it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

import _selfprompt_torchvision_hook  # noqa: F401  (the torchvision guard, before torchvision is first found)
from selfprompt.version import __version__

# public name -> the module that defines it
_HOMES = {
    "get_model": "selfprompt.engine.build",
    "available_initializers": "selfprompt.init",
    "init_prompts": "selfprompt.init",
    "register_initializer": "selfprompt.init",
    "get_method": "selfprompt.methods",
    "load_pretrained": "selfprompt.methods",
    "method_names": "selfprompt.methods",
    "register_method": "selfprompt.methods",
    "AdaptFormer": "selfprompt.methods.adaptformer",
    "APT": "selfprompt.methods.apt",
    "BitFit": "selfprompt.methods.bitfit",
    "BPT": "selfprompt.methods.bpt",
    "CondensedViT": "selfprompt.methods.condensation",
    "CVPT": "selfprompt.methods.cvpt",
    "E2VPT": "selfprompt.methods.e2vpt",
    "GaPT": "selfprompt.methods.gapt",
    "IPT": "selfprompt.methods.ipt",
    "LoRA": "selfprompt.methods.lora",
    "PromptedViT": "selfprompt.methods.prompt",
    "PromptedViTConfig": "selfprompt.methods.prompt",
    "PromptSettings": "selfprompt.methods.prompt",
    "SSF": "selfprompt.methods.ssf",
    "VFPT": "selfprompt.methods.vfpt",
    "ClassifierConfig": "selfprompt.model",
    "ViTClassifier": "selfprompt.model",
}

__all__ = [
    "APT",
    "BPT",
    "CVPT",
    "E2VPT",
    "IPT",
    "SSF",
    "VFPT",
    "AdaptFormer",
    "BitFit",
    "ClassifierConfig",
    "CondensedViT",
    "GaPT",
    "LoRA",
    "PromptSettings",
    "PromptedViT",
    "PromptedViTConfig",
    "ViTClassifier",
    "__version__",
    "available_initializers",
    "get_method",
    "get_model",
    "init_prompts",
    "load_pretrained",
    "method_names",
    "register_initializer",
    "register_method",
]


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first access (then kept here)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'selfprompt' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _ZooAfterTimm:
    """A ``sys.meta_path`` finder that finds nothing of its own: on the first import of ``timm`` it removes
    itself and has timm's loader register selfprompt's zoo once timm has loaded."""

    @classmethod
    def find_spec(cls, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "timm":
            return None
        if cls in sys.meta_path:
            sys.meta_path.remove(cls)
        spec = importlib.util.find_spec(name)  # the ordinary finders' spec
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterZoo(spec.loader)
        return spec


class _RegisterZoo:
    """timm's own loader, then :mod:`selfprompt.zoo.models` (its ``register_model`` calls need timm)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self.loader  # timm's own, as if never wrapped
        importlib.import_module("selfprompt.zoo.models")


if "timm" in sys.modules:
    importlib.import_module("selfprompt.zoo.models")
elif _ZooAfterTimm not in sys.meta_path:
    sys.meta_path.insert(0, _ZooAfterTimm)
