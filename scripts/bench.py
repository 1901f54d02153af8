"""bulkscore against what its users would otherwise run, on the same questions, on this machine.

    python scripts/bench.py [--questions 128] [--max-new-tokens 32] [--peers one,batched,raydata,bulkscore]

Each peer runs as its own process, timed from its start to its output file (imports, Ray start and
model load included), with greedy decoding of the questions as they are, with the tokenizer's own
special tokens (raw prompts, as the speed issue's task; `--prompt-format chat`: the chat template, for
every peer), at least one new token each (bulkscore's default --min-new-tokens):
  one        transformers `generate`, one question at a time
  batched    transformers `generate`, batches of 32 in float32 with left padding (the assignment's
             `batched_generate`)
  raydata    Ray Data: read_json -> map_batches(a callable class holding the model, batches of 32)
             -> write_parquet
  llamacpp   llama.cpp (llama-cpp-python, built from PyPI) on the embedded GGUF file as it is, one
             question at a time (its Python API has no batched generation), greedy, all CPUs
  bulkscore  `bulkscore run` at its defaults (which also computes the three losses)
  careful    the same with `--batch-size 1 --shard-size 3` (a user's small, careful run)
  warm       the same `bulkscore run --address` to a Ray head already running on 127.0.0.1 (as after
             `ray start --head`): start-up without Ray's own start; the head is started before the
             clock and stopped by process id after
  before     with --baseline DIR: `bulkscore run` from another checkout of bulkscore (e.g. a `git
             worktree` of an earlier commit), for a before/after table from one run
Prints wall time, rows/s, generated tokens/s, each peer's time over bulkscore's (how many times
faster bulkscore is), and where each peer's time went: start-up (from its start to its model loaded:
imports, Ray and the load), generating, and the loss pass (bulkscore's alone; the others compute
none). `make bench` runs it; on a machine with a GPU, the peers use it.
`--task choice [--rows 300]`: multiple-choice scoring against lm-evaluation-harness (bench_choice.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import start_head, stop_head  # noqa: E402

PEERS = ("one", "batched", "raydata", "llamacpp", "bulkscore", "warm", "careful", "before")
BULKSCORE_PEERS = {"bulkscore": [], "warm": [], "careful": ["--batch-size", "1", "--shard-size", "3"], "before": []}
PEER_BATCH = 32


def prompts_for(tokenizer, questions: list[str], prompt_format: str) -> list[str]:
    """The questions as `bulkscore run --prompt-format` words them: chat (the template) or raw."""
    if prompt_format == "raw":
        return list(questions)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]


def load_hf(model: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(device).eval()
    return tokenizer, lm


def hf_generate(tokenizer, lm, prompts: list[str], max_new_tokens: int, raw: bool = False) -> list[int]:
    """Greedy completions of a batch; returns each one's token count up to and with its EOS."""
    import torch

    # A chat template writes its special tokens as text; raw prompts get the tokenizer's own, as in bulkscore.
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=raw).to(lm.device)
    with torch.inference_mode():
        out = lm.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            min_new_tokens=1,  # as bulkscore's default --min-new-tokens: no empty completion
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    new = out[:, inputs["input_ids"].shape[1] :].tolist()
    eos = tokenizer.eos_token_id
    return [row.index(eos) + 1 if eos in row else len(row) for row in new]


def since_start() -> float:
    """Seconds since the bench started this peer's process (BENCH_STARTED, the parent's clock)."""
    return round(time.time() - float(os.environ["BENCH_STARTED"]), 3)


