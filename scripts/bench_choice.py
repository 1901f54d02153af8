"""Multiple-choice scoring: bulkscore against lm-evaluation-harness's Hugging Face backend.

    python scripts/bench.py --task choice [--rows 300]      (or this script itself)

The rows: the bundled questions as 4-choice rows (compare_lm_eval.lm_eval_rows). Each peer runs as
its own process, timed from its start to its results (imports, Ray start and model load included):
  lm-eval-32    lm-eval's HFLM, batch size 32, at its default dtype (the model folder's: float32)
  lm-eval-auto  the same with batch size auto (it finds the largest batch that fits)
  bulkscore     `bulkscore run --task choice` at its defaults (--dtype auto)
  bulkscore-fp32  the same in float32, lm-eval's arithmetic
Prints wall time, rows/s, and each peer's time over bulkscore's.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_lm_eval import lm_eval_rows, model_folder, run_harness  # noqa: E402

PEERS = ("lm-eval-32", "lm-eval-auto", "bulkscore", "bulkscore-fp32")


def peer_command(name: str, model: str, rows: Path, folder: Path) -> list[str]:
    if name.startswith("lm-eval"):
        batch = name.removeprefix("lm-eval-")
        return [sys.executable, __file__, "--peer", batch, "--model", model, "--input", str(rows)]
    dtype = ["--dtype", "float32"] if name.endswith("fp32") else []
    output = folder / f"{name}.parquet"
    return [
        sys.executable,
        "-c",
        "from bulkscore.jobs.cli import cli; cli()",
        "run",
        str(rows),
        "--task",
        "choice",
        "--model",
        model,
        "-o",
        str(output),
        "--overwrite",
        "--quiet",
        *dtype,
    ]


def run_lm_eval_peer(args) -> None:
    rows = [json.loads(line) for line in Path(args.input).open()]
    batch = args.peer if args.peer == "auto" else int(args.peer)
    results = run_harness(args.model, "choice", rows, batch, "auto")
    print(json.dumps({"requests": len(results)}))


def machine() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")]
    kinds = [f for f in ("avx2", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return f"{names[0] if names else platform.processor()} ({', '.join(kinds)}), {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--peers", default=",".join(PEERS), type=lambda s: s.split(","))
    parser.add_argument("--model", help="model folder [default: the embedded SmolLM2-135M-Instruct, converted]")
    parser.add_argument("--task", default="choice", help=argparse.SUPPRESS)
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        return run_lm_eval_peer(args)
    model = model_folder(args.model)
    folder = Path(tempfile.mkdtemp(prefix="bench-choice-"))
    rows = folder / "mc.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in lm_eval_rows(args.rows)["choice"]))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "HF_HUB_OFFLINE": "1",
    }
    print(f"{args.rows} 4-choice rows, {model}; {machine()}", flush=True)
    times = {}
    for name in args.peers:
        started = time.perf_counter()
        done = subprocess.run(peer_command(name, model, rows, folder), env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        times[name] = time.perf_counter() - started
        extra = ""
        if name.startswith("bulkscore"):
            summary = json.loads((folder / f"{name}.summary.json").read_text())
            extra = f" acc {summary['acc']:.4f} acc_norm {summary['acc_norm']:.4f}, timings {summary['timings']}"
        print(f"  {name}: {times[name]:.1f} s ({args.rows / times[name]:.1f} rows/s){extra}", flush=True)
    if "bulkscore" in times:
        print("| peer | wall s | rows/s | x bulkscore's time |")
        print("| --- | --- | --- | --- |")
        for name, seconds in times.items():
            print(f"| {name} | {seconds:.1f} | {args.rows / seconds:.1f} | {seconds / times['bulkscore']:.2f} |")


if __name__ == "__main__":
    main()
