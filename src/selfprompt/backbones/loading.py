"""Reading a weights file, inferring the ViT it fits, and loading it with nothing left out silently."""

from __future__ import annotations

import argparse
import math
import pickle
import re
from pathlib import Path
from typing import Any

from selfprompt.backbones.formats import CheckpointError, Tensors

import timm
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import nn

TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt")
# timm's standard widths: size name, heads and depth of its vit_<size>_* models
WIDTHS = {192: ("tiny", 3, 12), 384: ("small", 6, 12), 768: ("base", 12, 12), 1024: ("large", 16, 24)}
WIDTHS[1280] = ("huge", 16, 32)


def read_checkpoint(path: Path) -> Any:
    """What a ``.safetensors`` or torch file holds; a truncated or foreign file is a clear error.

    Torch files are read with ``weights_only=True`` (no code runs); ``argparse.Namespace``, which MAE and
    DINO save beside the weights, is allowed.
    """
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" not in str(error):
            raise _unreadable(path, error) from error
        raise CheckpointError(
            f"{path} holds Python objects besides tensors, which selfprompt does not unpickle ({error}). If "
            f"you trust the file, keep its state dict: torch.save(torch.load(PATH, weights_only=False)"
            f"['model'], 'weights.pth') (or ['state_dict'], ['teacher']), and pass that file."
        ) from error
    except Exception as error:  # torch and safetensors raise many types for a damaged file
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"Cannot read {path} ({type(error).__name__}: {error}). The file is truncated, corrupt or not a "
        f"checkpoint (.pth/.pt/.tar/.bin, .safetensors, or a JAX .npz): download it again."
    )


def describe_shapes(state: Tensors) -> dict[str, Any]:
    """embed_dim, depth, patch_size, grid, prefix tokens and img_size read from a ViT state dict."""
    proj = state["patch_embed.proj.weight"]
    depth = 1 + max((int(m[1]) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    prefix = int("cls_token" in state) + (state["reg_token"].shape[1] if "reg_token" in state else 0)
    found = {"embed_dim": proj.shape[0], "depth": depth, "patch_size": proj.shape[-1], "prefix": prefix}
    if "pos_embed" in state:
        tokens = state["pos_embed"].shape[1]
        side = math.isqrt(tokens - prefix)
        side = side if side * side == tokens - prefix else math.isqrt(tokens)  # no_embed_class layouts
        found |= {"grid": side, "img_size": side * proj.shape[-1]}
    return found


def infer_architecture(state: Tensors, family: str | None, source: str) -> tuple[str, dict[str, Any]]:
    """A timm name and kwargs that fit ``state``'s shapes, for timm's standard widths; else an error that
    says which arguments to give."""
    shapes = describe_shapes(state)
    size = WIDTHS.get(shapes["embed_dim"])
    name = size and f"vit_{size[0]}_patch{shapes['patch_size']}_{shapes.get('img_size', 224)}"
    if size is None or shapes["prefix"] != 1 or not timm.is_model(name):
        raise CheckpointError(
            f"Cannot infer the architecture of {source} ({_shape_text(shapes)}): pass the timm name, e.g. "
            f"--model.backbone vit_base_patch16_224, with --model.backbone_kwargs for what differs from it "
            f"(embed_dim, depth, num_heads, patch_size, img_size)."
        )
    kwargs: dict[str, Any] = {}
    if shapes["depth"] != size[2]:
        kwargs["depth"] = shapes["depth"]
    if family == "moco" and size[0] == "small":
        kwargs["num_heads"] = 12  # MoCo v3's ViT-Small has 12 heads, timm's 6 (MoCo v3 README)
    return name, kwargs


def _shape_text(shapes: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in shapes.items())


def load_strict(model: nn.Module, state: Tensors, source: str) -> dict[str, Any]:
    """Copy ``state`` into ``model``; every model tensor must be there with its shape, and nothing else.

    A position embedding for another grid is resampled with timm's ``resample_abs_pos_embed``. Returns
    ``{"loaded", "missing", "unexpected", "resampled"}``; missing and unexpected are empty (either is an
    error), and are kept so that every load reports them.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit the {type(model).__name__} built for it: missing {_few(missing)}, "
            f"unexpected {_few(unexpected)}. The checkpoint has {_shape_text(describe_shapes(state))}; pick "
            f"a --model.backbone (and --model.backbone_kwargs) of that architecture."
        )
    state = dict(state)
    resampled = None
    for key, target in expected.items():
        value = state[key]
        if value.shape == target.shape:
            continue
        if key == "pos_embed" and value.shape[-1] == target.shape[-1]:
            state[key] = _resample(model, value)
            resampled = f"pos_embed {tuple(value.shape)} -> {tuple(target.shape)}"
            continue
        raise CheckpointError(
            f"{source}: tensor {key} has shape {tuple(value.shape)} in the checkpoint but "
            f"{tuple(target.shape)} in the model. The checkpoint has {_shape_text(describe_shapes(state))}; "
            f"pick a --model.backbone (and --model.backbone_kwargs) of that architecture."
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return {"loaded": len(state), "missing": missing, "unexpected": unexpected, "resampled": resampled}


def _resample(model: nn.Module, pos_embed: torch.Tensor) -> torch.Tensor:
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    return resample_abs_pos_embed(
        pos_embed, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix, verbose=False
    )


def _few(keys: list[str], n: int = 6) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")
