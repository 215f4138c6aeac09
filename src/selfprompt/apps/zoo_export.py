"""``selfprompt zoo export``: a finished ``selfprompt pretrain`` run as zoo weights (fp16 safetensors),
a model card and a registry entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfprompt.atomic import atomic_write, write_json, write_text
from selfprompt.engine.rundir import RunDir
from selfprompt.zoo import REGISTRY_NAME, registry, sha256, weights_file
from selfprompt.zoo.models import WEIGHTS_DIR

import yaml
from safetensors.torch import load_file, save_file


def export(run_dir: str | Path, name: str, weights_dir: str | Path | None = None, note: str = "") -> Path:
    """Write a finished pretraining run's encoder as ``NAME.safetensors`` (fp16) with a model card
    ``NAME.md`` and a registry entry; returns the card's path."""
    run = RunDir(Path(run_dir))
    target = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    if not run.summary.is_file():
        raise FileNotFoundError(f"{run.path} holds no finished pretraining run (no {run.summary.name}).")
    config = run.read_config()
    if config["backbone"] != name.split(".")[0]:
        raise ValueError(f"{run.path} pretrained {config['backbone']}, not the architecture of {name}.")
    weights = {k: v.half().contiguous() for k, v in load_file(str(run.encoder)).items()}
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
    summary, env = run.read_summary(), run.read_env()
    card = path.with_suffix(".md")
    text = model_card(name, entry, config, summary, env, note)
    write_text(card, text)
    entries = registry(target) | {name: entry}
    write_json(target / REGISTRY_NAME, entries)
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
