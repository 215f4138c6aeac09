"""An adapter folder copied alone (without its run) classifies images as its run does: the same class names,
preprocessing and probabilities through ``predict``, ``eval``, ``serve`` and the ONNX export; and its model
card states what the config holds."""

from __future__ import annotations

import base64
import json
import shutil
import signal

from selfprompt.adapter import PREPROCESSING_KEYS, TaskInfo, read_config
from selfprompt.apps.predict import evaluate_run, predict_run
from selfprompt.cli import main
from selfprompt.data.splits import preprocessing
from selfprompt.data.transforms import data_config
from selfprompt.engine.run import run
from selfprompt.serving.export import run_export
from selfprompt.serving.loading import load_source_model

import pytest
import torch
import yaml
from conftest import tiny_vit
from engine_helpers import make_dataset, tiny_config

ZOO = "vit_mini_patch4_32.sup_fmnist"  # shipped with the package: loads offline by name
# preprocessing that differs from the backbone's own in every field a run can set
DATA = {"data.crop_pct": 0.8, "data.interpolation": "bilinear", "data.img_size": 40}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run on the zoo backbone at input size 40 with its own crop and interpolation, and a copy of its
    final adapter folder alone, elsewhere."""
    root = tmp_path_factory.mktemp("self_contained")
    data = make_dataset(root / "data")
    cfg = tiny_config(data, root / "run", "vpt-shallow", stage="final", **DATA)
    cfg.model.backbone, cfg.model.pretrained = ZOO, True
    cfg.model.backbone_kwargs = {"img_size": 40}
    cfg.optim.epochs = 1
    run(cfg, log=lambda _: None)
    copy = root / "elsewhere" / "my-adapter"
    shutil.copytree(root / "run" / "seed0" / "final" / "adapter", copy)
    return root / "run", copy, data, cfg


def test_the_adapter_config_holds_labels_preprocessing_and_how_to_rebuild_the_backbone(trained):
    run_dir, copy, _, cfg = trained
    config = read_config(copy)
    model, _ = load_source_model(run_dir)
    classes = json.loads((run_dir / "seed0" / "final" / "classes.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(classes)}
    expected = preprocessing(cfg.data, model.backbone)
    assert config["preprocessing"] == json.loads(json.dumps(expected))
    assert config["preprocessing"]["input_size"] == [3, 40, 40]
    default = data_config(model.backbone)
    assert all(
        config["preprocessing"][k] != json.loads(json.dumps(default[k]))
        for k in ("crop_pct", "interpolation")
    )
    assert config["backbone"]["name"] == ZOO
    assert config["backbone_weights"]["kwargs"] == {"img_size": 40}
    training = config["training"]
    assert (training["method"], training["stage"], training["seed"]) == ("vpt-shallow", "final", 0)
    assert training["evaluated_on"] == "test" and 0 <= training["accuracy"] <= 1
    result = json.loads((run_dir / "seed0" / "final" / "result.json").read_text())
    assert training["accuracy"] == result["last_test_acc"]


def test_predict_from_the_copied_adapter_alone_equals_the_run(trained):
    run_dir, copy, data, _ = trained
    images = [str(data / "test")]
    from_run = predict_run(run_dir, images, None, None, "cpu", topk=3)
    from_copy = predict_run(copy, images, None, None, "cpu", topk=3)
    assert from_copy == from_run  # paths, class names and probabilities
    classes = json.loads((run_dir / "seed0" / "final" / "classes.json").read_text())
    assert {row["class_1"] for row in from_copy} <= set(classes)
    assert not any(name.startswith("class_") for name in classes)


def test_eval_of_the_copy_on_an_image_folder_equals_the_runs_test_split(trained):
    run_dir, copy, data, _ = trained
    on_run = evaluate_run(run_dir, "test", None, None, "cpu")
    on_copy = evaluate_run(copy, "test", None, None, "cpu", images=data / "test")
    assert on_copy["images"] == on_run["images"]
    assert on_copy["acc"] == on_run["acc"] and on_copy["loss"] == pytest.approx(on_run["loss"], rel=1e-6)
    with pytest.raises(ValueError, match=r"adapter folder: it holds no data\. Pass --images"):
        evaluate_run(copy, "test", None, None, "cpu")


def test_serving_the_copy_beside_its_run_answers_the_same(trained):
    pytest.importorskip("litserve")
    from selfprompt.serving.server import Job, MultiTaskAPI, ServeSettings

    run_dir, copy, data, _ = trained
    api = MultiTaskAPI(ServeSettings({"run": run_dir, "copy": copy}), max_batch_size=4, batch_timeout=0.01)
    on_sigint = signal.getsignal(signal.SIGINT)
    with torch.enable_grad():  # setup turns autograd off and ignores SIGINT in its process (a worker's)
        api.setup("cpu")
    signal.signal(signal.SIGINT, on_sigint)
    image = next((data / "test").rglob("*.png")).read_bytes()
    job = api.decode_request({"image": base64.b64encode(image).decode(), "tasks": ["run", "copy"], "topk": 3})
    assert isinstance(job, Job)
    answer = api.predict([job])[0]
    assert answer["predictions"]["copy"] == answer["predictions"]["run"]
    assert api.model.tasks["copy"].classes == api.model.tasks["run"].classes


def test_onnx_export_of_the_copy_carries_labels_and_preprocessing_in_the_file(trained, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    run_dir, copy, _, _ = trained
    files = {name: tmp_path / f"{name}.onnx" for name in ("run", "copy")}
    run_export([str(run_dir)], files["run"])
    run_export([str(copy)], files["copy"])
    metadata = {}
    for name, path in files.items():
        metadata[name] = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
        assert metadata[name] == json.loads(path.with_suffix(".json").read_text())  # the sidecar, too
    assert metadata["copy"] == metadata["run"]
    config = read_config(copy)
    assert metadata["copy"]["classes"] == list(config["id2label"].values())
    assert metadata["copy"]["preprocessing"] == config["preprocessing"]
    images = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(0)).numpy()
    logits = [ort.InferenceSession(str(p)).run(None, {"images": images})[0] for p in files.values()]
    assert (logits[0] == logits[1]).all()


def test_the_cli_predicts_from_the_adapter_folder(trained, capsys, tmp_path):
    run_dir, copy, data, _ = trained
    out = tmp_path / "rows.json"
    assert main(["predict", str(copy), str(data / "test"), "--device", "cpu", "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == predict_run(run_dir, [str(data / "test")], None, None, "cpu")


def test_the_model_card_is_written_with_the_hub_front_matter_and_the_run_facts(trained):
    _, copy, _, _ = trained
    card = (copy / "README.md").read_text()
    front, _, body = card.removeprefix("---\n").partition("\n---\n")
    meta = yaml.safe_load(front)
    config = read_config(copy)
    assert meta["library_name"] == "selfprompt" and meta["pipeline_tag"] == "image-classification"
    assert "vpt-shallow" in meta["tags"] and meta["metrics"] == ["accuracy"]
    assert "datasets" not in meta  # a folder of one's own is no Hub dataset
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == config["training"]["dataset"]
    score = meta["model-index"][0]["results"][0]["metrics"][0]
    assert score == {"type": "accuracy", "value": round(100 * config["training"]["accuracy"], 2)}
    model, _ = load_source_model(copy)
    tensors = model.num_adapter_parameters()
    for fact in (
        f"{tensors:,}",
        config["training"]["data_fingerprint"],
        config["backbone"]["fingerprint"]["sha256"],
        f"`{ZOO}`",
        "final, seed 0, 1 epoch",
        "bilinear",
    ):
        assert fact in body, fact


def test_an_adapter_saved_from_python_records_the_backbones_preprocessing_and_checks_its_labels(tmp_path):
    from selfprompt import PromptedViT, load_pretrained

    model = PromptedViT(tiny_vit(), 3, num_prompts=2)
    model.task_info = TaskInfo(labels=["cat", "dog"])
    with pytest.raises(ValueError, match="the labels name 2 classes, the head has 3"):
        model.save_pretrained(tmp_path)
    model.task_info = TaskInfo(labels=["cat", "dog", "cat"])
    with pytest.raises(ValueError, match=r"name \['cat'\] more than once"):
        model.save_pretrained(tmp_path)
    model.task_info = TaskInfo(labels=["cat", "dog", "owl"])
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path, tiny_vit())
    assert loaded.task_info.labels == ["cat", "dog", "owl"]
    assert set(loaded.task_info.preprocessing) == set(PREPROCESSING_KEYS)
    loaded.save_pretrained(tmp_path / "again")  # what loads saves again, unchanged
    first, again = (
        json.loads((p / "adapter_config.json").read_text()) for p in (tmp_path, tmp_path / "again")
    )
    assert first == again
    assert (tmp_path / "README.md").read_text() == (tmp_path / "again" / "README.md").read_text()


def test_an_adapter_of_an_earlier_release_still_loads_with_its_classes_beside_it(trained, tmp_path):
    _, copy, _, _ = trained
    old = tmp_path / "old"
    shutil.copytree(copy, old)
    config = json.loads((old / "adapter_config.json").read_text())
    for key in ("id2label", "preprocessing", "training"):
        config.pop(key)
    (old / "adapter_config.json").write_text(json.dumps(config))
    (old / "README.md").unlink()
    (old / "classes.json").write_text(json.dumps(["x", "y", "z"]))
    model, source = load_source_model(old)
    assert model.task_info.labels == ["x", "y", "z"] and source.classes == ["x", "y", "z"]
    assert model.task_info.preprocessing == data_config(model.backbone)  # the backbone's own, as before
    new, _ = load_source_model(copy)
    images = torch.randn(2, 3, 40, 40)
    assert torch.equal(model(images), new(images))


def test_predict_and_the_cli_read_an_adapter_pushed_to_the_hub_from_its_cache(trained, tmp_path, monkeypatch):
    import huggingface_hub
    from test_hub import put_in_cache

    run_dir, copy, data, _ = trained
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    put_in_cache(cache, "my-org/fmnist-vpt", copy)
    images = [str(data / "test")]
    expected = predict_run(run_dir, images, None, None, "cpu", topk=2)
    assert predict_run("my-org/fmnist-vpt", images, None, None, "cpu", topk=2) == expected
    out = tmp_path / "rows.json"
    argv = ["predict", "my-org/fmnist-vpt", *images, "--device", "cpu", "--topk", "2", "--output", str(out)]
    assert main(argv) == 0
    assert json.loads(out.read_text()) == expected


@pytest.mark.parametrize(
    "argv0, recorded",
    [("/venv/bin/selfprompt", True), ("/src/selfprompt/__main__.py", True), ("/x/pytest/__main__.py", False)],
)
def test_the_command_is_recorded_only_when_the_cli_ran(monkeypatch, tmp_path, argv0, recorded):
    from selfprompt.engine.run import run_record

    monkeypatch.setattr("sys.argv", [argv0, "train", "--data.root", "my images/"])
    cfg = tiny_config(tmp_path, tmp_path / "run", "linear")
    expected = "selfprompt train --data.root 'my images/'" if recorded else None
    assert run_record(cfg)["command"] == expected
