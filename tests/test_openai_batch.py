"""OpenAI Batch files in and out: request lines built from the `openai` package's own request types,
output lines parsed with its response types; the same completions as from a question file; bad
lines fail before any work, unsupported requests become row errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from openai.types import BatchError, Completion
from openai.types import completion_create_params as completion_params
from openai.types.chat import ChatCompletion
from openai.types.chat import completion_create_params as chat_params
from pydantic import TypeAdapter

import bulkscore
from bulkscore.jobs.cli import cli
from bulkscore.jobs.errors import InputError
from bulkscore.jobs.questions import load_questions
from bulkscore.jobs.storage import locate
from tests.helpers import QUESTIONS, write_jsonl

CHAT_BODY = TypeAdapter(chat_params.CompletionCreateParamsNonStreaming)
COMPLETION_BODY = TypeAdapter(completion_params.CompletionCreateParamsNonStreaming)
QUESTION_TEXTS = [q["question"] for q in QUESTIONS[:4]]
OPTIONS = {"max_new_tokens": 6, "quiet": True}


def chat_line(custom_id: str, messages: list[dict], **body) -> dict:
    """A /v1/chat/completions request line; its body checked against openai's own request type."""
    body = {"model": "gpt-4o-mini", "messages": messages} | body
    CHAT_BODY.validate_python(body)
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def completion_line(custom_id: str, prompt: str, **body) -> dict:
    line = unchecked(custom_id, prompt, **body)
    COMPLETION_BODY.validate_python(line["body"])
    return line


def unchecked(custom_id: str, prompt: str, **body) -> dict:
    """A /v1/completions request line that openai's type may refuse (a malformed one)."""
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": prompt} | body
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def invoke(*args) -> object:
    return CliRunner().invoke(cli, ["run", *map(str, args)])


def test_a_batch_file_reads_as_rows_with_each_requests_own_settings(tmp_path):
    lines = [
        chat_line("a", [{"role": "system", "content": "Be brief."}, *user("Q1")], max_completion_tokens=5, n=2),
        chat_line("b", [{"role": "user", "content": [{"type": "text", "text": "Q"}, {"type": "text", "text": "2"}]}]),
        completion_line("c", "Q3", temperature=0.5, top_p=0.9, seed=3, stop="\n"),
    ]
    questions = load_questions([write_jsonl(tmp_path / "batch.jsonl", lines)])
    assert questions.column("id").to_pylist() == ["a", "b", "c"]
    assert questions.column("question").to_pylist() == ["Q1", "Q\n2", "Q3"]  # text parts joined as vLLM joins them
    requests = questions.column("request").to_pylist()
    assert requests[0]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"}]
    assert (requests[0]["max_tokens"], requests[0]["n"], requests[0]["temperature"]) == (5, 2, None)
    assert requests[1]["messages"] == [{"role": "user", "content": "Q\n2"}]
    assert requests[2]["prompt"] == "Q3" and requests[2]["messages"] is None
    assert (requests[2]["temperature"], requests[2]["top_p"], requests[2]["seed"], requests[2]["stop"]) == (
        0.5,
        0.9,
        3,
        ["\n"],
    )
    assert all(r["unsupported"] is None for r in requests)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}), None),
        (json.dumps({"custom_id": "x", "url": "/v1/completions", "body": "prompt"}), "body must be an object"),
        (json.dumps(unchecked("x", "y", max_tokens="ten")), "body.max_tokens must be a whole number"),
        (json.dumps(unchecked("x", "y", stop=[""])), "body.stop must be a non-empty string"),
        (json.dumps(unchecked("x", "y", top_p=1.5)), "body.top_p must be a number from 0 to 1, not 1.5"),
        (json.dumps(unchecked("x", "y", seed=2**64 - 1)), "body.seed must be a whole number from -9223372036854775808"),
        (json.dumps(unchecked("x", "y", n=0)), "body.n must be a whole number from 1 to 128, not 0"),
        (json.dumps({**chat_line("x", user("y")), "body": {"messages": []}}), "body.messages must be a non-empty"),
        (json.dumps({**chat_line("x", user("y")), "body": {"messages": [{"content": "y"}]}}), "must be an object"),
        (json.dumps({**completion_line("x", "y"), "method": "GET"}), "method 'GET'"),
    ],
)
def test_a_malformed_line_fails_before_any_work_naming_its_line(tmp_path, tiny_model, line, message):
    first = json.dumps(completion_line("first", "fine"))
    batch = tmp_path / "batch.jsonl"
    # A first line without custom_id makes the file a plain question file: then that reader's error.
    batch.write_text(first + "\n\n" + line + "\n")
    result = invoke(batch, "--model", tiny_model, "-o", tmp_path / "out.jsonl", "--quiet")
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: {batch}, line 3: "), result.output
    assert message is None or message in result.output
    if message is None:
        assert "custom_id must be a non-empty string" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.parts").exists()


