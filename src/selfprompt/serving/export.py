"""Export to ONNX: one task's model, or a :class:`MultiTaskViT` with a task-id input; a LoRA adapter also
to peft's own format (:func:`run_peft_export`).

The exporter is torch's TorchScript-based one (``torch.onnx.export(..., dynamo=False)``): the torch.export
based default of torch >= 2.9 needs ``onnxscript``, which the ``export`` extra does not install. The batch
axis is dynamic. :func:`verify_onnx` runs the file with onnxruntime against PyTorch.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

from selfprompt.atomic import atomic_write, write_json
from selfprompt.serving.multitask import MultiTaskViT

import torch
from torch import nn

OPSET = 17


class MultiTaskGraph(nn.Module):
    """``(images (B, 3, H, W) float, task_ids (B,) int64) -> logits (B, C_max)``, ``-inf`` past a row's
    class count; task ids index ``tasks`` in the sidecar JSON. Only tasks that share the backbone."""

    def __init__(self, model: MultiTaskViT) -> None:
        super().__init__()
        grouped = [name for name, task in model.tasks.items() if not task.shared]
        if grouped:
            raise ValueError(
                f"Tasks {grouped} run through their own models (their methods change the backbone's weights, "
                f"as full and bitfit, or build prompts per image, as ipt): a multi-task graph shares one "
                f"backbone's forward; export them one by one."
            )
        if not model.tasks:
            raise ValueError("The multi-task model serves no task: add adapters first.")
        self.model = model
        self.bank = model._bank

    def forward(self, images: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return self.model.forward_shared(images, task_ids, self.bank, static=True)


def _export(module: nn.Module, inputs: tuple, names: list[str], output: Path) -> None:
    dynamic = {name: {0: "batch"} for name in [*names, "logits"]}
    output.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            module.eval(),
            inputs,
            str(output),
            dynamo=False,
            input_names=names,
            output_names=["logits"],
            dynamic_axes=dynamic,
            opset_version=OPSET,
        )


def _describe_file(output: Path, meta: dict[str, Any]) -> None:
    """``meta`` in ``<output>.json`` and in the ONNX file's own ``metadata_props`` (each key's value as JSON),
    so that the file alone names its inputs, classes and preprocessing."""
    import onnx

    write_json(output.with_suffix(".json"), meta)
    graph = onnx.load(str(output))
    for key, value in meta.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    atomic_write(output, lambda path: onnx.save(graph, str(path)))


@torch.no_grad()
def export_single(
    model: nn.Module,
    output: str | Path,
    image_size: tuple[int, int],
    classes: list[str],
    preprocessing: dict[str, Any] | None = None,
) -> Path:
    """``images -> logits`` of one task's model; its classes and ``preprocessing`` (timm's data-config keys)
    in ``<output>.json`` and in the file's ``metadata_props``."""
    output = Path(output)
    example = torch.randn(2, 3, *image_size)
    _export(model.float().cpu(), (example,), ["images"], output)
    _describe_file(output, {"inputs": ["images"], "classes": classes, "preprocessing": preprocessing})
    return output


@torch.no_grad()
def export_multitask(model: MultiTaskViT, output: str | Path, image_size: tuple[int, int]) -> Path:
    """``(images, task_ids) -> padded logits``; the tasks (id order), their classes and preprocessing in
    ``<output>.json`` and in the file's ``metadata_props``."""
    output = Path(output)
    model = model.float().cpu()
    graph = MultiTaskGraph(model)
    tasks = list(graph.bank.names)
    example = (torch.randn(2, 3, *image_size), torch.tensor([0, len(tasks) - 1]))
    _export(graph, example, ["images", "task_ids"], output)
    meta = {
        "inputs": ["images", "task_ids"],
        "tasks": tasks,
        "classes": {name: model.tasks[name].classes for name in tasks},
        "preprocessing": {name: model.tasks[name].model.task_info.preprocessing for name in tasks},
    }
    _describe_file(output, meta)
    return output


def image_size(model: nn.Module) -> tuple[int, int]:
    backbone = model.backbone
    return tuple(backbone.patch_embed.img_size)


