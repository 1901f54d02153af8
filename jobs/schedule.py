"""Run shards on a pool of actors: at most two in flight per actor, dead actors replaced.

A worker that dies costs only its in-flight shards, which run again on a live worker. The shard
that was running when a worker died is blamed for it; after MAX_DEATHS it is bisected, each piece
gets one more try, and a single row that still kills its worker becomes an error row.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pyarrow as pa

from bulkscore.jobs.cluster import PoolPlan
from bulkscore.jobs.errors import JobError
from bulkscore.workers.actor import ShardScorer
from bulkscore.workers.contract import ModelSpec, ScoringSettings, ShardTask, error_result

IN_FLIGHT_PER_WORKER = 2
MAX_DEATHS = 3  # deaths of a whole shard before it is bisected
WAIT_S = 0.5


@dataclass
class Work:
    task: ShardTask
    deaths: int = 0  # workers that died while running this piece or a piece holding it
    tries_left: int = MAX_DEATHS  # before this piece is split (or, for one row, given up)


def start_workers(plan: PoolPlan, model: ModelSpec, scoring: ScoringSettings) -> tuple[Callable, list, list[dict]]:
    """Start the actors and wait until each has loaded its model; refuse a model that fails to load.

    Returns a function that starts one more actor, the actors, and what each reports of itself.
    """
    import ray

    # The shards in flight on a worker run at once, so that its engine refills one's free decode
    # slots with the other's rows.
    scorer = ray.remote(ShardScorer).options(
        num_cpus=plan.cpus_per_worker,
        num_gpus=plan.gpus_per_worker,
        max_restarts=0,
        max_concurrency=IN_FLIGHT_PER_WORKER,
    )

    def start_one():
        return scorer.remote(model, scoring)

    actors = [start_one() for _ in range(plan.workers)]
    infos = ray.get([a.info.remote() for a in actors])
    for info in infos:
        if info.get("error"):
            for actor in actors:
                ray.kill(actor)
            raise JobError(f"a worker could not load the model: {info['error']}")
    return start_one, actors, infos


def after_death(work: Work, cause: str, num_samples: int) -> tuple[list[Work], pa.Table | None]:
    """What to do with a piece whose worker died running it: retry it, split it, or give up on it."""
    work.deaths += 1
    work.tries_left -= 1
    if work.tries_left > 0:
        return [work], None
    if work.task.size == 1:
        message = f"worker died: {work.deaths} workers died running this row (last: {cause})"
        return [], error_result(work.task, num_samples, message)
    # Each half gets one try: a half that kills its worker again is split again.
    return [Work(half, work.deaths, 1) for half in work.task.halves()], None


def death_cause(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


class Pool:
    """Which worker takes the next piece, in O(1) per piece whatever the number of shards.

    Workers sit in buckets by how many pieces they run (0 or 1; a full one is in none), so the least
    busy one is found without a scan. A piece that has been running when a worker died (a suspect)
    runs alone, so that a death there is its own: it takes an idle worker, which then takes nothing
    else until it is done.
    """

    def __init__(self, actors: Sequence) -> None:
        self.in_flight: dict = {}  # live actor -> [(ref, work)], in the order it runs them
        self.buckets: list[dict] = [{} for _ in range(IN_FLIGHT_PER_WORKER)]  # load -> {actor: None}
        for actor in actors:
            self.add(actor)

    def add(self, actor) -> None:
        self.in_flight[actor] = []
        self.buckets[0][actor] = None

    def taker(self, work: Work):
        """The least busy worker that can take `work` now, or None."""
        if work.deaths:
            return next(iter(self.buckets[0]), None)
        return next((next(iter(b)) for b in self.buckets if b), None)

    def launch(self, actor, ref, work: Work) -> None:
        self.unbucket(actor)
        self.in_flight[actor].append((ref, work))
        self.rebucket(actor)

    def finish(self, actor, ref, work: Work) -> None:
        self.unbucket(actor)
        self.in_flight[actor].remove((ref, work))
        self.rebucket(actor)

    def remove(self, actor) -> list[tuple]:
        """Forget a dead worker; returns what it was running."""
        self.unbucket(actor)
        return self.in_flight.pop(actor)

    def unbucket(self, actor) -> None:
        for bucket in self.buckets:
            bucket.pop(actor, None)

    def rebucket(self, actor) -> None:
        running = self.in_flight[actor]
        if len(running) < IN_FLIGHT_PER_WORKER and not any(w.deaths for _, w in running):
            self.buckets[len(running)][actor] = None


def run_shards(
    start_one: Callable,
    actors: Sequence,
    tasks: Iterable[ShardTask],
    num_samples: int,
    on_result: Callable[[ShardTask, pa.Table], None],
    say: Callable[[str], None],
    ray_api=None,
) -> int:
    """Score every task; returns how many workers died on the way.

    `tasks` is drawn as workers free up, so it may be a generator over an input larger than memory.
    The driver's work per finished piece does not grow with the number of shards. `ray_api` stands
    in for the `ray` module in tests (wait, get, kill).
    """
    if ray_api is None:
        import ray as ray_api
    from ray.exceptions import OutOfMemoryError, RayActorError, RayTaskError, WorkerCrashedError

    died = (RayActorError, WorkerCrashedError, OutOfMemoryError)
    fresh = iter(tasks)
    suspects: deque[Work] = deque()  # pieces that were running when a worker died: each runs alone
    again: deque[Work] = deque()  # pieces lost with a worker that did not cause it: before fresh ones
    upcoming: deque[Work] = deque()  # the next fresh piece, drawn but not placed yet
    pool = Pool(actors)
    owner: dict = {}  # ref -> (actor, work)
    deaths = 0

    def next_piece() -> Work | None:
        if again:
            return again[0]
        if not upcoming:
            task = next(fresh, None)
            if task is None:
                return None
            upcoming.append(Work(task))
        return upcoming[0]

    def launch(actor, work: Work) -> None:
        ref = actor.score.remote(work.task)
        pool.launch(actor, ref, work)
        owner[ref] = (actor, work)

    def fill() -> None:
        while suspects and (actor := pool.taker(suspects[0])) is not None:
            launch(actor, suspects.popleft())
        while (work := next_piece()) is not None and (actor := pool.taker(work)) is not None:
            (again or upcoming).popleft()
            launch(actor, work)

    def get(ref, work: Work) -> pa.Table:
        try:
            return ray_api.get(ref)
        except RayTaskError as error:
            raise JobError(f"shard {work.task.index} failed: {error.cause!r}") from None

    while True:
        fill()
        if not owner:
            break
        # A bounded wait gives Python a moment to act on Ctrl-C between checks.
        ready, _ = ray_api.wait(list(owner), num_returns=1, timeout=WAIT_S)
        if not ready:
            continue
        actor, work = owner.pop(ready[0])
        try:
            result = get(ready[0], work)
        except died as error:
            # The worker is gone with everything it had: keep what it finished, blame the piece
            # that was running (the first unfinished one), and run the rest again elsewhere.
            deaths += 1
            lost = pool.remove(actor)
            ray_api.kill(actor)
            pool.add(start_one())
            blamed = None
            for ref, piece in lost:
                owner.pop(ref, None)
                try:
                    on_result(piece.task, get(ref, piece))
                    continue
                except died:
                    pass
                if blamed is None:
                    blamed = piece
                    task = piece.task
                    say(
                        f"A worker died running rows {task.start}-{task.stop - 1} of shard {task.index}; "
                        f"starting a replacement ({death_cause(error)})"
                    )
                    retry, given_up = after_death(piece, death_cause(error), num_samples)
                    suspects.extendleft(reversed(retry))
                    if given_up is not None:
                        on_result(piece.task, given_up)
                else:
                    again.append(piece)
            continue
        pool.finish(actor, ready[0], work)
        on_result(work.task, result)
    return deaths