@pytest.mark.usefixtures("ray_instance")
def test_the_same_requests_as_a_batch_file_and_as_a_question_file_give_the_same_completions(tiny_model, tmp_path):
    """One Batch file of chat requests, completions requests and chat requests with a system turn,
    against the question file run as chat, raw and chat with --system: the same rows."""
    model = {"model": str(tiny_model)}
    questions = write_jsonl(
        tmp_path / "q.jsonl", [{"id": f"r{i}", "question": q} for i, q in enumerate(QUESTION_TEXTS)]
    )
    system = [{"role": "system", "content": "Answer in numbers."}]
    lines = (
        [chat_line(f"chat{i}", user(q)) for i, q in enumerate(QUESTION_TEXTS)]
        + [completion_line(f"text{i}", q) for i, q in enumerate(QUESTION_TEXTS)]
        + [chat_line(f"system{i}", system + user(q)) for i, q in enumerate(QUESTION_TEXTS)]
    )
    batch = bulkscore.run(str(write_jsonl(tmp_path / "batch.jsonl", lines)), **OPTIONS, **model)
    assert batch.summary["errors"] == 0
    plain = [
        bulkscore.run(str(questions), **OPTIONS, **model),
        bulkscore.run(str(questions), prompt_format="raw", **OPTIONS, **model),
        bulkscore.run(str(questions), system="Answer in numbers.", **OPTIONS, **model),
    ]
    n = len(QUESTION_TEXTS)
    for k, expected in enumerate(plain):
        got = batch.table.slice(k * n, n)
        for column in ("question", "completion", "loss", "completion_loss", "num_prompt_tokens"):
            assert got.column(column).to_pylist() == expected.table.column(column).to_pylist(), (k, column)
    # The system turn reaches the prompt (in place of the template's default one).
    with_system, without = (batch.table.slice(k * n, n).column("num_prompt_tokens").to_pylist() for k in (2, 0))
    assert all(a != b for a, b in zip(with_system, without))


@pytest.mark.usefixtures("ray_instance")
def test_a_requests_own_settings_win_over_the_commands(tiny_model, tmp_path):
    model = {"model": str(tiny_model)}
    questions = [
        {"id": name, "question": q} for name, q in zip(("short", "default", "sampled", "stopped"), QUESTION_TEXTS)
    ]
    path = write_jsonl(tmp_path / "q.jsonl", questions)

    def plain(**options) -> list[dict]:
        return bulkscore.run(str(path), quiet=True, **model, **options).table.to_pylist()

    default = plain(max_new_tokens=12)
    text = default[3]["completion"]
    # A letter the row generates, from midway: ASCII, so that no partly decoded character can hold it.
    stop = next(c for c in text[len(text) // 2 :] + text if c.isascii() and c.isalnum())
    lines = [
        chat_line("short", user(QUESTION_TEXTS[0]), max_tokens=3),
        chat_line("default", user(QUESTION_TEXTS[1])),
        chat_line("sampled", user(QUESTION_TEXTS[2]), temperature=1.5, seed=7, n=3, max_tokens=8),
        chat_line("stopped", user(QUESTION_TEXTS[3]), stop=[stop]),
    ]
    batch = bulkscore.run(str(write_jsonl(tmp_path / "batch.jsonl", lines)), max_new_tokens=12, quiet=True, **model)
    rows = batch.table.to_pylist()
    assert [(r["id"], r["sample"]) for r in rows] == [
        ("short", 0),
        ("default", 0),
        ("sampled", 0),
        ("sampled", 1),
        ("sampled", 2),
    ] + [("stopped", 0)]
    assert batch.summary["samples"] == 6 and batch.summary["rows"] == 4
    assert rows[0]["completion"] == plain(max_new_tokens=3)[0]["completion"]
    assert rows[0]["num_completion_tokens"] <= 3
    assert rows[1]["completion"] == default[1]["completion"]
    sampled = plain(max_new_tokens=8, temperature=1.5, seed=7, num_samples=3)
    assert [r["completion"] for r in rows[2:5]] == [r["completion"] for r in sampled if r["id"] == "sampled"]
    assert len({r["completion"] for r in rows[2:5]}) > 1  # sampled, not greedy
    # Its stop string cuts what the same row generates without one.
    assert (rows[5]["completion"], rows[5]["finish_reason"]) == (text[: text.index(stop)], "stop")


@pytest.mark.usefixtures("ray_instance")
def test_unsupported_requests_become_row_errors_and_the_rest_are_scored(tiny_model, tmp_path):
    lines = [
        chat_line("tools", user("x"), tools=[{"type": "function", "function": {"name": "f"}}]),
        chat_line("fine", user(QUESTION_TEXTS[0])),
        chat_line("logprobs", user("x"), logprobs=True, top_logprobs=2),
        chat_line("image", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]}]),
        {"custom_id": "embed", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x", "model": "m"}},
        completion_line("many", ["a", "b"]),  # type: ignore[arg-type]
        completion_line("also fine", QUESTION_TEXTS[1], frequency_penalty=0, logprobs=None),
    ]
    result = bulkscore.run(str(write_jsonl(tmp_path / "b.jsonl", lines)), model=str(tiny_model), **OPTIONS)
    rows = {r["id"]: r for r in result.table.to_pylist()}
    assert list(rows) == [line["custom_id"] for line in lines]
    assert rows["fine"]["error"] is None and rows["also fine"]["error"] is None
    assert rows["fine"]["completion"] is not None
    for name, part in [
        ("tools", "body.tools"),
        ("logprobs", "body.logprobs = true; body.top_logprobs = 2"),
        ("image", "content part of type 'image_url'"),
        ("embed", "url /v1/embeddings"),
        ("many", "body.prompt as a list"),
    ]:
        assert rows[name]["error"].startswith("unsupported request: "), name
        assert part in rows[name]["error"], (name, rows[name]["error"])
        assert rows[name]["finish_reason"] == "error"
    assert result.summary["errors"] == 5 and result.summary["error_kinds"] == {"unsupported request": 5}


