"""bulkscore: score a language model on a large question set, in batches, on Ray.

    import bulkscore
    result = bulkscore.run("questions.jsonl", max_new_tokens=32)
    result.table      # pyarrow.Table, one row per question and sample
    result.summary    # accuracy, answer rate, losses, throughput...

The driver lives in bulkscore.jobs, the Ray actors in bulkscore.workers.
"""

from bulkscore.jobs.api import Result, export, report, run
from bulkscore.jobs.errors import JobError, UsageError

__all__ = ["JobError", "Result", "UsageError", "export", "report", "run"]
