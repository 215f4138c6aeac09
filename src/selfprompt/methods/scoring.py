"""What the second stages of E2VPT (``selfprompt prune``) and Prompt Condensation (``selfprompt condense``)
share beyond loading the run (``selfprompt.engine.trained.scoring_source``): the key that lets a finished
scoring be reused and the ``--max_batches`` option."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def reusable(record: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The record at ``record`` when it was written for the same ``key``, else None; a damaged record is a
    ValueError naming it."""
    if not record.is_file():
        return None
    try:
        saved = json.loads(record.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{record} is not valid JSON ({error}): the file is damaged; restore it, or delete it and resume "
            f"to write it again."
        ) from None
    return saved if {k: saved.get(k) for k in key} == key else None


def max_batches_argument(parser: Any) -> None:
    """Adds ``--max_batches`` to a second stage's parser."""
    parser.add_argument(
        "--max_batches", type=int | None, default=None, help="Score on this many batches (default: all)."
    )
