"""OpenAI Batch files: requests in (the format vLLM's `run_batch` also reads), responses out.

A request line is `{"custom_id", "method": "POST", "url", "body"}` for /v1/chat/completions (`body.messages`)
or /v1/completions (`body.prompt`). It becomes one input row: `custom_id` is its id, its prompt and
its own settings (max_tokens or max_completion_tokens, temperature, top_p, seed, n, stop) go in the
row's `request` column (contract.REQUEST_TYPE), and its question is the prompt (completions) or the
last user turn (chat), what `loss` scores. A setting the request leaves out is the command's. A line
that is not a well-formed request fails the job before any work, naming the line; a well-formed
request that asks for what bulkscore does not do (tools, images, logprobs, penalties...) becomes
that row's `error`.

An output written as a batch file has one line per request, in input order, in the Batch API's
output shape; each choice carries the output columns bulkscore adds under `bulkscore`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from bulkscore.jobs.errors import InputError
from bulkscore.jobs.gather import Tally, tally_for, write_summary
from bulkscore.jobs.storage import Location
from bulkscore.workers.contract import REQUEST, REQUEST_TYPE, RESULT_SCHEMA

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Body fields bulkscore reads; and those it may ignore while they hold these (OpenAI's defaults).
READ = {
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "n",
    "stop",
}
IGNORABLE = {
    "user": None,
    "metadata": None,
    "store": None,
    "service_tier": None,
    "prompt_cache_key": None,
    "prompt_cache_retention": None,
    "safety_identifier": None,
    "stream": (False, None),
    "stream_options": (None,),
    "suffix": (None,),
    "logprobs": (False, None),
    "top_logprobs": (0, None),
    "frequency_penalty": (0, None),
    "presence_penalty": (0, None),
    "logit_bias": ({}, None),
    "echo": (False, None),
    "best_of": (1, None),
    "response_format": ({"type": "text"}, None),
    "parallel_tool_calls": None,  # meaningful only with tools, which are refused
}
EXTRA = "bulkscore"  # the key, in each output choice, of the output columns the Batch API has no place for
EXTRA_COLUMNS = (
    "sample",
    "answer_text",
    "answer",
    "is_correct",
    "loss",
    "completion_loss",
    "reference_loss",
    "num_completion_tokens",
)
LIMITS = {"seed": (-(2**63), 2**63 - 1), "n": (1, 128), "max_tokens": (1, 2**31 - 1)}
LIMITS["max_completion_tokens"] = LIMITS["max_tokens"]


def is_default(value: object, defaults: tuple) -> bool:
    """Whether a body field holds one of its harmless values: by type too (logprobs 0 asks for logprobs)."""
    return any(type(value) is type(d) and value == d for d in defaults)


def is_batch_file(path: Location) -> bool:
    """Whether a JSONL file's first object is an OpenAI Batch request (custom_id and body)."""
    first = next((line for _, line in numbered_lines(path) if line.strip()), "")
    try:
        data = json.loads(first)
    except ValueError:  # not JSON: the question file reader names what is wrong
        return False
    return isinstance(data, dict) and "custom_id" in data and "body" in data


def read_batch_file(path: Location) -> pa.Table:
    """The file's requests as rows {id, question, request}, checked line by line. Read a block at a
    time and made Arrow every READ_ROWS requests, so that no more than that many are Python objects."""
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), (REQUEST, REQUEST_TYPE)])
    batches, rows = [], []
    for number, line in numbered_lines(path):
        if line.strip():
            rows.append(read_request(line, f"{path}, line {number}"))
        if len(rows) == READ_ROWS:
            batches.append(pa.RecordBatch.from_pylist(rows, schema=schema))
            rows = []
    if rows:
        batches.append(pa.RecordBatch.from_pylist(rows, schema=schema))
    if not batches:
        raise InputError(f"{path}: no requests")
    table = pa.Table.from_batches(batches, schema)
    counts = pc.value_counts(table.column("id"))
    twice = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(twice):
        custom_id = twice[0]["values"].as_py()
        where = [i + 1 for i, v in enumerate(table.column("id").to_pylist()) if v == custom_id][:2]
        raise InputError(
            f"{path}: requests {where[0]} and {where[1]} share custom_id {custom_id!r}; each request needs its own"
        )
    return table


READ_ROWS = 8_192
READ_BLOCK = 1 << 20