@torch.no_grad()
def verify_onnx(
    path: str | Path, reference: nn.Module, inputs: dict[str, torch.Tensor], finite_only: bool = True
) -> dict[str, Any]:
    """Max |onnxruntime - PyTorch| on ``inputs`` (``-inf`` padding compared as equal)."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError("Verifying needs onnxruntime: pip install 'selfprompt[export]'.") from error
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])
    expected = reference(*inputs.values()).float()
    same_inf = torch.isinf(got) == torch.isinf(expected)
    finite = torch.isfinite(expected)
    diff = (got[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    return {"max_abs_diff": diff, "inf_positions_match": bool(same_inf.all()), "batch": got.shape[0]}


def describe(path: Path) -> str:
    meta = json.loads(path.with_suffix(".json").read_text())
    if "tasks" in meta:
        return f"{path}: images + task_ids -> logits; tasks {meta['tasks']} (ids in that order)"
    return f"{path}: images -> logits over {len(meta['classes'])} classes"


def run_export(
    sources: list[str],
    output: str | Path,
    backbone: str | None = None,
    stage: str | None = None,
    multitask: bool = False,
    verify: bool = True,
    tolerance: float = 1e-4,
    check_weights: bool = True,
) -> str:
    """``selfprompt export``: one source -> ``images -> logits``; several (or ``multitask``) ->
    ``(images, task_ids) -> logits``. Verifies at batch 1 and 3 and refuses a file over ``tolerance``."""
    from selfprompt.serving.loading import load_multitask, parse_adapter_specs

    adapters = parse_adapter_specs(sources)
    model = load_multitask(adapters, backbone, stage, check_weights).float().cpu()
    size = image_size(model)
    output = Path(output)
    if len(adapters) == 1 and not multitask:
        task = next(iter(model.tasks.values()))
        export_single(task.model, output, size, task.classes, task.model.task_info.preprocessing)
        reference, extra = task.model, {}
    else:
        export_multitask(model, output, size)
        reference, extra = MultiTaskGraph(model), None
    lines = [describe(output)]
    if verify:
        generator = torch.Generator().manual_seed(0)
        for batch in (1, 3):
            inputs = {"images": torch.randn(batch, 3, *size, generator=generator)}
            if extra is None:
                inputs["task_ids"] = torch.arange(batch) % len(model.tasks)
            check = verify_onnx(output, reference, inputs)
            if check["max_abs_diff"] > tolerance or not check["inf_positions_match"]:
                raise RuntimeError(f"{output} differs from PyTorch: {check}")
            lines.append(f"onnxruntime vs PyTorch, batch {batch}: max |diff| {check['max_abs_diff']:.2e}")
    return "\n".join(lines)


@torch.no_grad()
def run_peft_export(
    source: str,
    output: str | Path,
    backbone: str | None = None,
    stage: str | None = None,
    verify: bool = True,
    check_weights: bool = True,
) -> str:
    """``selfprompt export RUN --format peft``: a LoRA adapter (or run) in peft's format
    (:func:`selfprompt.methods.lora.save_peft`), checked by loading it with ``peft.PeftModel`` onto the
    plain timm classifier and comparing logits with selfprompt's (max |diff| <= 1e-5)."""
    from selfprompt.methods import load_pretrained
    from selfprompt.methods.lora import LoRA, peft_base, save_peft
    from selfprompt.serving.loading import source_backbone
    from selfprompt.serving.sources import resolve_source

    found = resolve_source(source, stage=stage)
    pristine = source_backbone(backbone, found)
    model = load_pretrained(found.adapter, copy.deepcopy(pristine), check_weights=check_weights)
    model = model.float().cpu().eval()
    if not isinstance(model, LoRA):
        raise ValueError(
            f"{found.adapter} holds a {type(model).__name__}: --format peft writes LoRA adapters (lora)."
        )
    folder = save_peft(model, output)
    lines = [f"{folder}: peft LoRA (PeftModel.from_pretrained onto selfprompt.methods.lora.peft_base(...))"]
    if verify:
        from peft import PeftModel

        base = peft_base(pristine, model.config.num_classes, model.config.pool)
        loaded = PeftModel.from_pretrained(base, str(folder)).eval()
        images = torch.randn(3, 3, *image_size(model), generator=torch.Generator().manual_seed(0))
        diff = (loaded(images) - model(images)).abs().max().item()
        if diff > 1e-5:
            raise RuntimeError(
                f"{folder} gives other logits in peft than in selfprompt: max |diff| {diff:.2e}."
            )
        lines.append(f"peft vs selfprompt, batch 3: max |diff| {diff:.2e}")
    return "\n".join(lines)
