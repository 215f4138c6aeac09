import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import selfprompt  # noqa: F401  (before timm: makes torchvision importable on CPU-only torch)

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

# "Starts equal to the backbone" within float32 rounding: two forwards of the same tiny ViT in one process
# were seen to differ by 7e-8 (the first test of a full run), so exact equality of two passes is not asserted.
FP32_ATOL = 1e-6
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0)


def tiny_vit(seed: int = 0, **overrides) -> VisionTransformer:
    """A random 32x32, patch-4 ViT (8x8 = 64 patch tokens); the same seed gives the same weights."""
    torch.manual_seed(seed)
    kwargs = {**TINY, "num_classes": 0, **overrides}
    return VisionTransformer(**kwargs).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
