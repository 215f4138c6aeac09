"""One call for every backbone: a timm name with its pretrained tag (hub, cache or selfprompt's zoo), or a
weights file in any layout of :mod:`selfprompt.backbones.formats`, with the weights' origin and licence."""

from __future__ import annotations

import difflib
import logging
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from selfprompt.backbones.family import BACKBONE_FAMILIES, backbone_family_refusal
from selfprompt.backbones.formats import CheckpointError, convert
from selfprompt.backbones.loading import infer_architecture, load_strict, read_checkpoint

import numpy
import timm
import torch
from huggingface_hub import constants as hub_constants
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer

log = logging.getLogger(__name__)
INFO_ATTRIBUTE = "selfprompt_info"
TRAINING_ONLY = ("drop_path_rate", "drop_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate")
WRAPPERS = ("module", "base_encoder", "backbone", "teacher")  # prefixes that group nothing by themselves
HF_HUB = "hf-hub:"  # timm's prefix of a model read from a Hugging Face Hub repo (config.json + weights)


@dataclass(frozen=True)
class Family:
    """What a pretraining method implies for its weights.

    Attributes:
        license: The weights' licence, as their repository states it.
        pool: The head input it expects (``mae``: SPT's MAE path), None for the backbone's own pooling.
        mean, std: The normalisation it was pretrained with.
    """

    license: str
    pool: str | None = None
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD


# licences: facebookresearch/mae LICENSE and moco-v3 README (CC-BY-NC 4.0); DINO as timm's .dino tags state
FAMILIES = {
    "mae": Family("cc-by-nc-4.0", pool="mae"),
    "moco": Family("cc-by-nc-4.0"),
    "dino": Family("apache-2.0"),
}


@dataclass
class BackboneInfo:
    """Where a backbone's weights came from, recorded with every run and adapter.

    Attributes:
        name: The timm name it was built as (inferred from the checkpoint when none was given).
        license: The weights' licence (timm's pretrained config, or the family's for a file), or unknown.
        family: mae, moco or dino when known, else None.
        pool: The family's head input (``mae`` for MAE); None follows the backbone's own pooling.
        checkpoint: The weights file, None for timm's own weights (hub, cache or zoo) or random ones.
        format: How the weights were read (e.g. ``MoCo v3 pretraining``), ``timm`` or ``random``.
        dropped: Checkpoint keys left out on purpose (heads, projectors, decoders), counted by prefix.
        load: ``{"loaded", "missing", "unexpected", "resampled"}`` of a file load.
        kwargs: The ``timm.create_model`` arguments that shaped it (``img_size``, ...; not the training-only
            drop rates), which rebuild it from ``name`` (saved with adapters).
    """

    name: str | None
    license: str = "unknown"
    family: str | None = None
    pool: str | None = None
    checkpoint: str | None = None
    format: str = "timm"
    dropped: dict[str, int] = field(default_factory=dict)
    load: dict[str, Any] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def adapter_name(self) -> str | None:
        """The name saved with adapters: the timm name, plus the weights file when one was given."""
        if self.checkpoint is None:
            return self.name
        return f"{self.name}+{Path(self.checkpoint).name}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        where = f"{self.checkpoint} ({self.format})" if self.checkpoint else self.format
        text = f"backbone {self.name} from {where}, family {self.family or 'unknown'}, licence {self.license}"
        if self.load is not None:
            text += f"; {self.load['loaded']} tensors loaded, missing none, unexpected none"
            if self.load["resampled"]:
                text += f", resampled {self.load['resampled']}"
        if self.dropped:
            text += "; dropped on purpose: " + ", ".join(f"{k} ({n})" for k, n in self.dropped.items())
        return text


def backbone_info(backbone: torch.nn.Module) -> BackboneInfo:
    """The :class:`BackboneInfo` of a backbone from :func:`create_backbone`; for one made otherwise, what its
    timm pretrained config says."""
    info = getattr(backbone, INFO_ATTRIBUTE, None)
    if info is not None:
        return info
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    name = f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("tag") else cfg.get("architecture")
    name = hub_name(backbone) or name
    family = tag_family(name)
    return BackboneInfo(name, cfg.get("license") or "unknown", family, _family_pool(family))


