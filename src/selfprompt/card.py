"""An adapter's model card: the ``README.md`` written beside its ``adapter_config.json``, with the Hub's YAML
front matter (``library_name: selfprompt``, ``base_model``, ``tags``, ``datasets``, ``metrics``, the
backbone weights' licence, the accuracy as ``model-index``) and the facts a reader checks first. It is a view
of the config alone: the same config always gives the same card."""

from __future__ import annotations

from typing import Any

UNKNOWN_LICENCES = ("unknown", "n/a (random weights)")


def model_card(config: dict[str, Any], trainable: int) -> str:
    """The card of an adapter whose ``adapter_config.json`` holds ``config`` and whose tensors hold
    ``trainable`` values."""
    from huggingface_hub import EvalResult, ModelCardData

    backbone, weights = config["backbone"], config.get("backbone_weights") or {}
    training = config.get("training") or {}
    method = training.get("method") or config["class"]
    dataset = training.get("dataset")
    accuracy = training.get("accuracy")
    licence = weights.get("license")
    title = f"{method} adapter for {backbone['name'] or 'a hand-built ViT'}"
    results = None
    if accuracy is not None and dataset:
        result = EvalResult(
            task_type="image-classification",
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split=training.get("evaluated_on"),
            metric_type="accuracy",
            metric_value=round(100 * accuracy, 2),
        )
        results = [result]
    data = ModelCardData(
        library_name="selfprompt",
        pipeline_tag="image-classification",
        base_model=weights.get("hub_id"),
        license=licence if licence and licence not in UNKNOWN_LICENCES else None,
        tags=["selfprompt", "timm", "image-classification", "peft", method],
        datasets=[dataset] if dataset and training.get("benchmark") else None,  # a benchmark task only
        metrics=["accuracy"],
        model_name=title if results else None,
        eval_results=results,
    )
    return f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{_body(config, trainable, method)}"


def _body(config: dict[str, Any], trainable: int, method: str) -> str:
    backbone, weights = config["backbone"], config.get("backbone_weights") or {}
    training = config.get("training") or {}
    labels = list((config.get("id2label") or {}).values())
    settings = ", ".join(f"{k}={v}" for k, v in config["model"].items())
    rows = [
        ("method", f"`{method}` ({config['class']}: {settings})"),
        ("trainable parameters", f"{trainable:,}"),
        ("backbone", _backbone(backbone, weights)),
        ("classes", _classes(labels) if labels else f"{config['model'].get('num_classes')} (unnamed)"),
        ("preprocessing", _preprocessing(config.get("preprocessing"))),
    ]
    if training:
        rows += [
            ("data", f"{training.get('dataset')}: trained on {training.get('trained_on')} "
             f"(fingerprint `{training.get('data_fingerprint')}`)"),
            ("stage", f"{training.get('stage')}, seed {training.get('seed')}, "
             f"{training.get('epochs')} epoch{'' if training.get('epochs') == 1 else 's'}"),
            ("accuracy", _accuracy(training)),
            ("command", f"`{training['command']}`" if training.get("command") else "not recorded"),
        ]  # fmt: skip
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in (config.get("versions") or {}).items())))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    create = _create_call(backbone, weights)
    return (
        f"A selfprompt adapter: the tensors that train on a frozen "
        f"timm Vision Transformer ({trainable:,} values), with what rebuilds the model, its class names and "
        f"its preprocessing. The backbone's weights are not included.\n\n"
        f"| | |\n|---|---|\n{table}\n\n"
        f"## Use\n\n"
        f"```python\nimport selfprompt\nfrom selfprompt.backbones import create_backbone\n\n"
        f'backbone = {create}\nmodel = selfprompt.load_pretrained("THIS_FOLDER_OR_REPO", backbone)\n'
        f"print(model.task_info.labels)\n```\n\n"
        f"```bash\nselfprompt predict THIS_FOLDER_OR_REPO images/ --topk 3\n```\n\n"
        f"The backbone's weights must be the ones it was trained on: loading checks their fingerprint "
        f"(`{(backbone.get('fingerprint') or {}).get('sha256', 'not recorded')}`).\n"
    )


def _backbone(backbone: dict[str, Any], weights: dict[str, Any]) -> str:
    name = f"`{backbone['name']}`" if backbone["name"] else "hand-built"
    facts = [f"{backbone['depth']} blocks, width {backbone['embed_dim']}"]
    if weights.get("family"):
        facts.append(f"{weights['family']} weights")
    facts.append(f"licence {weights.get('license') or 'unknown'}")
    if weights.get("kwargs"):
        facts.append(", ".join(f"{k}={v}" for k, v in weights["kwargs"].items()))
    return f"{name} ({'; '.join(facts)})"


def _classes(labels: list[str]) -> str:
    shown = ", ".join(labels[:10])
    return f"{len(labels)}: {shown}{', ...' if len(labels) > 10 else ''}"


def _preprocessing(pre: dict[str, Any] | None) -> str:
    if pre is None:
        return "the backbone's pretrained configuration"
    size = "x".join(str(n) for n in pre["input_size"][-2:])
    return (
        f"resize ({pre['interpolation']}) and centre crop {size} (crop_pct {pre['crop_pct']}), mean "
        f"{list(pre['mean'])}, std {list(pre['std'])}"
    )


def _accuracy(training: dict[str, Any]) -> str:
    accuracy = training.get("accuracy")
    if accuracy is None:
        return "not evaluated"
    text = f"{100 * accuracy:.2f}% on {training.get('evaluated_on')} (last epoch)"
    if training.get("selected_on_test"):
        text += "; WARNING: its epoch was selected on the test set, not a valid test result"
    return text


def _create_call(backbone: dict[str, Any], weights: dict[str, Any]) -> str:
    name = backbone["name"]
    if not name or weights.get("checkpoint"):
        file = weights.get("checkpoint") or "WEIGHTS_FILE"
        arch = (name or "ARCHITECTURE").split("+")[0]
        return f'create_backbone("{arch}", "{file}")'
    kwargs = "".join(f", {k}={v!r}" for k, v in (weights.get("kwargs") or {}).items())
    return f'create_backbone("{name}"{kwargs})'
