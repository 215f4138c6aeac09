"""Per-epoch metrics to JSONL and CSV (and optionally TensorBoard), rewritable from history on resume."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from selfprompt.atomic import atomic_write
from selfprompt.engine.rundir import TrainingDir


class MetricsLog:
    """Rows of per-epoch values in ``<name>.jsonl`` and ``<name>.csv`` of a training folder."""

    def __init__(
        self, folder: TrainingDir, tensorboard: bool = False, name: str = TrainingDir.METRICS
    ) -> None:
        self.jsonl = folder.log_file(name, "jsonl")
        self.csv = folder.log_file(name, "csv")
        self.rows: list[dict[str, Any]] = []
        self.writer = None
        if tensorboard:  # the run checked up front that the package is installed
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder.tensorboard))

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Start from ``rows`` (a resumed run's history), dropping lines written after its checkpoint."""
        self.rows = list(rows)
        text = "".join(json.dumps(r) + "\n" for r in self.rows)
        atomic_write(self.jsonl, lambda p: p.write_text(text))
        self._write_csv()

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv()
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()

    def _write_csv(self) -> None:
        columns = list(dict.fromkeys(k for r in self.rows for k in r))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.csv, lambda p: p.write_text(buffer.getvalue()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
