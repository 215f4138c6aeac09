"""What the second stages of E2VPT (``selfprompt prune``) and Prompt Condensation (``selfprompt condense``)
share beyond loading the run (``selfprompt.engine.trained.scoring_source``): the key that lets a finished
scoring be reused and the ``--max_batches`` option."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfprompt.atomic import read_json


def reusable(record: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The record at ``record`` when it was written for the same ``key``, else None; a damaged record is a
    ValueError naming it."""
    if not record.is_file():
        return None
    saved = read_json(record)
    return saved if {k: saved.get(k) for k in key} == key else None


def max_batches_argument(parser: Any) -> None:
    """Adds ``--max_batches`` to a second stage's parser."""
    parser.add_argument(
        "--max_batches", type=int | None, default=None, help="Score on this many batches (default: all)."
    )
