"""The likelihood tasks' shards: choice, loglikelihood and perplexity rows -> requests -> result rows.

Tokenization follows lm-evaluation-harness's Hugging Face backend (HFLM), so that the numbers are
comparable with its: a context's trailing spaces move to the continuation; the continuation's
tokens are those of context + continuation after the context's own tokens; an empty context is the
tokenizer's prefix token (BOS, else EOS); a text gets the tokenizer's own special tokens unless it
starts with the prefix token's text (as a chat template writes it); a text is scored in lm-eval's
rolling windows of the model's context.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import torch

from bulkscore.workers.contract import TIMINGS_KEY, ScoringSettings, ShardTask, result_schema
from bulkscore.workers.generation import Engine
from bulkscore.workers.likelihood import Continuations, Scored, rolling_windows
from bulkscore.workers.models import LoadedModel
from bulkscore.workers.prompts import format_prompt
from bulkscore.workers.scoring import describe, per_row_fallback


class RowError(ValueError):
    """What is wrong with one row: it becomes that row's `error`."""


def prefix_token(tokenizer) -> int:
    """lm-eval's prefix_token_id: what an empty context, and a text's first window, start from."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """lm-eval's tok_encode for each text (a chat prompt's included: its template writes the BOS
    text, where it has one), in as few tokenizer calls as can be."""
    if not texts:
        return []
    bos = tokenizer.decode(prefix_token(tokenizer))
    plain = [i for i, t in enumerate(texts) if not (bos and t.startswith(bos))]
    out: list[list[int] | None] = [None] * len(texts)
    for i, ids in zip(plain, tokenizer([texts[i] for i in plain])["input_ids"] if plain else []):
        out[i] = ids
    rest = [i for i in range(len(texts)) if out[i] is None]
    for i, ids in zip(rest, tokenizer([texts[i] for i in rest], add_special_tokens=False)["input_ids"] if rest else []):
        out[i] = ids
    return out


def split_spaces(context: str, continuation: str) -> tuple[str, str]:
    """The context's trailing spaces moved to the continuation (lm-eval's _encode_pair)."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def encode_pairs(tokenizer, context: str, continuations: Sequence[str]) -> Continuations:
    """One context's tokens and each continuation's, as lm-eval's loglikelihood encodes them."""
    if context == "":
        return empty_context(tokenizer, continuations)
    # The same spaces move whatever the continuation: one context for all.
    pairs = [split_spaces(context, c) for c in continuations]
    context_ids, *wholes = encode(tokenizer, [pairs[0][0]] + [c + rest for c, rest in pairs])
    if not context_ids:
        raise RowError("the context has no tokens")
    tails = [tuple(whole[len(context_ids) :]) for whole in wholes]
    for j, tail in enumerate(tails):
        if not tail:
            raise RowError(f"continuation {j} has no tokens")
    return Continuations(tuple(context_ids), tuple(tails))


def empty_context(tokenizer, continuations: Sequence[str]) -> Continuations:
    """lm-eval's empty context: the prefix token, or, for continuations that start with that token
    themselves, their first token (then every continuation must, to share one context)."""
    ids = tokenizer(list(continuations), add_special_tokens=False)["input_ids"]
    if any(not c for c in ids):
        raise RowError(f"continuation {next(j for j, c in enumerate(ids) if not c)} has no tokens")
    prefix = prefix_token(tokenizer)
    starts = {c[0] == prefix for c in ids}
    if starts == {False}:
        return Continuations((prefix,), tuple(map(tuple, ids)))
    if starts == {True} and all(len(c) > 1 for c in ids):
        return Continuations((prefix,), tuple(tuple(c[1:]) for c in ids))
    raise RowError("an empty context before choices of which only some start with the prefix token (or are only it)")


def check_length(request: Continuations, lm: LoadedModel) -> None:
    if request.positions > lm.context_length:
        raise RowError(
            f"too long: the context and its longest continuation take {request.positions + 1} tokens; "
            f"the model's context is {lm.context_length} tokens"
        )


@dataclass
class Row:
    """One input row on its way through: its request(s), or what is wrong with it."""

    row: int
    context: str | None = None
    choices: list[str] | None = None
    gold: int | None = None
    request: Continuations | None = None
    windows: list[Continuations] | None = None  # perplexity
    scored: list[Scored] | None = None
    error: str | None = None


def resolve_gold(choices: Sequence[str], index: int | None, text: str | None) -> int | None:
    """The right choice's index: given as one, else the choice whose text the answer is (else a
    whole number, as text); None without an answer."""
    if index is None and text is not None:
        stripped = [c.strip() for c in choices]
        if text in choices:
            index = choices.index(text)
        elif text.strip() in stripped:
            index = stripped.index(text.strip())
        elif re.fullmatch(r"\s*\d+\s*", text):
            index = int(text)
        else:
            raise RowError(f"answer {text[:80]!r} is neither one of the {len(choices)} choices nor an index")
    if index is not None and not 0 <= index < len(choices):
        raise RowError(f"answer index {index} is out of range for {len(choices)} choices")
    return index


