"""Log-likelihood of continuations after a context, on fixed-shape tiles (tiles.py says why).

A request is a context and its continuations (a multiple-choice question: one per choice; a
loglikelihood row or a perplexity window: one). Its context is prefilled once, in one tile row,
followed in that row by its first continuation of more than one token:
  - every continuation's first token is scored from the logits after the context's last token;
  - another continuation's later tokens are fed in a row that holds the context's keys and values:
    the context's own row, in place, once its previous continuation is done, or a free row that
    copies them (positions 0..n-1, one copy per layer for all rows that start in a call).
So k choices cost one context and k short continuations, not k contexts (lm-eval recomputes the
context for each choice). Each row's chunks are cut by its own lengths (the context and first
continuation together from their end; each other continuation from its end), so a continuation's
numbers are the same whichever row, neighbours or batch it ran in, and whether its row copied the
context or continued in place.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bulkscore.workers.losses import fusable, fused_scores, scores_in_chunks
from bulkscore.workers.models import LoadedModel
from bulkscore.workers.tiles import CHUNK, PREFILL_ROWS, Tile, cache_length, chunks, right_aligned, tile_rows


@dataclass(frozen=True)
class Continuations:
    """Token ids of a context (at least one) and of each continuation to score after it (each at least one)."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]

    @property
    def positions(self) -> int:
        """Cache positions its rows use: the context and the longest continuation but its last token."""
        return len(self.context) + max(map(len, self.continuations)) - 1


@dataclass(frozen=True)
class Scored:
    """One continuation: the sum of its tokens' log-probs, and whether each token is the argmax."""

    logprob: float
    is_greedy: bool
    num_tokens: int


@dataclass
class Tally:
    """A continuation's scores so far."""

    logprob: float = 0.0
    greedy: bool = True
    tokens: int = 0

    def add(self, logprob: float, greedy: bool) -> None:
        self.logprob += logprob
        self.greedy = self.greedy and greedy
        self.tokens += 1


@dataclass
class Stream:
    """What one tile row is fed: its tokens in pieces cut from their end, each token's target, and
    which of them score what. A context's row feeds the context and then its first continuation of
    more than one token (all but that one's last token); another continuation's row feeds that
    continuation (all but its last) after a copy of the context."""

    request: int
    pieces: list[tuple[Sequence[int], int]]  # (tokens, first position)
    targets: list[Sequence[int]]  # each piece's fed tokens' next ones (0 where nothing is scored)
    context_end: int | None  # which fed token is the context's last (its logits score first tokens)
    continuation: int | None  # whose tokens the targets from `scored_from` on are
    scored_from: int = 0  # the first fed token whose target is scored
    fed: int = 0  # pieces fed
    done: int = 0  # tokens fed

    def columns(self, width: int) -> tuple[int | None, int | None]:
        """Where this call's piece holds the context's last token, and the first column it scores
        (None for either where it has none): pieces sit in the last columns of a call."""
        end = self.done + len(self.pieces[self.fed][0])
        last = None
        if self.context_end is not None and self.done <= self.context_end < end:
            last = width - (end - self.context_end)
        first = max(self.done, self.scored_from)
        scores = self.continuation is not None and first < end
        return last, width - (end - first) if scores else None


def stream(request: int, fed: Sequence[int], targets: Sequence[int], start: int, width: int, **where) -> Stream:
    return Stream(request, chunks(fed, start, width), [p for p, _ in chunks(targets, 0, width)], **where)


