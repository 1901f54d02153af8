"""Random worker deaths on a private instance: a job whose workers are SIGKILLed every few seconds.

    python scripts/measure_chaos.py MODEL [--runs 3] [--first-kill 4] [--every 3] [--dtype D] [--isa avx2]

The issue's scenario: 96 questions, shards of 4, 2 workers of 1 CPU, 16 new tokens, one worker
process (a random one) SIGKILLed every `--every` seconds from `--first-kill` seconds after the
start, while loading its model or scoring. Prints, per run: exit code, seconds, kills, rows,
error rows, the deaths the summary counts and the file holding the job's messages, each with its
second. Every run should end 0 with no error rows.

`--isa avx2` runs the job on the AVX2 kernels of a CPU that has more (torch's ATEN_CPU_CAPABILITY,
oneDNN's ONEDNN_MAX_CPU_ISA, MKL's MKL_ENABLE_INSTRUCTIONS) and in float32, as `--dtype auto` runs
on an AVX2-only CPU: the kernels of such a machine, not its speed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import QUESTIONS, descendants, write_jsonl  # noqa: E402


def scorers(root: int) -> list[int]:
    pids = descendants(root)
    if not pids:
        return []
    found = subprocess.run(["ps", "-o", "pid=,args=", "-p", ",".join(map(str, pids))], capture_output=True, text=True)
    return [int(line.split()[0]) for line in found.stdout.splitlines() if "ray::ShardScorer" in line]


AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def run(model: str, seed: int, first_kill: float, every: float, folder: Path, dtype: str, isa: str | None) -> dict:
    rows = [
        {"id": i, "question": f"{q['question']} ({i})", "answer": q["answer"]} for i, q in enumerate(QUESTIONS * 12)
    ]
    questions = write_jsonl(folder / "questions.jsonl", rows)
    output = folder / f"answers-{seed}.parquet"
    options = ["--shard-size", "4", "--workers", "2", "--cpus-per-worker", "1", "--max-new-tokens", "16"]
    command = [sys.executable, "-c", "from bulkscore.jobs.cli import cli; cli()", "run", str(questions)]
    command += ["--model", model, "-o", str(output), *options, "--dtype", dtype, "--overwrite"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    if isa == "avx2":
        env |= AVX2_ONLY
    started = time.monotonic()
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    said: list[str] = []  # the job's messages, each with its second since the start

    def read() -> None:
        for line in job.stderr:  # the progress bar's redraws (after each \r) left out
            text = [part for part in line.split("\r") if part.strip() and not part.startswith("scoring:")]
            said.extend(f"{time.monotonic() - started:7.1f} {part.rstrip()}\n" for part in text)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    pick, kills, next_kill = random.Random(seed), 0, started + first_kill
    while job.poll() is None:
        if time.monotonic() >= next_kill:
            pids = scorers(job.pid)
            if pids:
                os.kill(pick.choice(pids), signal.SIGKILL)
                kills += 1
            next_kill += every
        time.sleep(0.1)
    job.wait()
    reader.join()
    log = folder / f"messages-{seed}.txt"
    log.write_text("".join(said))
    stderr = "".join(said)
    summary = json.loads(output.with_suffix(".summary.json").read_text()) if job.returncode == 0 else {}
    return {
        "exit": job.returncode,
        "s": round(time.monotonic() - started, 1),
        "kills": kills,
        "rows": summary.get("samples"),
        "errors": summary.get("errors"),
        "deaths": summary.get("worker_deaths"),
        "messages": str(log),
        **({"stderr": stderr[-500:]} if job.returncode else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model folder (e.g. the tests' tiny Llama)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--first-kill", type=float, default=4.0)
    parser.add_argument("--every", type=float, default=3.0)
    parser.add_argument("--dtype", default=None, help="the job's --dtype (default auto; float32 with --isa avx2)")
    parser.add_argument("--isa", choices=["avx2"], default=None, help="run on this CPU's AVX2 kernels only")
    args = parser.parse_args()
    dtype = args.dtype or ("float32" if args.isa == "avx2" else "auto")
    folder = Path(tempfile.mkdtemp(prefix="bulkscore-chaos-"))
    for seed in range(1, args.runs + 1):
        print(json.dumps(run(args.model, seed, args.first_kill, args.every, folder, dtype, args.isa)), flush=True)


if __name__ == "__main__":
    main()