def numbered_lines(path: Location) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 file, read a block at a time."""
    number, rest = 0, b""
    try:
        with path.open_input() as stream:
            while block := stream.read(READ_BLOCK):
                if number == 0 and not rest:
                    block = block.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
                *lines, rest = (rest + block).split(b"\n")
                for line in lines:
                    number += 1
                    yield number, text_of(line, path, number)
    except (OSError, pa.ArrowException) as error:
        raise InputError(f"{path}: cannot read ({getattr(error, 'strerror', None) or error})") from None
    if rest:
        yield number + 1, text_of(rest, path, number + 1)


def text_of(line: bytes, path: Location, number: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}, line {number}: not UTF-8 text; save the file as UTF-8") from None


def read_request(line: str, where: str) -> dict:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a request object, got {type(data).__name__}")
    custom_id, body = data.get("custom_id"), data.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        raise InputError(f"{where}: custom_id must be a non-empty string")
    if data.get("method", "POST") != "POST":
        raise InputError(f"{where}: method {data['method']!r}; Batch requests are POST")
    if not isinstance(body, dict):
        raise InputError(f"{where}: body must be an object (the request's JSON body)")
    url = data.get("url")
    if not isinstance(url, str):
        raise InputError(f"{where}: url must be a string, e.g. {CHAT!r}")
    request = dict.fromkeys(REQUEST_TYPE.names) | {"url": url}
    unsupported = []
    if url == CHAT:
        request["messages"], question = chat_turns(body.get("messages"), where, unsupported)
    elif url == COMPLETIONS:
        request["prompt"] = question = completion_prompt(body.get("prompt"), where, unsupported)
    else:
        unsupported.append(f"url {url}: bulkscore runs {CHAT} and {COMPLETIONS} requests")
        question = None
    request |= body_settings(body, where)
    for name, value in body.items():
        if name in READ:
            continue
        if name not in IGNORABLE:
            unsupported.append(f"body.{name}")
        elif IGNORABLE[name] is not None and not is_default(value, IGNORABLE[name]):
            unsupported.append(f"body.{name} = {json.dumps(value)[:40]}")
    if unsupported:
        request["unsupported"] = "; ".join(unsupported) + " (bulkscore generates text and computes losses only)"
    return {"id": custom_id, "question": question, REQUEST: request}


def chat_turns(messages: object, where: str, unsupported: list[str]) -> tuple[list[dict] | None, str | None]:
    """A chat body's messages as (role, text) turns, and the last user turn's text (the question)."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: body.messages must be a non-empty list of messages")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InputError(f"{where}: body.messages[{i}] must be an object with a role")
        role = message["role"]
        if role not in ROLES or message.get("tool_calls") or message.get("function_call"):
            unsupported.append(f"body.messages[{i}] (a {role} message{' with tool calls' if role in ROLES else ''})")
            continue
        content = message.get("content")
        if content is None and role == "assistant":  # an assistant turn may leave its content out
            content = ""
        text = content_text(content, f"{where}: body.messages[{i}].content", unsupported)
        turns.append({"role": ROLES[role], "content": text})
    if unsupported:
        return None, None
    # The question `loss` scores: the last user turn, else the last turn (a system message alone).
    question = next((t["content"] for t in reversed(turns) if t["role"] == "user"), turns[-1]["content"])
    return turns, question


