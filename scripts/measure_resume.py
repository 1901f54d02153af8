"""What a resume costs: the same job run straight through, and killed (SIGKILL, whole job) then resumed.

    python scripts/measure_resume.py [--limit 96] [--shard-size 16] [--kill-after 3]

Prints wall times and the extra time the killed-and-resumed job took over the uninterrupted one,
and checks that both outputs hold the same rows.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers import kill_job  # noqa: E402


def bulkscore(output: Path, args: argparse.Namespace) -> list[str]:
    return [
        str(Path(sys.executable).parent / "bulkscore"),
        "run",
        "--quiet",
        "-o",
        str(output),
        "--limit",
        str(args.limit),
        "--shard-size",
        str(args.shard_size),
        "--max-new-tokens",
        str(args.max_new_tokens),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=96)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--kill-after", type=int, default=3, help="finished shards before the kill")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    folder = Path(tempfile.mkdtemp(prefix="bulkscore-resume-"))

    clean = folder / "clean.parquet"
    started = time.perf_counter()
    subprocess.run(bulkscore(clean, args), env=env, check=True, capture_output=True)
    t_clean = time.perf_counter() - started

    resumed = folder / "resumed.parquet"
    parts = folder / "resumed.parquet.parts"
    started = time.perf_counter()
    job = subprocess.Popen(
        bulkscore(resumed, args), env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while len(list(parts.glob("part-*.parquet"))) < args.kill_after:
        time.sleep(0.05)
    kill_job(job)
    t_killed = time.perf_counter() - started
    done = len(list(parts.glob("part-*.parquet")))

    started = time.perf_counter()
    subprocess.run(bulkscore(resumed, args), env=env, check=True, capture_output=True)
    t_resume = time.perf_counter() - started

    same = pq.read_table(clean).select(["id", "completion"]) == pq.read_table(resumed).select(["id", "completion"])
    shards = -(-args.limit // args.shard_size)
    print(f"rows {args.limit}, shards {shards}, killed after {done} finished shards")
    print(f"uninterrupted run         {t_clean:7.1f} s")
    print(f"killed run (until kill)   {t_killed:7.1f} s")
    print(f"resumed run               {t_resume:7.1f} s")
    print(
        f"extra time of the resume  {t_killed + t_resume - t_clean:7.1f} s "
        f"({100 * (t_killed + t_resume - t_clean) / t_clean:.0f}% of the uninterrupted run)"
    )
    print(f"same rows and completions {same}")


if __name__ == "__main__":
    main()
