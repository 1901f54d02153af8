"""The actor's work on a tiny model, without Ray: losses, batch invariance, stops, row errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from tests.helpers import QUESTIONS
from workers.contract import (
    INPUT_SCHEMA,
    GenerationSettings,
    GradingSettings,
    ModelSpec,
    PromptSettings,
    ScoringSettings,
    ShardTask,
)
from workers.generation import SeededGumbel
from workers.models import load_model
from workers.scoring import score_shard


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(ModelSpec(str(tiny_model), "folder", dtype="float32", device="cpu"))


def task(questions: list[dict], start: int = 0) -> ShardTask:
    rows = pa.table(
        {"row": list(range(start, start + len(questions))),
         "question": [q["question"] for q in questions],
         "reference": [None if q.get("answer") is None else str(q["answer"]) for q in questions]},
        schema=INPUT_SCHEMA,
    )
    return ShardTask(0, start, start + len(questions), rows)


def settings(**generation) -> ScoringSettings:
    return ScoringSettings(PromptSettings("chat"), GenerationSettings(**({"max_new_tokens": 12} | generation)),
                           GradingSettings())


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
        prompt = tok.apply_chat_template([{"role": "user", "content": q["question"]}], tokenize=False,
                                         add_generation_prompt=True)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert row["num_prompt_tokens"] == len(prompt_ids)
        # loss: the homework grader's, HF's own shifted loss over question + completion.
        ids = torch.tensor([tok(q["question"] + row["completion"])["input_ids"]])
        with torch.inference_mode():
            expected_loss = model(input_ids=ids, labels=ids).loss.item()
        assert row["loss"] == pytest.approx(expected_loss, abs=1e-4)
        # completion_loss: generate this row alone, score its tokens given the prompt.
        with torch.inference_mode():
            alone = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False,
                                   pad_token_id=2, eos_token_id=2)[0, len(prompt_ids):].tolist()
        kept = alone[: row["num_completion_tokens"]]
        assert tok.decode(kept, skip_special_tokens=True) == row["completion"]
        assert row["completion_loss"] == pytest.approx(mean_nll(model, prompt_ids + kept, len(prompt_ids)), abs=1e-4)
        # reference_loss: prompt + reference tokenized together, scored after the prompt.
        whole = tok(prompt + str(q["answer"]), add_special_tokens=False)["input_ids"]
        assert row["reference_loss"] == pytest.approx(mean_nll(model, whole, len(prompt_ids)), abs=1e-4)


def test_reference_loss_reuses_the_prompt_cache(lm, monkeypatch):
    """Only `loss` takes a forward pass of its own: references are scored from generation's cache."""
    import workers.scoring

    real, scored = workers.scoring.span_nll, []

    def recording(lm_, sequences, starts):
        scored.append(len(sequences))
        return real(lm_, sequences, starts)

    monkeypatch.setattr(workers.scoring, "span_nll", recording)
    rows = score_shard(lm, task(QUESTIONS), settings()).to_pylist()
    assert scored == [len(QUESTIONS), 0]  # question + completion; no reference left to score
    assert all(r["reference_loss"] is not None for r in rows)


def test_a_shared_prefix_is_computed_once_and_changes_nothing(lm, monkeypatch):
    """Prompts that start alike (the chat template's system turn) share one prefix cache."""
    import workers.generation
    from workers.generation import generate_batch, shared_prefix
    from workers.prompts import encode_text, format_prompt

    chat = PromptSettings("chat")
    prompts = [encode_text(lm.tokenizer, format_prompt(lm.tokenizer, q["question"], chat), chat) for q in QUESTIONS]
    shared = shared_prefix(prompts)
    assert shared >= 20 and all(p[:shared] == prompts[0][:shared] for p in prompts)
    references = [lm.tokenizer(" 42", add_special_tokens=False)["input_ids"]] * len(prompts)
    gen = GenerationSettings(max_new_tokens=12)
    with torch.inference_mode():
        cached = generate_batch(lm, prompts, gen, (), references)
        monkeypatch.setattr(workers.generation, "MIN_SHARED_PREFIX", 10**6)  # every prompt whole
        assert shared_prefix(prompts) == 0
        plain = generate_batch(lm, prompts, gen, (), references)
    assert [g.token_ids for g in cached] == [g.token_ids for g in plain]
    assert [g.nll for g in cached] == pytest.approx([g.nll for g in plain], abs=1e-4)
    assert [g.continuation_nll for g in cached] == pytest.approx([g.continuation_nll for g in plain], abs=1e-4)


