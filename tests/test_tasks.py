"""The likelihood tasks (choice, loglikelihood, perplexity): lm-evaluation-harness's own numbers,
batch invariance in both dtypes, a choice row's context computed once, bad rows and bad inputs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from bulkscore.jobs.cli import cli
from bulkscore.workers.contract import (
    GenerationSettings,
    GradingSettings,
    ModelSpec,
    PromptSettings,
    ScoringSettings,
    ShardTask,
    input_schema,
)
from bulkscore.workers.likelihood import rolling_windows
from bulkscore.workers.models import load_model
from bulkscore.workers.scoring import shard_engine
from bulkscore.workers.tasks import score_task_shard
from bulkscore.workers.tiles import Tile
from tests.helpers import write_jsonl

WORDS = "the a cat dog sat on mat red blue Paris France is of in kg gram 42 7 and , . ?".split()


@pytest.fixture(scope="module")
def lm(tiny_model):
    """Loaded as a likelihood job's worker loads it (a float32 output layer on torch's own kernel)."""
    return load_model(ModelSpec(str(tiny_model), "folder", dtype="float32", device="cpu"), plain_float32_head=True)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def any_lm(request, tiny_model):
    return load_model(ModelSpec(str(tiny_model), "folder", dtype=request.param, device="cpu"), plain_float32_head=True)


def greedy_choice(lm, context: str) -> str | None:
    """The model's own next word after `context`, where " " + it tokenizes as that very token:
    a choice that is greedy."""
    ids = lm.tokenizer(context)["input_ids"]
    with torch.inference_mode():
        token = lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
    text = lm.tokenizer.decode([token])
    if text.startswith(" ") and text.strip() and lm.tokenizer(context + text)["input_ids"] == ids + [token]:
        return text[1:]
    return None


def choice_rows(lm, n: int = 10, seed: int = 1) -> list[dict]:
    """Contexts of 1-40 words (some ending in spaces, one empty), 1-5 choices of 1-6 words, in every
    third row one the model's own greedy next word; answers as indices."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        context = " ".join(rng.choices(WORDS, k=rng.randint(1, 40)))
        choices = [" ".join(rng.choices(WORDS, k=rng.randint(1, 6))) for _ in range(rng.randint(1, 5))]
        if len(rows) % 3 == 0:
            greedy = greedy_choice(lm, context)
            if greedy is None:
                continue
            choices[-1] = greedy
        else:
            context += rng.choice(["", " ", ":", "?  "])
        question = context if len(rows) != 4 else ""
        rows.append({"question": question, "choices": choices, "answer": rng.randrange(len(choices))})
    return rows


def shard(task: str, rows: list[dict], start: int = 0) -> ShardTask:
    columns = {
        "row": list(range(start, start + len(rows))),
        "question": [r["question"] for r in rows],
        "reference": [None if r.get("answer") is None else str(r["answer"]) for r in rows],
        "choices": [r.get("choices") for r in rows],
        "answer_index": [r.get("answer") if isinstance(r.get("answer"), int) else None for r in rows],
        "continuation": [r.get("continuation") for r in rows],
    }
    schema = input_schema(task)
    return ShardTask(0, start, start + len(rows), pa.table({n: columns[n] for n in schema.names}, schema=schema))


def scoring(task: str, batch_size: int | None = None, prompt: str = "raw", delimiter: str = " ") -> ScoringSettings:
    return ScoringSettings(
        PromptSettings(prompt), GenerationSettings(batch_size=batch_size), GradingSettings(), task, delimiter
    )


def score(lm, task: str, rows: list[dict], start: int = 0, **settings) -> list[dict]:
    s = scoring(task, **settings)
    return score_task_shard(lm, shard(task, rows, start), s, shard_engine(lm, s)).to_pylist()


