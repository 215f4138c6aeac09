"""Using runs: evaluate a split, classify images, and compute/cache/show initial prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selfprompt.build import (
    backbone_name,
    build_model,
    build_splits,
    create_backbone,
    eval_transform,
    init_method,
)
from selfprompt.checkpoint import atomic_write, load_adapter
from selfprompt.config import TrainConfig
from selfprompt.data import IMAGE_EXTENSIONS
from selfprompt.engine.distributed import Context, resolve_device
from selfprompt.engine.loop import evaluate
from selfprompt.engine.run import CONFIG_NAME
from selfprompt.init import init_prompts
from selfprompt.model import PromptedViT, ViTClassifier

import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

PROTOCOL_SPLITS = ("train", "val", "trainval", "test")


def load_run_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {run_dir} is not a `selfprompt train` run directory."
        )
    return TrainConfig.from_dict(yaml.safe_load(path.read_text()))


def load_run_model(
    run_dir: str | Path, seed: int | None, stage: str, device: str, ema: bool = False
) -> tuple[TrainConfig, ViTClassifier, list[str]]:
    """The trained model of one seed and stage of a run, on ``device``, in eval mode, and its class names."""
    cfg = load_run_config(run_dir)
    seed = cfg.seeds[0] if seed is None else seed
    stage_dir = Path(run_dir) / f"seed{seed}" / stage
    adapter = stage_dir / ("adapter_ema" if ema else "adapter")
    if not adapter.is_dir():
        raise FileNotFoundError(
            f"{adapter} does not exist: seed {seed}, stage {stage!r} has not finished in {run_dir} "
            f"(seeds: {cfg.seeds}; stages: tune, final{'; EMA needs optim.ema_decay' if ema else ''})."
        )
    backbone = create_backbone(cfg.model)
    model = load_adapter(adapter, backbone, backbone_name(backbone))
    classes = json.loads((stage_dir / "classes.json").read_text())
    return cfg, model.to(resolve_device(device)).eval(), classes


def evaluate_run(
    run_dir: str | Path, split: str, seed: int | None, stage: str, device: str, ema: bool = False
) -> dict[str, Any]:
    if split not in PROTOCOL_SPLITS:
        raise ValueError(
            f"split must be one of {PROTOCOL_SPLITS} (the run's configured splits), got {split!r}."
        )
    cfg, model, _ = load_run_model(run_dir, seed, stage, device, ema)
    dataset = getattr(build_splits(cfg.data, model.backbone), split)
    ctx = Context(rank=0, world_size=1, device=next(model.parameters()).device)
    scores = evaluate(model, dataset, ctx, cfg.data.eval_batch_size, cfg.precision, cfg.data.num_workers)
    return {"run": str(run_dir), "split": split, "stage": stage, "images": len(dataset), **scores}


def _image_files(inputs: list[str]) -> list[Path]:
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item} is neither an image file nor a folder.")
    if not files:
        raise ValueError(f"No images found in {inputs} (extensions: {', '.join(IMAGE_EXTENSIONS)}).")
    return files


@torch.no_grad()
def predict_run(
    run_dir: str | Path,
    inputs: list[str],
    seed: int | None,
    stage: str,
    device: str,
    ema: bool = False,
    topk: int = 1,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Top-k classes and probabilities for each image file (folders are searched recursively)."""
    cfg, model, classes = load_run_model(run_dir, seed, stage, device, ema)
    transform = eval_transform(cfg.data, model.backbone)
    files = _image_files(inputs)
    device_ = next(model.parameters()).device
    rows = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images = []
        for path in chunk:
            try:
                images.append(transform(Image.open(path).convert("RGB")))
            except OSError as error:
                raise ValueError(f"Cannot read image {path}: {error}") from error
        probs = model(torch.stack(images).to(device_)).float().softmax(dim=1)
        top = probs.topk(min(topk, len(classes)), dim=1)
        for path, values, indices in zip(chunk, top.values.tolist(), top.indices.tolist(), strict=True):
            row: dict[str, Any] = {"path": str(path)}
            for rank, (p, i) in enumerate(zip(values, indices, strict=True), start=1):
                suffix = "" if topk == 1 else f"_{rank}"
                row |= {f"class{suffix}": classes[i], f"probability{suffix}": round(p, 6)}
            rows.append(row)
    return rows


def init_prompts_command(cfg: TrainConfig, output: str, seed: int) -> torch.Tensor:
    """Compute the recipe's initial prompts on its training images, save them and print their statistics.

    An existing file computed with the same settings and data is reused (the cache); train with
    ``--model.prompts_file`` to start from it.
    """
    backbone = create_backbone(cfg.model)
    splits = build_splits(cfg.data, backbone)
    model = build_model(cfg.model, backbone, len(splits.classes))
    if not isinstance(model, PromptedViT):
        raise ValueError(f"method {cfg.model.method!r} has no prompts; use a vpt-* or spt-* method.")
    key = {
        "backbone": backbone_name(backbone),
        "method": init_method(cfg.model),
        "shape": list(model.prompts.shape),
        "seed": seed,
        "fraction": cfg.model.init_fraction,
        "max_images": cfg.model.init_max_images,
        "data": splits.train.fingerprint(),
        "preprocessing": repr(eval_transform(cfg.data, backbone)),
    }
    out = Path(output)
    cached = out.is_file() and _metadata(out) == key
    if cached:
        prompts = load_file(str(out))["prompts"]
    else:
        loader = torch.utils.data.DataLoader(splits.init_train, batch_size=cfg.data.eval_batch_size)
        prompts = init_prompts(
            model,
            loader,
            key["method"],
            fraction=cfg.model.init_fraction,
            max_images=key["max_images"],
            seed=seed,
        ).cpu()
        out.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"selfprompt": json.dumps(key)}
        atomic_write(out, lambda p: save_file({"prompts": prompts.contiguous()}, str(p), metadata=metadata))
    print(
        f"{'reused cached' if cached else 'computed'} {key['method']} prompts {tuple(prompts.shape)} -> {out}"
    )
    print(f"{'layer':>5s} {'mean norm':>10s} {'mean pairwise cosine':>21s}")
    for layer, p in enumerate(prompts.float()):
        cos = torch.nn.functional.normalize(p, dim=1) @ torch.nn.functional.normalize(p, dim=1).T
        off_diagonal = (cos.sum() - cos.diagonal().sum()) / max(1, len(p) * (len(p) - 1))
        print(f"{layer:5d} {p.norm(dim=1).mean():10.3f} {off_diagonal:21.3f}")
    return prompts


def _metadata(path: Path) -> dict[str, Any] | None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("selfprompt")
    return json.loads(raw) if raw else None
