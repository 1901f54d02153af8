"""Per-shard checkpoints under OUTPUT.parts/: a manifest plus one Parquet part per finished shard.

Every file is written under a temporary name and renamed, so a crash never leaves a half file
that looks finished. A part file's presence means its shard is done.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.errors import JobError
from jobs.shards import Shard


def parts_folder(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class PartStore:
    def __init__(self, output: Path) -> None:
        self.folder = parts_folder(output)
        self.manifest = self.folder / "manifest.json"

    def part(self, shard: Shard) -> Path:
        return self.folder / f"part-{shard.index:05d}.parquet"

    def open(self, fingerprint: str, plan: Sequence[Shard], settings: dict, overwrite: bool) -> set[int]:
        """Start or resume the job's checkpoints; returns the indices of shards already done."""
        if self.folder.exists() and overwrite:
            shutil.rmtree(self.folder)
        if self.manifest.is_file():
            found = json.loads(self.manifest.read_text()).get("fingerprint")
            if found != fingerprint:
                raise JobError(
                    f"{self.folder} holds checkpoints of a different job (fingerprint {found}, this "
                    f"job {fingerprint}); pass --overwrite to discard them, or choose another --output"
                )
            return {s.index for s in plan if self.part(s).is_file()}
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = {
            "fingerprint": fingerprint,
            "shards": [[s.start, s.stop] for s in plan],
            "settings": settings,
        }
        write_atomic(self.manifest, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
        return set()

    def write(self, shard: Shard, table: pa.Table) -> None:
        write_atomic(self.part(shard), lambda tmp: pq.write_table(table, tmp))

    def read(self, plan: Sequence[Shard]) -> pa.Table:
        return pa.concat_tables([pq.read_table(self.part(s)) for s in plan])

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
