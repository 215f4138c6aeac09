"""selfprompt: Self-Prompt Tuning (SPT), visual prompt tuning and other PETL methods for timm Vision
Transformers."""

from selfprompt._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()

from selfprompt.engine.build import get_model  # noqa: E402
from selfprompt.init import available_initializers, init_prompts, register_initializer  # noqa: E402
from selfprompt.methods import get_method, load_pretrained, method_names, register_method  # noqa: E402
from selfprompt.methods.adaptformer import AdaptFormer  # noqa: E402
from selfprompt.methods.bitfit import BitFit  # noqa: E402
from selfprompt.methods.condensation import CondensedViT  # noqa: E402
from selfprompt.methods.cvpt import CVPT  # noqa: E402
from selfprompt.methods.e2vpt import E2VPT  # noqa: E402
from selfprompt.methods.gapt import GaPT  # noqa: E402
from selfprompt.methods.ipt import IPT  # noqa: E402
from selfprompt.methods.lora import LoRA  # noqa: E402
from selfprompt.methods.prompt import PromptedViT, PromptedViTConfig, PromptSettings  # noqa: E402
from selfprompt.methods.ssf import SSF  # noqa: E402
from selfprompt.methods.vfpt import VFPT  # noqa: E402
from selfprompt.model import ClassifierConfig, ViTClassifier  # noqa: E402
from selfprompt.version import __version__  # noqa: E402
from selfprompt.zoo import models as _zoo_models  # noqa: E402, F401  (registers the zoo with timm)

__all__ = [
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
