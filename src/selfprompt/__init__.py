"""selfprompt: Self-Prompt Tuning (SPT) and visual prompt tuning for timm Vision Transformers."""

from selfprompt._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()

from selfprompt.checkpoint import load_adapter as load_pretrained  # noqa: E402
from selfprompt.init import available_initializers, init_prompts, register_initializer  # noqa: E402
from selfprompt.model import ClassifierConfig, PromptedViT, PromptedViTConfig, ViTClassifier  # noqa: E402
from selfprompt.version import __version__  # noqa: E402
from selfprompt.zoo import models as _zoo_models  # noqa: E402, F401  (registers the zoo with timm)

__all__ = [
    "ClassifierConfig",
    "PromptedViT",
    "PromptedViTConfig",
    "ViTClassifier",
    "__version__",
    "available_initializers",
    "init_prompts",
    "load_pretrained",
    "register_initializer",
]
