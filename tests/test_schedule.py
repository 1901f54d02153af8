"""The actor pool's dispatch, with stand-in actors that record which shards they were given."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pytest
from ray.exceptions import RayActorError

from bulkscore.jobs.schedule import run_shards
from bulkscore.workers.contract import INPUT_SCHEMA, ShardTask, error_result


def shard(index: int) -> ShardTask:
    rows = pa.table({"row": [index], "question": ["q"], "reference": [None]}, schema=INPUT_SCHEMA)
    return ShardTask(index, index, index + 1, rows)


@pytest.mark.usefixtures("ray_instance")
def test_a_few_shards_spread_over_the_whole_pool():
    import ray

    @ray.remote(num_cpus=0)
    class Recorder:
        def where(self):
            return {}

        def load(self):
            return {"node": "n"}

        def score(self, task):
            return error_result(task, 1, f"scored by {os.getpid()}")

    done = {}
    outcome = run_shards(
        Recorder.remote, [shard(0), shard(1)], 1, lambda t, r: done.update({t.index: r["error"][0]}), print, 2
    )
    assert outcome.deaths == 0 and sorted(done) == [0, 1]
    assert done[0] != done[1]  # one each, not both on one


class Ref:
    """A stand-in object ref: the answer, there at once."""

    def __init__(self, answer) -> None:
        self.answer = answer


class Instant:
    """Stand-in for the `ray` module and its actors: every shard is answered the moment it is sent
    (or, for a task in `kills`, the worker dies), so all the time spent is the driver's own."""

    def __init__(self, kills: frozenset[int] = frozenset()) -> None:
        self.kills = kills
        self.answer = error_result(shard(0), 1, "not scored")
        self.sent = 0

    def actor(self):
        pool = self

        class Actor:
            class score:
                @staticmethod
                def remote(task: ShardTask) -> Ref:
                    pool.sent += 1
                    return Ref(RayActorError() if task.start in pool.kills else pool.answer)

            class where:
                @staticmethod
                def remote() -> Ref:
                    return Ref({})

            class load:
                @staticmethod
                def remote() -> Ref:
                    return Ref({"node": "n"})

        return Actor()

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref: Ref):
        if isinstance(ref.answer, Exception):
            raise ref.answer
        return ref.answer

    def kill(self, actor) -> None:
        pass


def schedule(shards: int, workers: int = 8, kills: frozenset[int] = frozenset()) -> tuple[float, list[int], Instant]:
    """Driver seconds (CPU time) to run `shards` one-row shards on stand-in workers."""
    ray = Instant(kills)
    done: list[int] = []
    started = time.process_time()
    run_shards(
        ray.actor,
        (shard(i) for i in range(shards)),
        1,
        lambda task, result: done.append(task.index),
        lambda text: None,
        workers,
        ray_api=ray,
    )
    return time.process_time() - started, done, ray


def test_scheduling_cost_grows_linearly_with_the_number_of_shards():
    """Ten times the shards, about ten times the driver's time (the old queue scan: a hundred).
    A ratio within one run, so that a slow or busy machine does not matter."""
    schedule(1_000)  # warm up
    small, done_small, _ = schedule(2_000)
    large, done_large, _ = schedule(20_000)
    assert sorted(done_small) == list(range(2_000)) and sorted(done_large) == list(range(20_000))
    assert large < 30 * small, (small, large)


def test_shards_are_drawn_from_the_input_only_as_workers_free_up():
    drawn = []
    finished = []
    ray = Instant()

    def tasks():
        for i in range(500):
            drawn.append(i)
            # Never more than the pool's places (2 per worker) ahead of what has come back, plus
            # the one piece drawn and waiting for a place.
            assert len(drawn) - len(finished) <= 2 * 3 + 1
            yield shard(i)

    run_shards(ray.actor, tasks(), 1, lambda t, r: finished.append(t.index), print, 3, ray_api=ray)
    assert sorted(finished) == list(range(500))


def test_a_row_that_kills_every_worker_is_isolated_and_the_rest_are_scored():
    _, done, ray = schedule(40, workers=3, kills=frozenset({17}))
    assert sorted(done) == list(range(40))  # 17 once, as its error row
    assert ray.sent == 40 + 2  # row 17 tried three times: it runs alone each time
