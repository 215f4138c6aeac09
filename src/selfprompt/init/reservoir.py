"""A uniform sample without replacement from a stream of rows, in bounded memory."""

from __future__ import annotations

import torch


class Reservoir:
    """Keeps the ``capacity`` rows with the smallest i.i.d. uniform keys seen so far.

    That is a uniform random subset of the whole stream, as if all rows were stacked and permuted at once
    (the official SPT sampling), but never holding more than ``capacity`` rows plus one batch. Keys come
    from a CPU generator, so the choice depends only on the seed and the stream order, not on the device.
    """

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        self.capacity = capacity
        self.generator = generator
        self.rows: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.seen = 0

    def add(self, rows: torch.Tensor) -> None:
        keys = torch.rand(len(rows), generator=self.generator, dtype=torch.float64).to(rows.device)
        self.seen += len(rows)
        if self.rows is None:
            self.rows, self.keys = rows[:0], keys[:0]
        if len(self.keys) == self.capacity:  # only rows beating the current worst key can enter
            beats = keys < self.keys.max()
            rows, keys = rows[beats], keys[beats]
        rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        if len(keys) > self.capacity:
            kept = keys.topk(self.capacity, largest=False).indices
            rows, keys = rows[kept], keys[kept]
        self.rows, self.keys = rows, keys
