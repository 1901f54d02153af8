"""Run shards on a pool of actors that comes and goes: at most two shards in flight per worker.

A worker is started, then placed by Ray (when the cluster has room), then loads its model; only a
loaded worker is given work, so one that Ray cannot place holds none and the job goes on with the
others until room comes (a node added back, an autoscaler). A worker that dies, at any moment, or
that stops making progress (hangs) is replaced; it costs only its in-flight shards, which run again.

Rows are given up only on evidence, and the evidence is weighed against chance: the job's
background death rate, the deaths of workers that ran no suspect (loading, idle or running
ordinary pieces), less those that ran the piece judged, per second the workers lived so once
placed. A worker that dies `t` seconds into a piece's run is hit that early by chance with
probability 1 - exp(-rate * t); over several deaths, Fisher's method gives how often chance would
bring them all that early.

The piece that was running when its worker died becomes a suspect, and runs alone from then on,
once that chance is below SUSPECT_CHANCE (at once in a calm job, or after a hang); until then it is
retried beside the others. A suspect piece whose worker dies again is split in halves, and a single
row is given up after ROW_DEATHS deaths while it ran alone, each on a fresh worker, where chance
would bring them less than once in 1/CHANCE, or after MAX_ROW_DEATHS deaths alone whatever the
others. A hang is the driver's own finding and always counts. With no deaths around, a poison row
is given up after ROW_DEATHS deaths alone; under churn (spot preemptions, out-of-memory kills
elsewhere) a row is suspected and given up only if its workers die sooner and more often than the
others do.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from bulkscore.jobs.cluster import PoolPlan, Room
from bulkscore.jobs.errors import JobError
from bulkscore.workers.actor import ShardScorer
from bulkscore.workers.contract import RESULT_SCHEMA, ModelSpec, ScoringSettings, ShardTask, error_result

IN_FLIGHT_PER_WORKER = 2
ROW_DEATHS = 3  # unexplained deaths while a single row ran alone before it is given up
MAX_ROW_DEATHS = 10  # deaths alone that give a row up whatever the job's background deaths
CHANCE = 1e-4  # deaths that random ones would match this rarely are the row's
SUSPECT_CHANCE = 1e-2  # a piece whose deaths random ones would match more often goes on with the others
WAIT_S = 0.5
CHECK_EVERY_S = 0.5  # how often workers' progress and the cluster's room are looked at
SAY_WAITING_AFTER_S = 3.0  # a worker not placed this long is worth a message
SPREAD_WHILE_LOADING_S = 60.0  # while a worker loads (this long at most), the others take one piece each
DEFAULT_PLACEMENT_TIMEOUT_S = 600.0
DEFAULT_HANG_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Patience:
    """How long the job waits before it calls something stuck (both are run options)."""

    placement_s: float = DEFAULT_PLACEMENT_TIMEOUT_S  # no worker placed at all for this long: stop
    hang_s: float = DEFAULT_HANG_TIMEOUT_S  # a busy worker that finishes no model call for this long hangs

    @property
    def probe_s(self) -> float:
        return max(0.2, min(10.0, self.hang_s / 4))


@dataclass
class Work:
    task: ShardTask
    suspect: bool = False  # was running when a worker died or hung: runs alone from now on
    alone: int = 0  # workers that died or hung while this piece ran alone
    around: int = 0  # workers that died or hung while this piece (or one holding it) ran
    died: int = 0  # of `alone`, the deaths (not hangs)
    doubted: int = 0  # deaths while it ran beside others, before it was a suspect
    doubt: float = 0.0  # their surprise (as `surprise`)
    surprise: float = 0.0  # -log of the product of the chances that random deaths came as early
    background: int = 0  # deaths counted in the job's background that happened while it (or one holding it) ran
    launched: float = 0.0


@dataclass(eq=False)
class Worker:
    actor: Any
    number: int
    started: float
    placed: bool = False  # Ray found it room and it runs
    placed_at: float = 0.0
    info: dict | None = None  # what it reports once its model is loaded
    running: list = field(default_factory=list)  # [(ref, Work)], in the order it runs them
    refs: set = field(default_factory=set)  # its outstanding where/load/progress calls
    heard: float = 0.0  # when it last showed progress (or took work while idle)
    calls: int = -1  # its model calls at the last probe
    probe: Any = None
    probed: float = 0.0
    suspect_s: float = 0.0  # seconds it ran suspect pieces, finished ones
    suspect_since: float | None = None  # when the suspect piece it runs began

    def ordinary_s(self, now: float) -> float:
        """Seconds it lived running no suspect piece since it was placed (a process that could die):
        its share of the background exposure."""
        if not self.placed:
            return 0.0
        running = now - self.suspect_since if self.suspect_since is not None else 0.0
        return now - self.placed_at - self.suspect_s - running


@dataclass
class Background:
    """Deaths no suspect piece can explain (workers loading, idle or running ordinary pieces) and the
    seconds the dead workers lived so."""

    deaths: int = 0
    seconds: float = 0.0

    def rate(self, now: float, alive: Iterable[Worker], own: int) -> float:
        """Deaths per worker-second, the living workers' seconds included, less `own` deaths (those of
        the piece judged: its first death came while it ran as an ordinary piece)."""
        seconds = self.seconds + sum(w.ordinary_s(now) for w in alive)
        return (self.deaths - own) / max(seconds, 1e-3)


def chance_of(deaths: int, surprise: float) -> float:
    """How often `deaths` random deaths would each come as early as a row's did, where the product of
    their chances is exp(-surprise) (Fisher's method): P(Poisson(surprise) < deaths)."""
    if deaths == 0:
        return 1.0
    if math.isinf(surprise):
        return 0.0
    term = below = math.exp(-surprise)
    for k in range(1, deaths):
        term *= surprise / k
        below += term
    return min(1.0, below)


def start_workers(plan: PoolPlan, model: ModelSpec, scoring: ScoringSettings, spare: bool = False) -> Callable[[], Any]:
    """A function that starts one actor (and returns at once: Ray places it when it can). A `spare`
    asks Ray for no CPU: it waits, loaded, to take a dead worker's place and its CPUs (on a private
    instance, whose CPUs are all the job's)."""
    import ray

    # The shards in flight on a worker run at once, so that its engine refills one's free decode
    # slots with the other's rows; one more thread answers progress probes while they run.
    scorer = ray.remote(ShardScorer).options(
        num_cpus=0 if spare else plan.cpus_per_worker,
        num_gpus=plan.gpus_per_worker,
        max_restarts=0,
        max_concurrency=IN_FLIGHT_PER_WORKER + 1,
    )
    return lambda: scorer.remote(model, scoring)


def after_death(
    work: Work,
    cause: str,
    alone: bool,
    num_samples: int,
    schema: pa.Schema = RESULT_SCHEMA,
    ran_s: float = 0.0,
    rate: float = 0.0,
) -> tuple[list[Work], pa.Table | None]:
    """What to do with a piece whose worker died (or hung) `ran_s` after it began: retry it alone,
    split it, or give up on it (a single row whose deaths alone chance at `rate` deaths per
    worker-second cannot explain; see the module's text): its result rows in `schema`."""
    work.around += 1
    if not alone or not work.suspect:
        doubt(work, cause, ran_s, rate)
        return [work], None
    work.alone += 1
    if work.task.size > 1:
        halves = work.task.halves()
        return [Work(h, suspect=True, around=work.around, background=work.background) for h in halves], None
    if what_happened(cause) == "died":
        work.died, work.surprise = work.died + 1, work.surprise + surprise(ran_s, rate)
    random_ones = work.died if chance_of(work.died, work.surprise) >= CHANCE else 0
    if work.alone - random_ones < ROW_DEATHS and work.alone < MAX_ROW_DEATHS:
        return [work], None
    what = what_happened(cause)
    message = f"worker {what}: {work.alone} workers {what} running this row alone, {work.around} in all (last: {cause})"
    return [], error_result(work.task, num_samples, message, schema)


def surprise(ran_s: float, rate: float) -> float:
    """-log of the chance that a random death, at `rate` deaths per worker-second, comes within ran_s."""
    chance = -math.expm1(-rate * ran_s)
    return -math.log(chance) if chance > 0 else math.inf


def doubt(work: Work, cause: str, ran_s: float, rate: float) -> None:
    """A piece that ran beside others when its worker died (or hung) becomes a suspect, to run alone,
    once chance would bring its deaths that soon less than once in 1/SUSPECT_CHANCE (at once in a calm
    job, and after a hang); until then it goes on with the others, which under churn keeps every
    worker running two pieces instead of one."""
    work.doubted += 1
    work.doubt += math.inf if what_happened(cause) == "hung" else surprise(ran_s, rate)
    work.suspect = chance_of(work.doubted, work.doubt) < SUSPECT_CHANCE


def what_happened(cause: str) -> str:
    """ "hung" for a worker the driver killed for making no progress (its cause starts so), else "died"."""
    return "hung" if cause.startswith("hung") else "died"


def never_ran(error: BaseException) -> bool:
    return "never ran" in str(error) or "creation cancelled" in str(error)


def death_cause(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    cause = text[0][:300] if text else type(error).__name__
    return cause + " (it never ran: Ray cancelled it before it started)" if never_ran(error) else cause


class Pool:
    """Which loaded worker takes the next piece, in O(1) per piece whatever the number of shards.

    Workers sit in buckets by how many pieces they run (0 or 1; a full one is in none), so the least
    busy one is found without a scan. A suspect piece runs alone, so that a death there is its own:
    it takes an idle worker, which then takes nothing else until it is done.
    """

    def __init__(self) -> None:
        self.workers: set[Worker] = set()
        self.buckets: list[dict] = [{} for _ in range(IN_FLIGHT_PER_WORKER)]  # load -> {worker: None}

    def add(self, worker: Worker) -> None:
        self.workers.add(worker)
        self.buckets[0][worker] = None

    def taker(self, work: Work, busy_too: bool = True) -> Worker | None:
        """The least busy worker that can take `work` now, or None; with `busy_too` false, only an idle one."""
        if work.suspect or not busy_too:
            return next(iter(self.buckets[0]), None)
        return next((next(iter(b)) for b in self.buckets if b), None)

    def launch(self, worker: Worker, ref, work: Work) -> None:
        self.unbucket(worker)
        worker.running.append((ref, work))
        self.rebucket(worker)

    def finish(self, worker: Worker, ref, work: Work) -> None:
        self.unbucket(worker)
        worker.running.remove((ref, work))
        self.rebucket(worker)

    def remove(self, worker: Worker) -> None:
        self.unbucket(worker)
        self.workers.discard(worker)

    def unbucket(self, worker: Worker) -> None:
        for bucket in self.buckets:
            bucket.pop(worker, None)

    def rebucket(self, worker: Worker) -> None:
        running = worker.running
        if len(running) < IN_FLIGHT_PER_WORKER and not any(w.suspect for _, w in running):
            self.buckets[len(running)][worker] = None


@dataclass
class Outcome:
    deaths: int = 0  # workers that died or hung
    hangs: int = 0
    infos: list[dict] = field(default_factory=list)  # what each worker that loaded reported


def run_shards(
    start_one: Callable[[], Any],
    tasks: Iterable[ShardTask],
    num_samples: int,
    on_result: Callable[[ShardTask, pa.Table], None],
    say: Callable[[str], None],
    workers: int,
    patience: Patience = Patience(),
    on_ready: Callable[[dict], None] = lambda info: None,
    room: Room | None = None,
    ray_api=None,
    schema: pa.Schema = RESULT_SCHEMA,
    start_spare: Callable[[], Any] | None = None,
) -> Outcome:
    """Score every task on `workers` actors made by `start_one`, replaced as they die or hang; a row
    given up gets result rows in `schema` (the job's task's).

    With `start_spare`, once a worker has died one spare is kept loading or loaded beside the pool,
    holding no work: the next worker that dies is replaced by it at once, not after a whole start-up
    (a process's boot, its imports and its model's load), and a new spare starts in its place.

    `tasks` is drawn as workers free up, so it may be a generator over an input larger than memory.
    The driver's work per finished piece does not grow with the number of shards. `ray_api` stands
    in for the `ray` module in tests (wait, get, kill).
    """
    room = room or Room()
    if ray_api is None:
        import ray as ray_api
    from ray.exceptions import (
        ObjectLostError,
        OutOfMemoryError,
        RayActorError,
        RayError,
        RaySystemError,
        RayTaskError,
        WorkerCrashedError,
    )

    # A result lost with its node (ObjectLostError) is as lost as the worker that made it. A call on
    # an actor whose creation Ray cancelled can end in a RaySystemError ("Actor creation cancelled")
    # instead of a RayActorError, depending on when Ray learns of it: the worker never ran either way.
    died = (RayActorError, WorkerCrashedError, OutOfMemoryError, ObjectLostError, RaySystemError)
    fresh = iter(tasks)
    suspects: deque[Work] = deque()  # pieces that were running when a worker died: each runs alone
    again: deque[Work] = deque()  # pieces lost with a worker that did not cause it: before fresh ones
    upcoming: deque[Work] = deque()  # the next fresh piece, drawn but not placed yet
    pool = Pool()
    starting: set[Worker] = set()  # not loaded yet: placed or waiting for room
    spares: set[Worker] = set()  # loading or loaded, no work: the next dead worker's replacement
    owner: dict = {}  # shard ref -> (worker, work)
    calls: dict = {}  # where/load/progress ref -> (kind, worker)
    numbers = itertools.count(1)
    outcome = Outcome()
    background = Background()
    start_deaths = 0  # in a row, with no worker loaded in between
    no_room_since: float | None = None
    said_waiting: tuple | None = None
    checked = 0.0

    def call(worker: Worker, kind: str, ref) -> None:
        calls[ref] = (kind, worker)
        worker.refs.add(ref)

    def start(spare: bool = False) -> None:
        worker = Worker((start_spare if spare else start_one)(), next(numbers), time.monotonic())
        call(worker, "where", worker.actor.where.remote())
        call(worker, "load", worker.actor.load.remote())
        (spares if spare else starting).add(worker)

    def replace() -> None:
        """A dead worker's replacement: the spare, loaded or not, else a fresh one; then a new spare."""
        if spares:
            spare = spares.pop()
            if spare.info is None:
                starting.add(spare)
            else:
                pool.add(spare)
        else:
            start()
        if start_spare is not None and not spares:
            start(spare=True)

    def next_piece() -> Work | None:
        if again:
            return again[0]
        if not upcoming:
            task = next(fresh, None)
            if task is None:
                return None
            upcoming.append(Work(task))
        return upcoming[0]

    def launch(worker: Worker, work: Work) -> None:
        work.launched = now = time.monotonic()
        if not worker.running:
            worker.heard = now
        if work.suspect:
            worker.suspect_since = now
        ref = worker.actor.score.remote(work.task)
        pool.launch(worker, ref, work)
        owner[ref] = (worker, work)

    def fill() -> None:
        while suspects and (worker := pool.taker(suspects[0])) is not None:
            launch(worker, suspects.popleft())
        # While other workers are loading (or were just started), a worker takes one piece, not two,
        # so that the first shards spread over the pool.
        now = time.monotonic()
        spread = any(
            now - w.placed_at < SPREAD_WHILE_LOADING_S if w.placed else now - w.started < SAY_WAITING_AFTER_S
            for w in starting
        )
        while (work := next_piece()) is not None and (worker := pool.taker(work, not spread)) is not None:
            (again or upcoming).popleft()
            launch(worker, work)

    def get(ref, work: Work) -> pa.Table:
        try:
            return ray_api.get(ref)
        except RayTaskError as error:
            raise JobError(f"shard {work.task.index} failed: {error.cause!r}") from None

    def lose(worker: Worker, cause: str) -> None:
        """The worker is gone (dead, or hung and killed) with everything it had: keep what it
        finished, blame the piece that was running (the first unfinished one), run the rest again
        elsewhere, and start a replacement."""
        nonlocal start_deaths
        now = time.monotonic()
        outcome.deaths += 1
        outcome.hangs += what_happened(cause) == "hung"
        background.seconds += worker.ordinary_s(now)
        ordinary = worker.suspect_since is None
        background.deaths += ordinary
        was_spare = worker in spares
        pool.remove(worker)
        starting.discard(worker)
        spares.discard(worker)
        for ref in worker.refs:
            calls.pop(ref, None)
        ray_api.kill(worker.actor)
        lost = worker.running
        for ref, _ in lost:
            owner.pop(ref, None)
        finished = set(ray_api.wait([r for r, _ in lost], num_returns=len(lost), timeout=0)[0]) if lost else set()
        unfinished = []
        for ref, piece in lost:
            if ref in finished:
                try:
                    on_result(piece.task, get(ref, piece))
                    continue
                except died:
                    pass
            piece.background += ordinary
            unfinished.append(piece)
        if unfinished:
            blamed, task = unfinished[0], unfinished[0].task
            what = what_happened(cause)
            say(
                f"A worker {what} running rows {task.start}-{task.stop - 1} of shard {task.index}; "
                f"starting a replacement ({cause})"
            )
            rate = background.rate(now, [*pool.workers, *starting, *spares], blamed.background)
            retry, given_up = after_death(
                blamed, cause, len(unfinished) == 1, num_samples, schema, now - blamed.launched, rate
            )
            if given_up is not None:
                on_result(blamed.task, given_up)
            # The others that ran beside it are doubted too (a culprit running second would
            # otherwise go on killing workers while its neighbour takes the blame), unblamed.
            for piece in unfinished[1:]:
                doubt(piece, cause, now - piece.launched, rate)
            again_now = retry + unfinished[1:]
            suspects.extendleft(reversed([p for p in again_now if p.suspect]))
            again.extendleft(reversed([p for p in again_now if not p.suspect]))
        else:
            when = "while starting" if worker.info is None else "while idle"
            what = "The spare worker" if was_spare else "A worker"
            say(f"{what} died {when}; starting {'another' if was_spare else 'a replacement'} ({cause})")
            if worker.info is None:
                start_deaths += 1
                if start_deaths >= max(5, 2 * workers) and not pool.workers:
                    raise JobError(room.start_failure(cause))
        if was_spare:
            start(spare=True)
        else:
            replace()

    def loaded(worker: Worker, info: dict) -> None:
        nonlocal start_deaths
        if info.get("error"):
            raise JobError(f"a worker could not load the model: {info['error']}")
        start_deaths = 0
        if not worker.placed:  # its load answered first
            worker.placed, worker.placed_at = True, time.monotonic()
        worker.info = info
        outcome.infos.append(info)
        if worker in spares:
            return
        starting.discard(worker)
        pool.add(worker)
        on_ready(info)

    def count_the_dead() -> None:
        """At the end, a worker that died idle (the spare, or one with nothing left to do) has no call
        to fail: each loaded one is asked once, so that every death is counted."""
        probes = {w.actor.progress.remote(): w for w in [*pool.workers, *spares] if w.info is not None}
        ready = ray_api.wait(list(probes), num_returns=len(probes), timeout=2.0)[0] if probes else []
        for ref in ready:
            try:
                ray_api.get(ref)
            except died:
                outcome.deaths += 1

    def heard_from(worker: Worker, progress: int) -> None:
        worker.probe = None
        if progress != worker.calls:
            worker.calls, worker.heard = progress, time.monotonic()

    def unplaced() -> list[Worker]:
        """Started workers Ray has not found room for yet."""
        return [w for w in starting if not w.placed]

    def check(now: float) -> None:
        """Probe busy workers, kill hung ones; stop if no worker at all can be placed."""
        nonlocal no_room_since, said_waiting
        for worker in list(pool.workers):
            if not worker.running:
                continue
            if now - worker.heard > patience.hang_s:
                lose(worker, f"hung: no model call finished in {patience.hang_s:g} s")
            elif worker.probe is None and now - worker.probed >= patience.probe_s:
                worker.probe, worker.probed = worker.actor.progress.remote(), now
                call(worker, "progress", worker.probe)
        for worker in [w for w in spares if w.info is not None and w.probe is None]:
            # A loaded spare has no call that its death would fail: asked how it is, so its death is seen.
            worker.probe = worker.actor.progress.remote()
            call(worker, "progress", worker.probe)
        for worker in [w for w in starting if w.placed and now - w.placed_at > patience.placement_s]:
            lose(worker, f"hung: its model did not load in {patience.placement_s:g} s")
        waiting = unplaced()
        if pool.workers or len(waiting) < len(starting):
            no_room_since = None
        elif no_room_since is None:
            no_room_since = now
        elif now - no_room_since > patience.placement_s:
            raise JobError(
                f"no worker could be placed for {patience.placement_s:g} s: {room.describe()}. Finished "
                "shards are kept; the same command resumes when the cluster has room (or ask for less: "
                "--workers, --cpus-per-worker, --gpus-per-worker)"
            )
        long_waiting = [w for w in waiting if now - w.started > SAY_WAITING_AFTER_S]
        state = len(long_waiting)
        if long_waiting and state != said_waiting:
            say(
                f"{len(pool.workers)} of {workers} workers running; waiting for room for "
                f"{len(long_waiting)} more ({room.describe()})"
            )
            said_waiting = state
        elif not long_waiting:
            said_waiting = None

    def say_short_handed() -> None:
        """At the end, workers still waiting for room that the cluster does not have are worth a line:
        the job ran short-handed, however soon it ended after they were started."""
        waiting = unplaced()
        if waiting and not room.fits_a_worker():
            say(
                f"Finished with {len(pool.workers)} of {workers} workers running; {len(waiting)} more "
                f"never found room ({room.describe()})"
            )

    try:
        for _ in range(workers):
            start()
        while True:
            fill()
            if not owner and not suspects and next_piece() is None:
                count_the_dead()
                say_short_handed()
                break
            now = time.monotonic()
            if now - checked >= CHECK_EVERY_S:
                checked = now
                check(now)
            # A bounded wait gives Python a moment to act on Ctrl-C between checks.
            ready, _ = ray_api.wait([*owner, *calls], num_returns=1, timeout=WAIT_S)
            if not ready:
                continue
            ref = ready[0]
            if ref in calls:
                kind, worker = calls.pop(ref)
                worker.refs.discard(ref)
                try:
                    answer = ray_api.get(ref)
                except died as error:
                    lose(worker, death_cause(error))
                    continue
                except RayTaskError as error:
                    raise JobError(f"a worker failed in {kind}: {error.cause!r}") from None
                if kind == "where":
                    worker.placed, worker.placed_at = True, time.monotonic()
                elif kind == "load":
                    loaded(worker, answer)
                else:
                    heard_from(worker, answer)
                continue
            worker, work = owner.pop(ref)
            try:
                result = get(ref, work)
            except died as error:
                owner[ref] = (worker, work)  # lose() accounts for it with the worker's others
                lose(worker, death_cause(error))
                continue
            pool.finish(worker, ref, work)
            worker.heard = time.monotonic()
            if work.suspect:
                worker.suspect_s += worker.heard - worker.suspect_since
                worker.suspect_since = None
            on_result(work.task, result)
    except RayError as error:
        # Ray can report an actor it cancelled before it ran from other calls too (its kill, a
        # submission): with no worker loaded, that is the start failure, said as such.
        if pool.workers or not never_ran(error):
            raise
        raise JobError(room.start_failure(death_cause(error))) from None
    finally:
        for worker in [*starting, *pool.workers, *spares]:
            try:
                ray_api.kill(worker.actor)
            except Exception:  # the connection may be gone already: the error that ended the job matters
                pass
    return outcome
