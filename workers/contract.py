"""What crosses the driver/actor boundary: frozen settings, a shard's rows, the result columns.

Both sides import this module; it imports neither torch nor transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

# The text inside <answer></answer> (what cot asks for), else the completion's last number (what a
# plain chat answer ends with): on the bundled set with the default chat prompt, 294 of 300 answered
# instead of 0 of 300 with tags alone.
DEFAULT_ANSWER_REGEX = r"<answer>(.*?)</answer>|(-?\d[\d,]*(?:\.\d+)?)(?!.*\d)"


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how. `source` is a local folder, a `.gguf` file or a hub id."""

    source: str
    kind: str  # "embedded" | "folder" | "gguf" | "hub"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    trust_remote_code: bool = False
    threads: int | None = None
    adapter: str | None = None  # a PEFT LoRA adapter folder, applied on top of `source`


@dataclass(frozen=True)
class PromptSettings:
    format: str = "chat"  # raw | chat | cot
    system: str | None = None  # cot: the instruction; the driver fills in the bundled one
    examples: tuple[tuple[str, str], ...] = ()  # cot: few-shot (question, answer text) pairs


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    min_new_tokens: int = 1
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0
    stop: tuple[str, ...] = ()
    batch_size: int | None = None  # None: as many rows as the token budget allows

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GradingSettings:
    tolerance: float = 0.05
    answer_regex: str = DEFAULT_ANSWER_REGEX


# What a job does with each row: generate an answer (and grade it), or score given text as
# lm-evaluation-harness's request types do (multiple choice, one continuation, a whole text).
TASKS = ("generate", "choice", "loglikelihood", "perplexity")
LIKELIHOOD_TASKS = TASKS[1:]


@dataclass(frozen=True)
class ScoringSettings:
    """Everything an actor needs besides the model: fixed for the whole job."""

    prompt: PromptSettings
    generation: GenerationSettings
    grading: GradingSettings
    task: str = "generate"  # one of TASKS
    choice_delimiter: str = " "  # choice: between the context and each choice (lm-eval's target_delimiter)


@dataclass(frozen=True)
class ShardTask:
    """One shard, or a piece of one: `rows` holds INPUT_SCHEMA's columns for input rows [start, stop)."""

    index: int
    start: int
    stop: int
    rows: pa.Table

    @property
    def size(self) -> int:
        return self.stop - self.start

    def pairs(self, num_samples: int) -> list[tuple[int, int]]:
        """Its (row, sample) pairs, in order: `num_samples` per row, or a request's own `n`."""
        counts = row_samples(self.rows, num_samples)
        return [(row, s) for row, n in zip(range(self.start, self.stop), counts) for s in range(n)]

    def halves(self) -> tuple[ShardTask, ShardTask]:
        mid = self.start + self.size // 2
        return (
            ShardTask(self.index, self.start, mid, self.rows.slice(0, mid - self.start)),
            ShardTask(self.index, mid, self.stop, self.rows.slice(mid - self.start)),
        )


INPUT_SCHEMA = pa.schema([("row", pa.int64()), ("question", pa.string()), ("reference", pa.string())])
# The columns each task adds to a shard's rows: choice's texts and its answer as an index where the
# input gave one (else `reference` holds the answer's text); loglikelihood's continuation.
TASK_INPUTS = {
    "generate": [],
    "choice": [("choices", pa.list_(pa.string())), ("answer_index", pa.int64())],
    "loglikelihood": [("continuation", pa.string())],
    "perplexity": [],
}


# A request from an OpenAI Batch file (jobs.openai_batch reads them): its prompt, as chat turns
# (/v1/chat/completions) or text (/v1/completions), and its own settings over the job's (null: the
# job's). `unsupported` says what it asks for that bulkscore does not do: the row's error.
MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
REQUEST_TYPE = pa.struct(
    [
        ("url", pa.string()),
        ("model", pa.string()),
        ("messages", pa.list_(MESSAGE_TYPE)),
        ("prompt", pa.string()),
        ("max_tokens", pa.int64()),
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("seed", pa.int64()),
        ("n", pa.int64()),
        ("stop", pa.list_(pa.string())),
        ("unsupported", pa.string()),
    ]
)
REQUEST = "request"  # the column that holds them, in the input and in a generate shard's rows


def input_schema(task: str, requests: bool = False) -> pa.Schema:
    """A shard's rows for the task; `requests`: with each row's OpenAI Batch request (generate)."""
    return pa.schema(list(INPUT_SCHEMA) + TASK_INPUTS[task] + ([(REQUEST, REQUEST_TYPE)] if requests else []))


def sample_counts(rows: pa.Table, num_samples: int) -> pa.ChunkedArray:
    """How many samples each row has, as Arrow: its request's `n` where it gives one, else `num_samples`."""
    if REQUEST not in rows.column_names:
        return pa.chunked_array([pa.repeat(pa.scalar(num_samples, pa.int64()), rows.num_rows)])
    return pc.fill_null(pc.struct_field(rows.column(REQUEST), "n"), num_samples)


