"""The real embedded SmolLM2 model, end to end, as a user runs it: the console script, no Ray up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.embedded


def test_bundled_set_with_the_embedded_model(tmp_path, embedded_folder):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    output = tmp_path / "answers.parquet"
    command = [
        str(Path(sys.executable).parent / "bulkscore"),
        "run",
        "--limit",
        "6",
        "--max-new-tokens",
        "24",
        "--shard-size",
        "4",
        "-o",
        str(output),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Read 6 questions" in done.stderr
    assert (
        "Starting 1 worker(s) with SmolLM2-135M-Instruct for 2 shard(s) on a private local Ray instance..."
        in done.stderr
    )
    assert "6/6" in done.stderr  # the progress bar reached the end
    assert done.stdout.splitlines()[0] == "rows       6 (6 samples, 0 errors)"

    table = pq.read_table(output).to_pydict()
    assert table["id"] == [0, 1, 2, 3, 4, 5]
    assert table["reference"][:3] == ["252000", "50000", "50000000"]
    assert all(text and text.strip() for text in table["completion"])  # a real model writes words
    assert all(0 < loss < 10 for loss in table["loss"])
    summary = json.loads(output.with_suffix(".summary.json").read_text())
    assert summary["model"] == "SmolLM2-135M-Instruct"
    assert summary["rows"] == 6 and summary["errors"] == 0
    # The bundled set's category passes through, and the report breaks accuracy down by it.
    assert table["category"] == ["time", "mass", "data", "speed", "speed", "volume"]
    done = subprocess.run(
        [str(Path(sys.executable).parent / "bulkscore"), "report", str(output)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("1 run(s), by category)")
    page = output.with_suffix(".html").read_text()
    assert "Accuracy and answer rate by category" in page and "SmolLM2-135M-Instruct" in page


def test_cot_makes_the_embedded_model_answer_in_tags(embedded_folder):
    """The bundled cot instruction and examples get <answer> tags from SmolLM2-135M; plain chat does not."""
    import pyarrow as pa

    from bulkscore.jobs.questions import bundled_questions, load_questions
    from bulkscore.jobs.settings import prompt_settings
    from bulkscore.workers.contract import GenerationSettings, GradingSettings, ModelSpec, ScoringSettings, ShardTask
    from bulkscore.workers.models import load_model
    from bulkscore.workers.scoring import score_shard

    lm = load_model(ModelSpec("", "embedded", dtype="float32", device="cpu"))
    questions = load_questions([bundled_questions()], limit=16)
    rows = pa.table(
        {"row": range(16), "question": questions.column("question"), "reference": questions.column("reference")}
    )
    rates = {}
    for prompt_format in ("chat", "cot"):
        tags_only = GradingSettings(answer_regex=r"<answer>(.*?)</answer>")  # not the default's last-number fallback
        settings = ScoringSettings(prompt_settings(prompt_format, None, None), GenerationSettings(), tags_only)
        answers = score_shard(lm, ShardTask(0, 0, 16, rows), settings).column("answer_text").to_pylist()
        rates[prompt_format] = sum(a is not None for a in answers) / 16
    assert rates["cot"] >= 0.5 and rates["cot"] > rates["chat"], rates


BF16_LOSS_BOUND = 0.025  # relative to float32; measured 1.0% at worst over the first 32 bundled rows


def test_bfloat16_losses_stay_within_the_bound_of_float32(embedded_folder):
    """What `--dtype auto` picks on CPUs with AVX512-BF16 or AMX (and on GPUs) keeps the grader's loss."""
    import torch

    from bulkscore.jobs.questions import bundled_questions
    from bulkscore.workers.contract import ModelSpec
    from bulkscore.workers.losses import span_nll
    from bulkscore.workers.models import load_model

    rows = [json.loads(line) for line in bundled_questions().read_text().splitlines()[:16]]
    losses = {}
    for dtype in ("float32", "bfloat16"):
        lm = load_model(ModelSpec("embedded", "embedded", dtype, "cpu"))
        assert lm.model.dtype == getattr(torch, dtype)
        sequences = [lm.tokenizer(f"{r['question']} {r['answer']}")["input_ids"] for r in rows]
        with torch.inference_mode():
            losses[dtype] = span_nll(lm, sequences, [1] * len(sequences))
    for full, half in zip(losses["float32"], losses["bfloat16"]):
        assert half == pytest.approx(full, rel=BF16_LOSS_BOUND)
    assert losses["float32"] != losses["bfloat16"]  # the half-precision pass really ran


@pytest.mark.usefixtures("ray_instance")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_embedded_model_gives_the_same_bits_whatever_the_batch_shard_or_workers(tmp_path, dtype, embedded_folder):
    """The issue's own check: SmolLM2-135M, rows one at a time in shards of 3 on one worker with two
    threads, against eight at a time in shards of 5 on two workers with one thread each."""
    from click.testing import CliRunner

    from bulkscore.jobs.cli import cli

    common = ["run", "--limit", "6", "--max-new-tokens", "8", "--dtype", dtype, "--quiet"]
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    for output, layout in (
        (a, ["--batch-size", "1", "--shard-size", "3"]),
        (b, ["--batch-size", "8", "--shard-size", "5", "--workers", "2", "--cpus-per-worker", "1"]),
    ):
        result = CliRunner().invoke(cli, [*common, *layout, "-o", str(output)])
        assert result.exit_code == 0, result.output
    ta, tb = pq.read_table(a).to_pydict(), pq.read_table(b).to_pydict()
    assert all(text and text.strip() for text in ta["completion"])
    for column in ("completion", "num_completion_tokens", "loss", "completion_loss", "reference_loss"):
        assert ta[column] == tb[column], column
    assert json.loads(b.with_suffix(".summary.json").read_text())["dtype"] == dtype


def test_a_choice_job_with_the_embedded_model(tmp_path, embedded_folder):
    """`bulkscore run mc.jsonl --task choice -o out.parquet`, as the likelihood issue asks: the task's
    columns and summary; the real model knows the capital of France."""
    rows = [
        {"question": "The capital of France is", "choices": ["Paris", "London", "Berlin", "Madrid"], "answer": 0},
        {"question": "One kilogram is", "choices": ["1000 grams", "10 grams"], "answer": "1000 grams"},
        {"question": "Water freezes at", "choices": ["0 degrees Celsius", "100 degrees Celsius"], "answer": 0},
        {"question": "An empty row", "choices": [], "answer": 0},
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "out.parquet"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [str(Path(sys.executable).parent / "bulkscore"), "run", str(path), "--task", "choice", "-o", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "rows       4 (1 errors)" and lines[1].startswith("acc        ")
    table = pq.read_table(output).to_pylist()
    assert table[0]["pred"] == 0 and table[0]["choice_is_greedy"][0] and table[0]["is_correct"]
    assert [r["gold"] for r in table] == [0, 0, 0, None] and table[3]["error"] == "bad row: no choices"
    summary = json.loads(output.with_suffix(".summary.json").read_text())
    assert summary["task"] == "choice" and summary["with_answer"] == 3
    assert summary["acc"] == pytest.approx(sum(r["is_correct"] for r in table[:3]) / 3, abs=1e-6)
    assert {"acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(summary)
