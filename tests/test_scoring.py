"""The actor's work on a tiny model, without Ray: losses, batch invariance, stops, row errors."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bulkscore.workers.contract import (
    INPUT_SCHEMA,
    REQUEST,
    REQUEST_TYPE,
    GenerationSettings,
    GradingSettings,
    ModelSpec,
    PromptSettings,
    ScoringSettings,
    ShardTask,
    input_schema,
)
from bulkscore.workers.generation import Engine, gumbel_noise
from bulkscore.workers.models import load_model
from bulkscore.workers.scoring import score_shard, shard_engine
from bulkscore.workers.tiles import CHUNK
from tests.helpers import QUESTIONS


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(ModelSpec(str(tiny_model), "folder", dtype="float32", device="cpu"))


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def any_lm(request, tiny_model):
    """The tiny model in each dtype bulkscore runs on CPUs: results must not depend on the batch in either."""
    return load_model(ModelSpec(str(tiny_model), "folder", dtype=request.param, device="cpu"))


def task(questions: list[dict], start: int = 0) -> ShardTask:
    rows = pa.table(
        {
            "row": list(range(start, start + len(questions))),
            "question": [q["question"] for q in questions],
            "reference": [None if q.get("answer") is None else str(q["answer"]) for q in questions],
        },
        schema=INPUT_SCHEMA,
    )
    return ShardTask(0, start, start + len(questions), rows)


def settings(prompt: str = "chat", **generation) -> ScoringSettings:
    return ScoringSettings(
        PromptSettings(prompt), GenerationSettings(**({"max_new_tokens": 12} | generation)), GradingSettings()
    )


def mean_nll(model, ids: list[int], first: int) -> float:
    """Mean NLL of ids[first:] computed directly: one sequence, no padding, no batching."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # [T, V]
        logp = torch.log_softmax(logits, dim=-1)
        return -torch.stack([logp[t - 1, ids[t]] for t in range(first, len(ids))]).mean().item()


def test_three_losses_equal_an_independent_computation(lm):
    result = score_shard(lm, task(QUESTIONS), settings()).to_pylist()
    tok, model = lm.tokenizer, lm.model
    for q, row in zip(QUESTIONS, result):
        assert row["error"] is None
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": q["question"]}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert row["num_prompt_tokens"] == len(prompt_ids)
        # loss: the homework grader's, HF's own shifted loss over question + completion.
        ids = torch.tensor([tok(q["question"] + row["completion"])["input_ids"]])
        with torch.inference_mode():
            expected_loss = model(input_ids=ids, labels=ids).loss.item()
        assert row["loss"] == pytest.approx(expected_loss, abs=1e-4)
        # completion_loss: generate this row alone, score its tokens given the prompt.
        with torch.inference_mode():
            alone = model.generate(
                input_ids=torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False, pad_token_id=2, eos_token_id=2
            )[0, len(prompt_ids) :].tolist()
        kept = alone[: row["num_completion_tokens"]]
        assert tok.decode(kept, skip_special_tokens=True) == row["completion"]
        assert row["completion_loss"] == pytest.approx(mean_nll(model, prompt_ids + kept, len(prompt_ids)), abs=1e-4)
        # reference_loss: prompt + reference tokenized together, scored after the prompt.
        whole = tok(prompt + str(q["answer"]), add_special_tokens=False)["input_ids"]
        assert row["reference_loss"] == pytest.approx(mean_nll(model, whole, len(prompt_ids)), abs=1e-4)


def test_reference_loss_reuses_the_prompt_cache(lm, monkeypatch):
    """Only `loss` takes a forward pass of its own: references are scored from generation's cache."""
    real, scored = Engine.span_nll, []

    def recording(engine, sequences, starts, **prefixed):
        scored.append(len(sequences))
        return real(engine, sequences, starts, **prefixed)

    monkeypatch.setattr(Engine, "span_nll", recording)
    rows = score_shard(lm, task(QUESTIONS), settings()).to_pylist()
    assert scored == [len(QUESTIONS), 0]  # question + completion; no reference left to score
    assert all(r["reference_loss"] is not None for r in rows)


