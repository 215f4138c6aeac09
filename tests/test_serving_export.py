"""``selfprompt export``: ONNX files for one task and for many (task-id input), checked with onnxruntime."""

import json

from selfprompt.backbones import create_backbone
from selfprompt.cli import main
from selfprompt.methods.prompt import PromptedViT
from selfprompt.model import ViTClassifier
from selfprompt.serving.export import MultiTaskGraph
from selfprompt.serving.loading import load_multitask

import pytest
import torch

ort = pytest.importorskip("onnxruntime")
ZOO = "vit_mini_patch4_32.mae_fmnist"  # shipped with the package: loads offline by name


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    PromptedViT(create_backbone(ZOO), 5, num_prompts=6).save_pretrained(root / "shallow")
    PromptedViT(create_backbone(ZOO), 3, num_prompts=2, deep=True, pool="mae").save_pretrained(root / "deep")
    ViTClassifier(create_backbone(ZOO), 4).save_pretrained(root / "linear")
    return root


def _run(path, inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])


@pytest.mark.parametrize("name", ["shallow", "deep"])
def test_one_task_exports_with_a_dynamic_batch(adapters, tmp_path, name, capsys):
    output = tmp_path / f"{name}.onnx"
    assert main(["export", str(adapters / name), "--format", "onnx", "--output", str(output)]) == 0
    assert "max |diff|" in capsys.readouterr().out
    model = load_multitask({name: adapters / name}).tasks[name].model
    for batch in (1, 5):
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(images)
        assert (_run(output, {"images": images}) - expected).abs().max().item() <= 1e-4
    assert len(json.loads(output.with_suffix(".json").read_text())["classes"]) == model.config.num_classes


def test_many_tasks_export_as_one_graph_with_a_task_id_input(adapters, tmp_path):
    output = tmp_path / "multi.onnx"
    sources = [f"{n}={adapters / n}" for n in ("shallow", "deep", "linear")]
    assert main(["export", *sources, "--output", str(output)]) == 0
    meta = json.loads(output.with_suffix(".json").read_text())
    assert meta["tasks"] == ["shallow", "deep", "linear"]
    multi = load_multitask({n: adapters / n for n in meta["tasks"]})
    images, ids = torch.randn(7, 3, 32, 32), torch.tensor([0, 1, 2, 2, 1, 0, 1])
    got = _run(output, {"images": images, "task_ids": ids})
    with torch.no_grad():
        rows = multi(images, [meta["tasks"][i] for i in ids.tolist()])
        graph = MultiTaskGraph(multi)(images, ids)
    for i, row in enumerate(rows):
        assert (got[i, : row.numel()] - row).abs().max().item() <= 1e-4
        assert torch.isinf(got[i, row.numel() :]).all()
    assert torch.equal(torch.isinf(got), torch.isinf(graph))


def test_export_refuses_another_format(adapters, tmp_path, capsys):
    assert (
        main(["export", str(adapters / "deep"), "--format", "tflite", "--output", str(tmp_path / "x")]) == 1
    )
    assert "--format must be onnx" in capsys.readouterr().err