def prepare(lm: LoadedModel, rows: list[dict], settings: ScoringSettings) -> list[Row]:
    """Each row's request, lm-eval's tokenization; a row at fault gets its error instead."""
    task, chat = settings.task, settings.prompt.format != "raw"  # chat: the context in its template
    out = []
    for r in rows:
        item = Row(r["row"], r["question"])
        try:
            if task == "perplexity":
                if not item.context:
                    raise RowError("empty text: nothing to score")
            else:
                if item.context is None:
                    raise RowError("no context (the question column is empty)")
                context = format_prompt(lm.tokenizer, item.context, settings.prompt) if chat else item.context
                if task == "choice":
                    choices = r["choices"]
                    if not choices:
                        raise RowError("no choices")
                    if any(c is None for c in choices):
                        raise RowError(f"choice {[c is None for c in choices].index(True)} is empty (null)")
                    item.choices = choices
                    item.gold = resolve_gold(choices, r["answer_index"], r["reference"])
                    texts = [settings.choice_delimiter + c for c in choices]
                else:
                    if not r["continuation"]:
                        raise RowError("no continuation")
                    texts = [r["continuation"]]
                item.request = encode_pairs(lm.tokenizer, context, texts)
                check_length(item.request, lm)
        except RowError as error:
            item.error = f"bad row: {error}"
        out.append(item)
    if task == "perplexity":
        texts = [item for item in out if item.error is None]
        for item, tokens in zip(texts, encode(lm.tokenizer, [item.context for item in texts])):
            if tokens:
                item.windows = rolling_windows(tokens, prefix_token(lm.tokenizer), lm.context_length)
            else:
                item.error = "bad row: empty text: it has no tokens"
    return out


def score_rows(engine: Engine, items: Sequence[Row]) -> None:
    """Every request of the rows without an error, scored together; a failure confined to some
    rows becomes their error."""
    todo = [item for item in items if item.error is None]
    requests = [item.windows if item.windows is not None else [item.request] for item in todo]

    def run(batch: list[list[Continuations]]) -> list[list[Scored]]:
        flat = engine.likelihood([r for rs in batch for r in rs])
        out, at = [], 0
        for rs in batch:
            out.append([s for scored in flat[at : at + len(rs)] for s in scored])
            at += len(rs)
        return out

    for item, result in zip(todo, per_row_fallback(run, requests)):
        if isinstance(result, BaseException):
            item.error = f"scoring failed: {describe(result)}"
        else:
            item.scored = result


def first_best(values: Sequence[float]) -> int:
    """The index of the first largest value (numpy's argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def choice_values(item: Row) -> dict:
    logprobs = [s.logprob for s in item.scored]
    lengths = [len(c) for c in item.choices]  # characters, as lm-eval's acc_norm divides by
    normed = [lp / n if n else -math.inf for lp, n in zip(logprobs, lengths)]
    pred, pred_norm = first_best(logprobs), first_best(normed)
    gold = item.gold
    return {
        "choice_logprobs": logprobs,
        "choice_num_tokens": [s.num_tokens for s in item.scored],
        "choice_is_greedy": [s.is_greedy for s in item.scored],
        "pred": pred,
        "pred_norm": pred_norm,
        "gold": gold,
        "is_correct": None if gold is None else pred == gold,
        "is_correct_norm": None if gold is None else pred_norm == gold,
    }


def row_values(item: Row, task: str) -> dict:
    if item.scored is None:
        values = {"num_prompt_tokens": 0} if task != "perplexity" else {}
        if task == "choice" and item.choices is not None:
            values["gold"] = item.gold
        return values | {"error": item.error}
    if task == "choice":
        return choice_values(item) | {"num_prompt_tokens": len(item.request.context)}
    if task == "loglikelihood":
        (scored,) = item.scored
        return {
            "logprob": scored.logprob,
            "num_continuation_tokens": scored.num_tokens,
            "is_greedy": scored.is_greedy,
            "num_prompt_tokens": len(item.request.context),
        }
    return {
        "logprob": sum(s.logprob for s in item.scored),
        "num_tokens": sum(s.num_tokens for s in item.scored),
        "num_words": len(re.split(r"\s+", item.context)),  # lm-eval's count_words
        "num_bytes": len(item.context.encode("utf-8")),
    }


def result_table(items: Sequence[Row], task: str) -> pa.Table:
    schema = result_schema(task)
    columns: dict[str, list] = {name: [] for name in schema.names}
    for item in items:
        values = {"row": item.row, "sample": 0, "error": item.error} | row_values(item, task)
        for name in schema.names:
            columns[name].append(values.get(name))
    return pa.table(columns, schema=schema)


def score_task_shard(lm: LoadedModel, task: ShardTask, settings: ScoringSettings, engine: Engine) -> pa.Table:
    """One result row per input row of the shard, in the task's result schema."""
    with torch.inference_mode():
        with engine.tokenizer:
            items = prepare(lm, task.rows.to_pylist(), settings)
        score_rows(engine, items)
    table = result_table(items, settings.task)
    return table.replace_schema_metadata({TIMINGS_KEY: json.dumps(engine.take_seconds()).encode()})
