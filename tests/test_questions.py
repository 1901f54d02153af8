import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bulkscore.jobs.errors import InputError
from bulkscore.jobs.questions import Columns, bundled_questions, load_questions
from bulkscore.jobs.settings import JobSpec, fingerprint
from bulkscore.jobs.storage import locate
from bulkscore.workers.contract import GenerationSettings, GradingSettings, ModelSpec, PromptSettings, ScoringSettings
from tests.helpers import QUESTIONS, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def four_formats(tmp_path: Path) -> dict[str, Path]:
    pairs = [[q["question"], q["answer"]] for q in QUESTIONS]
    jsonl = write_jsonl(tmp_path / "q.jsonl", [{"question": q["question"], "answer": q["answer"]} for q in QUESTIONS])
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps([{"question": q["question"], "answer": q["answer"]} for q in QUESTIONS]))
    homework = tmp_path / "pairs.json"
    homework.write_text(json.dumps([p + ["some reasoning"] if i % 2 else p for i, p in enumerate(pairs)]))
    parquet = tmp_path / "q.parquet"
    # Parquet columns are typed: the mixed answer column is stored as text (numbers as their
    # shortest text, as the other formats read them: 2500.0 is "2500").
    answers = [
        a if isinstance(a, str) else f"{a:g}" if a == int(a) else repr(a) for a in (q["answer"] for q in QUESTIONS)
    ]
    pq.write_table(pa.table({"question": [q["question"] for q in QUESTIONS], "answer": answers}), parquet)
    return {"jsonl": jsonl, "json": objects, "pairs": homework, "parquet": parquet}


def test_four_formats_give_identical_rows(tmp_path):
    tables = {name: load_questions([path]) for name, path in four_formats(tmp_path).items()}
    expected = {
        "id": list(range(len(QUESTIONS))),
        "question": [q["question"] for q in QUESTIONS],
        "reference": ["6000", "2500", "180", "0.75", "2000", "Paris", "90", "16.09344"],
    }
    # The homework's third element, the reasoning, passes through as a column of its own.
    reasoning = tables.pop("pairs")
    assert reasoning.column("reasoning").to_pylist() == [None, "some reasoning"] * (len(QUESTIONS) // 2)
    tables["pairs"] = reasoning.drop_columns(["reasoning"])
    for name, table in tables.items():
        assert table.to_pydict() == expected, name
        assert table.schema == pa.schema([("id", pa.int64()), ("question", pa.string()), ("reference", pa.string())])
    # The same rows make the same job, whatever file they came from: resume and --overwrite agree.
    spec = JobSpec(
        ("x",),
        locate("a.parquet"),
        ModelSpec("", "embedded"),
        ScoringSettings(PromptSettings(), GenerationSettings(), GradingSettings()),
        64,
        None,
    )
    assert len({fingerprint(spec, table) for table in tables.values()}) == 1
    assert fingerprint(spec, reasoning) != fingerprint(spec, tables["pairs"])  # more content, another job


def test_parquet_folder_and_numeric_answers(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": ["a?", "b?"], "target": [1.5, 2.0]}), folder / "0.parquet")
    pq.write_table(pa.table({"prompt": ["c?"], "target": [3.25]}), folder / "1.parquet")
    table = load_questions([folder])
    assert table.column("question").to_pylist() == ["a?", "b?", "c?"]
    assert table.column("reference").to_pylist() == ["1.5", "2", "3.25"]  # numbers as their shortest text


def test_ids_kept_with_their_type_and_inputs_concatenated_in_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "q-1", "input": "x?", "correct_answer": 1}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "q-0", "input": "y?"}])
    table = load_questions([a, b])
    assert table.to_pydict() == {"id": ["q-1", "q-0"], "question": ["x?", "y?"], "reference": ["1", None]}
    assert table.schema.field("id").type == pa.string()