@pytest.fixture(scope="module")
def harness(tiny_model):
    """lm-evaluation-harness's Hugging Face backend on the same model folder (no network)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_model), device="cpu", batch_size=4, dtype="float32")


def requests(kind: str, arguments: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


def test_choices_equal_lm_evaluation_harness(lm, harness):
    """Float32: each choice's log-prob within 1e-4 of lm-eval's, is_greedy, pred and pred_norm identical
    (numpy's argmax of the sums, and of the sums per character, as lm-eval's acc and acc_norm)."""
    import numpy as np

    rows = choice_rows(lm)
    ours = score(lm, "choice", rows)
    theirs = harness.loglikelihood(
        requests("loglikelihood", [(r["question"], " " + c) for r in rows for c in r["choices"]]), disable_tqdm=True
    )
    assert any(greedy for _, greedy in theirs) and not all(greedy for _, greedy in theirs)
    at = 0
    for row, result in zip(rows, ours):
        assert result["error"] is None
        expected = theirs[at : at + len(row["choices"])]
        at += len(row["choices"])
        lls = np.array([ll for ll, _ in expected])
        assert result["choice_logprobs"] == pytest.approx(list(lls), abs=1e-4)
        assert result["choice_is_greedy"] == [greedy for _, greedy in expected]
        assert result["pred"] == np.argmax(lls)
        assert result["pred_norm"] == np.argmax(lls / np.array([float(len(c)) for c in row["choices"]]))
        assert result["gold"] == row["answer"] and result["is_correct"] == (result["pred"] == row["answer"])


def test_loglikelihood_and_perplexity_equal_lm_evaluation_harness(lm, harness):
    """One continuation per context, and whole texts in rolling windows: texts longer than the
    model's 512-token context take several windows (the tiny model's, as lm-eval reads it too)."""
    rows = choice_rows(lm, n=6, seed=2)
    pairs = [{"question": r["question"], "continuation": " " + r["choices"][-1]} for r in rows]
    ours = score(lm, "loglikelihood", pairs)
    theirs = harness.loglikelihood(requests("loglikelihood", [(p["question"], p["continuation"]) for p in pairs]))
    for result, (ll, greedy) in zip(ours, theirs):
        assert result["logprob"] == pytest.approx(ll, abs=1e-4) and result["is_greedy"] == greedy
    rng = random.Random(3)
    texts = [" ".join(rng.choices(WORDS, k=n)) for n in (1, 7, 300, 1100)]
    assert harness.max_length == lm.context_length == 512
    ours = score(lm, "perplexity", [{"question": t} for t in texts])
    theirs = harness.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    assert ours[-1]["num_tokens"] > 2 * 512  # three windows
    for text, result, ll in zip(texts, ours, theirs):
        assert result["logprob"] == pytest.approx(ll, abs=1e-4 * max(1, abs(ll) / 100))
        assert result["num_tokens"] == len(lm.tokenizer(text)["input_ids"])
        assert (result["num_words"], result["num_bytes"]) == (len(text.split()), len(text.encode()))


def test_rolling_windows_are_lm_evaluation_harness_windows():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n, width in [(1, 4), (4, 4), (5, 4), (9, 4), (13, 5), (40, 7)]:
        tokens = list(range(100, 100 + n))
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 1, width, 1)]
        ours = rolling_windows(tokens, 1, width)
        assert [(list(w.context), list(w.continuations[0])) for w in ours] == [(a, b) for a, b in theirs]
        assert all(w.positions <= width for w in ours)


RESULTS = {
    "choice": ("choice_logprobs", "choice_is_greedy", "choice_num_tokens", "pred", "pred_norm"),
    "loglikelihood": ("logprob", "is_greedy", "num_continuation_tokens"),
    "perplexity": ("logprob", "num_tokens"),
}


@pytest.mark.parametrize("task", ["choice", "loglikelihood", "perplexity"])
def test_results_do_not_depend_on_batch_size_or_shard(any_lm, task):
    """Bitwise, in float32 and bfloat16: any number of rows at once, a shard's tail alone, its halves,
    and tiles scaled as a small model's are."""
    rows = choice_rows(any_lm, n=9, seed=4)
    if task == "loglikelihood":
        rows = [{"question": r["question"], "continuation": " " + " ".join(r["choices"])} for r in rows]
    elif task == "perplexity":
        rows = [
            {"question": r["question"] + " " + " ".join(r["choices"]) * (1 + 40 * (i == 2))} for i, r in enumerate(rows)
        ]
        rows[4]["question"] = "x"
    one = score(any_lm, task, rows, batch_size=1)
    three = score(any_lm, task, rows, batch_size=3)
    auto = score(any_lm, task, rows)
    tail = score(any_lm, task, rows[5:], start=5, batch_size=2)
    halves = score(any_lm, task, rows[:4]) + score(any_lm, task, rows[4:], start=4)
    wide = score(dataclasses.replace(any_lm, tile_scale=2), task, rows)
    assert all(r["error"] is None for r in auto)
    for column in RESULTS[task]:
        values = [r[column] for r in auto]
        assert [r[column] for r in one] == [r[column] for r in three] == values, column
        assert [r[column] for r in halves] == [r[column] for r in wide] == values, column
        assert [r[column] for r in tail] == values[5:], column


