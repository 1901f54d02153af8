"""Fault injection, for tests of the driver's recovery: a worker dies as a killed process does, or
hangs as a stuck kernel does.

Set BULKSCORE_CRASH_ON_QUESTION (or BULKSCORE_HANG_ON_QUESTION) in the environment Ray's workers
start with; a worker given a shard holding a question that contains that text kills itself with
SIGKILL (or stops its model thread for good). Unset: nothing happens.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import Executor

from bulkscore.workers.contract import ShardTask

CRASH_ON_QUESTION = "BULKSCORE_CRASH_ON_QUESTION"
HANG_ON_QUESTION = "BULKSCORE_HANG_ON_QUESTION"


def asked(variable: str, task: ShardTask) -> bool:
    needle = os.environ.get(variable)
    return bool(needle) and any(needle in (q or "") for q in task.rows.column("question").to_pylist())


def crash_if_asked(task: ShardTask) -> None:
    if asked(CRASH_ON_QUESTION, task):
        # Die a moment into the work, as a real crash does, not before the last reply is sent.
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)


def hang_if_asked(task: ShardTask, model_thread: Executor) -> None:
    """Block the worker's model thread for an hour: every shard on the worker stops making progress
    while the process stays alive and answers, as with a kernel that never returns."""
    if asked(HANG_ON_QUESTION, task):
        model_thread.submit(time.sleep, 3600)
