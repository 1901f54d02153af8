"""The Ray actor: holds one loaded model and scores the shards sent to it.

Plain class; the driver wraps it with `ray.remote`, with as many concurrent calls as shards in flight
plus one for `progress`: the shards share one generation engine (continuous batching across shards).
Creating the actor does nothing heavy, so that the driver learns at once that Ray placed it (`where`)
and separately when its model is loaded (`load`); torch and transformers load in `load`, in the
actor's process, never in the driver's.
"""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa

from bulkscore.workers.contract import ModelSpec, ScoringSettings, ShardTask
from bulkscore.workers.faults import crash_if_asked, hang_if_asked


class ShardScorer:
    def __init__(self, spec: ModelSpec, settings: ScoringSettings) -> None:
        self.spec, self.settings = spec, settings
        self.lm = self.engine = None
        self.load_error: str | None = None

    def where(self) -> dict:
        """Answered as soon as the actor runs: it has been placed."""
        import ray

        return {"pid": os.getpid(), "host": socket.gethostname(), "node": ray.get_runtime_context().get_node_id()}

    def load(self) -> dict:
        """Load the model; what the worker reports of itself (with `error` if the model failed to load)."""
        try:
            with collector_paused():
                self.load_model()
        except Exception as error:  # reported (a missing package included), so the driver refuses the job clearly
            self.load_error = f"{type(error).__name__}: {error}"
            return self.where() | {"error": self.load_error}
        from bulkscore.workers.models import kernels_pinned

        return self.where() | {
            "device": str(self.lm.device),
            "dtype": str(self.lm.dtype).removeprefix("torch."),
            "load_s": round(self.lm.load_s, 3),
            "load_pieces": self.lm.load_pieces,
            "invariant": kernels_pinned(self.lm.device),
        }

    def load_model(self) -> None:
        """The model and its engine, on the one thread that will run it."""
        from bulkscore.workers.models import load_model, pin_kernels, skip_unused_imports

        pin_kernels()  # before torch's first call into MKL, which reads the setting once
        skip_unused_imports()
        import torch

        from bulkscore.workers.generation import model_thread
        from bulkscore.workers.scoring import shard_engine

        thread = model_thread(self.spec.threads or torch.get_num_threads())  # torch runs on it alone
        plain = self.settings.task != "generate"  # the likelihood tasks: float32 log-probs as lm-eval's
        lm = thread.submit(load_model, self.spec, plain).result()
        self.lm, self.engine = lm, shard_engine(lm, self.settings, thread)

    def progress(self) -> int:
        """Model calls finished so far: the driver's sign that the worker is not hung."""
        return self.engine.calls if self.engine is not None else 0

    def score(self, task: ShardTask) -> pa.Table:
        from bulkscore.workers.scoring import score_shard
        from bulkscore.workers.tasks import score_task_shard

        if self.lm is None:
            raise RuntimeError(f"this worker could not load the model: {self.load_error}")
        crash_if_asked(task)
        hang_if_asked(task, self.engine.model_thread)
        scorer = score_shard if self.settings.task == "generate" else score_task_shard
        return scorer(self.lm, task, self.settings, self.engine)


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cycle collector off for the block, then, if it succeeded, everything still alive
    frozen out of its reach. Loading torch, transformers and a model makes about a million objects
    that live as long as the worker; the collector, run every 700 new ones, would walk them again and
    again (measured: imports and load 3.8-4.2 s -> 3.5 s). Frozen, they are skipped by every later
    collection too; the few cycles the imports left as garbage stay with them (no full collection
    first: that walk is what this saves). After a failed load nothing is frozen, so that the
    half-loaded model can go."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
        gc.freeze()
    finally:
        if was_on:
            gc.enable()