class Group:
    """The requests of one cache length, on one tile of [rows, CHUNK]."""

    def __init__(self, lm: LoadedModel, requests: Sequence[Continuations], length: int, in_flight: int | None) -> None:
        self.lm, self.requests = lm, requests
        self.tile = Tile(lm, tile_rows(PREFILL_ROWS, length, lm.tile_scale), length, CHUNK)
        self.in_flight = min(self.tile.rows, in_flight or self.tile.rows)
        self.rows: list[Stream | None] = [None] * self.tile.rows
        self.owner: dict[int, int] = {}  # row -> the request whose context it holds
        self.later: dict[int, deque[int]] = {}  # context row -> continuations to run once the context is in
        self.queued: dict[int, deque[int]] = {}  # context row -> continuations ready to run from it
        self.tallies: dict[int, list[Tally]] = {}

    def run(self, members: Sequence[int], tick: Callable[[], None]) -> None:
        waiting = deque(sorted(members, key=lambda i: (-self.requests[i].positions, i)))
        while waiting or any(self.rows) or any(self.queued.values()):
            self.fill(waiting)
            self.step()
            tick()

    def fill(self, waiting: deque[int]) -> None:
        """Free rows take, in turn: their own request's next continuation (in place), another row's
        (from a copy of its context), a new request's context."""
        free = [r for r in range(self.in_flight) if self.rows[r] is None]
        for row in [r for r in free if self.queued.get(r)]:
            self.rows[row] = self.continuation_stream(row)
            free.remove(row)
        copies: list[tuple[int, int]] = []  # (row, the context row it copies)
        for row in free:
            source = next((r for r, left in self.queued.items() if left), None)
            if source is not None:
                self.rows[row] = self.continuation_stream(source)
                copies.append((row, source))
            elif waiting:
                self.rows[row] = self.context_stream(waiting.popleft(), row)
        if copies:
            count = max(len(self.requests[self.rows[row].request].context) for row, _ in copies)
            self.tile.cache.take([r for r, _ in copies], self.tile.cache, [s for _, s in copies], count)
        for row in [r for r, left in self.queued.items() if not left and self.rows[r] is None]:
            del self.queued[row]  # nothing more comes from this context: the row is free

    def context_stream(self, index: int, row: int) -> Stream:
        """The request's context into `row`, then its first continuation of more than one token."""
        request = self.requests[index]
        context, n = request.context, len(request.context)
        self.tallies[index] = [Tally() for _ in request.continuations]
        longer = deque(j for j, c in enumerate(request.continuations) if len(c) > 1)
        own = longer.popleft() if longer else None
        self.owner[row], self.later[row] = index, longer
        tail = request.continuations[own] if own is not None else (0,)
        fed, targets = context + tail[:-1], (0,) * n + tail[1:]
        return stream(index, fed, targets, 0, self.tile.width, context_end=n - 1, continuation=own, scored_from=n)

    def continuation_stream(self, source: int) -> Stream:
        """The next queued continuation of the request whose context row `source` holds."""
        j = self.queued[source].popleft()
        index = self.owner[source]
        request = self.requests[index]
        tokens = request.continuations[j]
        return stream(
            index, tokens[:-1], tokens[1:], len(request.context), self.tile.width, context_end=None, continuation=j
        )

    def step(self) -> None:
        """One call: each row's next piece; the first tokens of the contexts that end here and the
        continuation tokens fed here are scored."""
        rows, width = self.rows, self.tile.width
        feeds = [run.pieces[run.fed] if run else None for run in rows]
        columns = [run.columns(width) if run else (None, None) for run in rows]
        ending = {row: last for row, (last, _) in enumerate(columns) if last is not None}
        scoring = {row: first for row, (_, first) in enumerate(columns) if first is not None}
        targets = None
        if scoring:
            targets = right_aligned([run and run.targets[run.fed] for run in rows], self.tile.rows, width, 0)[0]
        last_at = [ending.get(row, width - 1) for row in range(self.tile.rows)] if ending else None
        firsts, nll, greedy = tile_scores(self.lm, self.tile, feeds, last_at, targets)
        if ending:
            self.score_firsts(list(ending), firsts)
        if scoring:
            nll, greedy = nll.tolist(), greedy.tolist()  # [R][W]: one copy out for the whole call
            for row, first in scoring.items():
                run = rows[row]
                tally = self.tallies[run.request][run.continuation]
                for value, top in zip(nll[row][first:], greedy[row][first:]):
                    tally.add(-value, top)
        for row, run in enumerate(rows):
            if run is not None:
                run.done += len(feeds[row][0])
                run.fed += 1
                if run.fed == len(run.pieces):
                    rows[row] = None

    def score_firsts(self, ending: Sequence[int], logprobs: torch.Tensor) -> None:
        """Every continuation's first token, from the logits after its context's last ([R, V] log-probs)."""
        best = logprobs[torch.tensor(ending)].argmax(dim=-1).tolist()
        requests = [self.requests[self.rows[row].request] for row in ending]
        at = [row for row, request in zip(ending, requests) for _ in request.continuations]
        tokens = [c[0] for request in requests for c in request.continuations]
        values = iter(logprobs[torch.tensor(at), torch.tensor(tokens)].tolist())  # one copy out for all
        for row, request, top in zip(ending, requests, best):
            self.queued[row] = self.later.pop(row)  # its keys and values are in from this call on
            for tally, continuation in zip(self.tallies[self.rows[row].request], request.continuations):
                tally.add(next(values), continuation[0] == top)

    def results(self, index: int) -> list[Scored]:
        return [Scored(t.logprob, t.greedy, t.tokens) for t in self.tallies.pop(index)]


