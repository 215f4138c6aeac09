"""The adapter format: the trained tensors as safetensors and what rebuilds them as JSON, written atomically.

An adapter folder holds ``adapter.safetensors`` (what trains: prompts, head, biases, ...),
``adapter_config.json`` and ``README.md`` (its model card, :mod:`selfprompt.card`, a view of the config). The
config holds the format version, the model class, its constructor settings, the backbone's signature and its
weights' fingerprint (both checked on load), the weights' origin, licence and creation arguments, library
versions and the task (:class:`TaskInfo`: ``id2label``, ``preprocessing``, ``training``), so that the folder
alone classifies images as its run did. A tensor holding NaN or Inf is refused both ways
(:func:`check_finite`): it is never written, and one written elsewhere is never loaded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from selfprompt.atomic import atomic_write, write_json
from selfprompt.backbones import BACKBONE_FAMILIES, backbone_family, backbone_info
from selfprompt.backbones.create import hub_name
from selfprompt.version import __version__

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1
CARD_NAME = "README.md"
SIGNATURE_KEYS = ("name", "embed_dim", "depth", "patch_size", "num_prefix_tokens")
PREPROCESSING_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct")
_REWRITE = "the adapter folder is damaged: save the adapter again (or copy it again from the trained run)."
_DIVERGED = "retrain with a lower learning rate (optim.lr) or with optim.grad_clip set"


@dataclass
class TaskInfo:
    """What an adapter carries besides its tensors and settings, so that its folder alone classifies images as
    its run did (saved in ``adapter_config.json``; every field optional, as adapters of earlier releases lack
    them).

    Attributes:
        labels: The class names in the head's order (saved as ``id2label``); None: ``class_<i>``.
        preprocessing: The eval preprocessing it was trained with, in timm's data-config keys
            (:data:`PREPROCESSING_KEYS`: ``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``);
            None: the backbone's pretrained config.
        training: How it was trained (method, dataset, data fingerprint, stage, seed, accuracy, command), as
            ``selfprompt train`` records it for the model card; None otherwise.
    """

    labels: list[str] | None = None
    preprocessing: dict[str, Any] | None = None
    training: dict[str, Any] | None = None

    def check(self, num_classes: int, where: str) -> None:
        """Refuse labels that do not name each of ``num_classes`` classes once, and preprocessing without
        timm's keys (``where``: the file or call that holds them)."""
        if self.labels is not None:
            if len(self.labels) != num_classes or not all(isinstance(c, str) for c in self.labels):
                raise ValueError(
                    f"{where}: the labels name {len(self.labels)} classes, the head has {num_classes}: give "
                    f"one class name (a string) per output, in label order."
                )
            if len(set(self.labels)) != len(self.labels):
                twice = sorted({c for c in self.labels if self.labels.count(c) > 1})
                raise ValueError(f"{where}: the labels name {twice} more than once; class names are unique.")
        if self.preprocessing is not None:
            missing = [key for key in PREPROCESSING_KEYS if key not in self.preprocessing]
            if missing:
                raise ValueError(
                    f"{where}: the preprocessing lacks {missing} (it takes timm's data-config keys "
                    f"{list(PREPROCESSING_KEYS)}, e.g. from selfprompt.data.data_config(backbone))."
                )

    def to_config(self) -> dict[str, Any]:
        """Its keys of ``adapter_config.json`` (only those set)."""
        config: dict[str, Any] = {}
        if self.labels is not None:
            config["id2label"] = {str(i): name for i, name in enumerate(self.labels)}
        if self.preprocessing is not None:
            config["preprocessing"] = json.loads(
                json.dumps({k: self.preprocessing[k] for k in PREPROCESSING_KEYS})
            )
        if self.training is not None:
            config["training"] = json.loads(json.dumps(self.training))
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TaskInfo:
        """The task of an adapter config (:func:`read_config` checked its kinds)."""
        id2label = config.get("id2label")
        labels = [id2label[str(i)] for i in range(len(id2label))] if id2label is not None else None
        return cls(labels, config.get("preprocessing"), config.get("training"))


def timm_name(backbone: nn.Module) -> str | None:
    """timm's ``architecture.tag`` name of a backbone (``hf-hub:org/name`` for one from a Hub repo), or None
    for a hand-built one."""
    if (hub := hub_name(backbone)) is not None:
        return hub
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch:
        return None
    return f"{arch}.{cfg['tag']}" if cfg.get("tag") else arch


def backbone_signature(backbone: VisionTransformer, name: str | None) -> dict[str, Any]:
    """The backbone properties an adapter depends on; saved with it and checked on load."""
    return {
        "name": name,
        "embed_dim": backbone.embed_dim,
        "depth": len(backbone_family(backbone).blocks(backbone)),
        "patch_size": list(backbone.patch_embed.patch_size),
        "num_prefix_tokens": getattr(backbone, "num_prefix_tokens", 0),
    }


