"""Per-shard checkpoints under OUTPUT.parts/: a manifest plus one Parquet part per finished shard.
For a folder output the parts are the output itself: OUTPUT/part-NNNNN.parquet, and the manifest
OUTPUT/_manifest.json (a name Parquet readers skip).

Every file appears whole or not at all (see jobs.storage), so a crash never leaves a half file
that looks finished. A part file's presence means its shard is done.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import pyarrow as pa

from bulkscore.jobs.errors import JobError
from bulkscore.jobs.gather import FOLDER_MANIFEST, is_folder
from bulkscore.jobs.shards import Shard
from bulkscore.jobs.storage import Location


def checkpoints(output: Location) -> Location:
    """Where a job on `output` keeps its finished shards."""
    return output if is_folder(output) else parts_folder(output)


def parts_folder(output: Location) -> Location:
    return output.sibling(output.name + ".parts")


def part_name(shard: Shard) -> str:
    return f"part-{shard.index:05d}.parquet"


class PartStore:
    def __init__(self, output: Location, folder_output: bool = False) -> None:
        self.folder = output if folder_output else parts_folder(output)
        self.manifest = self.folder.child(FOLDER_MANIFEST if folder_output else "manifest.json")

    def open(self, fingerprint: str, plan: Sequence[Shard], settings: dict, overwrite: bool) -> set[int]:
        """Start or resume the job's checkpoints; returns the indices of shards already done."""
        if overwrite:
            self.folder.remove_tree()
        if self.manifest.exists():
            found = json.loads(self.manifest.read_bytes()).get("fingerprint")
            if found != fingerprint:
                raise JobError(
                    f"{self.folder} holds checkpoints of a different job (fingerprint {found}, this "
                    f"job {fingerprint}); pass --overwrite to discard them, or choose another --output"
                )
            names = set(self.folder.names())
            return {s.index for s in plan if part_name(s) in names}
        self.folder.make_dirs()
        manifest = {
            "fingerprint": fingerprint,
            "shards": [[s.start, s.stop] for s in plan],
            "settings": settings,
        }
        self.manifest.write_bytes(json.dumps(manifest, indent=2).encode())
        return set()

    def write(self, shard: Shard, table: pa.Table) -> None:
        self.folder.child(part_name(shard)).write_table(table)

    def parts(self, plan: Sequence[Shard]) -> Iterator[pa.Table]:
        """The parts in input order, read one at a time."""
        for shard in plan:
            yield self.folder.child(part_name(shard)).read_table()

    def remove(self) -> None:
        self.folder.remove_tree()


class MemoryStore:
    """PartStore's place for a job with no output (bulkscore.run without `output`): nothing is
    written, and nothing resumes."""

    folder = "memory"

    def __init__(self) -> None:
        self.tables: dict[int, pa.Table] = {}

    def open(self, fingerprint: str, plan: Sequence[Shard], settings: dict, overwrite: bool) -> set[int]:
        return set()

    def write(self, shard: Shard, table: pa.Table) -> None:
        self.tables[shard.index] = table

    def read(self, plan: Sequence[Shard]) -> pa.Table:
        return pa.concat_tables([self.tables[s.index] for s in plan])

    def remove(self) -> None:
        self.tables.clear()
