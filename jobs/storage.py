"""Where a job's output lives: a local path, or a pyarrow filesystem URI (s3://, gs://, hdfs://...).

The driver alone writes there; workers send their results back through Ray, so they need no
shared disk. Local files are written under a temporary name and renamed; object stores publish an
object whole when its upload completes, so a half-written object never appears there either.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bulkscore.jobs.errors import JobError


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    path: str  # within fs
    text: str  # as the user wrote it, for messages

    @property
    def is_local(self) -> bool:
        return self.fs.type_name == "local"

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def __str__(self) -> str:
        return self.text

    def sibling(self, name: str) -> Location:
        base, sep, query = self.text.partition("?")
        base = base.rstrip("/")  # a folder written with its slash
        head = base.rsplit("/", 1)[0] + "/" if "/" in base else ""
        return Location(self.fs, posixpath.join(posixpath.dirname(self.path), name), head + name + sep + query)

    def child(self, name: str) -> Location:
        base, sep, query = self.text.partition("?")
        return Location(self.fs, posixpath.join(self.path, name), base.rstrip("/") + "/" + name + sep + query)

    def kind(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self.kind() != pafs.FileType.NotFound

    def make_dirs(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def names(self) -> list[str]:
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        return sorted(posixpath.basename(info.path) for info in self.fs.get_file_info(selector))

    def open_input(self) -> pa.NativeFile:
        return self.fs.open_input_stream(self.path)

    def read_bytes(self) -> bytes:
        with self.open_input() as f:
            return f.read()

    def write_bytes(self, data: bytes) -> None:
        self.write(lambda path: write_stream(self.fs, path, data))

    def read_table(self) -> pa.Table:
        return pq.read_table(self.path, filesystem=self.fs)

    def read_metadata(self) -> dict[bytes, bytes]:
        """A Parquet file's key-value metadata (what was added as it was closed included)."""
        with self.fs.open_input_file(self.path) as f:
            return pq.ParquetFile(f).metadata.metadata or {}

    def write_table(self, table: pa.Table) -> None:
        self.write(lambda path: pq.write_table(table, path, filesystem=self.fs))

    def write(self, put) -> None:
        """put(path) writes the file; locally under a temporary name, then renamed into place."""
        if not self.is_local:
            put(self.path)
            return
        tmp = posixpath.join(posixpath.dirname(self.path), f".{self.name}.tmp-{os.getpid()}")
        try:
            put(tmp)
            self.fs.move(tmp, self.path)
        finally:
            if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                self.fs.delete_file(tmp)

    def remove(self) -> None:
        """Delete this file, if it is there."""
        if self.kind() == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def remove_tree(self) -> None:
        if self.exists():
            self.fs.delete_dir(self.path)


def write_stream(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def locate(text: str) -> Location:
    """A Location for a local path or a filesystem URI; an unusable URI is refused clearly."""
    if "://" not in text:
        return Location(pafs.LocalFileSystem(), os.path.abspath(text), text)
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowException, OSError) as error:
        raise JobError(f"--output {text}: not a usable filesystem URI ({error})") from None
    return Location(fs, path, text)