def weights_fingerprint(backbone: nn.Module) -> dict[str, Any]:
    """What tells the backbone's weights apart: the SHA-256 of three of its tensors (the first, middle and
    last parameter of two or more dimensions in the module's order: class token or position embedding, a
    mid-depth matrix, the last block's MLP), as float32 bytes, so the same weights give the same fingerprint
    on any machine and device; a random initialisation never does. Saved with an adapter, compared on load."""
    names = [name for name, p in backbone.named_parameters() if p.ndim >= 2]
    picked = list(dict.fromkeys([names[0], names[len(names) // 2], names[-1]])) if names else []
    return {"tensors": picked, "sha256": _digest(backbone, picked)}


def _digest(backbone: nn.Module, names: list[str]) -> str | None:
    """The SHA-256 of the tensors ``names`` of ``backbone`` (names, shapes, float32 bytes); None when one is
    missing."""
    params = dict(backbone.named_parameters())
    digest = hashlib.sha256()
    for name in names:
        if name not in params:
            return None
        tensor = params[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def brings_weights(record: dict[str, Any], held: Collection[str]) -> bool:
    """Whether an adapter holding the tensors ``held`` brings the fingerprinted backbone tensors itself (full
    fine-tuning): then the backbone it is loaded onto does not matter, and its record is the one it started
    from."""
    return any(f"backbone.{name}" in held for name in record["tensors"])


def check_fingerprint(record: dict[str, Any], backbone: nn.Module, directory: Path) -> None:
    """Refuse a backbone whose weights are not those the adapter was trained on (its recorded fingerprint,
    :func:`weights_fingerprint`)."""
    if _digest(backbone, record["tensors"]) != record["sha256"]:
        raise ValueError(
            f"The backbone's weights are not the ones the adapter in {directory} was trained on (their "
            f"fingerprint differs; its name and shapes match). A timm model created with pretrained=False "
            f"has random weights: create it with pretrained=True, or from the weights file the adapter was "
            f"trained with, in float32 (cast the whole model after loading). To load it onto these weights "
            f"on purpose, pass check_weights=False (the commands: --check_weights false)."
        )


def _weights_record(backbone: nn.Module) -> dict[str, Any]:
    """The origin and licence of the backbone's weights, their Hub repository (timm's ``hf_hub_id``) and the
    arguments that shaped it (:attr:`~selfprompt.backbones.BackboneInfo.kwargs`, e.g. ``img_size``), which
    rebuild it from its name (informative; not checked on load)."""
    info = backbone_info(backbone)
    checkpoint = Path(info.checkpoint).name if info.checkpoint else None
    hub_id = (getattr(backbone, "pretrained_cfg", None) or {}).get("hf_hub_id") if not checkpoint else None
    return {
        "license": info.license,
        "family": info.family,
        "format": info.format,
        "checkpoint": checkpoint,
        "hub_id": hub_id,
        "kwargs": json.loads(json.dumps(info.kwargs)),
    }


def save_adapter(
    directory: str | Path,
    model_class: str,
    settings: Any,
    backbone: nn.Module,
    backbone_name: str | None,
    tensors: dict[str, torch.Tensor],
    fingerprint: dict[str, Any] | None = None,
    task: TaskInfo | None = None,
) -> Path:
    """Write ``tensors``, the config that rebuilds ``model_class(backbone, **asdict(settings))`` with its
    ``task`` (:class:`TaskInfo`), and the model card the config describes; ``fingerprint``: the weights the
    adapter belongs on (default: ``backbone``'s now)."""
    from selfprompt.card import model_card  # the card renders with huggingface_hub, needed here only

    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    check_finite(tensors, directory / WEIGHTS_NAME, writing=True)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format_version": FORMAT_VERSION,
        "class": model_class,
        "model": asdict(settings),
        "backbone": {
            **backbone_signature(backbone, backbone_name),
            "fingerprint": fingerprint or weights_fingerprint(backbone),
        },
        "backbone_weights": _weights_record(backbone),
        "versions": {"selfprompt": __version__, "torch": torch.__version__, "timm": timm.__version__},
        **(task or TaskInfo()).to_config(),
    }
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write_json(directory / CONFIG_NAME, config)
    card = model_card(config, sum(t.numel() for t in tensors.values()))
    atomic_write(directory / CARD_NAME, lambda p: p.write_text(card))
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    """The adapter config of ``directory``, checked to be a format this release reads."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No {CONFIG_NAME} in {directory}: not a selfprompt adapter directory "
            f"(write one with model.save_pretrained)."
        )
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {_REWRITE}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(config).__name__}; {_REWRITE}")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has adapter format {config.get('format_version')!r}; this selfprompt "
            f"({__version__}) reads format {FORMAT_VERSION}."
        )
    problems = [
        f"{key!r} ({what})"
        for key, kind, what in (
            ("class", str, "the model class's name"),
            ("model", dict, "the model's settings"),
            ("backbone", dict, "the backbone's signature"),
        )
        if not isinstance(config.get(key), kind)
    ]
    if not problems:
        missing = sorted(set(SIGNATURE_KEYS) - set(config["backbone"]))
        problems += [f"'backbone.{key}'" for key in missing]
        if not _is_fingerprint(config["backbone"].get("fingerprint", {"tensors": [], "sha256": ""})):
            problems.append("'backbone.fingerprint' (the weights' fingerprint: tensors and sha256)")
    id2label = config.get("id2label", {})
    indices = [str(i) for i in range(len(id2label))] if isinstance(id2label, dict) else None
    if indices is None or sorted(id2label, key=_index) != indices:
        problems.append("'id2label' (the class names by index: {\"0\": name, ...})")
    elif not all(isinstance(name, str) for name in id2label.values()):
        problems.append("'id2label' (class names must be strings)")
    for key in ("preprocessing", "training"):
        if not isinstance(config.get(key, {}), dict):
            problems.append(f"{key!r} (a JSON object)")
    if problems:
        raise ValueError(f"{path} lacks {', '.join(problems)} or holds the wrong kind of value; {_REWRITE}")
    return config


def _index(key: str) -> int:
    return int(key) if key.isdigit() else -1


def _is_fingerprint(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("tensors"), list)
        and all(isinstance(name, str) for name in record["tensors"])
        and isinstance(record.get("sha256"), str)
    )


def check_signature(saved: dict[str, Any], backbone: nn.Module, name: str | None, directory: Path) -> None:
    """Refuse a backbone whose signature differs from the one the adapter was trained on."""
    if not any(isinstance(backbone, family.model_class) for family in BACKBONE_FAMILIES):
        return  # the model's constructor names what is supported
    actual = backbone_signature(backbone, name if name is not None else timm_name(backbone))
    problems = [
        f"{key}: the adapter was trained with {saved[key]!r}, this backbone has {actual[key]!r}"
        for key in SIGNATURE_KEYS
        if saved[key] != actual.get(key)
    ]
    if problems:
        hint = (
            "\n(a hand-built or renamed backbone: pass backbone_name=...)"
            if saved["name"] != actual["name"]
            else ""
        )
        raise ValueError(
            f"The backbone does not match the adapter in {directory}:\n  " + "\n  ".join(problems) + hint
        )


def check_finite(tensors: Mapping[str, torch.Tensor], path: str | Path, writing: bool = False) -> None:
    """Refuse ``tensors`` read from ``path`` (ValueError), or about to be written there (FloatingPointError,
    before anything is written), when one holds NaN or Inf; the message names each such tensor."""
    found = []
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            counts = ((int(tensor.isnan().sum()), "NaN"), (int(tensor.isinf().sum()), "Inf"))
            held = " and ".join(f"{n} {kind}" for n, kind in counts if n)
            found.append(f"tensor {key!r} holds {held} of its {tensor.numel()} values")
    if not found:
        return
    if writing:
        raise FloatingPointError(
            f"Refusing to write {path}: {'; '.join(found)}. Training diverged: {_DIVERGED}. Nothing was "
            f"written."
        )
    raise ValueError(
        f"{path}: {'; '.join(found)}. It was saved from a run that diverged: {_DIVERGED}, or use an earlier "
        f"copy of the file."
    )


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path`` (an adapter's weights or a prompts file), refused when it
    cannot be read or holds NaN or Inf (:func:`check_finite`)."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist.") from None
    except (SafetensorError, OSError) as error:
        fix = _REWRITE if path.name == WEIGHTS_NAME else "write it again (or copy it again)."
        raise ValueError(
            f"{path} cannot be read ({error}): the file is damaged or cut short; {fix}"
        ) from None
    check_finite(tensors, path)
    return tensors


@torch.no_grad()
def load_tensors(directory: str | Path, params: dict[str, torch.Tensor]) -> None:
    """Copy the adapter's tensors into ``params``, which must name exactly the same tensors and shapes."""
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: the adapter directory is incomplete.")
    copy_tensors(read_tensors(weights), params, weights)


@torch.no_grad()
def copy_tensors(tensors: Mapping[str, torch.Tensor], params: dict[str, torch.Tensor], source: Path) -> None:
    """Copy ``tensors`` (read from ``source``) into ``params``, which must name exactly the same tensors and
    shapes."""
    if set(tensors) != set(params):
        raise ValueError(f"{source} holds tensors {sorted(tensors)}, expected {sorted(params)}.")
    for key, param in params.items():
        if tensors[key].shape != param.shape:
            raise ValueError(
                f"{source}: {key} has shape {tuple(tensors[key].shape)}, the config implies "
                f"{tuple(param.shape)}."
            )
        param.copy_(tensors[key])