@pytest.mark.usefixtures("ray_instance")
def test_a_jsonl_output_is_a_batch_output_file_that_openais_types_parse(tiny_model, tmp_path):
    lines = [
        chat_line("c1", user(QUESTION_TEXTS[0])),
        completion_line("t1", QUESTION_TEXTS[1]),
        chat_line("n3", user(QUESTION_TEXTS[2]), temperature=0.8, n=3),
        chat_line("bad", user("x"), tools=[{"type": "function", "function": {"name": "f"}}]),
    ]
    batch = write_jsonl(tmp_path / "in.jsonl", lines)
    common = ["--model", tiny_model, "--max-new-tokens", "6", "--quiet", "--shard-size", "2"]
    result = invoke(batch, "-o", tmp_path / "out.jsonl", *common, "--keep-parts")
    assert result.exit_code == 0, result.output
    assert f"Wrote {tmp_path / 'out.jsonl'} and {tmp_path / 'out.jsonl.summary.json'}" in result.output
    assert invoke(batch, "-o", tmp_path / "out.parquet", *common).exit_code == 0
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["custom_id"] for line in out] == ["c1", "t1", "n3", "bad"]  # one per request, in input order
    chat = ChatCompletion.model_validate(out[0]["response"]["body"])
    text = Completion.model_validate(out[1]["response"]["body"])
    sampled = ChatCompletion.model_validate(out[2]["response"]["body"])
    assert out[0]["response"]["status_code"] == 200 and out[0]["error"] is None
    assert chat.choices[0].message.content == table[0]["completion"]
    assert chat.choices[0].finish_reason == table[0]["finish_reason"]
    assert chat.usage.prompt_tokens == table[0]["num_prompt_tokens"]
    assert chat.usage.completion_tokens == table[0]["num_completion_tokens"]
    assert text.object == "text_completion" and text.choices[0].text == table[1]["completion"]
    assert [c.message.content for c in sampled.choices] == [r["completion"] for r in table[2:5]]
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert sampled.usage.completion_tokens == sum(r["num_completion_tokens"] for r in table[2:5])
    extra = out[0]["response"]["body"]["choices"][0]["bulkscore"]
    assert extra["loss"] == table[0]["loss"] and extra["completion_loss"] == table[0]["completion_loss"]
    assert out[3]["response"] is None
    error = BatchError.model_validate(out[3]["error"])
    assert error.code == "unsupported_request" and error.message == table[5]["error"]
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["rows"] == 4 and summary["samples"] == 6 and summary["errors"] == 1
    # The same command again: nothing to do. Without the file, from the kept parts: nothing scored again.
    again = invoke(batch, "-o", tmp_path / "out.jsonl", *common, "--keep-parts")
    assert "already holds this job's results" in again.output
    written = (tmp_path / "out.jsonl").read_text()
    (tmp_path / "out.jsonl").unlink()
    (tmp_path / "out.jsonl.summary.json").unlink()
    resumed = invoke(batch, "-o", tmp_path / "out.jsonl", *[a for a in common if a != "--quiet"])
    assert resumed.exit_code == 0 and "Resuming: 2 of 2 shards already done" in resumed.output, resumed.output
    assert json.loads((tmp_path / "out.jsonl.summary.json").read_text())["workers"] == 0  # nothing scored again
    assert strip_created(written) == strip_created((tmp_path / "out.jsonl").read_text())
    # Written, its summary not (a crash between), its parts kept: the same command finishes it.
    assert invoke(batch, "-o", tmp_path / "out.jsonl", *common, "--keep-parts", "--overwrite").exit_code == 0
    (tmp_path / "out.jsonl.summary.json").unlink()
    again = invoke(batch, "-o", tmp_path / "out.jsonl", *common)
    assert again.exit_code == 0, again.output
    assert strip_created(written) == strip_created((tmp_path / "out.jsonl").read_text())
    assert json.loads((tmp_path / "out.jsonl.summary.json").read_text())["workers"] == 0
    for command in ("report", "export"):  # they read Parquet outputs, and say so
        refused = CliRunner().invoke(cli, [command, str(tmp_path / "out.jsonl"), "-o", str(tmp_path / "x")])
        assert refused.exit_code == 1
        assert refused.output == (
            f"Error: {tmp_path / 'out.jsonl'}: cannot read it as Parquet (a .jsonl file; report and export read "
            "Parquet outputs: run the job with -o NAME.parquet)\n"
        )


