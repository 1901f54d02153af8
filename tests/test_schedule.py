"""The actor pool's dispatch, with stand-in actors that record which shards they were given."""

from __future__ import annotations

import pyarrow as pa
import pytest

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
        def __init__(self):
            self.seen = []

        def score(self, task):
            self.seen.append(task.index)
            return error_result(task, 1, "not scored")

        def shards(self):
            return self.seen

    actors = [Recorder.remote() for _ in range(2)]
    done = []
    deaths = run_shards(lambda: None, actors, [shard(0), shard(1)], 1, lambda t, r: done.append(t.index), print)
    assert deaths == 0 and sorted(done) == [0, 1]
    assert sorted(ray.get([a.shards.remote() for a in actors])) == [[0], [1]]  # one each, not both on one
