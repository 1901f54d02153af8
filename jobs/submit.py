"""Ray Jobs: submit `bulkscore run` to a cluster, follow it, ask for its status or logs, stop it."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

from bulkscore.jobs.cluster import use_token_if_present
from bulkscore.jobs.errors import JobError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def jobs_address(address: str | None) -> str:
    found = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not found:
        raise JobError("no Ray Jobs address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")
    return found


def jobs_client(address: str | None):
    use_token_if_present()
    from ray.job_submission import JobSubmissionClient

    where = jobs_address(address)
    try:
        return JobSubmissionClient(where)
    except Exception as error:  # connection refused, 401/403 from token auth, a bad URL...
        raise JobError(f"cannot use the Ray Jobs API at {where}: {error}") from None


def call(what: str, fn: Callable, *args):
    try:
        return fn(*args)
    except RuntimeError as error:  # the Jobs SDK reports HTTP errors (unknown job, auth) this way
        raise JobError(f"{what}: {error}") from None


def read_runtime_env(path: Path | None, working_dir: str | None) -> dict | None:
    env: dict = {}
    if path is not None:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            env = yaml.safe_load(text) or {}
        else:
            env = json.loads(text)
        if not isinstance(env, dict):
            raise JobError(f"{path}: a runtime environment must be a mapping, got {type(env).__name__}")
    if working_dir is not None:
        env["working_dir"] = working_dir
    return env or None


def submit(client, run_args: Sequence[str], runtime_env: dict | None) -> str:
    entrypoint = shlex.join(["bulkscore", "run", *run_args])
    return call("cannot submit the job", lambda: client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env))


def follow(client, job_id: str, write: Callable[[str], None]) -> None:
    """Stream the job's logs until it ends."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            write(lines)

    asyncio.run(tail())


def final_status(client, job_id: str) -> tuple[str, str]:
    info = call(f"cannot read job {job_id}", client.get_job_info, job_id)
    return str(info.status), info.message or ""