def strip_created(text: str) -> list[dict]:
    lines = [json.loads(line) for line in text.splitlines()]
    for line in lines:
        if line["response"]:
            del line["response"]["body"]["created"]
    return lines


@pytest.mark.usefixtures("ray_instance")
def test_a_requests_model_is_ignored_with_a_warning_that_says_which_runs(tiny_model, tmp_path):
    said = []
    lines = [chat_line("a", user("Q")), chat_line("b", user("Q"), model="gpt-4.1")]
    path = str(write_jsonl(tmp_path / "b.jsonl", lines))
    bulkscore.run(path, model=str(tiny_model), say=said.append, max_new_tokens=2, system="Be brief.")
    warnings = [line for line in said if line.startswith("Warning:")]
    assert warnings == [
        "Warning: --system applies to plain questions only; a request's prompt is its own",
        f"Warning: the requests name gpt-4.1, gpt-4o-mini; bulkscore ignores a request's model and runs "
        f"{Path(tiny_model).resolve()} (--model) for all of them",
    ]


def test_a_batch_file_is_read_a_block_at_a_time_and_names_the_line_at_fault_across_blocks(tmp_path, monkeypatch):
    import bulkscore.jobs.openai_batch as openai_batch

    monkeypatch.setattr(openai_batch, "READ_BLOCK", 100)  # lines span blocks
    monkeypatch.setattr(openai_batch, "READ_ROWS", 3)  # requests become Arrow 3 at a time
    lines = [completion_line(f"r{i}", f"question {i}", max_tokens=i + 1) for i in range(10)]
    path = write_jsonl(tmp_path / "batch.jsonl", lines)
    questions = load_questions([path])
    assert questions.column("id").to_pylist() == [f"r{i}" for i in range(10)]
    assert [r["max_tokens"] for r in questions.column("request").to_pylist()] == list(range(1, 11))
    path.write_bytes(path.read_bytes() + b'{"custom_id": "\xff"}\n')
    with pytest.raises(InputError, match=rf"^{path}, line 11: not UTF-8 text"):
        load_questions([path])


