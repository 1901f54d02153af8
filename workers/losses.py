"""Teacher-forced mean negative log-likelihood of token spans, on fixed-shape tiles (tiles.py)."""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from bulkscore.workers.models import LoadedModel
from bulkscore.workers.tiles import (
    CHUNK,
    PREFILL_ROWS,
    SharedPrefix,
    Tile,
    cache_length,
    chunks,
    right_aligned,
    tile_rows,
)


@dataclass
class Scoring:
    """A sequence in a tile row: its chunks go in, one call after another."""

    index: int
    pieces: list  # (tokens, first position) chunks of the tokens fed
    targets: list  # the same chunks of the tokens each fed token predicts
    skip: int  # NLLs before the first scored token
    fed: int = 0  # chunks fed so far
    nlls: list[float] = field(default_factory=list)


def start_scoring(
    tile: Tile, row: int, shared: SharedPrefix, index: int, sequence: Sequence[int], start: int
) -> Scoring:
    """Place a sequence in a tile row. Token t is predicted by the logits at t - 1: all tokens but the
    last are fed, and every one after those the prefix holds is a target."""
    first = max(start, 1)
    held = shared.length_for(sequence, first)
    if held:
        shared.copy_into(tile, row)
    return Scoring(
        index,
        chunks(sequence[held:-1], held, tile.width),
        chunks(sequence[held + 1 :], 0, tile.width),
        first - held - 1,
    )


def span_nll(
    lm: LoadedModel,
    sequences: Sequence[Sequence[int]],
    starts: Sequence[int],
    prefix: Sequence[int] = (),
    tick: Callable[[], None] = lambda: None,
) -> list[float | None]:
    """Mean NLL of tokens sequences[i][starts[i]:], each given the tokens before it; None where there
    is no token to score. Each value depends on its sequence alone, not on the others scored with it.

    A tile row takes the next sequence in the call after its last one ends, so the rows stay busy
    whatever the lengths. `prefix`: tokens many sequences start with (prompts.shared_start); where a
    sequence starts with it and scores nothing inside it, its keys and values are copied, not computed.
    """
    shared = SharedPrefix(lm, prefix)
    results: list[float | None] = [None] * len(sequences)
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, (sequence, start) in enumerate(zip(sequences, starts)):
        if max(start, 1) < len(sequence):
            by_length[cache_length(len(sequence))].append(i)
    for length, members in sorted(by_length.items()):
        tile = Tile(lm, tile_rows(PREFILL_ROWS, length, lm.tile_scale), length, CHUNK)
        waiting = deque(sorted(members, key=lambda i: (-len(sequences[i]), i)))
        rows: list[Scoring | None] = [None] * tile.rows
        while waiting or any(rows):
            for row in range(tile.rows):
                if rows[row] is None and waiting:
                    i = waiting.popleft()
                    rows[row] = start_scoring(tile, row, shared, i, sequences[i], starts[i])
            feeds = [run.pieces[run.fed] if run else None for run in rows]
            targets, _ = right_aligned([run and run.targets[run.fed][0] for run in rows], tile.rows, tile.width, 0)
            logits = tile.forward(feeds, last_only=False)  # [R, W, V]
            tick()  # one more call done: the worker is making progress
            nll = -torch.log_softmax(logits, dim=-1).gather(2, targets.to(logits.device)[..., None])[..., 0]  # [R, W]
            for row, run in enumerate(rows):
                if run is None:
                    continue
                run.nlls += nll[row, tile.width - len(feeds[row][0]) :].tolist()
                run.fed += 1
                if run.fed == len(run.pieces):
                    scored = run.nlls[run.skip :]
                    results[run.index] = sum(scored) / len(scored)
                    rows[row] = None
    return results
