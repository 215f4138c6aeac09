"""``selfprompt condense``: Prompt Condensation's scoring step on a trained vpt-*/spt-* run (see
:mod:`selfprompt.methods.condensation`), written as a ``pc`` adapter plus a record of what was kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfprompt.apps.scoring import reusable, scoring_source
from selfprompt.atomic import write_json
from selfprompt.methods.condensation import RECORD, check_keep, condense, kept_mask, prompt_importance
from selfprompt.methods.prompt import PromptedViT


def condense_run(
    run_dir: str | Path,
    keep: float,
    output: str | Path,
    seed: int | None = None,
    stage: str = "final",
    device: str = "auto",
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Score the prompts of ``run_dir``'s trained model on the training images of its ``stage`` (eval
    transforms), keep the best ``keep`` share and write the condensed adapter into ``output``; an ``output``
    condensed from the same run, seed, stage and data is reused. Returns the record."""
    check_keep(keep)
    _, model, loader, key = scoring_source(
        run_dir,
        seed,
        stage,
        device,
        PromptedViT,
        "condense a vpt-deep or spt-deep run (its prompts are what Prompt Condensation ranks)",
    )
    key |= {"keep": keep, "max_batches": max_batches}
    out = Path(output)
    record = reusable(out / RECORD, key)
    if record is not None and (out / "adapter_config.json").is_file():
        print(f"reused {out} (condensed from the same run, seed, stage and data)")
        return record
    scores = prompt_importance(model, loader, max_batches)
    mask = kept_mask(scores, keep)
    model.requires_grad_(False)
    condense(model, mask).save_pretrained(out)
    counts = mask.sum(1).tolist()
    record = {
        **key,
        "prompts_before": int(mask.numel()),
        "prompts_kept": int(mask.sum()),
        "layer_counts": counts,
        "kept": mask.int().tolist(),
        "scores": scores.tolist(),
    }
    write_json(out / RECORD, record)
    print(f"kept {record['prompts_kept']} of {record['prompts_before']} prompts -> {out}")
    print(f"{'layer':>5s} {'kept':>5s} {'best score':>11s} {'median score':>13s}")
    for layer, (count, row) in enumerate(zip(counts, scores, strict=True)):
        print(f"{layer:5d} {count:5d} {row.max():11.3e} {row.median():13.3e}")
    return record