def test_a_rows_choices_share_its_contexts_prefill(lm, monkeypatch):
    """The context goes through the model once however many choices follow it: the tokens fed are
    the context's and each choice's but its last (its first is scored from the context's logits)."""
    fed = []
    real = Tile.inputs

    def counting(tile, feeds):
        fed.append(sum(len(feed[0]) for feed in feeds if feed))
        return real(tile, feeds)

    monkeypatch.setattr(Tile, "inputs", counting)
    context = "The cat sat on the mat and then it looked at the dog for a long time before it"
    choices = ["went to sleep on the red mat", "ran away", "sat", "looked at the blue dog again"]
    (result,) = score(lm, "choice", [{"question": context, "choices": choices}])
    context_tokens = len(lm.tokenizer(context)["input_ids"])
    assert result["num_prompt_tokens"] == context_tokens
    assert sum(fed) == context_tokens + sum(n - 1 for n in result["choice_num_tokens"])
    # and the numbers are those of each choice scored alone after the whole context
    alone = [score(lm, "loglikelihood", [{"question": context, "continuation": " " + c}])[0] for c in choices]
    assert result["choice_logprobs"] == pytest.approx([a["logprob"] for a in alone], abs=1e-5)


def test_bad_rows_become_errors_and_the_rest_are_scored(lm):
    rows = [
        {"question": "Pick one", "choices": ["a", "b"], "answer": 1},
        {"question": "No choices", "choices": [], "answer": 0},
        {"question": "Out of range", "choices": ["a", "b"], "answer": 2},
        {"question": "Not a choice", "choices": ["a", "b"], "answer": "c"},
        {"question": "By text", "choices": ["one", "two"], "answer": "two"},
        {"question": "A null choice", "choices": ["a", None]},
        {"question": None, "choices": ["a"]},
        {"question": "x " * 600, "choices": ["a"]},
    ]
    results = score(lm, "choice", rows)
    assert [r["error"] for r in results] == [
        None,
        "bad row: no choices",
        "bad row: answer index 2 is out of range for 2 choices",
        "bad row: answer 'c' is neither one of the 2 choices nor an index",
        None,
        "bad row: choice 1 is empty (null)",
        "bad row: no context (the question column is empty)",
        results[7]["error"],
    ]
    assert results[7]["error"].startswith("bad row: too long: ") and "the model's context is 512" in results[7]["error"]
    assert results[4]["gold"] == 1 and results[0]["gold"] == 1
    assert results[5]["gold"] is None and results[2]["choice_logprobs"] is None
    texts = score(lm, "perplexity", [{"question": "fine"}, {"question": ""}, {"question": None}])
    assert [r["error"] for r in texts] == [None] + ["bad row: empty text: nothing to score"] * 2


