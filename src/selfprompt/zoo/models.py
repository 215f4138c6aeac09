"""timm registrations of the zoo's architectures and pretrained tags, so ``timm.create_model`` finds them.

``timm.create_model("vit_mini_patch4_32.mae_fmnist", pretrained=True)`` loads the weights shipped in
``selfprompt/zoo/weights`` (no network), exactly as timm loads any local pretrained file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

WEIGHTS_DIR = Path(__file__).parent / "weights"
# the pixels the zoo was pretrained on: gray images repeated to RGB, scaled to [-1, 1]
MEAN = STD = (0.5, 0.5, 0.5)


def _cfg(tag_name: str, **kwargs: Any) -> dict[str, Any]:
    return {
        "file": str(WEIGHTS_DIR / f"{tag_name}.safetensors"),
        "num_classes": 0,
        "input_size": (3, 32, 32),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": MEAN,
        "std": STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


ZOO_TAGS = ("vit_mini_patch4_32.mae_fmnist", "vit_mini_patch4_32.sup_fmnist")
default_cfgs = generate_default_cfgs({name: _cfg(name) for name in ZOO_TAGS})


@register_model
def vit_mini_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Mini: 32x32 inputs, 4x4 patches (64 tokens + class token), width 128, 6 blocks, 4 heads (1.2 M
    parameters); the architecture of selfprompt's offline zoo."""
    args = dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4)
    return build_model_with_cfg(
        VisionTransformer,
        "vit_mini_patch4_32",
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **dict(args, **kwargs),
    )
