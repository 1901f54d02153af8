"""The shard plan: contiguous row ranges, the same for the same input and shard size."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SHARD_SIZE = 64
MOST_SHARDS = 512  # --shard-size auto: beyond this many, shards grow instead
LARGEST_AUTO_SHARD = 16384


def auto_shard_size(num_rows: int) -> int:
    """--shard-size auto: 64 rows, doubled until the job has at most MOST_SHARDS shards (or shards of
    LARGEST_AUTO_SHARD). Past ~30,000 rows, smaller shards only add per-shard work (a part file, a
    scheduling round, a half-empty last tile) and files for a folder output; 512 shards still keep
    64 workers busy and lose at most 1/512 of the job to a crash. It depends on the row count
    alone, so a resume plans the same shards."""
    size = DEFAULT_SHARD_SIZE
    while size < LARGEST_AUTO_SHARD and -(-num_rows // size) > MOST_SHARDS:
        size *= 2
    return size


@dataclass(frozen=True)
class Shard:
    index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_shards(num_rows: int, shard_size: int | None = DEFAULT_SHARD_SIZE) -> list[Shard]:
    """Shards of `shard_size` rows (None: auto_shard_size)."""
    shard_size = shard_size or auto_shard_size(num_rows)
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    starts = range(0, num_rows, shard_size)
    return [Shard(i, start, min(start + shard_size, num_rows)) for i, start in enumerate(starts)]
