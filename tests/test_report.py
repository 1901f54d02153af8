"""`bulkscore report` pages opened in headless Chromium, and input columns passing through `run`."""

from __future__ import annotations

import json
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from bulkscore.jobs.cli import cli
from bulkscore.jobs.report import COLOURS
from tests.helpers import QUESTIONS, browser, write_jsonl
from tests.test_cli import OUTPUT_SCHEMA

CATEGORIES = ["mass", "length", "time", "volume", "data", "trivia", "time", "speed"]
HOSTILE = "<script>alert('x')</script><img src=x onerror=alert(1)> & \"quotes\""


def run_job(tiny_model, questions: Path, output: Path, *extra: str) -> pa.Table:
    result = CliRunner().invoke(
        cli,
        [
            "run",
            str(questions),
            "--model",
            str(tiny_model),
            "-o",
            str(output),
            "--max-new-tokens",
            "8",
            "--quiet",
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    return pq.read_table(output)


def report(*args) -> str:
    result = CliRunner().invoke(cli, ["report", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory, ray_instance) -> dict[str, Path]:
    """Two runs of one set (chat, raw) with a category column, one empty question (an error row) and
    a hostile question; and a run without references."""
    folder = tmp_path_factory.mktemp("report")
    rows = [q | {"category": c} for q, c in zip(QUESTIONS, CATEGORIES)]
    rows[5] = rows[5] | {"question": HOSTILE}
    rows.append({"id": 18, "question": "  ", "answer": 1, "category": "mass"})
    questions = write_jsonl(folder / "questions.jsonl", rows)
    bare = write_jsonl(folder / "bare.jsonl", [{"question": q["question"]} for q in QUESTIONS])
    out = {name: folder / f"{name}.parquet" for name in ("chat", "raw", "bare")}
    run_job(tiny_model, questions, out["chat"], "--answer-regex", r"(\d+)")
    run_job(tiny_model, questions, out["raw"], "--prompt-format", "raw", "--answer-regex", r"(\d+)")
    run_job(tiny_model, bare, out["bare"])
    return out


class Marked(HTMLParser):
    """Text of each element carrying data-metric, keyed by (run, group, metric); and the error kinds."""

    def __init__(self):
        super().__init__()
        self.stack: list[dict] = []
        self.values: dict[tuple, str] = {}
        self.kinds: dict[tuple, str] = {}
        self.tags: Counter = Counter()

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        if tag in ("meta", "br", "img", "line", "rect", "input"):
            return
        self.stack.append(dict(attrs) | {"tag": tag, "text": ""})

    def handle_endtag(self, tag):
        while self.stack:
            element = self.stack.pop()
            if "data-metric" in element:
                run = next((e["data-run"] for e in [element, *reversed(self.stack)] if "data-run" in e), None)
                group = next((e["data-group"] for e in [element, *reversed(self.stack)] if "data-group" in e), None)
                self.values[(int(run), group, element["data-metric"])] = element["text"].strip()
            if "data-error-kind" in element:
                self.kinds[(int(element["data-run"]), element["data-error-kind"])] = element["text"].strip()
            if self.stack:
                self.stack[-1]["text"] += element["text"]
            if element["tag"] == tag:
                break

    def handle_data(self, data):
        if self.stack:
            self.stack[-1]["text"] += data


def pixels(image: Image.Image) -> Counter:
    """How many pixels of each colour."""
    return Counter({colour: n for n, colour in image.getcolors(image.width * image.height)})


def rendered(page: Path) -> Marked:
    """The page's DOM as Chromium built it, parsed."""
    marked = Marked()
    marked.feed(browser(page, "--dump-dom").stdout)
    return marked


def pct(correct: int, total: int) -> str:
    return f"{100 * correct / total:.1f}%"


def expected_figures(table: pa.Table) -> dict[str, str]:
    """The summary the page should state, computed from the Parquet rows in plain Python."""
    rows = table.to_pylist()
    graded = [r for r in rows if r["reference"] is not None]
    correct = sum(1 for r in rows if r["is_correct"])
    answered = sum(1 for r in rows if r["answer_text"] is not None)
    losses = [r["loss"] for r in rows if r["loss"] is not None]
    return {
        "rows": f"{len(rows):,}",
        "errors": str(sum(1 for r in rows if r["error"] is not None)),
        "accuracy": f"{pct(correct, len(graded))} ({correct} of {len(graded)})" if graded else "– (0 of 0)",
        "answer_rate": f"{pct(answered, len(rows))} ({answered})",
        "mean_loss": f"{sum(losses) / len(losses):.3f}",
        "prompt_tokens": f"{sum(r['num_prompt_tokens'] for r in rows):,}",
        "completion_tokens": f"{sum(r['num_completion_tokens'] for r in rows):,}",
    }


def test_input_columns_pass_through_run_with_their_types(tiny_model, tmp_path, ray_instance):
    """Other columns follow the contract's, typed as in the input; a clashing name gets `input_`."""
    extra = pa.table(
        {
            "category": [f"c{i % 3}" for i in range(len(QUESTIONS))],
            "level": pa.array(range(len(QUESTIONS)), pa.int16()),
            "weight": [0.5 * i for i in range(len(QUESTIONS))],
            "tags": [["a", "b"][: i % 3] for i in range(len(QUESTIONS))],
            "completion": [f"given {i}" for i in range(len(QUESTIONS))],
        }
    )
    source = pa.table(
        {
            "id": [q["id"] for q in QUESTIONS],
            "question": [q["question"] for q in QUESTIONS],
            "answer": [str(q["answer"]) for q in QUESTIONS],
        }
    )
    for name in extra.column_names:
        source = source.append_column(name, extra.column(name))
    pq.write_table(source, tmp_path / "questions.parquet")
    table = run_job(tiny_model, tmp_path / "questions.parquet", tmp_path / "out.parquet", "--shard-size", "3")
    passed = [
        ("category", pa.string()),
        ("level", pa.int16()),
        ("weight", pa.float64()),
        ("tags", pa.list_(pa.string())),
        ("input_completion", pa.string()),
    ]
    assert table.schema.remove_metadata() == pa.schema(list(OUTPUT_SCHEMA) + passed)
    for name, column in zip(["category", "level", "weight", "tags", "input_completion"], extra.columns):
        assert table.column(name).to_pylist() == column.to_pylist()
    assert table.column("completion").to_pylist() != extra.column("completion").to_pylist()


def test_bundled_set_has_a_category_column():
    from bulkscore.jobs.questions import bundled_questions, load_questions

    table = load_questions([bundled_questions()])
    assert table.column_names == ["id", "question", "reference", "category"]
    assert Counter(table.column("category").to_pylist()) == {
        c: 50 for c in ("length", "mass", "volume", "time", "data", "speed")
    }


def test_numbers_on_the_page_equal_the_parquet_files(runs, tmp_path):
    page = tmp_path / "report.html"
    said = report(runs["chat"], runs["raw"], "-o", page)
    assert said.startswith(f"Wrote {page} (") and said.rstrip().endswith("2 run(s), by category)")
    marked = rendered(page)
    for i, name in enumerate(("chat", "raw")):
        table = pq.read_table(runs[name])
        for metric, value in expected_figures(table).items():
            assert marked.values[(i, None, metric)] == value, (name, metric)
        summary = json.loads(runs[name].with_suffix(".summary.json").read_text())
        assert marked.values[(i, None, "rows_per_s")] == f"{summary['rows_per_s']:,.2f}"
        assert marked.values[(i, None, "model")] == summary["model"]
        # Per category: accuracy, answer rate and rows, from the rows of that category.
        for category in set(CATEGORIES):
            rows = [r for r in table.to_pylist() if r["category"] == category]
            correct = sum(1 for r in rows if r["is_correct"])
            answered = sum(1 for r in rows if r["answer_text"] is not None)
            assert marked.values[(i, category, "rows")] == str(len(rows))
            assert marked.values[(i, category, "accuracy")] == pct(correct, len(rows))
            assert marked.values[(i, category, "answer_rate")] == pct(answered, len(rows))
        # Errors grouped by kind: the empty question.
        assert marked.kinds[(i, "empty question")] == "empty question: 1 row(s)"
    assert any(v != "0.0%" for (run, group, metric), v in marked.values.items() if metric == "answer_rate")


def test_text_from_the_data_is_escaped(runs, tmp_path):
    page = tmp_path / "report.html"
    report(runs["chat"], "-o", page)
    source = page.read_text()
    assert HOSTILE not in source and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in source
    marked = rendered(page)
    assert marked.tags["script"] == 0 and marked.tags["img"] == 0  # nothing from the data became markup
    assert "http://" not in source and "https://" not in source and "src=" not in source.replace("src=x", "")


def test_page_renders_in_chromium_and_is_not_blank(runs, tmp_path):
    page, shot = tmp_path / "report.html", tmp_path / "shot.png"
    report(runs["chat"], runs["raw"], "-o", page)
    browser(page, f"--screenshot={shot}", width=1280, height=1600)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1600)
    colours = pixels(image)
    white = colours[(255, 255, 255)]
    assert white < 0.97 * image.width * image.height  # text, tables and charts were drawn
    # Both runs' bars are on screen in their own colours.
    for colour in COLOURS[:2]:
        rgb = tuple(int(colour[k : k + 2], 16) for k in (1, 3, 5))
        assert colours[rgb] > 200, colour


def test_a_run_without_references_renders(runs, tmp_path):
    page, shot = tmp_path / "bare.html", tmp_path / "bare.png"
    said = report(runs["bare"], "-o", page)
    assert said.rstrip().endswith("1 run(s))")  # no category column: no breakdown
    marked = rendered(page)
    assert marked.values[(0, None, "accuracy")] == "– (0 of 0)"
    assert marked.values[(0, None, "errors")] == "0"
    assert "No wrong answers graded." in page.read_text()
    browser(page, f"--screenshot={shot}", height=800)
    assert len(pixels(Image.open(shot).convert("RGB"))) > 10


def test_default_output_sits_beside_the_answers(runs):
    said = report(runs["bare"])
    assert said.startswith(f"Wrote {runs['bare'].with_suffix('.html')} (")


def test_by_groups_by_any_pass_through_column_and_refuses_a_missing_one(runs, tmp_path):
    page = tmp_path / "by.html"
    report(runs["chat"], "--by", "finish_reason", "-o", page)
    marked = rendered(page)
    table = pq.read_table(runs["chat"]).to_pylist()
    for reason, n in Counter(r["finish_reason"] for r in table).items():
        assert marked.values[(0, reason, "rows")] == str(n)
    result = CliRunner().invoke(cli, ["report", str(runs["chat"]), str(runs["bare"]), "--by", "category"])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: --by category: no such column in {runs['bare']}; columns: id, sample,")
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "missing.parquet")])
    assert result.exit_code == 1 and result.output.startswith(f"Error: {tmp_path / 'missing.parquet'}: cannot read it")


