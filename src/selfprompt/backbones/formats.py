"""Checkpoint layouts of the ViTs users bring, each recognised from its keys and turned into timm's keys.

A converter takes what ``torch.load`` (or safetensors) returned and gives back a :class:`Converted` (a
timm ``VisionTransformer`` state dict plus what was dropped on purpose), or None when the layout is not its
own. :func:`convert` tries them in order. Layouts, as the official code saves them:

- MAE pretraining (facebookresearch/mae ``main_pretrain.py``): ``{"model": ...}`` with the encoder under
  timm's names plus ``mask_token`` and ``decoder_*`` (the released encoder-only files have neither: a
  ``model`` dict without ``head``/``fc_norm`` is read as MAE pretraining too).
- MAE fine-tuning (``main_finetune.py``, global pool): ``{"model": ...}`` with ``fc_norm`` instead of
  ``norm`` and a ``head``: built with ``global_pool="avg"``.
- MoCo v3 pretraining (``main_moco.py``): ``{"state_dict": ...}`` with ``module.base_encoder.*`` (its
  ``head`` is the projector MLP), ``module.momentum_encoder.*`` and ``module.predictor.*``.
- MoCo v3 linear probe (``main_lincls.py``): ``{"state_dict": ...}`` with ``module.*`` and a 1000-class head.
- DINO full checkpoint (``main_dino.py``): ``{"student", "teacher", ...}``, the teacher's encoder under
  ``backbone.`` (``module.backbone.`` for a DDP student) beside its DINO ``head``; the teacher is used, as
  in DINO's own evaluation scripts. DINO's released backbone-only files are plain timm-layout dicts.
- timm: a plain state dict (``.pth``/``.bin``/``.safetensors``), possibly under ``model``/``state_dict``
  or with a ``module.`` prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

Tensors = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the problem and the fix."""


@dataclass
class Converted:
    """A checkpoint in timm's layout.

    Attributes:
        state_dict: The encoder's tensors under timm ``VisionTransformer`` names.
        format: The layout it was read as (human readable).
        family: The pretraining it comes from (mae, moco, dino), None when the layout does not say.
        dropped: Keys left out on purpose (heads, projectors, decoders, momentum encoders).
        model_kwargs: ``timm.create_model`` arguments the layout needs (MAE fine-tuning: ``global_pool``).
    """

    state_dict: Tensors
    format: str
    family: str | None = None
    dropped: list[str] = field(default_factory=list)
    model_kwargs: dict[str, Any] = field(default_factory=dict)


HEAD_PREFIXES = ("head.", "head_dist.")  # classifiers (and projectors) that a num_classes=0 backbone lacks


def _split(
    tensors: Mapping[str, Any], prefix: str, drop: Callable[[str], bool] = lambda k: False
) -> tuple[Tensors, list[str]]:
    """Keys under ``prefix`` (stripped) that ``drop`` keeps; every other key is returned as dropped."""
    kept, dropped = {}, []
    for key, value in tensors.items():
        name = key[len(prefix) :] if key.startswith(prefix) else None
        if name is None or drop(name) or not isinstance(value, torch.Tensor):
            dropped.append(key)
        else:
            kept[name] = value
    return kept, dropped


def _is_head(key: str) -> bool:
    return key.startswith(HEAD_PREFIXES)


def _tensor_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values())


def mae_pretraining(ckpt: Mapping[str, Any]) -> Converted | None:
    model = ckpt.get("model")
    if not _tensor_dict(model) or "head.weight" in model or "fc_norm.weight" in model:
        return None
    if "norm.weight" not in model and not any(k.startswith("decoder_") for k in model):
        return None
    tensors, dropped = _split(model, "", lambda k: k == "mask_token" or k.startswith("decoder_"))
    return Converted(tensors, "MAE pretraining", "mae", dropped)


def mae_finetuning(ckpt: Mapping[str, Any]) -> Converted | None:
    model = ckpt.get("model")
    if not _tensor_dict(model) or "fc_norm.weight" not in model or "norm.weight" in model:
        return None
    tensors, dropped = _split(model, "", _is_head)
    return Converted(tensors, "MAE fine-tuning", "mae", dropped, {"global_pool": "avg"})


def moco_v3_pretraining(ckpt: Mapping[str, Any]) -> Converted | None:
    state = ckpt.get("state_dict")
    if not _tensor_dict(state) or not any(k.startswith("module.base_encoder.") for k in state):
        return None
    tensors, dropped = _split(state, "module.base_encoder.", _is_head)  # head: the projector MLP
    return Converted(tensors, "MoCo v3 pretraining", "moco", dropped)


def moco_v3_linear(ckpt: Mapping[str, Any]) -> Converted | None:
    state = ckpt.get("state_dict")
    if not _tensor_dict(state) or "module.cls_token" not in state or "module.head.weight" not in state:
        return None
    tensors, dropped = _split(state, "module.", _is_head)
    return Converted(tensors, "MoCo v3 linear probe", "moco", dropped)


def dino_full(ckpt: Mapping[str, Any]) -> Converted | None:
    teacher = ckpt.get("teacher")
    if not _tensor_dict(teacher) or "student" not in ckpt:
        return None
    prefix = "module.backbone." if any(k.startswith("module.backbone.") for k in teacher) else "backbone."
    tensors, dropped = _split(teacher, prefix)
    dropped = [f"teacher.{k}" for k in dropped] + [f"student.{k}" for k in ckpt["student"]]
    return Converted(tensors, "DINO full checkpoint (teacher)", "dino", dropped)


def timm_state_dict(ckpt: Mapping[str, Any]) -> Converted | None:
    for wrapper in ("model", "state_dict"):
        if _tensor_dict(ckpt.get(wrapper)):
            ckpt = ckpt[wrapper]
            break
    if not _tensor_dict(ckpt):
        return None
    prefix = "module." if all(k.startswith("module.") for k in ckpt) else ""
    tensors, dropped = _split(ckpt, prefix, _is_head)
    kwargs = {"global_pool": "avg"} if "fc_norm.weight" in tensors and "norm.weight" not in tensors else {}
    return Converted(tensors, "timm state dict", None, dropped, kwargs)


CONVERTERS: tuple[Callable[[Mapping[str, Any]], Converted | None], ...] = (
    mae_pretraining,
    mae_finetuning,
    moco_v3_pretraining,
    moco_v3_linear,
    dino_full,
    timm_state_dict,
)


def convert(ckpt: Mapping[str, Any], source: str = "the checkpoint") -> Converted:
    """The first converter that recognises ``ckpt``; a non-ViT layout is an error that says so."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source} holds a {type(ckpt).__name__}, not a state dict.")
    for converter in CONVERTERS:
        converted = converter(ckpt)
        if converted is not None:
            break
    else:
        raise CheckpointError(
            f"{source} holds no tensors under a known layout (top-level keys: {sorted(ckpt)[:8]}); expected "
            f"a timm/MAE/MoCo v3/DINO ViT checkpoint."
        )
    if "patch_embed.proj.weight" not in converted.state_dict:
        sample = sorted(converted.state_dict)[:5]
        raise CheckpointError(
            f"{source} is not a Vision Transformer checkpoint: read as {converted.format}, it has no "
            f"patch_embed.proj.weight (keys such as {sample}). selfprompt prompts timm VisionTransformer "
            f"backbones; a ResNet or other convolutional model cannot be used."
        )
    return converted
