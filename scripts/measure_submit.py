"""What submitting costs: the same job run locally and through `bulkscore submit` to a Ray head.

    python scripts/measure_submit.py [--limit 32] [--shard-size 8] [--max-new-tokens 32]

Starts a head on 127.0.0.1 (stopped by process id afterwards), then times each way from the command
to the first finished shard on disk ("first rows scored") and to the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers import start_head, stop_head  # noqa: E402

BIN = Path(sys.executable).parent


def timed(command: list[str], parts: Path, env: dict) -> tuple[float, float]:
    """(seconds to the first part file, seconds to the end)."""
    started = time.perf_counter()
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = None
    while job.poll() is None:
        if first is None and parts.exists() and any(parts.glob("part-*.parquet")):
            first = time.perf_counter() - started
        time.sleep(0.05)
    if job.returncode != 0:
        raise SystemExit(f"{command[:2]} failed with exit code {job.returncode}")
    return first or float("nan"), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bulkscore-submit-"))
    run_args = [
        "--limit",
        str(args.limit),
        "--shard-size",
        str(args.shard_size),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--keep-parts",
        "--quiet",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}

    local = folder / "local.parquet"
    local_first, local_total = timed(
        [str(BIN / "bulkscore"), "run", "-o", str(local), *run_args], folder / "local.parquet.parts", env
    )
    head = start_head()
    try:
        submitted = folder / "submitted.parquet"
        submit = [str(BIN / "bulkscore"), "submit", "--address", head["jobs"], "--", "-o", str(submitted), *run_args]
        sub_first, sub_total = timed(submit, folder / "submitted.parquet.parts", env)
    finally:
        stop_head(head)
    print(f"{args.limit} rows, {args.max_new_tokens} new tokens, shards of {args.shard_size}, embedded model")
    print(f"local run      first rows scored {local_first:6.1f} s   total {local_total:6.1f} s")
    print(f"submitted job  first rows scored {sub_first:6.1f} s   total {sub_total:6.1f} s")
    print(f"submit overhead: {sub_total - local_total:+.1f} s ({100 * (sub_total - local_total) / local_total:+.0f}%)")


if __name__ == "__main__":
    main()
