"""Hugging Face datasets in and out: save_to_disk folders (a Dataset's, a DatasetDict's split) read
with pyarrow alone, a Dataset given from Python through its indices, a hub name refused with the way
to save it, and a job's result as a Dataset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import bulkscore
import bulkscore.jobs.run
from bulkscore.jobs.api import Result, question_sources
from bulkscore.jobs.cli import cli
from bulkscore.jobs.questions import Columns, load_questions
from tests.helpers import QUESTIONS

TOPICS = ["mass", "length", "time", "volume", "data", "geography", "time", "speed"]
ROWS = [q | {"topic": t} for q, t in zip(QUESTIONS, TOPICS)]
TRAIN = ROWS[:4]
TEST = [ROWS[i] for i in (4, 6, 7)]  # numeric answers only: one Arrow type per column


@pytest.fixture(autouse=True)
def quiet_datasets():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for a job that should have been refused")

    monkeypatch.setattr(bulkscore.jobs.run, "ray_session", refuse)


@pytest.fixture
def dataset_dict(tmp_path) -> Path:
    folder = tmp_path / "units"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(TRAIN), "test": datasets.Dataset.from_list(TEST)}
    ).save_to_disk(folder)
    return folder


def invoke(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


def test_a_saved_dataset_reads_its_files_in_order_with_every_column(tmp_path):
    folder = tmp_path / "units"
    datasets.Dataset.from_list(ROWS[:4]).save_to_disk(folder, num_shards=2)
    assert len(json.loads((folder / "state.json").read_text())["_data_files"]) == 2
    table = load_questions([folder])
    assert table.column("id").to_pylist() == [10, 11, 12, 13]
    assert table.column("question").to_pylist() == [q["question"] for q in QUESTIONS[:4]]
    assert table.column("reference").to_pylist() == ["6000", "2500", "180", "0.75"]
    assert table.column_names == ["id", "question", "reference", "topic"]
    assert table.column("topic").to_pylist() == ["mass", "length", "time", "volume"]


def test_a_dataset_dicts_split_is_chosen_or_its_only_one_read(tmp_path, dataset_dict):
    assert load_questions([dataset_dict], Columns(split="test")).column("id").to_pylist() == [14, 16, 17]
    assert load_questions([dataset_dict], Columns(split="train")).column("id").to_pylist() == [10, 11, 12, 13]
    assert load_questions([dataset_dict / "test"]).column("id").to_pylist() == [14, 16, 17]  # a split's folder
    single = tmp_path / "single"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(TEST)}).save_to_disk(single)
    table = load_questions([single])
    assert table.column("reference").to_pylist() == ["2000", "90", "16.09344"]
    assert table.column("topic").to_pylist() == ["data", "time", "speed"]


@pytest.mark.usefixtures("no_ray")
def test_a_dataset_dict_without_a_split_or_with_an_unknown_one_is_refused(dataset_dict, tmp_path):
    result = invoke(dataset_dict, "-o", tmp_path / "o.parquet")
    assert (result.exit_code, result.stderr) == (
        1,
        f"Error: {dataset_dict}: a DatasetDict with splits train, test; choose one with --split\n",
    )
    result = invoke(dataset_dict, "--split", "validation", "-o", tmp_path / "o.parquet")
    assert (result.exit_code, result.stderr) == (
        1,
        f"Error: {dataset_dict}: no split 'validation' (asked for by --split); splits: train, test\n",
    )
    assert not (tmp_path / "o.parquet").exists()


@pytest.mark.usefixtures("no_ray")
def test_split_for_an_input_that_is_no_dataset_dict_is_a_usage_error(tmp_path):
    folder = tmp_path / "plain"
    datasets.Dataset.from_list(TEST).save_to_disk(folder)
    result = invoke(folder, "--split", "test", "-o", tmp_path / "o.parquet")
    assert result.exit_code == 2
    assert result.stderr.endswith(
        f"Error: Invalid value for --split: {folder} is not a DatasetDict folder (one written by "
        "DatasetDict.save_to_disk); --split chooses one of its splits\n"
    )
    with pytest.raises(bulkscore.UsageError, match="'--split': the Dataset given is not a DatasetDict folder"):
        load_questions(question_sources(datasets.Dataset.from_list(TEST)), Columns(split="test"))


@pytest.mark.usefixtures("no_ray")
def test_a_broken_saved_dataset_names_the_folder(tmp_path):
    folder = tmp_path / "units"
    datasets.Dataset.from_list(TEST).save_to_disk(folder)
    (folder / "data-00000-of-00001.arrow").unlink()
    result = invoke(folder, "-o", tmp_path / "o.parquet")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {folder}: not a readable saved dataset (")
    assert "Traceback" not in result.output


@pytest.mark.usefixtures("no_ray")
def test_a_hub_name_is_not_downloaded_and_the_error_says_how_to_save_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("openai/gsm8k")
    assert (result.exit_code, result.stderr) == (
        1,
        "Error: openai/gsm8k: no such file or folder. bulkscore does not download data while it runs; if "
        'openai/gsm8k is a Hugging Face hub dataset, save it to a folder first: python -c "import datasets; '
        "datasets.load_dataset('openai/gsm8k').save_to_disk('gsm8k')\" (name a config if it has several: "
        "load_dataset('openai/gsm8k', 'main')), then: bulkscore run gsm8k --split test\n",
    )
    (tmp_path / "data").mkdir()  # a local folder's missing file, and a file's name: no hub hint
    for name in ("data/questions", "questions.jsonl"):
        result = invoke(name)
        assert (result.exit_code, result.stderr) == (1, f"Error: {name}: no such file or folder\n")


def test_a_dataset_in_memory_is_read_through_its_indices():
    whole = datasets.Dataset.from_list(TRAIN + TEST)
    picked = whole.filter(lambda row: row["topic"] != "time").shuffle(seed=3).select([0, 2, 4])
    assert picked.data.num_rows == 7  # the table from before the filter: what a careless reader would score
    rows = picked.to_list()
    (source,) = question_sources(picked)
    table = load_questions([source])
    assert str(source) == "the Dataset given"
    assert table.column("id").to_pylist() == [r["id"] for r in rows] == [17, 11, 10]  # no "time" row, shuffled
    assert table.column("topic").to_pylist() == [r["topic"] for r in rows]
    assert table.column("question").to_pylist() == [r["question"] for r in rows]
    dataset_dict = datasets.DatasetDict({"train": whole, "test": picked})
    with pytest.raises(bulkscore.UsageError) as refused:
        question_sources(dataset_dict)
    assert str(refused.value) == (
        "Invalid value for 'INPUTS': a DatasetDict with splits train, test; give one split, e.g. ds['train']"
    )


def test_an_iterable_dataset_is_read_in_arrow_batches_with_its_types(monkeypatch):
    """Its rows in order, and its columns' own types: through Python dicts an int32 column came back
    int64 and a float32 one float64."""
    import bulkscore.jobs.hfdatasets

    features = datasets.Features(
        {"id": datasets.Value("int32"), "question": datasets.Value("string"), "weight": datasets.Value("float32")}
    )
    rows = [{"id": i, "question": q["question"], "weight": i / 4} for i, q in enumerate(QUESTIONS * 3)]
    monkeypatch.setattr(bulkscore.jobs.hfdatasets, "ITER_ROWS", 5)  # several batches
    streamed = datasets.Dataset.from_list(rows, features=features).to_iterable_dataset()
    (source,) = question_sources(streamed)
    table = load_questions([source])
    assert table.column("id").to_pylist() == [r["id"] for r in rows]
    assert table.column("question").to_pylist() == [r["question"] for r in rows]
    assert table.schema.field("weight").type == pa.float32() and table.column("weight").to_pylist() == [
        r["weight"] for r in rows
    ]
    assert source.data.schema.field("id").type == pa.int32()

    def generated():  # no features: each batch's types are inferred
        yield from ({"question": r["question"], "answer": r["id"]} for r in rows)

    (source,) = question_sources(datasets.IterableDataset.from_generator(generated))
    assert load_questions([source]).column("question").to_pylist() == [r["question"] for r in rows]


def test_the_driver_reads_a_saved_dataset_without_importing_datasets(tmp_path, dataset_dict):
    code = (
        "import sys; from bulkscore.jobs.questions import Columns, load_questions; "
        f"t = load_questions([{str(dataset_dict)!r}], Columns(split='test')); "
        "print(t.column('id').to_pylist(), 'datasets' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "[14, 16, 17] False\n"), done.stderr[-2000:]


def test_to_dataset_without_the_datasets_package_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(bulkscore.JobError, match=r"^to_dataset needs the datasets package: pip install datasets$"):
        Result({}, rows=pa.table({"id": [1]})).to_dataset()


@pytest.mark.usefixtures("ray_instance")
def test_a_job_on_a_dataset_returns_a_dataset_and_the_split_makes_the_job(tiny_model, tmp_path, dataset_dict):
    options = {"model": str(tiny_model), "max_new_tokens": 6, "quiet": True}
    picked = datasets.Dataset.from_list(TEST).shuffle(seed=3)
    result = bulkscore.run(picked, **options)
    assert result.table.column("id").to_pylist() == [17, 16, 14]  # the shuffled order
    assert result.table.column("topic").to_pylist() == ["speed", "time", "data"]
    assert result.summary["rows"] == 3 and result.summary["errors"] == 0
    returned = result.to_dataset()
    assert isinstance(returned, datasets.Dataset)
    assert returned.column_names == result.table.column_names
    assert returned.to_list() == result.table.to_pylist()

    output = tmp_path / "answers.parquet"
    common = ["--model", tiny_model, "--max-new-tokens", "6", "--quiet", "-o", output]
    done = invoke(dataset_dict, "--split", "test", *common)
    assert done.exit_code == 0, done.output
    written = pq.read_table(output)
    assert written.column("id").to_pylist() == [14, 16, 17]
    by_id = dict(zip(result.table.column("id").to_pylist(), result.table.column("completion").to_pylist()))
    assert written.column("completion").to_pylist() == [by_id[i] for i in (14, 16, 17)]
    other = invoke(dataset_dict, "--split", "train", *common)  # other rows: another job, not a resume
    assert other.exit_code == 1
    assert f"Error: {output} holds the results of a different job" in other.stderr
