"""``selfprompt prune``: E2VPT's scoring step on a trained e2vpt run (:mod:`.model`): the scores of its
visual prompts' token and segment masks, the file a rewound run's ``e2vpt.pruning`` names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfprompt.atomic import write_json
from selfprompt.methods.e2vpt.model import E2VPT, SEGMENTS, mask_importance, pruning_masks
from selfprompt.methods.registry import ScoringSource, StageCommand
from selfprompt.methods.scoring import max_batches_argument, reusable


def prune_run(
    run_dir: str | Path,
    output: str | Path,
    source: ScoringSource,
    seed: int | None = None,
    stage: str = "final",
    device: str = "auto",
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Score the token and segment masks of ``run_dir``'s trained e2vpt model on the training images of its
    ``stage`` (eval transforms, loaded by ``source``) and write the record to the file ``output``; a record
    of the same run, seed, stage and data is reused. Returns the record."""
    cfg, model, loader, key = source(
        run_dir, seed, stage, device, E2VPT, "prune an e2vpt run (its visual prompts are what E2VPT prunes)"
    )
    key |= {"max_batches": max_batches, "num_prompts": model.num_prompts, "segments": SEGMENTS}
    out = Path(output)
    record = reusable(out, key)
    if record is not None:
        print(f"reused {out} (scored from the same run, seed, stage and data)")
        return record
    tokens, segments = mask_importance(model, loader, max_batches)
    record = {
        **key,
        "prompt_init": cfg.prompt.init,
        "token_scores": tokens.tolist(),
        "segment_scores": segments.tolist(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, record)
    print(f"scored {model.num_prompts} visual prompts x {SEGMENTS} segments -> {out}")
    print(f"{'pruned share':>12s}  tokens kept (by index)")
    for share in (0.1, 0.3, 0.5, 0.7, 0.9):
        kept = [i for i, k in enumerate(pruning_masks(tokens, segments, share, 0.0)[0]) if k]
        print(f"{share:12.1f}  {kept}")
    return record


def _arguments(parser: Any) -> None:
    parser.add_argument("--output", type=str, required=True, help="The file of the scores (JSON).")
    max_batches_argument(parser)


def _run(args: Any, source: ScoringSource) -> None:
    if args.ema:
        raise ValueError("--ema: prune scores the trained prompts themselves; drop --ema.")
    prune_run(args.run_dir, args.output, source, args.seed, args.stage, args.device, args.max_batches)


PRUNE = StageCommand(
    "prune",
    "E2VPT pruning: score an e2vpt run's prompt masks for a pruned, rewound run.",
    "E2VPT pruning: score the token and segment masks of an e2vpt run's visual prompts on its training "
    "images, for a run that retrains from its initial values with them pruned (--e2vpt.pruning FILE "
    "--e2vpt.prune_tokens T --e2vpt.prune_segments S).",
    _arguments,
    _run,
)
