"""The Ray actor: holds one loaded model and scores the shards sent to it.

Plain class; the driver wraps it with `ray.remote`, with as many concurrent calls as shards in flight:
those shards share one generation engine (continuous batching across shards). torch and transformers
load in `__init__`, in the actor's process, never in the driver's.
"""

from __future__ import annotations

import os
import socket

import pyarrow as pa

from bulkscore.workers.contract import ModelSpec, ScoringSettings, ShardTask
from bulkscore.workers.faults import crash_if_asked


class ShardScorer:
    def __init__(self, spec: ModelSpec, settings: ScoringSettings) -> None:
        from bulkscore.workers.models import load_model

        self.settings = settings
        self.lm = self.engine = None
        self.load_error: str | None = None
        try:
            from bulkscore.workers.scoring import shard_engine

            self.lm = load_model(spec)
            self.engine = shard_engine(self.lm, settings)
        except Exception as error:  # reported by info(), so the driver can refuse the job clearly
            self.load_error = f"{type(error).__name__}: {error}"

    def info(self) -> dict:
        if self.lm is None:
            return {"pid": os.getpid(), "error": self.load_error}
        import ray

        from bulkscore.workers.models import kernels_pinned

        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node": ray.get_runtime_context().get_node_id(),
            "device": str(self.lm.device),
            "dtype": str(self.lm.dtype).removeprefix("torch."),
            "load_s": round(self.lm.load_s, 3),
            "invariant": kernels_pinned(self.lm.device),
        }

    def score(self, task: ShardTask) -> pa.Table:
        from bulkscore.workers.scoring import score_shard

        if self.lm is None:
            raise RuntimeError(f"this worker could not load the model: {self.load_error}")
        crash_if_asked(task)
        return score_shard(self.lm, task, self.settings, self.engine)