def invoke(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


@pytest.mark.parametrize(
    "task, rows, message",
    [
        (
            "choice",
            [{"question": "q", "options": ["a"]}],
            "no column 'choices' (each row's list of choices; name it with --choices-column); the columns besides the question, answer and id: options",
        ),
        (
            "choice",
            [{"question": "q", "choices": "a"}],
            "column 'choices' holds string, not lists: give each row a list of choices (strings)",
        ),
        (
            "choice",
            [{"question": "q", "choices": [1, 2]}],
            "column 'choices' holds lists of int64, not of text: every choice must be a string (row 0: [1, 2])",
        ),
        (
            "loglikelihood",
            [{"context": "q"}],
            "no column 'continuation' (the text scored after each context; name it with --continuation-column)",
        ),
        ("loglikelihood", [{"context": "q", "continuation": 3}], "column 'continuation' holds int64, not text"),
        ("perplexity", [{"body": "q"}], "no question column (looked for text, question, prompt, input); columns: body"),
    ],
)
def test_bad_inputs_are_refused_before_any_work(tmp_path, task, rows, message):
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    result = invoke(path, "--task", task, "-o", tmp_path / "out.parquet")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: ") and message in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "out.parquet.parts").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "choice", "--temperature", "0.5"], "--task choice scores given text and samples nothing"),
        (["--task", "perplexity", "--prompt-format", "chat"], "--task perplexity scores each text as it is (raw)"),
        (["--task", "loglikelihood", "--answer-column", "a"], "--task loglikelihood reads no answer"),
        (["--task", "choice", "--continuation-column", "c"], "only for --task loglikelihood"),
        (["--choices-column", "c"], "only for --task choice or loglikelihood"),
        (["--task", "rank"], "Invalid value for '--task'"),
    ],
)
def test_bad_task_options_are_usage_errors(tmp_path, args, message):
    result = invoke("-o", tmp_path / "a.parquet", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def lm_eval_stderr(values: list[float]) -> float:
    from lm_eval.api.metrics import mean_stderr

    return mean_stderr(values)


@pytest.mark.usefixtures("ray_instance")
def test_choice_job_writes_its_columns_and_lm_evals_summary(lm, tiny_model, tmp_path):
    """The job end to end, shards of 3 over two workers: every row once, the task's columns, the
    numbers bitwise those of the rows scored in this process, the summary's figures as lm-eval
    aggregates them, the report; the same command again resumes."""
    rows = [
        {"id": f"q{i}", "question": f"Question {i}: pick", "choices": ["red", "blue dog", "a cat"], "answer": i % 3}
        | {"category": "ab"[i % 2], "others": ["x", "y", "z"]}
        for i in range(7)
    ] + [{"id": "bad", "question": "none", "choices": [], "answer": 0, "category": "a", "others": []}]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    output = tmp_path / "mc.parquet"
    args = (path, "--task", "choice", "--model", tiny_model, "-o", output, "--shard-size", "3", "--dtype", "float32")
    result = invoke(*args, "--workers", "2", "--cpus-per-worker", "1", "--keep-parts", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "rows       8 (1 errors)"
    table = pq.read_table(output)
    assert table.column_names == [
        "id", "sample", "question", "reference", "choice_logprobs", "choice_num_tokens", "choice_is_greedy",
        "pred", "pred_norm", "gold", "is_correct", "is_correct_norm", "num_prompt_tokens", "error", "choices",
        "category", "others",
    ]  # fmt: skip
    out = table.to_pylist()
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert out[-1]["error"] == "bad row: no choices" and out[0]["gold"] == 0
    here = score(lm, "choice", rows)
    for column in RESULTS["choice"]:
        assert [r[column] for r in out] == [r[column] for r in here], column
    summary = json.loads(output.with_suffix(".summary.json").read_text())
    correct = [float(r["is_correct"]) for r in out[:-1]]
    normed = [float(r["is_correct_norm"]) for r in out[:-1]]
    assert summary["task"] == "choice" and summary["errors"] == 1 and summary["with_answer"] == 7
    assert summary["acc"] == pytest.approx(sum(correct) / 7, abs=1e-6)
    assert summary["acc_stderr"] == pytest.approx(lm_eval_stderr(correct), abs=1e-6)
    assert summary["acc_norm_stderr"] == pytest.approx(lm_eval_stderr(normed), abs=1e-6)
    assert set(summary["timings"]) == {"startup_s", "startup", "score_s"} and summary["timings"]["score_s"] > 0
    # the report: the summary's figures, acc per category, the margins' histogram
    page = tmp_path / "mc.html"
    shown = CliRunner().invoke(cli, ["report", str(output), "--by", "category", "-o", str(page)])
    assert shown.exit_code == 0, shown.output
    html = page.read_text()
    assert f"data-metric='acc' data-run=0>{summary['acc']:.4f} ± {summary['acc_stderr']:.4f} (" in html
    for group in "ab":
        picked = [r["is_correct"] for r in out if r["category"] == group and r["is_correct"] is not None]
        expected = f'data-group="{group}" data-run=0>acc <span data-metric="acc">{sum(picked) / len(picked):.4f}'
        assert expected in html
    assert 'data-histogram="margin of the chosen choice over the next (nats)"' in html
    assert 'data-error-kind="bad row"' in html
    # the choices read are part of the job: another column is another job
    other = invoke(*args, "--choices-column", "others", "--quiet")
    assert other.exit_code == 1 and "holds the results of a different job" in other.stderr
    output.unlink()
    again = invoke(*args)
    assert again.exit_code == 0 and "Resuming: 3 of 3 shards already done" in again.stderr
    assert pq.read_table(output).to_pylist() == out


@pytest.mark.usefixtures("ray_instance")
def test_perplexity_job_aggregates_as_lm_eval(tiny_model, tmp_path):
    """word and byte perplexity and bits per byte: sums over all rows, not means of ratios."""
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity

    rng = random.Random(5)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(1, 60))) for _ in range(9)] + [""]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t, "source": i % 2} for i, t in enumerate(texts)])
    output = tmp_path / "ppl.parquet"
    result = invoke(path, "--task", "perplexity", "--model", tiny_model, "-o", output, "--shard-size", "4", "--quiet")
    assert result.exit_code == 0, result.output
    out = pq.read_table(output).to_pylist()
    assert [r["question"] for r in out] == texts and [r["source"] for r in out] == [i % 2 for i in range(10)]
    assert out[-1]["error"] == "bad row: empty text: nothing to score"
    scored = out[:-1]
    summary = json.loads(output.with_suffix(".summary.json").read_text())
    words = [(r["logprob"], r["num_words"]) for r in scored]
    nbytes = [(r["logprob"], r["num_bytes"]) for r in scored]
    assert summary["word_perplexity"] == pytest.approx(weighted_perplexity(words), rel=1e-6)
    assert summary["byte_perplexity"] == pytest.approx(weighted_perplexity(nbytes), rel=1e-6)
    assert summary["bits_per_byte"] == pytest.approx(bits_per_byte(nbytes), rel=1e-6)
    assert summary["tokens"] == sum(r["num_tokens"] for r in scored)
    assert math.isfinite(summary["token_perplexity"])
    shown = CliRunner().invoke(cli, ["report", str(output), "--by", "source"])
    assert shown.exit_code == 0, shown.output
    html = output.with_suffix(".html").read_text()
    assert f"data-metric='word_perplexity' data-run=0>{summary['word_perplexity']:,.4f}</td>" in html
    assert 'data-histogram="perplexity per token, per row"' in html and 'data-group="1" data-run=0>' in html