def test_a_finished_row_leaves_the_batch(lm):
    """Rows that end early stop riding along: later steps run only the rows still going, and every
    row's tokens and NLLs equal those it gets alone."""
    from workers.generation import generate_batch
    from workers.prompts import encode_text, format_prompt

    chat = PromptSettings("chat")
    prompts = [encode_text(lm.tokenizer, format_prompt(lm.tokenizer, q["question"], chat), chat) for q in QUESTIONS]
    gen = GenerationSettings(max_new_tokens=12)
    with torch.inference_mode():
        free = generate_batch(lm, prompts, gen)
    # Make row 0's third token an end-of-sequence token: row 0 ends there, rows without it go on.
    ender = free[0].token_ids[2]
    ending = dataclasses.replace(lm, eos_token_ids=(ender,))
    assert any(ender not in g.token_ids for g in free)
    rows_per_step = []
    hook = lm.model.register_forward_pre_hook(
        lambda module, args, kwargs: rows_per_step.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        with torch.inference_mode():
            batched = generate_batch(ending, prompts, gen)
            steps = list(rows_per_step)
            alone = [generate_batch(ending, [p], gen)[0] for p in prompts]
    finally:
        hook.remove()
    assert batched[0].token_ids == free[0].token_ids[:3] and batched[0].finish_reason == "stop"
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert [g.nll for g in batched] == pytest.approx([g.nll for g in alone], abs=1e-4)
    decode_rows = [shape[0] for shape in steps if shape[1] == 1]  # one new token per row
    assert decode_rows[0] == len(prompts) and decode_rows[-1] < len(prompts)
    assert decode_rows == sorted(decode_rows, reverse=True)
    assert sum(decode_rows) == sum(len(g.token_ids) for g in batched) - len(prompts)


def test_greedy_results_do_not_depend_on_batch_size(lm):
    one = score_shard(lm, task(QUESTIONS), settings(batch_size=1)).to_pydict()
    eight = score_shard(lm, task(QUESTIONS), settings(batch_size=8)).to_pydict()
    auto = score_shard(lm, task(QUESTIONS), settings()).to_pydict()
    assert one["completion"] == eight["completion"] == auto["completion"]
    assert len(set(one["completion"])) > 1
    for column in ("loss", "completion_loss", "reference_loss"):
        assert eight[column] == pytest.approx(one[column], abs=1e-4)


def test_stop_string_cuts_the_completion(lm):
    plain = score_shard(lm, task(QUESTIONS[:1]), settings()).to_pylist()[0]
    assert plain["finish_reason"] == "length" and plain["num_completion_tokens"] == 12
    stop = plain["completion"][len(plain["completion"]) // 2 :][:3]
    cut = score_shard(lm, task(QUESTIONS[:1]), settings(stop=(stop,))).to_pylist()[0]
    assert cut["finish_reason"] == "stop"
    assert cut["completion"] == plain["completion"][: plain["completion"].find(stop)]
    assert cut["num_completion_tokens"] < 12


def test_bad_rows_become_errors_and_the_rest_are_scored(lm):
    questions = [QUESTIONS[0], {"question": "", "answer": 1}, {"question": "word " * 600, "answer": 2}, QUESTIONS[1],
                 {"question": None, "answer": 3}]
    rows = score_shard(lm, task(questions, start=40), settings()).to_pylist()
    assert [r["row"] for r in rows] == [40, 41, 42, 43, 44]
    assert [r["finish_reason"] for r in rows] == ["length", "error", "error", "length", "error"]
    assert rows[1]["error"] == rows[4]["error"] == "empty question"
    assert rows[2]["error"].startswith("prompt too long: ") and "exceeds the model's context of 512 tokens" in rows[2]["error"]
    assert rows[1]["completion"] is None and rows[1]["loss"] is None and rows[1]["is_correct"] is None
    assert rows[0]["error"] is None and rows[3]["error"] is None and rows[3]["loss"] is not None


def test_samples_expand_each_row(lm):
    s = dataclasses.replace(settings(), generation=GenerationSettings(max_new_tokens=6, temperature=1.0,
                                                                       num_samples=3, seed=7))
    rows = score_shard(lm, task(QUESTIONS[:2]), s).to_pylist()
    assert [(r["row"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert len({r["completion"] for r in rows}) > 1


def sampled(**generation) -> ScoringSettings:
    return settings(**({"temperature": 1.0, "top_p": 0.95, "num_samples": 3, "seed": 5} | generation))


def test_seeded_samples_do_not_depend_on_batch_or_shard(lm):
    """Each (row, sample) draws its own noise: batch size and where the shard starts change nothing."""
    whole = score_shard(lm, task(QUESTIONS), sampled(batch_size=24)).to_pydict()
    alone = score_shard(lm, task(QUESTIONS), sampled(batch_size=1)).to_pydict()
    assert alone["completion"] == whole["completion"]
    assert alone["completion_loss"] == pytest.approx(whole["completion_loss"], abs=1e-4)
    # Rows 3..7 as a shard of their own, in batches of two: the same rows get the same samples.
    tail = score_shard(lm, task(QUESTIONS[3:], start=3), sampled(batch_size=2)).to_pydict()
    assert tail["completion"] == whole["completion"][9:]
    # The samples of a row differ, and another seed draws others.
    assert len(set(whole["completion"][:3])) == 3
    other = score_shard(lm, task(QUESTIONS), sampled(seed=6)).to_pydict()
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
    draws = [SeededGumbel([seed], torch.device("cpu"))(None, scores).argmax().item() for seed in range(4000)]
    frequencies = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    assert frequencies.tolist() == pytest.approx([0.6, 0.3, 0.1, 0.0], abs=0.03)


def test_raw_prompt_is_the_question_with_the_tokenizers_own_special_tokens(lm):
    row = score_shard(lm, task(QUESTIONS[:1]), dataclasses.replace(settings(), prompt=PromptSettings("raw"))).to_pylist()[0]
    assert row["num_prompt_tokens"] == len(lm.tokenizer(QUESTIONS[0]["question"])["input_ids"])
    chat = score_shard(lm, task(QUESTIONS[:1]), settings()).to_pylist()[0]
    assert chat["num_prompt_tokens"] > row["num_prompt_tokens"] + 10  # the template's system turn


def test_trim_keeps_tokens_up_to_the_first_eos(lm):
    from workers.generation import trim_completion

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
    from jobs.settings import resolve_model
    from workers.embedded import embedded_gguf
    from workers.models import model_folder

    source, kind = resolve_model(str(embedded_gguf()))
    assert kind == "gguf" and source.endswith(".gguf")
    assert model_folder(ModelSpec(source, kind)) == str(embedded_folder)
    assert model_folder(ModelSpec("", "embedded")) == str(embedded_folder)


def test_a_generation_failure_confined_to_one_row_becomes_its_error(lm, monkeypatch):
    import workers.scoring

    real = workers.scoring.generate_batch

    def fail_on_the_long_prompt(lm_, prompts, *args):
        if any("explain the steps" in lm_.tokenizer.decode(p) for p in prompts):
            raise ValueError("injected failure")
        return real(lm_, prompts, *args)

    monkeypatch.setattr(workers.scoring, "generate_batch", fail_on_the_long_prompt)
    for batch_size in (None, 1):
        rows = score_shard(lm, task(QUESTIONS), settings(batch_size=batch_size)).to_pylist()
        failed = [r for r in rows if r["error"] is not None]
        assert [r["error"] for r in failed] == ["generation failed: ValueError: injected failure"]
        assert failed[0]["row"] == 7  # the one long question; a batch holding it was retried row by row
        assert all(r["completion"] is not None for r in rows if r["error"] is None)


def test_out_of_memory_halves_the_batch_instead_of_failing_rows(lm, monkeypatch):
    import workers.scoring

    real, sizes = workers.scoring.generate_batch, []

    def small_memory(lm_, prompts, *args):
        sizes.append(len(prompts))
        if len(prompts) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(lm_, prompts, *args)

    expected = score_shard(lm, task(QUESTIONS), settings(batch_size=8)).column("completion").to_pylist()
    monkeypatch.setattr(workers.scoring, "generate_batch", small_memory)
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
    from workers.models import cpu_flags, resolve_dtype

    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, frozenset({"avx2", "avx512f"})) == torch.float32
    assert resolve_dtype("auto", cpu, frozenset({"avx2", "avx512_bf16"})) == torch.bfloat16
    assert resolve_dtype("auto", cpu, frozenset({"amx_bf16", "amx_tile"})) == torch.bfloat16
    assert resolve_dtype("float32", cpu, frozenset({"amx_bf16"})) == torch.float32
    assert resolve_dtype("bfloat16", cpu, frozenset()) == torch.bfloat16
    assert "fpu" in cpu_flags() or not Path("/proc/cpuinfo").exists()