def test_what_openai_accepts_reads_as_it_means(tmp_path):
    """Valid requests that are easy to get wrong: top_p 0 (the likeliest token alone), stop [] (no
    stop strings, not the command's), an assistant turn without content, metadata-only fields, a
    system message alone, a byte-order mark, and a first line longer than any block size."""
    long = "word " * 30_000
    lines = [
        completion_line("p0", "Q", top_p=0, temperature=1.0, stop=[], prompt_cache_key="k", safety_identifier="u"),
        chat_line(
            "turns", [*user("Q"), {"role": "assistant", "tool_calls": []}, *user("again")], stream=False, store=True
        ),
        chat_line("system", [{"role": "system", "content": "Say hi."}]),
        chat_line("long", user(long)),
    ]
    path = tmp_path / "b.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(line) + "\n" for line in lines[::-1]).encode())
    questions = load_questions([path])
    rows = {r["id"]: r for r in questions.to_pylist()}
    assert list(rows) == ["long", "system", "turns", "p0"]
    assert (rows["p0"]["request"]["top_p"], rows["p0"]["request"]["stop"]) == (0.0, [])
    assert rows["turns"]["request"]["messages"][1] == {"role": "assistant", "content": ""}
    assert rows["turns"]["question"] == "again" and rows["system"]["question"] == "Say hi."
    assert rows["long"]["question"] == long
    assert all(r["request"]["unsupported"] is None for r in rows.values())


def test_completions_logprobs_zero_asks_for_logprobs_and_is_unsupported(tmp_path):
    questions = load_questions([write_jsonl(tmp_path / "b.jsonl", [completion_line("x", "Q", logprobs=0)])])
    assert questions.column("request")[0]["unsupported"].as_py().startswith("body.logprobs = 0")


def test_a_custom_id_given_twice_fails_naming_both_requests(tmp_path):
    lines = [completion_line("a", "Q"), completion_line("b", "Q"), completion_line("a", "Q")]
    path = write_jsonl(tmp_path / "b.jsonl", lines)
    with pytest.raises(InputError) as raised:
        load_questions([path])
    assert str(raised.value) == f"{path}: requests 1 and 3 share custom_id 'a'; each request needs its own"


def test_requests_for_samples_at_temperature_zero_or_for_another_task_are_refused(tmp_path, tiny_model):
    path = write_jsonl(tmp_path / "b.jsonl", [chat_line("a", user("Q")), chat_line("b", user("Q"), n=2)])
    result = invoke(path, "--model", tiny_model, "-o", tmp_path / "out.parquet")
    assert result.exit_code == 1
    assert result.output == (
        "Error: 1 request(s) ask for n > 1 samples at temperature 0 (b): greedy decoding gives the same "
        "completion every time; give them a temperature, or the job --temperature\n"
    )
    task = invoke(path, "--model", tiny_model, "-o", tmp_path / "out.parquet", "--task", "perplexity")
    assert task.exit_code == 2
    assert "OpenAI Batch requests ask for completions: --task generate, not perplexity" in task.output


def test_a_request_whose_samples_partly_failed_keeps_the_others_and_reads_back(tmp_path, monkeypatch):
    import bulkscore.jobs.openai_batch as openai_batch

    def row(sample: int, completion: str | None, error: str | None) -> dict:
        return {
            "id": "a",
            "sample": sample,
            "completion": completion,
            "finish_reason": "error" if error else "stop",
            "error": error,
            "num_prompt_tokens": 5,
            "num_completion_tokens": 0 if error else 2,
        } | dict.fromkeys(("answer_text", "answer", "is_correct", "loss", "completion_loss", "reference_loss"))

    part = pa.Table.from_pylist(
        [row(0, "x", None), row(1, None, "generation failed: OutOfMemoryError: ..."), row(2, "y", None)]
        + [row(0, None, "empty question") | {"id": "b"}]
    )
    lines = [json.loads(line) for line in openai_batch.output_lines(part, "m", "job", True, 0)]
    body = ChatCompletion.model_validate(lines[0]["response"]["body"])
    assert [(c.index, c.message.content) for c in body.choices] == [(0, "x"), (2, "y")]
    assert lines[0]["response"]["body"]["bulkscore"]["errors"] == [
        {"sample": 1, "error": "generation failed: OutOfMemoryError: ..."}
    ]
    assert lines[1]["response"] is None
    assert BatchError.model_validate(lines[1]["error"]).code == "empty_question"
    # Read back: errors before successes, and more lines than one Arrow batch, type the same.
    monkeypatch.setattr(openai_batch, "READ_ROWS", 2)
    path = tmp_path / "out.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in [lines[1]] * 3 + [lines[0]]))
    back = openai_batch.read_batch_output(locate(str(path))).to_pylist()
    assert [(r["custom_id"], r["sample"], r["completion"], r["error"]) for r in back] == [
        ("b", None, None, "empty question"),
        ("b", None, None, "empty question"),
        ("b", None, None, "empty question"),
        ("a", 0, "x", None),
        ("a", 1, None, "generation failed: OutOfMemoryError: ..."),
        ("a", 2, "y", None),
    ]