def test_a_likelihood_worker_keeps_its_float32_output_layer_on_torchs_own_kernel(tiny_model, monkeypatch):
    """A likelihood job's float32 output layer is transformers' own product (MKL), not oneDNN's
    packed one that generate uses (its other layers are packed for both): on SmolLM2 that puts its
    log-probs within 6e-5 of lm-eval's instead of 1.0e-4."""
    from bulkscore.workers.actor import ShardScorer
    from bulkscore.workers.models import PackedLinear, packs_weights

    monkeypatch.setattr(ShardScorer, "where", lambda self: {})  # Ray's context would start a Ray instance
    spec = ModelSpec(str(tiny_model), "folder", dtype="float32", device="cpu", threads=1)
    packs = packs_weights(torch.device("cpu"), torch.float32)
    packed = {}
    for task in ("generate", "choice"):
        scorer = ShardScorer(spec, scoring(task))
        assert "error" not in scorer.load()
        model = scorer.lm.model
        packed[task] = (
            isinstance(model.get_output_embeddings(), PackedLinear),
            isinstance(model.model.layers[0].mlp.up_proj, PackedLinear),
        )
    assert packed == {"generate": (packs, packs), "choice": (False, packs)}


def test_an_empty_context_is_lm_evals_prefix_token(lm, harness):
    """An empty context: the prefix token; a continuation that starts with that token itself: its
    first token is the context (lm-eval's loglikelihood)."""
    bos = lm.tokenizer.decode(1)
    pairs = [("", " the cat sat"), ("", bos + "the cat sat on")]
    ours = score(lm, "loglikelihood", [{"question": c, "continuation": t} for c, t in pairs])
    theirs = harness.loglikelihood(requests("loglikelihood", pairs))
    for result, (ll, greedy) in zip(ours, theirs):
        assert result["error"] is None and result["logprob"] == pytest.approx(ll, abs=1e-4)
        assert result["is_greedy"] == greedy and result["num_prompt_tokens"] == 1