def test_raw_loss_comes_from_generation_and_equals_the_pass(lm, monkeypatch):
    """Raw prompts: question + completion is the sequence generation ran, so `loss` comes from the
    prefill's and the decode's own logits and takes no pass of its own, except for rows whose text
    tokenizes otherwise at the seam. Both ways, and HF's own loss, agree."""
    real, scored = Engine.span_nll, []

    def recording(engine, sequences, starts, **prefixed):
        scored.append(len(sequences))
        return real(engine, sequences, starts, **prefixed)

    monkeypatch.setattr(Engine, "span_nll", recording)
    folded = score_shard(lm, task(QUESTIONS), settings("raw")).to_pylist()
    assert scored[0] < len(QUESTIONS) // 2  # most rows' loss took no pass
    plain = Engine(lm, GenerationSettings(max_new_tokens=12))  # score_prompts off: every loss by a pass
    passed = score_shard(lm, task(QUESTIONS), settings("raw"), plain).to_pylist()
    assert scored[-2] == len(QUESTIONS)
    for q, a, b in zip(QUESTIONS, folded, passed):
        assert a["completion"] == b["completion"] and a["completion_loss"] == b["completion_loss"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        ids = torch.tensor([lm.tokenizer(q["question"] + a["completion"])["input_ids"]])
        with torch.inference_mode():
            assert a["loss"] == pytest.approx(lm.model(input_ids=ids, labels=ids).loss.item(), abs=1e-4)


def test_raw_loss_where_the_last_two_tokens_merge_comes_from_generation(lm, monkeypatch):
    """A completion cut by max_new_tokens whose last two tokens ("\\n" "\\n") its text makes one
    ("\\n\\n") still takes its `loss` from generation: the merged token's NLL from the logits that
    chose the first of the two. It equals the pass and HF's own loss."""
    from bulkscore.workers.generation import Chooser

    script = [*lm.tokenizer(" The answer is 5", add_special_tokens=False)["input_ids"], 198, 198]
    merged = lm.tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    assert len(merged) == 1 and merged != [198]

    def scripted(chooser, logits, steps, generators, rows=None, settings=None):  # the script's token at each step
        return torch.tensor([script[min(int(step), len(script) - 1)] for step in steps])

    real, scored = Engine.span_nll, []

    def recording(engine, sequences, starts, **prefixed):
        scored.append(len(sequences))
        return real(engine, sequences, starts, **prefixed)

    monkeypatch.setattr(Chooser, "__call__", scripted)
    monkeypatch.setattr(Engine, "span_nll", recording)
    questions = QUESTIONS[:3]
    folded = score_shard(lm, task(questions), settings("raw", max_new_tokens=len(script))).to_pylist()
    assert scored[0] == 0  # no row's loss took a pass
    plain = Engine(lm, GenerationSettings(max_new_tokens=len(script)))  # every loss by a pass
    passed = score_shard(lm, task(questions), settings("raw", max_new_tokens=len(script)), plain).to_pylist()
    for q, a, b in zip(questions, folded, passed):
        assert a["completion"] == " The answer is 5\n\n" and a["finish_reason"] == "length"
        ids = lm.tokenizer(q["question"] + a["completion"])["input_ids"]
        assert ids[-1] == merged[0]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        with torch.inference_mode():
            hf = lm.model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
        assert a["loss"] == pytest.approx(hf, abs=1e-4)


def test_small_models_get_wider_tiles():
    """Under a million parameters a call's arithmetic costs less than its Python: up to 8x the rows."""
    from bulkscore.workers.models import tile_scale
    from bulkscore.workers.tiles import tile_rows

    def scale(parameters: int) -> int:
        return tile_scale(torch.nn.Linear(parameters, 1, bias=False))

    assert [scale(n) for n in (20_000, 131_072, 300_000, 600_000, 2**20, 135_000_000)] == [8, 8, 2, 1, 1, 1]
    assert [tile_rows(64, 128, 8), tile_rows(16, 1024, 8), tile_rows(64, 65536, 8)] == [512, 128, 8]


def chat_requests(lm, questions=QUESTIONS, reference=" 42"):
    from bulkscore.workers.generation import Request
    from bulkscore.workers.prompts import encode_texts, format_prompt

    chat = PromptSettings("chat")
    tail = tuple(lm.tokenizer(reference, add_special_tokens=False)["input_ids"])
    return [
        Request(
            tuple(encode_texts(lm.tokenizer, [format_prompt(lm.tokenizer, q["question"], chat)], chat)[0]),
            continuation=tail,
        )
        for q in questions
    ]


def model_calls(lm):
    """Records the [rows, tokens] shape of each forward pass of lm.model's decoder (every call)."""
    shapes = []
    hook = lm.model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    return shapes, hook


def test_a_shared_prefix_is_computed_once_and_changes_little(lm):
    """Prompts that start alike (the chat template's system turn) copy one prefix cache, computed in a
    call of its own; from the settings alone, so a row uses it whatever its neighbours."""
    from bulkscore.workers.generation import generate
    from bulkscore.workers.prompts import shared_start

    requests = chat_requests(lm)
    prefix = shared_start(lm.tokenizer, PromptSettings("chat"))
    assert len(prefix) >= 20 and all(r.prompt[: len(prefix)] == tuple(prefix) for r in requests)
    assert len(shared_start(lm.tokenizer, PromptSettings("raw"))) < 8  # nothing worth sharing
    gen = GenerationSettings(max_new_tokens=12)
    shapes, hook = model_calls(lm)
    try:
        with torch.inference_mode():
            cached = generate(lm, requests, gen, prefix)
    finally:
        hook.remove()
    assert shapes.count((1, len(prefix))) == 1
    with torch.inference_mode():
        plain = generate(lm, requests, gen)  # every prompt whole
    assert [g.token_ids for g in cached] == [g.token_ids for g in plain]
    assert [g.nll for g in cached] == pytest.approx([g.nll for g in plain], abs=1e-4)
    assert [g.continuation_nll for g in cached] == pytest.approx([g.continuation_nll for g in plain], abs=1e-4)


def test_a_finished_row_frees_its_slot_for_a_waiting_row(lm, monkeypatch):
    """Continuous batching: a row that ends leaves its slot the step it ends and a waiting row takes
    it while the others go on; every call keeps the tile's shape, and each row equals itself alone."""
    import bulkscore.workers.generation
    from bulkscore.workers.generation import Decoder, generate

    monkeypatch.setattr(bulkscore.workers.generation, "DECODE_ROWS", 4)
    monkeypatch.setattr(bulkscore.workers.generation, "PREFILL_ROWS", 1)
    requests = chat_requests(lm)
    gen = GenerationSettings(max_new_tokens=12)
    with torch.inference_mode():
        free = generate(lm, requests, gen)
    # The first row to start (the longest prompt) ends at its third token, which the others lack.
    first = max(range(len(requests)), key=lambda i: (len(requests[i].prompt), -i))
    ender = free[first].token_ids[2]
    ending = dataclasses.replace(lm, eos_token_ids=(ender,))
    assert sum(ender not in g.token_ids for g in free) >= 4
    admitted, real_admit, decode_calls = [], Decoder.admit, []

    def admit(self, rows):
        for row in rows:  # one prefill row: at most one prompt done a call
            running = sum(run is not None for run in self.slots)
            admitted.append((len(self.filling[row].pendings), running))  # (rows in, rows running)
            decode_calls.append(shapes.count((4, 1)))
        return real_admit(self, rows)

    monkeypatch.setattr(Decoder, "admit", admit)
    shapes, hook = model_calls(lm)
    try:
        with torch.inference_mode():
            batched = generate(ending, requests, gen)
            calls, refills = list(shapes), list(admitted)
            alone = [generate(ending, [r], gen)[0] for r in requests]
    finally:
        hook.remove()
    assert batched[first].token_ids == free[first].token_ids[:3] and batched[first].finish_reason == "stop"
    assert refills[:4] == [(1, 0), (1, 1), (1, 2), (1, 3)]  # four slots filled, one prefill row at a time
    assert (1, 3) in refills[4:]  # the slot the first row left, refilled while three rows ran
    # ... at once: its third token came from the second decode call, and no third call ran without it.
    assert decode_calls[refills.index((1, 3), 4)] == 2
    assert sum(n for n, _ in refills) == len(requests)
    assert set(calls) == {(4, 1), (1, CHUNK)}
    for column in ("token_ids", "text", "finish_reason", "nll", "continuation_nll"):
        assert [getattr(g, column) for g in batched] == [getattr(g, column) for g in alone], column


def test_the_prompts_a_prefill_call_finishes_go_to_their_slots_in_one_copy(lm, monkeypatch):
    """Admitting each prompt with its own cache copy (and its own scan for free slots) took a quarter
    of a tiny model's time at 10^6 rows: the prompts one prefill call finishes are admitted together,
    one copy per layer for them all, and each row still equals itself alone."""
    from bulkscore.workers import tiles
    from bulkscore.workers.generation import Request, generate

    requests = [Request(tuple(lm.tokenizer(q["question"])["input_ids"])) for q in QUESTIONS]
    gen = GenerationSettings(max_new_tokens=4)
    copies, take = [], tiles.SlotCache.take
    monkeypatch.setattr(
        tiles.SlotCache, "take", lambda self, rows, *rest: (copies.append(len(rows)), take(self, rows, *rest))[1]
    )
    with torch.inference_mode():
        together = generate(lm, requests, gen)
        counted = list(copies)
        alone = [generate(lm, [r], gen)[0] for r in requests]
    assert sum(counted) == len(requests) and len(counted) < len(requests) / 2, counted
    for column in ("token_ids", "nll", "prompt_nlls"):
        assert [getattr(g, column) for g in together] == [getattr(g, column) for g in alone], column


def test_a_decode_call_has_the_smallest_height_that_holds_its_rows(any_lm):
    """Small jobs pay for the rows they have: a decoder's calls take the smallest decode height that
    holds its running and waiting rows (16, 32, 64 or 128 rows at the tiny model's scale 1), growing
    as rows come and shrinking as they end; every row's numbers are the same, bitwise, at every height."""
    from bulkscore.workers.generation import Request, generate

    small = dataclasses.replace(any_lm, tile_scale=1)
    assert small.fixed_products  # the products always run at one height (models.PackedLinear)
    questions = [f"{q['question']} ({n})" for n in range(6) for q in QUESTIONS]  # 48 prompts
    requests = [Request(tuple(small.tokenizer(q)["input_ids"])) for q in questions]
    gen = GenerationSettings(max_new_tokens=12)
    shapes, hook = model_calls(small)
    try:
        with torch.inference_mode():
            free = generate(small, requests, gen)
            # Rows that end at their own times, half of them early: the tokens most completions hold
            # after their first, as EOS.
            held, eos = Counter(t for g in free for t in set(g.token_ids[1:-1])), []
            for token, _ in held.most_common():
                eos.append(token)
                if sum(any(t in eos for t in g.token_ids[1:-1]) for g in free) >= len(free) // 2:
                    break
            ending = dataclasses.replace(small, eos_token_ids=tuple(eos))
            shapes.clear()
            together = generate(ending, requests, gen)
            heights = [rows for rows, tokens in shapes if tokens == 1]
            shapes.clear()
            few = generate(ending, requests[:3], gen)
            few_heights = {rows for rows, tokens in shapes if tokens == 1}
            alone = [generate(ending, [r], gen)[0] for r in requests]
    finally:
        hook.remove()
    assert heights[0] == 64 and heights == sorted(heights, reverse=True) and heights[-1] < 64, heights
    assert few_heights == {16}
    for column in ("token_ids", "nll", "finish_reason"):
        assert [getattr(g, column) for g in together] == [getattr(g, column) for g in alone], column
        assert [getattr(g, column) for g in few] == [getattr(g, column) for g in alone[:3]], column


def test_products_run_below_128_rows_only_where_this_cpu_gives_each_row_its_bits_there(any_lm):
    """The load's check (models.row_invariant_heights) finds whether each packed product gives every
    row the same bits at 16, 32 and 64 rows as at 128 on this CPU; only then do decode calls' products
    run at their own height (AMX in bfloat16 differs, so it pads to 128). A product whose last bits
    move with its rows, as AMX's do, is caught."""
    from bulkscore.workers.models import PackedLinear, row_invariant_heights
    from bulkscore.workers.tiles import decode_heights

    model, scale = any_lm.model, any_lm.tile_scale
    heights = decode_heights(128 * scale, scale, fixed_products=True)  # 16, 32, 64 and 128 times the scale
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    with torch.inference_mode():
        found = row_invariant_heights(model, heights)
        for module in packed:
            x = torch.randn(module.rows, module.in_features).to(any_lm.dtype)
            same = all(torch.equal(module.product(x[:h].contiguous()), module.product(x)[:h]) for h in heights)
            assert same or not found, (module.in_features, module.out_features)
        assert all(m.heights == (heights if found else (m.rows,)) for m in packed)
        first = packed[0]
        plain = first.product
        first.product = lambda x: plain(x) * (1 + 2**-7 * (x.shape[0] < first.rows))  # last bits move with rows
        try:
            assert not row_invariant_heights(model, heights)
        finally:
            del first.product


# Kernels that add many numbers: their order of additions may follow the shapes they are given.
REDUCING_OPS = {
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "matmul",
    "linear",
    "_linear_pointwise",  # oneDNN's product with packed weights (models.PackedLinear)
    "softmax",
    "_softmax",
    "log_softmax",
    "_log_softmax",
    "cross_entropy",
    "sum",
    "mean",
    "amax",
    "max",
    "argmax",
    "cumsum",
    "sort",
    "topk",
    "var_mean",
    "norm",
    "logsumexp",
}


class ReducingOps(TorchDispatchMode):
    """Records every matrix product, attention, softmax and reduction torch runs, with the shapes of
    its tensor arguments: the model's own layers and the engine's code alike."""

    def __init__(self, seen: set[tuple]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in REDUCING_OPS or "scaled_dot_product" in name:
            tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            self.seen.add((name, tuple(tuple(t.shape) for t in tensors)))
        return func(*args, **(kwargs or {}))


def test_a_row_meets_the_same_shapes_alone_in_a_batch_or_in_any_shard(lm):
    """The design itself, not what this CPU computes: every reduction a row takes part in has the same
    shape whether it runs alone, in a full batch, at any batch size or in a shard of any size (a
    resumed job's shards, or the halves of a shard split after worker deaths). Batching adds no shape
    that the rows alone do not meet."""

    def shapes(t: ShardTask, **generation) -> set[tuple]:
        # Recorded on the caller's thread and on the engine's model thread (modes are per thread).
        seen: set[tuple] = set()
        engine = shard_engine(lm, settings(**generation))
        on_model_thread = ReducingOps(seen)
        engine.model_thread.submit(on_model_thread.__enter__).result()
        try:
            with ReducingOps(seen):
                score_shard(lm, t, settings(**generation), engine)
        finally:
            engine.model_thread.submit(on_model_thread.__exit__, None, None, None).result()
        return seen

    whole = shapes(task(QUESTIONS))
    # The recorder sees the model's layers, its norms and attention, and the engine's own reductions.
    names = {name for name, _ in whole}
    assert names >= {"mean", "log_softmax", "argmax"} and names & {"linear", "_linear_pointwise"}
    assert names & {"matmul", "scaled_dot_product_attention"}
    alone = [shapes(task([q], start=i)) for i, q in enumerate(QUESTIONS)]
    assert set().union(*alone) == whole
    assert shapes(task(QUESTIONS), batch_size=1) == shapes(task(QUESTIONS), batch_size=3) == whole
    first, second = task(QUESTIONS).halves()
    assert shapes(first) | shapes(second) == whole
    assert shapes(task(QUESTIONS[2:7], start=2)) <= whole


RESULTS = ("completion", "num_completion_tokens", "loss", "completion_loss", "reference_loss")


@pytest.mark.parametrize("prompt, scale", [("chat", 1), ("raw", 1), ("raw", 2)])
def test_greedy_results_do_not_depend_on_batch_size_or_shard(any_lm, prompt, scale):
    """Bitwise: the same completions and the same three losses, to the last bit; with raw prompts
    (whose `loss` comes from generation) and on tiles scaled as a small model's are."""
    any_lm = dataclasses.replace(any_lm, tile_scale=scale)
    one = score_shard(any_lm, task(QUESTIONS), settings(prompt, batch_size=1)).to_pydict()
    eight = score_shard(any_lm, task(QUESTIONS), settings(prompt, batch_size=8)).to_pydict()
    auto = score_shard(any_lm, task(QUESTIONS), settings(prompt)).to_pydict()
    tail = score_shard(any_lm, task(QUESTIONS[5:], start=5), settings(prompt, batch_size=2)).to_pydict()
    assert len(set(one["completion"])) > 1 and None not in one["loss"]
    for column in RESULTS:
        assert one[column] == eight[column] == auto[column], column
        assert tail[column] == auto[column][5:], column


def test_stop_string_cuts_the_completion(lm):
    plain = score_shard(lm, task(QUESTIONS[:1]), settings()).to_pylist()[0]
    assert plain["finish_reason"] == "length" and plain["num_completion_tokens"] == 12
    stop = plain["completion"][len(plain["completion"]) // 2 :][:3]
    cut = score_shard(lm, task(QUESTIONS[:1]), settings(stop=(stop,))).to_pylist()[0]
    assert cut["finish_reason"] == "stop"
    assert cut["completion"] == plain["completion"][: plain["completion"].find(stop)]
    assert cut["num_completion_tokens"] < 12


def test_bad_rows_become_errors_and_the_rest_are_scored(lm):
    questions = [
        QUESTIONS[0],
        {"question": "", "answer": 1},
        {"question": "word " * 600, "answer": 2},
        QUESTIONS[1],
        {"question": None, "answer": 3},
    ]
    rows = score_shard(lm, task(questions, start=40), settings()).to_pylist()
    assert [r["row"] for r in rows] == [40, 41, 42, 43, 44]
    assert [r["finish_reason"] for r in rows] == ["length", "error", "error", "length", "error"]
    assert rows[1]["error"] == rows[4]["error"] == "empty question"
    assert (
        rows[2]["error"].startswith("prompt too long: ")
        and "exceeds the model's context of 512 tokens" in rows[2]["error"]
    )
    assert rows[1]["completion"] is None and rows[1]["loss"] is None and rows[1]["is_correct"] is None
    assert rows[0]["error"] is None and rows[3]["error"] is None and rows[3]["loss"] is not None


def test_samples_expand_each_row(lm):
    s = dataclasses.replace(
        settings(), generation=GenerationSettings(max_new_tokens=6, temperature=1.0, num_samples=3, seed=7)
    )
    rows = score_shard(lm, task(QUESTIONS[:2]), s).to_pylist()
    assert [(r["row"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert len({r["completion"] for r in rows}) > 1


def sampled(**generation) -> ScoringSettings:
    return settings(**({"temperature": 1.0, "top_p": 0.95, "num_samples": 3, "seed": 5} | generation))


def test_seeded_samples_do_not_depend_on_batch_or_shard(any_lm):
    """Each (row, sample) draws its own noise: batch size and where the shard starts change nothing."""
    whole = score_shard(any_lm, task(QUESTIONS), sampled(batch_size=24)).to_pydict()
    # Rows 0..2 one sample at a time; rows 3..7 as a shard of their own, two samples at a time.
    alone = score_shard(any_lm, task(QUESTIONS[:3]), sampled(batch_size=1)).to_pydict()
    tail = score_shard(any_lm, task(QUESTIONS[3:], start=3), sampled(batch_size=2)).to_pydict()
    for column in RESULTS:
        assert alone[column] == whole[column][:9], column
        assert tail[column] == whole[column][9:], column
    # The samples of a row differ, and another seed draws others.
    assert len(set(whole["completion"][:3])) == 3
    other = score_shard(any_lm, task(QUESTIONS), sampled(seed=6)).to_pydict()
    assert other["completion"] != whole["completion"]


def test_sampling_keeps_only_the_top_p_tokens(lm):
    """With a nucleus of one token (or a near-zero temperature) every sample is the greedy completion."""
    greedy = score_shard(lm, task(QUESTIONS[:3]), settings()).column("completion").to_pylist()
    nucleus = score_shard(lm, task(QUESTIONS[:3]), sampled(top_p=1e-6)).column("completion").to_pylist()
    cold = score_shard(lm, task(QUESTIONS[:3]), sampled(temperature=1e-6)).column("completion").to_pylist()
    assert nucleus == cold == [c for c in greedy for _ in range(3)]


def test_gumbel_max_draws_from_the_softmax():
    """The noise SeededGumbel adds turns argmax into a draw from softmax(scores)."""
    scores = torch.log(torch.tensor([[0.6, 0.3, 0.1, 0.0]]))
    noise = lambda seed: gumbel_noise([torch.Generator().manual_seed(seed)], 4, "cpu")  # noqa: E731
    draws = [(scores + noise(seed)).argmax().item() for seed in range(4000)]
    frequencies = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    assert frequencies.tolist() == pytest.approx([0.6, 0.3, 0.1, 0.0], abs=0.03)


def test_raw_prompt_is_the_question_with_the_tokenizers_own_special_tokens(lm):
    row = score_shard(
        lm, task(QUESTIONS[:1]), dataclasses.replace(settings(), prompt=PromptSettings("raw"))
    ).to_pylist()[0]
    assert row["num_prompt_tokens"] == len(lm.tokenizer(QUESTIONS[0]["question"])["input_ids"])
    chat = score_shard(lm, task(QUESTIONS[:1]), settings()).to_pylist()[0]
    assert chat["num_prompt_tokens"] > row["num_prompt_tokens"] + 10  # the template's system turn


def test_trim_keeps_tokens_up_to_the_first_eos(lm):
    from bulkscore.workers.generation import trim_completion

    hello = lm.tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    stopped = trim_completion(hello + [2, 2, 2], lm, GenerationSettings())
    assert stopped.token_ids == tuple(hello + [2])
    assert (stopped.text, stopped.finish_reason) == ("Hello world", "stop")
    running = trim_completion(hello, lm, GenerationSettings())
    assert (running.token_ids, running.finish_reason) == (tuple(hello), "length")
    # A stop string ends the completion before it, even inside a token, and before any EOS.
    cut = trim_completion(hello + [2], lm, GenerationSettings(stop=("o w",)))
    assert (cut.text, cut.finish_reason) == ("Hell", "stop")


def test_a_gguf_file_loads_through_the_cached_conversion(embedded_folder):
    from bulkscore.jobs.settings import resolve_model
    from bulkscore.workers.embedded import embedded_gguf
    from bulkscore.workers.models import model_folder

    source, kind = resolve_model(str(embedded_gguf()))
    assert kind == "gguf" and source.endswith(".gguf")
    assert model_folder(ModelSpec(source, kind)) == str(embedded_folder)
    assert model_folder(ModelSpec("", "embedded")) == str(embedded_folder)


def test_a_generation_failure_confined_to_one_row_becomes_its_error(lm, monkeypatch):
    real = Engine.generate

    def fail_on_the_long_prompt(engine, requests):
        if any("explain the steps" in engine.lm.tokenizer.decode(r.prompt) for r in requests):
            raise ValueError("injected failure")
        return real(engine, requests)

    monkeypatch.setattr(Engine, "generate", fail_on_the_long_prompt)
    for batch_size in (None, 1):
        rows = score_shard(lm, task(QUESTIONS), settings(batch_size=batch_size)).to_pylist()
        failed = [r for r in rows if r["error"] is not None]
        assert [r["error"] for r in failed] == ["generation failed: ValueError: injected failure"]
        assert failed[0]["row"] == 7  # the one long question; a batch holding it was retried row by row
        assert all(r["completion"] is not None for r in rows if r["error"] is None)


def test_out_of_memory_halves_the_batch_instead_of_failing_rows(lm, monkeypatch):
    real, sizes = Engine.generate, []

    def small_memory(engine, requests):
        sizes.append(len(requests))
        if len(requests) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(engine, requests)

    expected = score_shard(lm, task(QUESTIONS), settings(batch_size=8)).column("completion").to_pylist()
    monkeypatch.setattr(Engine, "generate", small_memory)
    rows = score_shard(lm, task(QUESTIONS), settings(batch_size=8)).to_pylist()
    assert [r["error"] for r in rows] == [None] * len(QUESTIONS)
    assert [r["completion"] for r in rows] == expected
    assert sizes == [8, 4, 2, 2, 4, 2, 2]  # halved down to what fits, never row by row


class Exploit:
    """Unpickling this runs a shell command: what a malicious pickle checkpoint does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickle_checkpoints_load_only_through_the_weights_only_loader(tmp_path, tiny_model):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pickle-code-ran"
    torch.save({"model.embed_tokens.weight": Exploit(str(marker))}, folder / "pytorch_model.bin")
    with pytest.raises(Exception) as error:
        load_model(ModelSpec(str(folder), "folder", dtype="float32", device="cpu"))
    assert "weights_only" in str(error.value) or "Weights only load failed" in str(error.value)
    assert not marker.exists()


def test_auto_dtype_is_bfloat16_only_where_the_hardware_computes_in_it():
    from bulkscore.workers.models import cpu_flags, resolve_dtype

    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, frozenset({"avx2", "avx512f"})) == torch.float32
    assert resolve_dtype("auto", cpu, frozenset({"avx2", "avx512_bf16"})) == torch.bfloat16
    assert resolve_dtype("auto", cpu, frozenset({"amx_bf16", "amx_tile"})) == torch.bfloat16
    assert resolve_dtype("float32", cpu, frozenset({"amx_bf16"})) == torch.float32
    assert resolve_dtype("bfloat16", cpu, frozenset()) == torch.bfloat16
    assert "fpu" in cpu_flags() or not Path("/proc/cpuinfo").exists()


def test_the_nucleus_is_the_one_a_full_sort_finds():
    """top_p_filter looks among the likeliest tokens first; a flat row (nucleus wider than that) sorts
    the whole row. Either way: the tokens whose mass ahead of them is under top_p."""
    from transformers import TopPLogitsWarper

    from bulkscore.workers.generation import NUCLEUS_CANDIDATES, top_p_filter

    torch.manual_seed(0)
    scores = torch.cat([torch.randn(6, 4096) * 4, torch.randn(2, 4096) * 0.01])  # peaked rows, then flat ones
    for top_p in (0.1, 0.5, 0.9, 0.99):
        ours = top_p_filter(scores, top_p) > -float("inf")
        theirs = TopPLogitsWarper(top_p)(None, scores.clone()) > -float("inf")
        assert torch.equal(ours, theirs), top_p
    assert (top_p_filter(scores, 0.9)[6:] > -float("inf")).sum(dim=-1).min() > NUCLEUS_CANDIDATES


def test_two_shards_in_flight_share_the_decode_tile(lm, monkeypatch):
    """A worker's two shards run at once through one engine: rows of the second take the slots the
    first's rows leave, and every row is what it is alone."""
    import threading

    from bulkscore.workers.generation import Batch, Decoder

    gen = GenerationSettings(max_new_tokens=12)
    first, second = chat_requests(lm, QUESTIONS[:4]), chat_requests(lm, QUESTIONS[4:])
    engine = Engine(lm, gen)
    batches, callers_per_round, real_round, real_init = [], [], Decoder.round, Batch.__init__

    def batch_init(self, size):
        real_init(self, size)
        batches.append(self)

    def round_(decoder):
        if len(callers_per_round) == 2:  # the first caller's rows are running: let the second's arrive
            deadline = time.monotonic() + 60
            while len(batches) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        callers_per_round.append(len({id(run.pending.batch) for run in decoder.slots if run is not None}))
        return real_round(decoder)

    monkeypatch.setattr(Batch, "__init__", batch_init)
    monkeypatch.setattr(Decoder, "round", round_)
    results = {}

    def run(name, requests):
        with torch.inference_mode():
            results[name] = engine.generate(requests)

    caller = threading.Thread(target=run, args=("first", first))
    caller.start()
    while len(callers_per_round) < 2:
        time.sleep(0.01)
    run("second", second)
    caller.join()
    assert max(callers_per_round) == 2  # rounds ran rows of both callers
    monkeypatch.undo()
    with torch.inference_mode():
        alone = [Engine(lm, gen).generate([r])[0] for r in first + second]
    together = results["first"] + results["second"]
    for column in ("token_ids", "nll", "continuation_nll"):
        assert [getattr(g, column) for g in together] == [getattr(g, column) for g in alone], column


def test_fused_nll_equals_the_whole_logits_in_both_dtypes():
    """The vocabulary projected 4,096 entries at a time, the log-sum-exp carried in float32, equals
    log_softmax over whole float32 logits; targets in every chunk, the last one short."""
    from bulkscore.workers.losses import VOCAB_CHUNK, fused_nll

    generator = torch.Generator().manual_seed(0)
    vocab = 3 * VOCAB_CHUNK + 100
    for dtype in (torch.float32, torch.bfloat16):
        hidden = torch.randn(4, 8, 64, generator=generator).to(dtype)
        weight = (torch.randn(vocab, 64, generator=generator) * 0.3).to(dtype)
        targets = torch.randint(0, vocab, (4, 8), generator=generator)
        targets[0, :4] = torch.tensor([0, VOCAB_CHUNK - 1, VOCAB_CHUNK, vocab - 1])
        whole = torch.nn.functional.linear(hidden, weight).float()
        expected = -torch.log_softmax(whole, dim=-1).gather(2, targets[..., None])[..., 0]
        assert torch.allclose(fused_nll(hidden, weight, targets), expected, atol=1e-4), dtype


def test_bfloat16_scoring_in_chunks_equals_whole_logits(any_lm, monkeypatch):
    """span_nll on the model itself both ways (chunks are used in bfloat16; float32 keeps whole logits)."""
    import bulkscore.workers.losses as losses

    sequences = [any_lm.tokenizer(q["question"] + " It is 42.")["input_ids"] for q in QUESTIONS]
    with torch.inference_mode():
        chunked = losses.span_nll(any_lm, sequences, [1] * len(sequences))
        monkeypatch.setattr(losses, "FUSED", False)
        whole = losses.span_nll(any_lm, sequences, [1] * len(sequences))
    assert losses.fusable(any_lm)
    assert chunked == pytest.approx(whole, abs=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_are_packed_where_onednn_computes_them_and_agree(tiny_model, monkeypatch, dtype):
    """On a CPU whose oneDNN computes the dtype, every Linear is a PackedLinear and its logits equal
    the model's own products within the dtype's rounding; elsewhere nothing is packed."""
    import bulkscore.workers.models as models

    def load():
        return load_model(ModelSpec(str(tiny_model), "folder", dtype=dtype, device="cpu")).model

    def kinds(model) -> set[type]:
        return {type(m) for m in model.modules() if isinstance(m, (torch.nn.Linear, models.PackedLinear))}

    packed = load()
    if not models.packs_weights(torch.device("cpu"), models.DTYPES[dtype]):
        assert dtype == "bfloat16" and kinds(packed) == {torch.nn.Linear}
        return
    assert kinds(packed) == {models.PackedLinear}
    if dtype == "bfloat16":  # the output layer keeps its weight for fused_nll: tied, so no copy
        assert packed.get_output_embeddings().weight is packed.get_input_embeddings().weight
    else:  # float32 scores from whole logits: the packed layer is all it keeps
        assert packed.get_output_embeddings().weight is None
    monkeypatch.setattr(models, "packs_weights", lambda device, dtype: False)
    plain = load()
    assert kinds(plain) == {torch.nn.Linear}
    ids = torch.tensor([[5, 17, 3, 9, 11, 2, 30, 7]])
    with torch.inference_mode():
        ours, theirs = packed(input_ids=ids).logits.float(), plain(input_ids=ids).logits.float()
    close = dict(atol=0.05, rtol=0.02) if dtype == "bfloat16" else dict(atol=1e-4, rtol=1e-4)
    assert torch.allclose(ours, theirs, **close)


def run_check(script: str, *args: str, isa: str = "") -> str:
    """A check script in a fresh Python process (oneDNN reads ONEDNN_MAX_CPU_ISA once: a process each);
    its standard output, once it has exited 0."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa) if isa else dict(os.environ)
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


PACKED_ROWS_CHECK = """
import hashlib, sys, torch
from bulkscore.workers.models import PACK_ROWS
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]))
dtypes = [torch.float32] + ([torch.bfloat16] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else [])
differ, digest = [], hashlib.sha256()
for dtype in dtypes:
    # SmolLM2's layer products and its vocabulary projection, at the tiles' rows: decode 64, prefill
    # 16 (x 8 tokens = 128), long contexts' fewer, a small model's up to 8x more.
    for k, n in [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k, dtype=dtype) / 24, PACK_ROWS)
        product = lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        for rows in (64, 128, 16, 1, 8, 32, 512):
            x = torch.randn(rows, k, dtype=dtype)
            alone = product(x)
            digest.update(alone.float().numpy().tobytes())
            order = torch.randperm(rows)
            neighbours = torch.randn(rows, k, dtype=dtype)
            kept = order[: max(1, rows // 2)]
            neighbours[kept] = x[kept]
            if not torch.equal(product(x[order]), alone[order]) or not torch.equal(product(neighbours)[kept], alone[kept]):
                differ.append((str(dtype), k, n, rows))
print(differ, digest.hexdigest())
"""


@pytest.mark.parametrize("isa", ["", "AVX2"])
def test_packed_products_give_each_row_its_own_numbers(isa):
    """The premise of packing under fixed tiles: at a tile's shape, a packed product's output row is
    its input row's alone, bitwise, wherever the row sits and whatever its neighbours, and the same
    with 1 thread or 2 (--cpus-per-worker); on this CPU's kernels and on oneDNN's AVX2 ones
    (ONEDNN_MAX_CPU_ISA, which oneDNN reads once: a process each)."""
    digests = set()
    for threads in ("1", "2"):
        stdout = run_check(PACKED_ROWS_CHECK, threads, isa=isa)
        differ, digest = stdout.strip().rsplit(" ", 1)
        assert differ == "[]", (threads, stdout)
        digests.add(digest)
    assert len(digests) == 1  # every product bit for bit the same on 1 thread and on 2


DECODE_HEIGHTS_CHECK = """
import hashlib, torch
from transformers import LlamaConfig, LlamaForCausalLM
from bulkscore.workers.models import LoadedModel, pack_weights, packs_weights, unpacked_products
from bulkscore.workers.attention import use_tile_attention
from bulkscore.workers.tiles import Tile, decode_heights
torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
    num_key_value_heads=3, tie_word_embeddings=True, attn_implementation="sdpa",
)  # SmolLM2-135M's shapes, two of its layers
heights = decode_heights(128, 1, True)
differ, digests = [], {}
for dtype in [torch.float32, torch.bfloat16]:
    if not packs_weights(torch.device("cpu"), dtype):
        continue
    model = LlamaForCausalLM(config).to(dtype).eval()
    use_tile_attention(model)
    pack_weights(model, keep_head=True)
    assert not unpacked_products(model)
    lm = LoadedModel(model, None, torch.device("cpu"), dtype, 2048, (2,), 0, 0.0, fixed_products=True)
    # 128 rows at their own places (1..254) of a 256-position cache of random keys and values.
    tokens, places = torch.randint(0, 49152, (128,)).tolist(), torch.randint(1, 255, (128,)).tolist()
    cache = [torch.randn(2, 128, 3, 257, 64).to(dtype) for _ in range(2)]  # per layer: keys, values
    for threads in (1, 2):
        torch.set_num_threads(threads)
        digest, logits = digests.setdefault((str(dtype), threads), hashlib.sha256()), {}
        with torch.inference_mode():
            for height in heights:
                tile = Tile(lm, height, 256, 1)
                tile.cache.keys = [layer[0, :height].clone() for layer in cache]
                tile.cache.values = [layer[1, :height].clone() for layer in cache]
                out = tile.forward([([t], p) for t, p in zip(tokens[:height], places[:height])], last_only=True)
                logits[height] = (out, torch.log_softmax(out, dim=-1), out.argmax(dim=-1))
                digest.update(out.numpy().tobytes())
        widest = logits[heights[-1]]
        for height, numbers in logits.items():
            if not all(torch.equal(a, b[:height]) for a, b in zip(numbers, widest)):
                differ.append((str(dtype), threads, height))
same_threads = all(digests[(d, 1)].digest() == digests[(d, 2)].digest() for d, _ in digests)
print(differ, same_threads)
"""


@pytest.mark.parametrize("isa", ["", "AVX512_CORE_BF16", "AVX2"])
def test_a_decode_call_gives_each_row_its_numbers_at_every_height(isa):
    """The premise of decode_heights: at SmolLM2's shapes (two of its layers, random weights), a
    decode call of 16, 32, 64 or 128 rows gives each row the same logits, log-softmax and argmax,
    bitwise, with 1 thread and 2; on this CPU's kernels, on AVX-512 without AMX and on AVX2 ones
    (ONEDNN_MAX_CPU_ISA: on a CPU without the newer kernels the first two are the same)."""
    stdout = run_check(DECODE_HEIGHTS_CHECK, isa=isa)
    # No (dtype, threads, height) differs, and 1 thread computes what 2 do.
    assert stdout.split() == ["[]", "True"], stdout


def test_a_worker_loads_its_model_on_the_thread_that_runs_it(tiny_model, monkeypatch):
    """One thread runs torch in a worker, loading included (generation.model_thread says why)."""
    import threading

    import bulkscore.workers.models as models
    from bulkscore.workers.actor import ShardScorer

    threads = []

    def load(spec, *args):
        threads.append(threading.current_thread())
        return models_load(spec, *args)

    models_load = models.load_model
    monkeypatch.setattr(models, "load_model", load)
    monkeypatch.setattr(ShardScorer, "where", lambda self: {})  # Ray's context would start a Ray instance
    scorer = ShardScorer(ModelSpec(str(tiny_model), "folder", device="cpu", threads=1), settings())
    assert "error" not in scorer.load()
    scoring = scorer.engine.model_thread.submit(threading.current_thread).result()
    assert threads == [scoring] and scoring is not threading.current_thread()


WORKER_LOAD_CHECK = """
import sys
import scipy  # installed here (lm-eval's dependencies): what a worker's load must not import of it
from bulkscore.workers.actor import ShardScorer
from bulkscore.workers.contract import GenerationSettings, GradingSettings, ModelSpec, PromptSettings, ScoringSettings
settings = ScoringSettings(PromptSettings("raw"), GenerationSettings(max_new_tokens=3), GradingSettings())
scorer = ShardScorer(ModelSpec(sys.argv[1], "folder", device="cpu", threads=1), settings)
scorer.where = lambda: {}  # Ray's context would start a Ray instance
info = scorer.load()
from bulkscore.workers.generation import Request, generate
out = generate(scorer.lm, [Request((5, 17, 3))], settings.generation)
print(info.get("error"), "scipy.optimize" in sys.modules, len(out[0].token_ids))
"""


def test_a_worker_loads_without_importing_scipy(tiny_model):
    """transformers imports scipy.optimize with its loss functions, for object detection alone: a
    worker's load (a fresh process, as a Ray worker's is) skips it (models.skip_unused_imports), and
    the model still generates."""
    stdout = run_check(WORKER_LOAD_CHECK, str(tiny_model))
    assert stdout.split() == ["None", "False", "3"], stdout


def test_a_worker_loads_with_the_cycle_collector_paused_and_leaves_it_on(tiny_model, monkeypatch):
    """The load's million long-lived objects are made without the collector and then frozen out of
    its reach (actor.collector_paused); the collector is on again afterwards, after a failed load too,
    which freezes nothing."""
    import gc

    import bulkscore.workers.models as models
    from bulkscore.workers.actor import ShardScorer

    collecting = []

    def load(spec, *args):
        collecting.append(gc.isenabled())
        if spec.source == "missing":
            raise FileNotFoundError("no such model")
        return models_load(spec, *args)

    models_load = models.load_model
    monkeypatch.setattr(models, "load_model", load)
    monkeypatch.setattr(ShardScorer, "where", lambda self: {})  # Ray's context would start a Ray instance
    gc.unfreeze()  # what an earlier load in this process froze
    try:
        scorer = ShardScorer(ModelSpec(str(tiny_model), "folder", device="cpu", threads=1), settings())
        assert "error" not in scorer.load()
        assert collecting == [False] and gc.isenabled()
        assert gc.get_freeze_count() > 100_000  # torch's and transformers' objects among them
        gc.unfreeze()

        failed = ShardScorer(ModelSpec("missing", "folder", device="cpu", threads=1), settings()).load()
        assert failed["error"] == "FileNotFoundError: no such model"
        assert collecting == [False, False] and gc.isenabled()
        assert gc.get_freeze_count() == 0  # nothing of a failed load is kept out of the collector's reach
    finally:
        gc.unfreeze()
        gc.enable()


def test_a_request_whose_prefix_call_fails_gets_the_error_not_a_hang(lm, monkeypatch):
    """The model call that computes the shared prefix raises while a lone request is being taken in:
    that request ends with the error (the caller retries row by row) instead of waiting forever."""
    from concurrent.futures import ThreadPoolExecutor

    from bulkscore.workers.prompts import shared_start
    from bulkscore.workers.tiles import SharedPrefix

    def broken(prefix, tile, row):
        raise RuntimeError("the prefix call failed")

    monkeypatch.setattr(SharedPrefix, "copy_into", broken)
    engine = Engine(lm, GenerationSettings(max_new_tokens=4), shared_start(lm.tokenizer, PromptSettings("chat")))
    caller = ThreadPoolExecutor(1)
    try:
        result = caller.submit(engine.generate, chat_requests(lm)[:1])
        with pytest.raises(RuntimeError, match="the prefix call failed"):
            result.result(timeout=60)
    finally:
        caller.shutdown(wait=False)


def request_task(requests: list[dict], start: int = 0) -> ShardTask:
    """A shard of OpenAI Batch requests (contract.REQUEST_TYPE): each its own prompt and settings."""
    full = [dict.fromkeys(REQUEST_TYPE.names) | r for r in requests]
    question = [r["prompt"] or r["messages"][-1]["content"] for r in full]
    rows = pa.table(
        {
            "row": list(range(start, start + len(requests))),
            "question": question,
            "reference": [None] * len(requests),
            REQUEST: full,
        },
        schema=input_schema("generate", requests=True),
    )
    return ShardTask(0, start, start + len(requests), rows)


def test_each_requests_own_settings_give_it_the_same_numbers_beside_any_others(any_lm):
    """Greedy and sampled rows of other temperatures, top-p, lengths and stops in one decode tile:
    every row's samples, completions and losses are what it gets alone (a row's number is its own)."""
    chat = "/v1/chat/completions"
    requests = [
        {"url": chat, "messages": [{"role": "user", "content": QUESTIONS[0]["question"]}]},
        {"url": chat, "messages": [{"role": "user", "content": QUESTIONS[1]["question"]}], "temperature": 1.4, "n": 3},
        {"url": "/v1/completions", "prompt": QUESTIONS[2]["question"], "temperature": 1.3, "top_p": 0.8, "seed": 5},
        {"url": chat, "messages": [{"role": "user", "content": QUESTIONS[3]["question"]}], "max_tokens": 4},
        {"url": chat, "messages": [{"role": "user", "content": QUESTIONS[4]["question"]}], "stop": ["a", "e"]},
        {"url": "/v1/completions", "prompt": QUESTIONS[5]["question"], "top_p": 0.5, "temperature": 0.9, "n": 2},
    ]
    together = score_shard(any_lm, request_task(requests), settings(max_new_tokens=10)).to_pylist()
    assert [(r["row"], r["sample"]) for r in together] == [(0, 0), (1, 0), (1, 1), (1, 2), (2, 0), (3, 0), (4, 0)] + [
        (5, 0),
        (5, 1),
    ]
    alone = [
        r
        for i, request in enumerate(requests)
        for r in score_shard(any_lm, request_task([request], start=i), settings(max_new_tokens=10)).to_pylist()
    ]
    columns = ("completion", "loss", "completion_loss", "num_completion_tokens", "finish_reason", "error")
    for a, b in zip(together, alone):
        assert [a[c] for c in columns] == [b[c] for c in columns], (a["row"], a["sample"])
    assert all(r["error"] is None for r in together)
    assert together[5]["num_completion_tokens"] <= 4
    assert not any(ch in together[6]["completion"] for ch in "ae")
    assert len({r["completion"] for r in together[1:4]}) > 1  # sampled


def test_top_p_keeps_the_likeliest_token_at_zero_and_leaves_a_row_at_one_as_it_is():
    from bulkscore.workers.generation import top_p_filter

    scores = torch.randn(3, 500, generator=torch.Generator().manual_seed(0))
    kept = top_p_filter(scores, [0.0, 1.0, 0.5]).isfinite()
    assert kept[0].nonzero().flatten().tolist() == [int(scores[0].argmax())]
    assert bool(kept[1].all())
    assert 1 < int(kept[2].sum()) < 500
