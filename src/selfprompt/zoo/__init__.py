"""selfprompt's offline model zoo: small ViTs pretrained by ``selfprompt pretrain``, shipped as fp16
safetensors with a model card each, loaded by name through timm (see :mod:`selfprompt.zoo.models`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from selfprompt.checkpoint import atomic_write
from selfprompt.zoo.models import WEIGHTS_DIR, ZOO_TAGS

import yaml
from safetensors.torch import load_file, save_file

REGISTRY_NAME = "registry.json"


def registry(weights_dir: Path = WEIGHTS_DIR) -> dict[str, dict[str, Any]]:
    """Name -> ``{file, sha256, bytes, parameters, dtype}`` of every exported backbone."""
    path = weights_dir / REGISTRY_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def available() -> list[str]:
    """The zoo names whose weights ship with this installation."""
    return [name for name in registry() if weights_file(name).is_file()]


def weights_file(name: str, weights_dir: Path = WEIGHTS_DIR) -> Path:
    if name not in ZOO_TAGS:
        raise ValueError(f"{name!r} is not in selfprompt's zoo; its names: {list(ZOO_TAGS)}.")
    return weights_dir / f"{name}.safetensors"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify(name: str, weights_dir: Path = WEIGHTS_DIR) -> None:
    """Raise if ``name``'s shipped weights are missing or differ from their recorded SHA-256."""
    entry = registry(weights_dir).get(name)
    path = weights_file(name, weights_dir)
    if entry is None or not path.is_file():
        raise FileNotFoundError(
            f"The weights of {name} are not in {weights_dir}; reinstall selfprompt, or export them with "
            f"`selfprompt zoo export RUN_DIR --name {name}`."
        )
    actual = sha256(path)
    if actual != entry["sha256"]:
        raise ValueError(
            f"{path} has SHA-256 {actual}, its registry records {entry['sha256']}: the file is damaged or "
            f"was replaced; reinstall selfprompt."
        )


def export(run_dir: str | Path, name: str, weights_dir: str | Path | None = None, note: str = "") -> Path:
    """Write a finished pretraining run's encoder as ``NAME.safetensors`` (fp16) with a model card
    ``NAME.md`` and a registry entry; returns the card's path."""
    run = Path(run_dir)
    target = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{run} holds no finished pretraining run (no summary.json).")
    config = yaml.safe_load((run / "config.yaml").read_text())
    if config["backbone"] != name.split(".")[0]:
        raise ValueError(f"{run} pretrained {config['backbone']}, not the architecture of {name}.")
    weights = {k: v.half().contiguous() for k, v in load_file(str(run / "encoder.safetensors")).items()}
    path = weights_file(name, target)
    target.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: save_file(weights, str(p), metadata={"name": name, "format": "pt"}))
    path.chmod(0o644)  # safetensors creates owner-only files; shipped weights are world-readable
    entry = {
        "file": path.name,
        "sha256": sha256(path),
        "bytes": path.stat().st_size,
        "parameters": sum(v.numel() for v in weights.values()),
        "dtype": "float16",
    }
    summary = json.loads(summary_path.read_text())
    env = json.loads((run / "env.json").read_text())
    card = path.with_suffix(".md")
    text = model_card(name, entry, config, summary, env, note)
    atomic_write(card, lambda p: p.write_text(text))
    entries = registry(target) | {name: entry}
    atomic_write(target / REGISTRY_NAME, lambda p: p.write_text(json.dumps(entries, indent=2) + "\n"))
    return card


def model_card(
    name: str,
    entry: dict[str, Any],
    config: dict[str, Any],
    summary: dict[str, Any],
    env: dict[str, Any],
    note: str = "",
) -> str:
    data = config["data"]
    source = "Fashion-MNIST train, 28x28 gray" if data["source"] == "fashion-mnist" else data["root"]
    command = " ".join(["selfprompt", *env["command"][1:]]) if env["command"] else "(unknown)"
    lines = [
        f"# {name}",
        "",
        f'`timm.create_model("{name}", pretrained=True)` after `import selfprompt` (offline).',
        "",
        "| field | value |",
        "| --- | --- |",
        f"| architecture | {config['backbone']} {config['backbone_kwargs'] or ''} |",
        f"| objective | {config['objective']} |",
        f"| data | {source}; {summary['images']} images, SHA-256 {env['data_fingerprint']} |",
        f"| command | `{command}` |",
        f"| seed | {config['seed']} |",
        f"| epochs | {summary['epochs']} |",
        f"| device | {env['device']} ({env['world_size']} process(es)) |",
        f"| wall time | {summary['wall_time_s']:.0f} s |",
        f"| final training loss | {summary['final_train_loss']:.4f} |",
    ]
    if "final_eval_acc" in summary:
        lines.append(f"| Fashion-MNIST test accuracy | {100 * summary['final_eval_acc']:.2f}% |")
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines += [
        f"| parameters | {entry['parameters']:,} ({entry['dtype']}, {entry['bytes']:,} bytes) |",
        f"| SHA-256 | `{entry['sha256']}` |",
        f"| versions | {versions} |",
        "",
        "Inputs: RGB (gray repeated), 32x32 (bicubic resize), normalised with mean = std = 0.5.",
        "",
        *([note, ""] if note else []),
        "## Resolved config",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