def content_text(content: object, where: str, unsupported: list[str]) -> str:
    """A message's content as text: a string, or a list of text parts (joined by newlines, as vLLM
    joins them); other parts refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InputError(f"{where} must be a string or a list of content parts")
    texts = []
    for part in content:
        if not isinstance(part, dict):
            raise InputError(f"{where}: each content part must be an object")
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            unsupported.append(f"content part of type {part.get('type')!r}")
    return "\n".join(texts)


def completion_prompt(prompt: object, where: str, unsupported: list[str]) -> str | None:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        unsupported.append("body.prompt as a list of prompts or of token ids (give one text per request)")
        return None
    raise InputError(f"{where}: body.prompt must be a string")


def body_settings(body: dict, where: str) -> dict:
    """The body's generation settings, checked: what bulkscore's own options would accept."""

    def whole(name: str) -> int | None:
        value, (least, most) = body.get(name), LIMITS[name]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not least <= value <= most):
            raise InputError(f"{where}: body.{name} must be a whole number from {least} to {most}, not {value!r}")
        return value

    def number(name: str, holds: Callable[[float], bool], what: str) -> float | None:
        value = body.get(name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not holds(value)):
            raise InputError(f"{where}: body.{name} must be {what}, not {value!r}")
        return None if value is None else float(value)

    max_tokens, max_completion = whole("max_tokens"), whole("max_completion_tokens")
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise InputError(
            f"{where}: body.max_tokens {max_tokens} and body.max_completion_tokens {max_completion} differ"
        )
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise InputError(f"{where}: body.stop must be a non-empty string or a list of them, not {json.dumps(stop)}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InputError(f"{where}: body.model must be a string")
    return {
        "model": model,
        "max_tokens": max_completion if max_tokens is None else max_tokens,
        "temperature": number("temperature", lambda v: v >= 0, "a number of at least 0"),
        "top_p": number("top_p", lambda v: 0 <= v <= 1, "a number from 0 to 1"),
        "seed": whole("seed"),
        "n": whole("n"),
        "stop": stop,  # [] is no stop strings, not the command's
    }


def has_requests(questions: pa.Table) -> bool:
    """Whether some of the rows came as OpenAI Batch requests."""
    if REQUEST not in questions.column_names or questions.schema.field(REQUEST).type != REQUEST_TYPE:
        return False
    return questions.column(REQUEST).null_count < questions.num_rows


def other_models(questions: pa.Table, model: str) -> list[str]:
    """The models the requests name other than the one the job runs, if they came as requests."""
    if not has_requests(questions):
        return []
    named = pc.unique(pc.struct_field(questions.column(REQUEST), "model")).drop_null().to_pylist()
    return sorted(m for m in named if m != model)


def output_lines(part: pa.Table, model: str, job: str, chat: bool, created: int) -> Iterator[str]:
    """The Batch API output lines of one part (rows in the output contract, a row's samples together):
    one per input row. `chat`: the endpoint of rows that did not come as requests."""
    columns = part.to_pydict()
    asked = REQUEST in part.column_names and part.schema.field(REQUEST).type == REQUEST_TYPE
    requests = columns[REQUEST] if asked else None
    n, start = part.num_rows, 0
    while start < n:
        stop = start + 1
        while stop < n and columns["id"][stop] == columns["id"][start]:
            stop += 1
        request = requests[start] if requests else None
        yield json.dumps(output_line(columns, range(start, stop), request, model, job, chat, created))
        start = stop


def output_line(columns: dict, rows: range, request: dict | None, model: str, job: str, chat: bool, created: int):
    """One request's line: its samples as choices, or (none scored) its first sample's error. Samples
    that failed beside others that did not are listed in the body under `bulkscore.errors`."""
    first = rows[0]
    custom_id = str(columns["id"][first])
    tag = hashlib.sha256(f"{job}:{custom_id}".encode()).hexdigest()[:24]
    line = {"id": f"batch_req_{tag}", "custom_id": custom_id}
    failed = [r for r in rows if columns["error"][r] is not None]
    if len(failed) == len(rows):
        message = columns["error"][first]
        code = message.split(":", 1)[0].replace(" ", "_")
        return line | {"response": None, "error": {"code": code, "message": message}}
    is_chat = request["url"] == CHAT if request else chat
    choices = []
    for r in rows:
        if r in failed:
            continue
        choice = {"index": columns["sample"][r], "logprobs": None, "finish_reason": columns["finish_reason"][r]}
        if is_chat:
            choice["message"] = {"role": "assistant", "content": columns["completion"][r]}
        else:
            choice["text"] = columns["completion"][r]
        choices.append(choice | {EXTRA: {name: columns[name][r] for name in EXTRA_COLUMNS}})
    prompt_tokens = columns["num_prompt_tokens"][first]
    completion_tokens = sum(columns["num_completion_tokens"][r] for r in rows)
    body = {
        "id": f"{'chatcmpl' if is_chat else 'cmpl'}-{tag}",
        "object": "chat.completion" if is_chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    if failed:
        body[EXTRA] = {"errors": [{"sample": columns["sample"][r], "error": columns["error"][r]} for r in failed]}
    return line | {"response": {"status_code": 200, "request_id": f"req_{tag}", "body": body}, "error": None}


# Result.table of a batch output: a row per choice (and per failed sample or request), by custom_id.
READ_BACK = pa.schema(
    [("custom_id", pa.string())]
    + [RESULT_SCHEMA.field(name) for name in ("sample", "completion", "finish_reason", *EXTRA_COLUMNS[1:], "error")]
)


def read_batch_output(output: Location) -> pa.Table:
    """A batch output file's lines back as rows (READ_BACK), READ_ROWS at a time into Arrow."""
    batches, rows = [], []
    for _, text in numbered_lines(output):
        if text.strip():
            rows += read_back(json.loads(text))
        if len(rows) >= READ_ROWS:
            batches.append(pa.RecordBatch.from_pylist(rows, schema=READ_BACK))
            rows = []
    batches.append(pa.RecordBatch.from_pylist(rows, schema=READ_BACK))
    return pa.Table.from_batches(batches, READ_BACK)


def read_back(line: dict) -> list[dict]:
    custom_id = line["custom_id"]
    if line.get("response") is None:
        return [{"custom_id": custom_id, "error": (line.get("error") or {}).get("message")}]
    body = line["response"]["body"]
    rows = []
    for choice in body["choices"]:
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        extra = choice.get(EXTRA, {})
        rows.append({"custom_id": custom_id, "completion": text, "finish_reason": choice["finish_reason"]} | extra)
    rows += [{"custom_id": custom_id} | failed for failed in body.get(EXTRA, {}).get("errors", [])]
    return sorted(rows, key=lambda row: row.get("sample") or 0)


def write_batch_output(
    parts: Iterable[pa.Table], output: Location, settings: dict, summarize_tally: Callable[[Tally], dict]
) -> dict:
    """OUTPUT as a batch file assembled from `parts` (in input order) as they are read, one part in
    memory at a time; then its summary JSON. Both appear whole or not at all. Returns the summary."""
    tally = tally_for("generate")
    model, job = settings["model_name"], settings["fingerprint"]
    chat = settings["scoring"]["prompt"]["format"] != "raw"
    created = int(time.time())

    def put(path: str) -> None:
        with output.fs.open_output_stream(path) as stream:
            for part in parts:
                tally.add(part)
                stream.write("".join(line + "\n" for line in output_lines(part, model, job, chat, created)).encode())

    output.write(put)
    summary = summarize_tally(tally)
    write_summary(output, summary)
    return summary
