"""The shard plan: contiguous row ranges, the same for the same input and shard size."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SHARD_SIZE = 64


@dataclass(frozen=True)
class Shard:
    index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_shards(num_rows: int, shard_size: int = DEFAULT_SHARD_SIZE) -> list[Shard]:
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    starts = range(0, num_rows, shard_size)
    return [Shard(i, start, min(start + shard_size, num_rows)) for i, start in enumerate(starts)]