def write_peer_output(output: Path, tokens: list[int], loaded: float) -> None:
    """The peer's token counts, and its timings beside them as bulkscore's summary has them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"num_completion_tokens": tokens}), output)
    timings = {"startup_s": loaded, "generate_s": round(since_start() - loaded, 3), "loss_s": 0.0}
    output.with_suffix(".summary.json").write_text(json.dumps({"timings": timings}))


def read_questions(path: Path) -> list[str]:
    return [json.loads(line)["question"] for line in Path(path).read_text().splitlines()]


def run_transformers(args, batch: int) -> None:
    tokenizer, lm = load_hf(args.model, args.device)
    loaded = since_start()
    prompts = prompts_for(tokenizer, read_questions(args.input), args.prompt_format)
    tokens = []
    for i in range(0, len(prompts), batch):
        tokens += hf_generate(tokenizer, lm, prompts[i : i + batch], args.max_new_tokens, args.prompt_format == "raw")
    write_peer_output(Path(args.output), tokens, loaded)


def run_llamacpp(args) -> None:
    """llama.cpp on the GGUF file as it is: greedy (temperature 0), one question at a time, the
    machine's CPUs as its threads. Prompts are worded as for the other peers (raw: the question,
    with the file's own BOS rule; chat: the template's text)."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    threads = os.cpu_count()
    llm = Llama(model_path=args.gguf, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    loaded = since_start()
    prompts = prompts_for(AutoTokenizer.from_pretrained(args.model), read_questions(args.input), args.prompt_format)
    tokens = []
    for prompt in prompts:
        out = llm.create_completion(prompt, max_tokens=args.max_new_tokens, temperature=0.0)
        tokens.append(out["usage"]["completion_tokens"])
    write_peer_output(Path(args.output), tokens, loaded)


class RayDataGenerator:
    """What a Ray Data user writes: a callable class that loads the model once per actor."""

    def __init__(self, model: str, device: str, max_new_tokens: int, prompt_format: str, loaded: str):
        import torch

        torch.set_num_threads(os.cpu_count())  # Ray sets one thread per CPU it reserved
        self.tokenizer, self.lm = load_hf(model, device)
        Path(loaded).write_text(str(since_start()))  # the actor inherits BENCH_STARTED through Ray
        self.max_new_tokens, self.prompt_format = max_new_tokens, prompt_format

    def __call__(self, batch: dict) -> dict:
        prompts = prompts_for(self.tokenizer, list(batch["question"]), self.prompt_format)
        raw = self.prompt_format == "raw"
        batch["num_completion_tokens"] = hf_generate(self.tokenizer, self.lm, prompts, self.max_new_tokens, raw)
        return batch


def run_raydata(args) -> None:
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    gpus = 1 if args.device == "cuda" else 0
    dataset = ray.data.read_json(args.input)
    dataset = dataset.map_batches(
        RayDataGenerator,
        fn_constructor_args=(args.model, args.device, args.max_new_tokens, args.prompt_format, f"{args.output}.loaded"),
        # One CPU reserved, so that Ray Data's read and write tasks can still run beside it.
        batch_size=PEER_BATCH,
        concurrency=1,
        num_cpus=1,
        num_gpus=gpus,
    )
    folder = f"{args.output}.parts"
    dataset.write_parquet(folder)
    ray.shutdown()
    import pyarrow.parquet as pq

    tokens = pq.read_table(folder, columns=["num_completion_tokens"]).column(0).to_pylist()
    write_peer_output(Path(args.output), tokens, float(Path(f"{args.output}.loaded").read_text()))


def peer_command(name: str, args, folder: Path) -> tuple[list[str], Path]:
    output = folder / f"{name}.parquet"
    if name in BULKSCORE_PEERS:
        model = [] if args.model_given is None else ["--model", args.model]
        address = ["--address", args.head["gcs"]] if name == "warm" else []
        # "before": the same command from the baseline checkout, first on the path of driver and workers.
        program = (
            [sys.executable, "-c", f"from {args.baseline_cli} import cli; cli()"]
            if name == "before"
            else [str(Path(sys.executable).parent / "bulkscore")]
        )
        return (
            [
                *program,
                "run",
                str(args.input),
                "-o",
                str(output),
                "--max-new-tokens",
                str(args.max_new_tokens),
                "--prompt-format",
                args.prompt_format,
                "--quiet",
                *address,
                *model,
                *BULKSCORE_PEERS[name],
                *args.bulkscore_args,
            ],
            output,
        )
    return (
        [
            sys.executable,
            __file__,
            "--peer",
            name,
            "--input",
            str(args.input),
            "--output",
            str(output),
            "--model",
            args.model,
            "--device",
            args.device,
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--prompt-format",
            args.prompt_format,
            "--gguf",
            str(args.gguf),
        ],
        output,
    )


def generated_tokens(output: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_table(output, columns=["num_completion_tokens"]).column(0).to_pylist())


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}"