def test_named_columns_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"key": i, "q": f"q{i}?", "gold": i * 2} for i in range(5)])
    table = load_questions([path], Columns(question="q", answer="gold", id="key"), limit=2)
    assert table.to_pydict() == {"id": [0, 1], "question": ["q0?", "q1?"], "reference": ["0", "2"]}


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"question": "a"}\n{"question": \n', "bad.jsonl, line 2: not valid JSON"),
        ("list.jsonl", '{"question": "a"}\n[1, 2]\n', "bad.jsonl, line 2: expected a JSON object, got list"),
        ("obj.json", '{"question": "a"}', "expected a JSON array"),
        ("q.csv", "question\na\n", "unsupported format .csv"),
        ("noq.jsonl", '{"text": "a"}\n', "no question column (looked for question, prompt, input); columns: text"),
        ("empty.jsonl", "", "no rows"),
        ("dup.jsonl", '{"id": 1, "question": "a"}\n{"id": 1, "question": "b"}\n', "duplicate id 1"),
    ],
)
def test_bad_inputs_name_the_file_and_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError) as error:
        load_questions([path])
    assert message.replace("bad.jsonl", name) in str(error.value)
    assert str(path) in str(error.value)


def test_undecodable_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "ok"}\n{"question": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"latin1.jsonl, line 2: not UTF-8 text; save the file as UTF-8"):
        load_questions([path])


def test_missing_file_and_unknown_column(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        load_questions([tmp_path / "nope.jsonl"])
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "a?"}])
    with pytest.raises(InputError, match=r"no column 'ask' \(asked for by --question-column\); columns: question"):
        load_questions([path], Columns(question="ask"))


def test_bundled_set_is_what_the_script_makes(tmp_path):
    subprocess.run(
        [sys.executable, ROOT / "scripts" / "make_questions.py", tmp_path / "q.jsonl"], check=True, capture_output=True
    )
    assert (tmp_path / "q.jsonl").read_bytes() == bundled_questions().read_bytes()
    table = load_questions([bundled_questions()])
    rows = [json.loads(line) for line in bundled_questions().read_text().splitlines()]
    assert table.num_rows == len(rows) == 300
    assert {r["category"] for r in rows} == {"length", "mass", "volume", "time", "data", "speed"}
    assert table.column("id").to_pylist() == list(range(300))


def test_null_or_empty_questions_are_rows_not_file_errors(tmp_path):
    path = write_jsonl(
        tmp_path / "q.jsonl",
        [{"question": None, "answer": 1}, {"question": "", "answer": 2}, {"question": "ok?", "answer": 3}],
    )
    assert load_questions([path]).column("question").to_pylist() == [None, "", "ok?"]


def test_other_columns_stack_row_for_row_across_inputs(tmp_path):
    """A column one input lacks is null in its rows; mixed types in one column are refused."""
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"question": "a?", "answer": 1}, {"question": "b?", "answer": 2}])
    tagged = write_jsonl(tmp_path / "tagged.jsonl", [{"question": "c?", "answer": 3, "category": "mass", "level": 2}])
    table = load_questions([plain, tagged])
    assert table.column_names == ["id", "question", "reference", "category", "level"]
    assert table.column("category").to_pylist() == [None, None, "mass"]
    assert table.column("level").type == pa.int64() and table.column("level").to_pylist() == [None, None, 2]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"question": "a?", "level": 1}, {"question": "b?", "level": "two"}])
    with pytest.raises(
        InputError, match=r"mixed.jsonl: column 'level' mixes types \(e.g. numbers and text\); make it one type"
    ):
        load_questions([mixed])


def test_jsonl_read_block_by_block_whatever_its_later_blocks_hold(tmp_path, monkeypatch):
    """pyarrow reads JSONL block by block with the first block's types; a later block with a decimal
    answer after whole ones, or a new column, is read whole instead, and gives what plain JSON does."""
    from bulkscore.jobs import questions

    monkeypatch.setattr(questions, "JSON_BLOCK", 4096)
    plain = [{"question": f"q{i}?", "answer": i} for i in range(500)]
    cases = {
        "same.jsonl": plain,
        "decimal.jsonl": plain + [{"question": "r?", "answer": 2.5}],
        "column.jsonl": plain + [{"question": "s?", "answer": 3, "note": "late"}],
    }
    for name, rows in cases.items():
        table = load_questions([write_jsonl(tmp_path / name, rows)])
        assert table.column("reference").to_pylist() == [str(r["answer"]) for r in rows], name
        assert table.column("question").to_pylist() == [r["question"] for r in rows], name
    late = load_questions([tmp_path / "column.jsonl"])
    assert late.column("note").to_pylist() == [None] * 500 + ["late"]
