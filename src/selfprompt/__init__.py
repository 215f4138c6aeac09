"""selfprompt: Self-Prompt Tuning (SPT) and visual prompt tuning for timm Vision Transformers."""

from selfprompt._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()

from selfprompt.init import available_initializers, init_prompts, register_initializer  # noqa: E402
from selfprompt.model import PromptedViT, PromptedViTConfig  # noqa: E402
from selfprompt.version import __version__  # noqa: E402

__all__ = [
    "PromptedViT",
    "PromptedViTConfig",
    "__version__",
    "available_initializers",
    "init_prompts",
    "register_initializer",
]