def row_samples(rows: pa.Table, num_samples: int) -> list[int]:
    """sample_counts of a shard's rows, as a list."""
    return sample_counts(rows, num_samples).to_pylist()


# What an actor returns for a shard: one row per (input row, sample), keyed by `row`.
RESULT_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("sample", pa.int32()),
        ("completion", pa.string()),
        ("answer_text", pa.string()),
        ("answer", pa.float64()),
        ("is_correct", pa.bool_()),
        ("loss", pa.float64()),
        ("completion_loss", pa.float64()),
        ("reference_loss", pa.float64()),
        ("num_prompt_tokens", pa.int32()),
        ("num_completion_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("error", pa.string()),
    ]
)

# The likelihood tasks' result columns (after row and sample; each ends with error).
LIKELIHOOD_RESULTS = {
    "choice": [
        ("choice_logprobs", pa.list_(pa.float64())),  # each choice's summed token log-probs
        ("choice_num_tokens", pa.list_(pa.int32())),
        ("choice_is_greedy", pa.list_(pa.bool_())),  # every token of the choice is the argmax
        ("pred", pa.int32()),  # argmax of choice_logprobs
        ("pred_norm", pa.int32()),  # argmax of choice_logprobs / each choice's length (lm-eval's acc_norm)
        ("gold", pa.int32()),  # the right choice's index, where the row gives one
        ("is_correct", pa.bool_()),
        ("is_correct_norm", pa.bool_()),
        ("num_prompt_tokens", pa.int32()),
    ],
    "loglikelihood": [
        ("logprob", pa.float64()),
        ("num_continuation_tokens", pa.int32()),
        ("is_greedy", pa.bool_()),
        ("num_prompt_tokens", pa.int32()),
    ],
    "perplexity": [
        ("logprob", pa.float64()),  # the whole text's, over its rolling windows
        ("num_tokens", pa.int32()),
        ("num_words", pa.int64()),
        ("num_bytes", pa.int64()),
    ],
}
RESULT_SCHEMAS = {"generate": RESULT_SCHEMA} | {
    task: pa.schema([("row", pa.int64()), ("sample", pa.int32()), *fields, ("error", pa.string())])
    for task, fields in LIKELIHOOD_RESULTS.items()
}


def result_schema(task: str) -> pa.Schema:
    return RESULT_SCHEMAS[task]


# Key of a shard result's schema metadata: JSON {"generate_s", "loss_s"}, seconds the actor spent.
TIMINGS_KEY = b"bulkscore.timings"


def shard_timings(result: pa.Table) -> dict[str, float]:
    raw = (result.schema.metadata or {}).get(TIMINGS_KEY)
    return json.loads(raw) if raw else {}


def error_result(task: ShardTask, num_samples: int, error: str, schema: pa.Schema = RESULT_SCHEMA) -> pa.Table:
    """Result rows for a piece that could not be scored at all: every (row, sample) gets `error`."""
    pairs = task.pairs(num_samples)
    n = len(pairs)
    columns = {name: [None] * n for name in schema.names}
    columns["row"] = [r for r, _ in pairs]
    columns["sample"] = [s for _, s in pairs]
    for name in ("num_prompt_tokens", "num_completion_tokens"):
        if name in columns:
            columns[name] = [0] * n
    if "finish_reason" in columns:
        columns["finish_reason"] = ["error"] * n
    columns["error"] = [error] * n
    return pa.table(columns, schema=schema)


class ContractError(RuntimeError):
    """A shard result that breaks the row accounting: a row missing, repeated or out of range."""


def check_result(task: ShardTask, result: pa.Table, num_samples: int, schema: pa.Schema = RESULT_SCHEMA) -> pa.Table:
    """Refuse a result that does not hold each (row, sample) of the shard exactly once, in `schema`.

    Returns the result sorted by (row, sample).
    """
    if result.schema != schema:
        raise ContractError(
            f"shard {task.index}: result columns {result.schema.names} with types "
            f"{[str(t) for t in result.schema.types]}; expected {schema.names}"
        )
    result = result.sort_by([("row", "ascending"), ("sample", "ascending")])
    rows = result.column("row").to_pylist()
    samples = result.column("sample").to_pylist()
    expected = task.pairs(num_samples)
    if list(zip(rows, samples)) != expected:
        got = set(zip(rows, samples))
        missing = [k for k in expected if k not in got][:5]
        extra = len(rows) - len(got)
        raise ContractError(
            f"shard {task.index}: expected {len(expected)} (row, sample) pairs, got {len(rows)}; "
            f"missing {missing}{'...' if len(missing) == 5 else ''}, repeated {extra}"
        )
    return result
