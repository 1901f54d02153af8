"""Score one shard: prompts -> batched generation -> answers and grades -> batched losses.

Row accounting: every (row, sample) of the shard comes back exactly once, with a result or with
`error` set; a failure confined to one row becomes that row's error and the rest are scored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

import pyarrow as pa
import torch

from bulkscore.workers.answers import grade, parse_answer, parse_number
from bulkscore.workers.contract import (
    REQUEST,
    RESULT_SCHEMA,
    TIMINGS_KEY,
    GenerationSettings,
    PromptSettings,
    ScoringSettings,
    ShardTask,
    row_samples,
)
from bulkscore.workers.generation import Engine, Generated, Request, sample_seed
from bulkscore.workers.models import LoadedModel
from bulkscore.workers.prompts import encode_texts, format_prompt, shared_start

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class Item:
    """One (row, sample) of the shard on its way through."""

    row: int
    sample: int
    question: str | None
    reference: str | None
    request: dict | None = None  # its OpenAI Batch request (contract.REQUEST_TYPE), if it came as one
    prompt: str | None = None
    raw: bool = False  # the prompt is text as given (no chat template): `loss` scores what generation runs
    prompt_ids: list[int] | None = None
    reference_seq: list[int] | None = None  # prompt + reference, tokenized together
    generated: Generated | None = None
    error: str | None = None

    @property
    def settings(self) -> dict:
        """The request's own generation settings, by GenerationSettings' names (none: the job's)."""
        request = self.request or {}
        own = {
            "max_new_tokens": request.get("max_tokens"),
            "temperature": request.get("temperature"),
            "top_p": request.get("top_p"),
            "stop": None if request.get("stop") is None else tuple(request["stop"]),
            "seed": request.get("seed"),
        }
        return {name: value for name, value in own.items() if value is not None}

    @property
    def reference_ids(self) -> list[int] | None:
        """The reference's tokens after the prompt's, when prompt + reference splits there: then
        generation's prompt cache scores them; else (a token across the seam) a forward pass does."""
        seq, n = self.reference_seq, len(self.prompt_ids or ())
        return seq[n:] if seq is not None and len(seq) > n and seq[:n] == self.prompt_ids else None


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def per_row_fallback(fn: Callable[[list[In]], list[Out]], inputs: list[In]) -> list[Out | BaseException]:
    """fn over the whole batch; if that raises, over each input alone, keeping each one's error.

    Out of (GPU) memory, the inputs are halved and retried instead, down to single rows. A tile's own
    memory is fixed (workers.tiles), so a lasting shortage ends as row errors; the rows that do get
    scored are what they would be in any batch.
    """
    try:
        return list(fn(inputs))
    except Exception as error:  # confined to this batch: find the rows it comes from
        if len(inputs) == 1:
            return [error]
        if isinstance(error, torch.OutOfMemoryError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(inputs) // 2
            return per_row_fallback(fn, inputs[:half]) + per_row_fallback(fn, inputs[half:])
    results: list[Out | BaseException] = []
    for x in inputs:
        try:
            results.extend(fn([x]))
        except Exception as error:  # confined to this row: it becomes the row's error
            results.append(error)
    return results


def prompt_text(lm: LoadedModel, item: Item, settings: ScoringSettings) -> tuple[str, bool]:
    """(the item's prompt, whether it is raw text): its request's chat turns through the model's chat
    template, or its request's text as it is; else its question in the job's prompt format."""
    request = item.request
    if request is not None and request["messages"] is not None:
        messages = [{"role": m["role"], "content": m["content"]} for m in request["messages"]]
        return lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
    if request is not None and request["prompt"] is not None:
        return request["prompt"], True
    return format_prompt(lm.tokenizer, item.question, settings.prompt), settings.prompt.format == "raw"


def encode(lm: LoadedModel, texts: Sequence[tuple[str, bool]]) -> list[list[int]]:
    """Token ids of (text, raw) pairs: one tokenizer call for the raw ones, one for the rest."""
    ids: list[list[int] | None] = [None] * len(texts)
    for raw in (True, False):
        where = [i for i, (_, r) in enumerate(texts) if r == raw]
        format = PromptSettings("raw" if raw else "chat")
        for i, tokens in zip(where, encode_texts(lm.tokenizer, [texts[i][0] for i in where], format)):
            ids[i] = tokens
    return ids


def prepare_prompts(lm: LoadedModel, items: Sequence[Item], settings: ScoringSettings) -> None:
    """Each item's prompt and its tokens, and prompt + reference's: one tokenizer call for all the
    shard's prompts, one for all its references (a question's samples share theirs)."""
    valid, texts, made = [], {}, {}  # made: prompts by question, or by request (a row's samples share it)
    for item in items:
        key = item.question if item.request is None else id(item.request)
        if item.request is not None and item.request["unsupported"] is not None:
            item.error = f"unsupported request: {item.request['unsupported']}"
        elif item.question is None or not item.question.strip():
            item.error = "empty question"
        else:
            try:
                made[key] = made.get(key) or prompt_text(lm, item, settings)
            except Exception as error:  # a chat template that refuses a request's turns: its row's error
                if item.request is None:
                    raise
                item.error = f"chat template failed: {describe(error)}"
        if item.error is None:
            texts[id(item)] = made[key]
            valid.append(item)
    unique = list(dict.fromkeys(texts.values()))
    prompts = dict(zip(unique, encode(lm, unique)))
    pairs = list(dict.fromkeys((texts[id(item)], item.reference) for item in valid if item.reference is not None))
    references = dict(zip(pairs, encode(lm, [(text + r, raw) for (text, raw), r in pairs])))
    for item in valid:
        (item.prompt, item.raw), item.prompt_ids = texts[id(item)], prompts[texts[id(item)]]
        if item.reference is not None:
            item.reference_seq = references[(texts[id(item)], item.reference)]
        longest = item.settings.get("max_new_tokens", settings.generation.max_new_tokens)
        if len(item.prompt_ids) > lm.context_length - longest:
            asked = "the request's max_tokens" if "max_new_tokens" in item.settings else "--max-new-tokens"
            item.error = (
                f"prompt too long: {len(item.prompt_ids)} tokens; with {asked} {longest} that exceeds "
                f"the model's context of {lm.context_length} tokens"
            )


def own_settings(item: Item, job: GenerationSettings) -> GenerationSettings | None:
    """The item's request's generation settings over the job's; None where it sets none."""
    own = {name: value for name, value in item.settings.items() if name != "seed"}
    return replace(job, **own) if own else None


def generate_items(engine: Engine, items: Sequence[Item], settings: ScoringSettings) -> None:
    todo = [item for item in items if item.error is None]
    gen = settings.generation

    def run(xs: list[Item]) -> list[Generated]:
        return engine.generate(
            [
                Request(
                    tuple(x.prompt_ids),
                    sample_seed(x.settings.get("seed", gen.seed), x.row, x.sample),
                    None if x.reference_ids is None else tuple(x.reference_ids),
                    own_settings(x, gen),
                    # A request's text prompt is raw whatever the job's format (Engine's score_prompts).
                    score_prompt=x.raw if x.request is not None else None,
                )
                for x in xs
            ]
        )

    for item, result in zip(todo, per_row_fallback(run, todo)):
        if isinstance(result, BaseException):
            item.error = f"generation failed: {describe(result)}"
        else:
            item.generated = result


def generated_loss(item: Item, sequence: Sequence[int]) -> float | None:
    """The mean NLL of `sequence` (question + completion, tokenized) from generation's own NLLs, when
    it is the prompt's tokens followed by the completion's first ones (the text leaves out a final
    end-of-sequence), or by all but the last two and the one token those make (Generated.merged_tail),
    and the prompt's NLLs were kept (Engine's score_prompts); else None."""
    generated, prompt = item.generated, item.prompt_ids
    n = len(sequence) - len(prompt)
    if generated.prompt_nlls is None or not 0 <= n <= len(generated.token_ids) or len(sequence) < 2:
        return None
    tokens, nlls = list(generated.token_ids), generated.token_nlls
    if list(sequence) == prompt + tokens[:n]:
        values = generated.prompt_nlls + nlls[:n]
    elif generated.merged_tail and list(sequence) == prompt + tokens[:-2] + [generated.merged_tail[0]]:
        values = generated.prompt_nlls + nlls[:-2] + (generated.merged_tail[1],)
    else:
        return None
    return sum(values) / len(values)


def item_losses(engine: Engine, items: Sequence[Item]) -> list[tuple]:
    """(loss, completion_loss, reference_loss) per item, as the output contract defines them.

    completion_loss comes from generation's own logits, reference_loss mostly from generation's
    prompt cache; `loss`, and any reference whose tokens do not start where the prompt's end, are
    scored by span_nll.
    """
    if not items:
        return []
    # loss: question + completion as plain text, with the tokenizer's own special tokens. Where that
    # is the very sequence generation ran (raw prompts), generation's own NLLs give it.
    with engine.tokenizer:
        whole = engine.lm.tokenizer([item.question + item.generated.text for item in items])["input_ids"]
    losses = [generated_loss(item, sequence) for item, sequence in zip(items, whole)]
    rest = [i for i, loss in enumerate(losses) if loss is None]
    for i, loss in zip(rest, engine.span_nll([whole[i] for i in rest], [1] * len(rest))):
        losses[i] = loss
    # reference_loss: prompt + reference tokenized together, scored after the prompt's tokens;
    # mostly done during generation, from the prompt's cache.
    by_item = {
        id(item): item.generated.continuation_nll for item in items if item.generated.continuation_nll is not None
    }
    rest = [item for item in items if item.reference is not None and id(item) not in by_item]
    references = engine.span_nll(
        [item.reference_seq for item in rest], [len(item.prompt_ids) for item in rest], prefixed=True
    )
    by_item |= dict(zip(map(id, rest), references))
    return [(loss, item.generated.nll, by_item.get(id(item))) for item, loss in zip(items, losses)]


def score_losses(engine: Engine, items: Sequence[Item]) -> dict[int, tuple]:
    done = [item for item in items if item.generated is not None]
    losses = per_row_fallback(lambda xs: item_losses(engine, xs), done)
    out = {}
    for item, value in zip(done, losses):
        if isinstance(value, BaseException):
            item.error = f"loss failed: {describe(value)}"
        else:
            out[id(item)] = value
    return out


def result_table(items: Sequence[Item], losses: dict[int, tuple], settings: ScoringSettings) -> pa.Table:
    pattern = re.compile(settings.grading.answer_regex, re.DOTALL)
    columns: dict[str, list] = {name: [] for name in RESULT_SCHEMA.names}
    for item in items:
        ok = item.error is None
        completion = item.generated.text if ok else None
        answer_text = parse_answer(completion, pattern) if ok else None
        loss, completion_loss, reference_loss = losses.get(id(item), (None, None, None))
        values = {
            "row": item.row,
            "sample": item.sample,
            "completion": completion,
            "answer_text": answer_text,
            "answer": parse_number(answer_text),
            "is_correct": grade(answer_text, item.reference, settings.grading.tolerance) if ok else None,
            "loss": loss,
            "completion_loss": completion_loss,
            "reference_loss": reference_loss,
            "num_prompt_tokens": len(item.prompt_ids or ()),
            "num_completion_tokens": len(item.generated.token_ids) if ok else 0,
            "finish_reason": item.generated.finish_reason if ok else "error",
            "error": item.error,
        }
        for name, value in values.items():
            columns[name].append(value)
    return pa.table(columns, schema=RESULT_SCHEMA)


def shard_engine(lm: LoadedModel, settings: ScoringSettings, thread: ThreadPoolExecutor | None = None) -> Engine:
    """The generation engine for a job's shards on this model: one per worker, shared by its shards;
    `thread`: the model_thread the model was loaded on."""
    # Raw prompts are the question itself: question + completion, the `loss` text, is what generation
    # runs, so its prefill keeps the prompts' NLLs (item_losses).
    raw = settings.prompt.format == "raw"
    return Engine(
        lm, settings.generation, shared_start(lm.tokenizer, settings.prompt), score_prompts=raw, thread=thread
    )


def score_shard(lm: LoadedModel, task: ShardTask, settings: ScoringSettings, engine: Engine | None = None) -> pa.Table:
    """One RESULT_SCHEMA row per (input row, sample) of the shard. Shards scored at once (from two
    threads) through one `engine` share its decode tiles.

    The result's timings are the model time the engine spent since the last shard it reported:
    summed over a worker's shards, its whole time, counted once."""
    engine = engine or shard_engine(lm, settings)
    rows = task.rows.to_pylist()
    counts = row_samples(task.rows, settings.generation.num_samples)
    items = [
        Item(row=r["row"], sample=s, question=r["question"], reference=r["reference"], request=r.get(REQUEST))
        for r, n in zip(rows, counts)
        for s in range(n)
    ]
    with torch.inference_mode():
        with engine.tokenizer:
            prepare_prompts(lm, items, settings)
        generate_items(engine, items, settings)
        losses = score_losses(engine, items)
    table = result_table(items, losses, settings)
    timings = engine.take_seconds()
    return table.replace_schema_metadata({TIMINGS_KEY: json.dumps(timings).encode()})