def hub_name(backbone: torch.nn.Module) -> str | None:
    """``hf-hub:org/name`` for a backbone timm created from a Hub repo (``create_model("hf-hub:org/name")``),
    the name it is created again by; None for any other."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return f"{HF_HUB}{cfg['hf_hub_id']}" if cfg.get("source") == "hf-hub" and cfg.get("hf_hub_id") else None


def tag_family(name: str | None) -> str | None:
    """mae or dino for a timm name whose pretrained tag says so (``.mae``, ``.mae_fmnist``, ``.dino``)."""
    tag = (name or "").partition(".")[2]
    return next((f for f in ("mae", "dino") if tag == f or tag.startswith(f"{f}_")), None)


def _family_pool(family: str | None) -> str | None:
    return FAMILIES[family].pool if family in FAMILIES else None


def create_backbone(
    name: str | None = None,
    checkpoint: str | Path | None = None,
    *,
    pretrained: bool = True,
    **kwargs: Any,
) -> VisionTransformer:
    """A timm backbone of a supported family (ViT, Eva, Beit, Swin: :mod:`selfprompt.backbones.family`)
    without its classifier (``num_classes=0``), from a name, a weights file (ViTs), or both.

    Args:
        name: timm ``architecture.tag`` (``vit_base_patch16_224.mae``, ``.augreg_in21k``, a zoo name).
            With a checkpoint it names the architecture (and, for a plain timm file, whose weights these
            are); None infers it from the checkpoint's shapes (timm's standard ViT widths).
        checkpoint: A weights file: timm ``.pth``/``.safetensors``, MAE, MoCo v3 or DINO checkpoints, or a
            JAX ``.npz``; the layout is recognised from its keys. None loads timm's pretrained weights
            (local cache or zoo offline, the hub online) when ``pretrained``, else random ones.
        pretrained: Load timm's weights for ``name`` (ignored with a checkpoint).
        **kwargs: More ``timm.create_model`` arguments (``img_size``, ``drop_path_rate``, ...).

    The result's :func:`backbone_info` tells where its weights came from, their licence and the load report;
    its ``pretrained_cfg`` carries the normalisation the weights expect (ImageNet for MAE, MoCo v3 and
    DINO files). Raises :class:`CheckpointError` (a ValueError) for a file that does not fit.
    """
    if checkpoint is None:
        if name is None:
            raise ValueError("Give a timm name (e.g. vit_base_patch16_224.mae) or a checkpoint file.")
        model = _create(name, pretrained, kwargs)
        info = backbone_info(model)
        if not pretrained:
            info.format, info.license = "random", "n/a (random weights)"
    else:
        model, info = _from_file(name, Path(checkpoint), kwargs)
    info.kwargs = {k: v for k, v in kwargs.items() if k not in TRAINING_ONLY}
    setattr(model, INFO_ATTRIBUTE, info)
    log.info(info.describe())
    return model


def _from_file(
    name: str | None, path: Path, kwargs: dict[str, Any]
) -> tuple[VisionTransformer, BackboneInfo]:
    if not path.is_file():
        raise FileNotFoundError(
            f"Backbone checkpoint {path} does not exist; pass --model.checkpoint PATH, a local weights file."
        )
    if path.suffix == ".npz":
        return _from_npz(name, path, kwargs)
    converted = convert(read_checkpoint(path), str(path))
    named = name is not None
    if name is None:
        name, inferred = infer_architecture(converted.state_dict, converted.family, str(path))
        kwargs = inferred | kwargs
    model = _create(name, False, converted.model_kwargs | kwargs)
    report = load_strict(model, converted.state_dict, str(path))
    family = converted.family or (tag_family(name) if named else None)
    license = _file_license(family, model, named and "." in name)
    dropped = dict(Counter(_group(k) for k in converted.dropped))
    pool = _family_pool(family)
    info = BackboneInfo(name, license, family, pool, str(path), converted.format, dropped, report)
    _bind_preprocessing(model, family, license, path)
    return model, info


def _from_npz(name: str | None, path: Path, kwargs: dict[str, Any]) -> tuple[VisionTransformer, BackboneInfo]:
    if name is None:
        raise CheckpointError(
            f"A JAX .npz ({path}) does not say its architecture: pass --model.backbone, e.g. "
            f"vit_base_patch16_224.augreg_in21k."
        )
    model = _create(name, False, kwargs)
    try:
        with numpy.load(path) as arrays:
            blocks = {m[1] for key in arrays.files if (m := re.search(r"encoderblock_(\d+)/", key))}
            stacked = [k for k in arrays.files if k.endswith("Transformer/encoderblock/LayerNorm_0/scale")]
            depth = len(arrays[stacked[0]]) if stacked else len(blocks)  # big_vision stacks its blocks
    except Exception as error:
        raise CheckpointError(
            f"Cannot read {path} as a .npz ({error}): the file is truncated or corrupt."
        ) from error
    if depth != len(model.blocks):  # timm's loader would ignore extra blocks silently
        raise CheckpointError(
            f"{path} has {depth} encoder blocks, {name} {len(model.blocks)}: pick a --model.backbone "
            f"(or --model.backbone_kwargs depth) of the checkpoint's architecture."
        )
    try:
        model.load_pretrained(str(path))  # timm's loader of the original JAX checkpoints
    except Exception as error:
        raise CheckpointError(
            f"timm's JAX loader could not read {path} into {name} ({type(error).__name__}: {error}); check "
            f"that --model.backbone names the checkpoint's architecture."
        ) from error
    family = tag_family(name)
    license = _file_license(family, model, "." in name)
    report = {"loaded": len(model.state_dict()), "missing": [], "unexpected": [], "resampled": None}
    info = BackboneInfo(name, license, family, _family_pool(family), str(path), "JAX .npz", {}, report)
    _bind_preprocessing(model, family, license, path)
    return model, info


def _file_license(family: str | None, model: VisionTransformer, tagged: bool) -> str:
    """The family's licence; for a plain file named by its timm tag, that tag's; else unknown."""
    if family in FAMILIES:
        return FAMILIES[family].license
    return (model.pretrained_cfg.get("license") if tagged else None) or "unknown"


def _bind_preprocessing(model: VisionTransformer, family: str | None, license: str, path: Path) -> None:
    """Record the file and its licence (and the family's normalisation) in the model's pretrained config,
    which data transforms read."""
    cfg = dict(model.pretrained_cfg, file=str(path), source="file", license=license)
    if family in FAMILIES:
        cfg |= {"mean": FAMILIES[family].mean, "std": FAMILIES[family].std}
    model.pretrained_cfg = model.default_cfg = cfg


def _group(key: str) -> str:
    """A dropped key's group in the report, past DDP and wrapper prefixes: ``module.base_encoder.head``."""
    parts = key.split(".")
    depth = next(i for i, part in enumerate(parts) if part not in WRAPPERS or i == len(parts) - 1)
    return ".".join(parts[: depth + 1])


def _create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> VisionTransformer:
    architecture = name.split(".")[0]
    if not name.startswith(HF_HUB) and not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=5, cutoff=0.5)
        raise ValueError(f"Unknown backbone {name!r} (timm {timm.__version__}); closest names: {close}")
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)  # random weights (no pretrained ones, new layers) are the same everywhere
            model = timm.create_model(name, pretrained=pretrained, **dict(kwargs, num_classes=0))
    except (OSError, RuntimeError) as error:
        if name.startswith(HF_HUB) and isinstance(error, OSError):  # even pretrained=False reads config.json
            raise RuntimeError(_hub_unreadable(name, error)) from error
        if not pretrained:
            raise
        raise RuntimeError(
            f"Could not load pretrained weights for {name!r} ({error}). Offline, pick a backbone that ships "
            f"with selfprompt (--model.backbone vit_mini_patch4_32.sup_fmnist; selfprompt zoo list), point "
            f"--model.checkpoint at a local weights file, or use --model.pretrained false for random weights."
        ) from error
    if not any(isinstance(model, family.model_class) for family in BACKBONE_FAMILIES):
        raise TypeError(f"{name} is a {type(model).__name__}; {backbone_family_refusal(model)}")
    return model


def _hub_unreadable(name: str, error: OSError) -> str:
    """Why timm could not read ``hf-hub:org/name[@revision]`` (huggingface_hub's OSErrors: not in the cache
    offline, no such repo, no network) and what to do."""
    repo = name[len(HF_HUB) :].split("@")[0]
    offline = " while HF_HUB_OFFLINE=1 forbids downloading it" if hub_constants.is_offline_mode() else ""
    return (
        f"Could not read the backbone {name} from the Hugging Face Hub or its cache "
        f"({hub_constants.HF_HUB_CACHE}){offline} ({type(error).__name__}: {error}): download the repo "
        f"once online (`hf download {repo}`), or point --model.checkpoint at a local weights file."
    )
