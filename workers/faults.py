"""Fault injection, for tests of the driver's recovery: a worker dies as a killed process does.

Set BULKSCORE_CRASH_ON_QUESTION in the environment Ray's workers start with; a worker given a
shard holding a question that contains that text kills itself with SIGKILL. Unset: nothing happens.
"""

from __future__ import annotations

import os
import signal
import time

from bulkscore.workers.contract import ShardTask

CRASH_ON_QUESTION = "BULKSCORE_CRASH_ON_QUESTION"


def crash_if_asked(task: ShardTask) -> None:
    needle = os.environ.get(CRASH_ON_QUESTION)
    if needle and any(needle in (q or "") for q in task.rows.column("question").to_pylist()):
        # Die a moment into the work, as a real crash does, not before the last reply is sent.
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)