def tile_scores(
    lm: LoadedModel, tile: Tile, feeds: Sequence, last_at: Sequence[int] | None, targets: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One call of the tile: log-probs after each row's column last_at[r] ([R, V] float32; None
    without last_at), and given `targets` ([R, W]) each place's NLL and whether its target is the
    argmax ([R, W] each). Every product has the tile's shape whichever rows ask for it."""
    rows = torch.arange(tile.rows)
    if not fusable(lm):
        logits = tile.forward(feeds, last_only=False)  # [R, W, V]
        last = torch.log_softmax(logits[rows, torch.tensor(last_at)], dim=-1) if last_at else None
        return (last, *log_softmax_scores(logits, targets)) if targets is not None else (last, None, None)
    hidden = tile.hidden(feeds)  # [R, W, H]
    head = lm.model.get_output_embeddings()
    last = None
    if last_at:
        picked = hidden[rows.to(hidden.device), torch.tensor(last_at, device=hidden.device)]  # [R, H]
        last = torch.log_softmax(head(picked).float(), dim=-1)  # [R, V]
    if targets is None:
        return last, None, None
    if scores_in_chunks(lm):
        return last, *fused_scores(hidden, head.weight, targets)
    return last, *log_softmax_scores(head(hidden).float(), targets)


def log_softmax_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [R, W, V] float32; targets: [R, W]. Each target's NLL and whether it is the argmax of
    the log-probs (as lm-eval's HF backend takes it), [R, W] each."""
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = targets.to(logits.device)
    return -logprobs.gather(2, targets[..., None])[..., 0], logprobs.argmax(dim=-1) == targets


def score_continuations(
    lm: LoadedModel,
    requests: Sequence[Continuations],
    in_flight: int | None = None,
    tick: Callable[[], None] = lambda: None,
) -> list[list[Scored]]:
    """Each request's continuations scored after its context; each value depends on its request
    alone. `in_flight`: how many rows of a tile are used (--batch-size; the tile's shape stays)."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, request in enumerate(requests):
        by_length[cache_length(request.positions)].append(i)
    results: list[list[Scored] | None] = [None] * len(requests)
    for length, members in sorted(by_length.items()):
        group = Group(lm, requests, length, in_flight)
        group.run(members, tick)
        for i in members:
            results[i] = group.results(i)
    return results


def rolling_windows(tokens: Sequence[int], prefix: int, width: int) -> list[Continuations]:
    """lm-eval's loglikelihood_rolling windows (get_rolling_token_windows with context_len=1, made
    disjoint), each a request of one continuation: every token is predicted once; the first window
    predicts up to `width` tokens after `prefix` (BOS, else EOS), each later one up to `width` more
    with what remains of its `width` fed tokens as context."""
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(width, len(tokens))
    windows = [Continuations((prefix,), (tuple(tokens[:first]),))]
    predicted = first
    while predicted < len(tokens):
        size = min(len(tokens) - predicted, width)
        end = predicted + size
        fed = tokens[end - width - 1 : end - 1]  # end > width here: the window's `width` inputs
        windows.append(Continuations(tuple(fed[: len(fed) - size + 1]), (tuple(tokens[end - size : end]),)))
        predicted = end
    return windows
