"""Hugging Face datasets in and out, with pyarrow alone on the driver.

A folder that `Dataset.save_to_disk` wrote holds state.json (its `_data_files`, in order),
dataset_info.json and those files: Arrow IPC streams (datasets' ArrowWriter) with any indices
mapping already applied. `DatasetDict.save_to_disk` writes dataset_dict.json ({"splits": [...]})
and one such folder per split, named after it. A `datasets.Dataset` given from Python is read
through its indices: after select, shuffle or filter its `.data` is the table from before them.
`datasets` itself is imported only where the caller already holds one of its objects, or asks for
one (a Result's `to_dataset`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs

from bulkscore.jobs.errors import InputError, JobError, UsageError
from bulkscore.jobs.storage import Location

if TYPE_CHECKING:
    import datasets

STATE = "state.json"
INFO = "dataset_info.json"
DICT = "dataset_dict.json"
# A hub dataset's id: a name, or owner/name, of letters, digits, - _ and .
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".pq", ".csv", ".tsv", ".txt", ".arrow")


def saved_kind(path: Location) -> str | None:
    """'dict' for a folder DatasetDict.save_to_disk wrote, 'dataset' for Dataset.save_to_disk's, else None."""
    if is_file(path.child(DICT)):
        return "dict"
    if is_file(path.child(STATE)) and is_file(path.child(INFO)):
        return "dataset"
    return None


def is_file(path: Location) -> bool:
    try:
        return path.kind() == pafs.FileType.File
    except (OSError, pa.ArrowException):
        return False


def read_saved(path: Location, split: str | None) -> pa.Table:
    """A saved Dataset's rows, or those of a saved DatasetDict's split (its only one, or `split`)."""
    if saved_kind(path) == "dict":
        path = path.child(pick_split(path, split))
    return read_dataset(path)


def pick_split(path: Location, split: str | None) -> str:
    splits = read_json(path, DICT).get("splits")
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise InputError(f"{path}: not a readable DatasetDict folder ({DICT} lists no splits)")
    if not splits:
        raise InputError(f"{path}: no rows (a DatasetDict with no splits)")
    if split is None:
        if len(splits) == 1:
            return splits[0]
        raise InputError(f"{path}: a DatasetDict with splits {', '.join(splits)}; choose one with --split")
    if split not in splits:
        raise InputError(f"{path}: no split {split!r} (asked for by --split); splits: {', '.join(splits)}")
    return split


def read_dataset(path: Location) -> pa.Table:
    """The Arrow files state.json lists, in order, as one table (no columns when it lists none)."""
    try:
        names = [entry["filename"] for entry in read_json(path, STATE)["_data_files"]]
    except (KeyError, TypeError):
        raise InputError(f"{path}: not a readable saved dataset ({STATE} lists no _data_files)") from None
    try:
        tables = [read_stream(path.child(name)) for name in names]
        return pa.concat_tables(tables) if tables else pa.table({})
    except (OSError, pa.ArrowException) as error:
        raise InputError(f"{path}: not a readable saved dataset ({error})") from None


def read_stream(path: Location) -> pa.Table:
    """One Arrow IPC stream file; memory-mapped where it is local, as datasets maps it (no copy)."""
    source = pa.memory_map(path.path) if path.is_local else path.fs.open_input_file(path.path)
    with source:
        return pa.ipc.open_stream(source).read_all()


def read_json(folder: Location, name: str) -> dict:
    try:
        data = json.loads(folder.child(name).read_bytes())
    except (OSError, pa.ArrowException, ValueError) as error:
        raise InputError(f"{folder}: cannot read {name} ({error})") from None
    if not isinstance(data, dict):
        raise InputError(f"{folder}: cannot read {name} (not a JSON object)")
    return data


def check_split(sources: Sequence[object], split: str | None) -> None:
    """--split chooses a DatasetDict folder's split: refused where no input is one."""
    if split is None or any(isinstance(s, Location) and saved_kind(s) == "dict" for s in sources):
        return
    where = ", ".join(map(str, sources))
    raise UsageError(
        "--split",
        f"{where} {'is' if len(sources) == 1 else 'are'} not a DatasetDict folder (one written by "
        "DatasetDict.save_to_disk); --split chooses one of its splits",
    )


def hub_hint(path: Location) -> str:
    """For a missing input named as a hub dataset is (owner/name): how to save it first; else ''."""
    text = path.text
    if "://" in text or not HUB_NAME.fullmatch(text) or PurePosixPath(text).suffix.lower() in FILE_SUFFIXES:
        return ""
    if "/" in text and os.path.isdir(text.split("/")[0]):  # a local folder's missing file, not a hub owner
        return ""
    folder = text.rsplit("/", 1)[-1]
    return (
        f". bulkscore does not download data while it runs; if {text} is a Hugging Face hub dataset, save "
        f"it to a folder first: python -c \"import datasets; datasets.load_dataset('{text}')"
        f".save_to_disk('{folder}')\" (name a config if it has several: load_dataset('{text}', 'main')), then: "
        f"bulkscore run {folder} --split test"
    )


ITER_ROWS = 8192  # an IterableDataset's rows per Arrow batch


def dataset_table(data: object) -> pa.Table | None:
    """A datasets.Dataset's rows as a pyarrow Table, through its indices mapping, or an
    IterableDataset's, read in Arrow batches (its rows as Python dicts would lose their types: an
    int32 or float32 column would come back 64-bit); None for other objects of datasets. A
    DatasetDict is refused."""
    import datasets  # already imported: `data` is one of its objects

    if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = list(data)
        raise UsageError(
            "INPUTS",
            f"a {type(data).__name__} with splits {', '.join(splits)}; give one split, e.g. "
            f"ds[{(splits[0] if splits else 'test')!r}]",
        )
    if isinstance(data, datasets.Dataset):
        return data.with_format("arrow")[:]  # the rows the indices pick, in their order; a slice without indices
    if isinstance(data, datasets.IterableDataset):
        batches = list(data.with_format("arrow").iter(batch_size=ITER_ROWS))
        if batches:  # without features each batch's types are inferred: unified across batches
            return pa.concat_tables(batches, promote_options="default")
        return data.features.arrow_schema.empty_table() if data.features else pa.table({})
    return None


def to_dataset(table: pa.Table) -> datasets.Dataset:
    """`table` as a datasets.Dataset (in memory, no copy)."""
    try:
        import datasets
    except ImportError:
        raise JobError("to_dataset needs the datasets package: pip install datasets") from None
    return datasets.Dataset(table)
