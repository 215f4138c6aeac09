"""``selfprompt condense``: Prompt Condensation's scoring step on a trained vpt-*/spt-* run (see
:mod:`selfprompt.methods.condensation.model`), written as a ``pc`` adapter plus a record of what was kept."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from selfprompt.atomic import write_json
from selfprompt.methods.condensation.model import RECORD, check_keep, condense, kept_mask, prompt_importance
from selfprompt.methods.prompt import PromptedViT
from selfprompt.methods.registry import ScoringSource, StageCommand
from selfprompt.methods.scoring import max_batches_argument, reusable


def condense_run(
    run_dir: str | Path,
    keep: float,
    output: str | Path,
    source: ScoringSource,
    seed: int | None = None,
    stage: str = "final",
    device: str = "auto",
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Score the prompts of ``run_dir``'s trained model on the training images of its ``stage`` (eval
    transforms, loaded by ``source``), keep the best ``keep`` share and write the condensed adapter into
    ``output``; an ``output`` condensed from the same run, seed, stage and data is reused. Returns the
    record."""
    check_keep(keep)
    _, model, loader, key = source(
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
    condensed = condense(model, mask)
    # the same classes and preprocessing; the run's accuracy is not the condensed model's
    condensed.task_info = replace(model.task_info, training=None)
    condensed.save_pretrained(out)
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


def _arguments(parser: Any) -> None:
    parser.add_argument("--keep", type=float, default=0.3, help="Share of the prompts kept, in (0, 1].")
    parser.add_argument("--output", type=str, required=True, help="The folder of the condensed adapter.")
    max_batches_argument(parser)


def _run(args: Any, source: ScoringSource) -> None:
    if args.ema:
        raise ValueError("--ema: condense ranks the trained prompts themselves; drop --ema.")
    condense_run(
        args.run_dir, args.keep, args.output, source, args.seed, args.stage, args.device, args.max_batches
    )


CONDENSE = StageCommand(
    "condense",
    "Prompt Condensation: keep a run's most important prompts for method pc.",
    "Prompt Condensation: keep the best share of a vpt-*/spt-* run's prompts, ranked on its training "
    "images, as an adapter that method pc fine-tunes (--condense.adapter).",
    _arguments,
    _run,
)