def test_an_unwritable_page_is_an_error_not_a_traceback(runs, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    for command in (["report", str(runs["bare"])], ["export", str(runs["bare"])]):
        result = CliRunner().invoke(cli, [*command, "-o", str(blocked / "page.html")])
        assert result.exit_code == 1
        assert result.output.startswith(f"Error: cannot write {blocked / 'page.html'}: ")


def test_the_page_is_the_same_read_in_batches_of_two_rows_or_from_a_folder(runs, tmp_path, monkeypatch):
    """The report streams each output by record batches: its figures, groups, histograms and listed
    rows merge across batches (and across a folder output's files) to the very same page."""
    from bulkscore.jobs import report as report_module

    def page(*answers) -> str:
        out = tmp_path / "page.html"
        report(*answers, "-o", out)
        return out.read_text()

    whole = page(runs["chat"], runs["raw"])
    monkeypatch.setattr(report_module, "BATCH_ROWS", 2)
    assert page(runs["chat"], runs["raw"]) == whole

    # The chat run as a folder output of three files, with its manifest and its summary beside it.
    folder = tmp_path / "runs" / "chat"
    folder.mkdir(parents=True)
    table = pq.read_table(runs["chat"])
    settings = json.loads(pq.ParquetFile(runs["chat"]).metadata.metadata[b"bulkscore.settings"])
    for i, start in enumerate(range(0, table.num_rows, 4)):
        pq.write_table(table.slice(start, 4), folder / f"part-{i:05d}.parquet")
    (folder / "_manifest.json").write_text(json.dumps({"settings": settings}))
    (folder.parent / "chat.summary.json").write_bytes(runs["chat"].with_suffix(".summary.json").read_bytes())
    (tmp_path / "runs" / "raw.parquet").write_bytes(runs["raw"].read_bytes())
    (tmp_path / "runs" / "raw.summary.json").write_bytes(runs["raw"].with_suffix(".summary.json").read_bytes())
    assert page(folder, tmp_path / "runs" / "raw.parquet") == whole