def compare(args) -> None:
    from bulkscore.jobs.questions import bundled_questions

    folder = Path(tempfile.mkdtemp(prefix="bulkscore-bench-"))
    lines = bundled_questions().read_text().splitlines()[: args.questions]
    args.input = folder / "questions.jsonl"
    args.input.write_text("".join(line + "\n" for line in lines))
    if args.baseline:
        args.baseline_path, args.baseline_cli = baseline_on_path(Path(args.baseline).resolve(), folder)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    results = {}
    run_peers(args, folder, env, results)
    reference = results.get("bulkscore", (None, None))[0]
    print(
        f"{args.questions} questions x {args.max_new_tokens} new tokens, {args.prompt_format} prompts, greedy; "
        f"{time.strftime('%Y-%m-%d')}, {machine()}"
    )
    print(
        "| peer | wall s | rows/s | generated tokens/s | peer time / bulkscore time "
        "| start-up s | generating s | loss s | generating / bulkscore's |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    own = results.get("bulkscore", (None, None, {}))[2].get("generate_s")
    for name, (wall, tokens, timings) in results.items():
        ratio = f"{wall / reference:.2f}" if reference else "-"
        figures = [timings.get(k) for k in ("startup_s", "generate_s", "loss_s")]
        shown = " | ".join("-" if f is None else f"{f:.2f}" for f in figures)
        generating = f"{figures[1] / own:.2f}" if own and figures[1] else "-"
        print(
            f"| {name} | {wall:.1f} | {args.questions / wall:.2f} | {tokens / wall:.1f} | {ratio} | {shown} "
            f"| {generating} |"
        )


def baseline_on_path(baseline: Path, folder: Path) -> tuple[Path, str]:
    """What to put first on the path of the `before` peer's driver and workers, and its CLI's module.

    A checkout from before the package rename imports as top-level `jobs` and `workers`. One after it
    keeps `jobs/` and `workers/` beside `bulkscore/` and installs them as bulkscore.jobs and
    bulkscore.workers: a folder of links lays that package out, lest the installed (current)
    bulkscore.jobs and bulkscore.workers answer for the baseline's."""
    if not (baseline / "bulkscore" / "__init__.py").exists():
        return baseline, "jobs.cli"
    package = folder / "baseline" / "bulkscore"
    package.mkdir(parents=True)
    for entry in (baseline / "bulkscore").iterdir():
        (package / entry.name).symlink_to(entry)
    for part in ("jobs", "workers"):
        (package / part).symlink_to(baseline / part)
    return package.parent, "bulkscore.jobs.cli"


def run_peers(args, folder: Path, env: dict, results: dict) -> None:
    for name in args.peers:
        # The warm peer's head runs for that peer alone: no other peer shares the machine with an idle
        # head's dashboard, agents and monitors.
        args.head = start_head() if name == "warm" else None
        try:
            command, output = peer_command(name, args, folder)
            peer_env = env | {"PYTHONPATH": str(args.baseline_path)} if name == "before" else env
            peer_env = peer_env | {"BENCH_STARTED": repr(time.time())}  # the peer's since_start()
            started = time.perf_counter()
            # "before" runs in the bench's folder: in a checkout, the working directory's bulkscore/
            # would come first on the path of its driver and workers.
            cwd = folder if name == "before" else None
            done = subprocess.run(command, env=peer_env, capture_output=True, text=True, cwd=cwd)
            wall = time.perf_counter() - started
        finally:
            if args.head:
                stop_head(args.head)
        if done.returncode != 0:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        timings = json.loads(output.with_suffix(".summary.json").read_text()).get("timings") or {}
        results[name] = (wall, generated_tokens(output), timings)
        print(f"  {name}: {wall:.1f} s; timings: {json.dumps(timings)}", file=sys.stderr, flush=True)


def main() -> None:
    if "--task" in sys.argv:  # `--task choice`: the likelihood bench against lm-eval (bench_choice.py)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_choice import main as bench_choice

        return bench_choice()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompt-format", default="raw", choices=["raw", "chat"], help="for every peer")
    parser.add_argument("--peers", default=",".join(PEERS[:6]), type=lambda s: s.split(","))
    parser.add_argument("--model", dest="model_given", help="model folder [default: the embedded SmolLM2-135M]")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--bulkscore-args", default="", type=str.split, help="extra `bulkscore run` options")
    parser.add_argument("--baseline", help="another bulkscore checkout, run as the peer `before`")
    parser.add_argument("--peer", choices=PEERS[:4], help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if "before" in args.peers and not args.baseline:
        parser.error("the peer `before` needs --baseline DIR (a checkout of the bulkscore to compare with)")
    if args.peer:
        args.model = args.model_given
        if args.peer == "raydata":
            run_raydata(args)
        elif args.peer == "llamacpp":
            run_llamacpp(args)
        else:
            run_transformers(args, 1 if args.peer == "one" else PEER_BATCH)
        return
    if args.model_given is None:
        from bulkscore.workers.embedded import embedded_gguf, prepare_gguf

        args.gguf = embedded_gguf()  # the llamacpp peer reads the file as it is
        args.model = str(prepare_gguf(args.gguf))
    else:
        args.model = str(Path(args.model_given).resolve()) if Path(args.model_given).exists() else args.model_given
        args.gguf = args.model if args.model.endswith(".gguf") else None
    if "llamacpp" in args.peers and args.gguf is None:
        parser.error("the peer `llamacpp` reads a GGUF file: the embedded model, or --model FILE.gguf")
    compare(args)


if __name__ == "__main__":
    main()
