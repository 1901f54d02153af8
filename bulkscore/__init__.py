"""bulkscore: score a language model on a large question set, in batches, on Ray.

    import bulkscore
    result = bulkscore.run("questions.jsonl", max_new_tokens=32)
    result.table      # pyarrow.Table, one row per question and sample
    result.summary    # accuracy, answer rate, losses, throughput...

The driver lives in bulkscore.jobs, the Ray actors in bulkscore.workers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and editors see; at run time, __getattr__ below
    from bulkscore.jobs.api import Result, export, report, run
    from bulkscore.jobs.errors import JobError, UsageError

# The public names, imported when first used: a Ray worker imports this package on its way to
# bulkscore.workers, and needs none of the driver's modules (measured: 0.15 s of its start-up).
PUBLIC = {
    "JobError": "bulkscore.jobs.errors",
    "Result": "bulkscore.jobs.api",
    "UsageError": "bulkscore.jobs.errors",
    "export": "bulkscore.jobs.api",
    "report": "bulkscore.jobs.api",
    "run": "bulkscore.jobs.api",
}

__all__ = ["JobError", "Result", "UsageError", "export", "report", "run"]


def __getattr__(name: str):
    if name not in PUBLIC:
        raise AttributeError(f"module 'bulkscore' has no attribute {name!r}")
    return getattr(import_module(PUBLIC[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(PUBLIC))