def test_input_columns_are_renamed_only_where_the_tasks_own_columns_clash(tmp_path):
    """A generate job's `gold` or `logprob` column passes through as it is; a choice job's `gold`,
    its own column's name, becomes `input_gold`. An answer too large for an index is matched as text."""
    from bulkscore.jobs.questions import Columns, InMemory, load_questions

    row = {"question": "q", "answer": 2**70, "gold": 1, "logprob": 0.5, "choices": ["a"]}
    plain = load_questions([write_jsonl(tmp_path / "q.jsonl", [row])])
    assert plain.column_names[3:] == ["gold", "logprob", "choices"]
    picked = load_questions([InMemory("the rows given", [row])], Columns(task="choice"))
    assert picked.column_names[3:] == ["input_gold", "logprob", "choices", "__answer_index"]
    assert picked.column("__answer_index").to_pylist() == [None]
    assert picked.column("reference").to_pylist() == [str(2**70)]


def test_choices_of_another_type_are_refused_even_when_every_list_is_empty(tmp_path):
    path = tmp_path / "mc.parquet"
    pq.write_table(pa.table({"question": ["q"], "choices": pa.array([[]], pa.list_(pa.int64()))}), path)
    result = invoke(path, "--task", "choice", "-o", tmp_path / "out.parquet")
    assert result.exit_code == 1, result.output
    assert "column 'choices' holds lists of int64, not of text: every choice must be a string" in result.stderr


def test_generate_jobs_keep_their_settings_and_fingerprint(tmp_path):
    """The tasks' settings are absent from a generate job's, so an output from before them resumes."""
    from bulkscore.jobs.settings import JobSpec, scoring_settings

    generate, choice = scoring("generate"), scoring("choice")
    assert "task" not in scoring_settings(generate) and "choice_delimiter" not in scoring_settings(generate)
    assert scoring_settings(choice)["task"] == "choice" and scoring_settings(choice)["choice_delimiter"] == " "
    spec = JobSpec(("x",), None, ModelSpec("m", "folder"), generate, None, None)
    assert set(spec.settings()["scoring"]) == {"prompt", "generation", "grading"}
