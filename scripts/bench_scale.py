"""bulkscore's own cost at scale: a model that computes almost nothing, 10^4..10^6 rows, end to end.

    python scripts/bench_scale.py                  # 10,000, 100,000 and 1,000,000 rows
    python scripts/bench_scale.py --rows 10000     # one size
    python scripts/bench_scale.py --task perplexity --rows 100000   # each question scored as a text
    python scripts/bench_scale.py --format openai-batch --rows 10000 --rows 100000   # Batch files in and out

The model is built here: a 1-layer Llama of width 16 with a 512-word BPE tokenizer trained on the
bundled questions, so the time is the tool's (driver, scheduling, Ray, the worker's per-row path),
not the model's. Each size runs `bulkscore run` in a fresh process on a private Ray instance
(raw prompts, 4 new tokens, greedy) and prints wall time, rows/s, the driver's peak RSS (VmHWM,
read from /proc while it runs) and its CPU time. `--format openai-batch` writes the questions as
OpenAI Batch /v1/completions requests and the output as a Batch output file (out.jsonl). Then the
scheduler alone: stand-in actors that
answer at once, 100,000 one-row shards, the driver's CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = (10_000, 100_000, 1_000_000)


def build_model(folder: Path) -> Path:
    """The near-zero model: 1 layer, width 16, 512 words."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (folder / "config.json").exists():
        return folder
    questions = [json.loads(line)["question"] for line in (ROOT / "jobs/data/unit_conversions.jsonl").open()]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(questions, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def write_questions(path: Path, rows: int, batch: bool = False) -> Path:
    """`rows` questions drawn from the bundled set, each with its own id; `batch`: as OpenAI Batch
    /v1/completions requests."""
    if path.exists():
        return path
    bundled = [json.loads(line) for line in (ROOT / "jobs/data/unit_conversions.jsonl").open()]
    pick = random.Random(0)
    with path.open("w") as f:
        for i in range(rows):
            q = pick.choice(bundled)
            line = {"id": i, "question": q["question"], "answer": q["answer"]}
            if batch:
                body = {"model": "m", "prompt": q["question"], "max_tokens": 4}
                line = {"custom_id": f"request-{i}", "method": "POST", "url": "/v1/completions", "body": body}
            f.write(json.dumps(line) + "\n")
    return path


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_job(model: Path, questions: Path, output: Path, extra: list[str], task: str = "generate") -> dict:
    command = [
        sys.executable,
        "-c",
        "from bulkscore.jobs.cli import cli; cli()",
        "run",
        str(questions),
        "--model",
        str(model),
        "-o",
        str(output),
        "--prompt-format",
        "raw",
        "--max-new-tokens",
        "4",
        "--overwrite",
        "--quiet",
        "--task",
        task,
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    started = time.perf_counter()
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = cpu = None
    while job.poll() is None:
        peak = peak_rss_mib(job.pid) or peak
        cpu = cpu_seconds(job.pid) or cpu
        time.sleep(0.2)
    wall = time.perf_counter() - started
    out, err = job.communicate()
    if job.returncode != 0:
        raise SystemExit(f"bulkscore run failed ({job.returncode}):\n{err[-3000:]}")
    summary = json.loads(output.with_name(output.name.removesuffix(".parquet") + ".summary.json").read_text())
    return {"wall_s": wall, "peak_rss_mib": peak, "driver_cpu_s": cpu, "summary": summary}


def schedule_only(shards: int) -> float:
    """Driver CPU seconds to run `shards` one-row shards on 8 stand-in actors that answer at once."""
    sys.path.insert(0, str(ROOT))
    from tests.test_schedule import schedule

    return schedule(shards)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, action="append", help="sizes to run (default 10^4, 10^5, 10^6)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bulkscore-scale")
    parser.add_argument("--shards", type=int, default=100_000, help="stand-in shards for the scheduler alone")
    parser.add_argument("--task", default="generate", help="generate, or perplexity: each question scored as a text")
    parser.add_argument(
        "--format", choices=("questions", "openai-batch"), default="questions", help="the input's and output's format"
    )
    parser.add_argument("run_args", nargs="*", help="more `bulkscore run` options, after --")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = build_model(args.work / "model")
    rows_list = args.rows or list(SIZES)
    results = []
    batch = args.format == "openai-batch"
    for rows in rows_list:
        questions = write_questions(args.work / f"{'requests' if batch else 'questions'}-{rows}.jsonl", rows, batch)
        output = args.work / f"{args.task}-{rows}.{'jsonl' if batch else 'parquet'}"
        found = run_job(model, questions, output, args.run_args, args.task)
        timings = found["summary"].get("timings") or {}
        results.append((rows, found, timings))
        print(
            f"  {rows:,} rows: {found['wall_s']:.1f} s, peak RSS {found['peak_rss_mib']:.0f} MiB, "
            f"driver CPU {found['driver_cpu_s']:.1f} s, timings {json.dumps(timings)}",
            flush=True,
        )
    scheduled = schedule_only(args.shards)
    what = "raw prompts, 4 new tokens" if args.task == "generate" else f"--task {args.task}"
    what += ", OpenAI Batch file in, Batch output file out" if batch else ""
    print(f"\nnear-zero model (1 layer, width 16, 512 words), {what}; {os.cpu_count()} CPUs")
    print(
        "| rows | wall s | rows/s | driver peak RSS MiB | driver CPU s | worker generate s | worker loss s | worker score s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for rows, found, timings in results:
        print(
            f"| {rows:,} | {found['wall_s']:.1f} | {rows / found['wall_s']:,.0f} | {found['peak_rss_mib']:.0f} "
            f"| {found['driver_cpu_s']:.1f} | {timings.get('generate_s', 0):.1f} | {timings.get('loss_s', 0):.1f} "
            f"| {timings.get('score_s', 0):.1f} |"
        )
    print(f"\nscheduler alone: {args.shards:,} shards on 8 stand-in actors in {scheduled:.2f} s of driver CPU")


if __name__ == "__main__":
    main()
