import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import selfprompt  # noqa: F401  (before timm: makes torchvision importable on CPU-only torch)
from selfprompt.data import vtab_mini

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


@contextlib.contextmanager
def small_vtab_mini(train: int = 128, val: int = 64, test: int = 128):
    """VTAB-mini tasks prepared by the real code with fewer images per split (the list files keep VTAB-1k's
    names, the manifest records the smaller counts): for tests of what runs on a task, not of its sizes."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("TRAIN", train), ("VAL", val), ("MAX_TEST", test), ("MIN_TEST", test)):
            patch.setattr(vtab_mini, name, value)
        yield
