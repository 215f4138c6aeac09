"""selfprompt: Self-Prompt Tuning (SPT), visual prompt tuning and other PETL methods for timm Vision
Transformers."""

from selfprompt._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()

from selfprompt.engine.build import get_model  # noqa: E402
from selfprompt.init import available_initializers, init_prompts, register_initializer  # noqa: E402
from selfprompt.methods import get_method, load_pretrained, method_names, register_method  # noqa: E402
from selfprompt.methods.prompt import PromptedViT, PromptedViTConfig, PromptSettings  # noqa: E402
from selfprompt.model import ClassifierConfig, ViTClassifier  # noqa: E402
from selfprompt.version import __version__  # noqa: E402
from selfprompt.zoo import models as _zoo_models  # noqa: E402, F401  (registers the zoo with timm)

__all__ = [
    "ClassifierConfig",
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
