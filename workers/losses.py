"""Teacher-forced mean negative log-likelihood of token spans, on fixed-shape tiles (tiles.py)."""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from bulkscore.workers.models import LoadedModel, PackedLinear
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

FUSED = True  # half-precision scoring projects the vocabulary in chunks where the model allows; off: whole logits
VOCAB_CHUNK = 4096  # vocabulary entries projected at once: [tokens, 4096] float32 stays in cache
FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})  # logits = lm_head(norm(h)), no more


def fusable(lm: LoadedModel) -> bool:
    """Whether the model's logits are its output layer applied to its decoder's last hidden states and
    nothing else (no bias, soft-capping or scaling): then fused_nll gives its NLLs."""
    head = lm.model.get_output_embeddings()
    return (
        getattr(lm.model.config, "model_type", None) in FUSED_MODEL_TYPES
        and type(head) in (torch.nn.Linear, PackedLinear)
        and head.bias is None
        and hasattr(lm.model, "get_decoder")
    )


def scores_in_chunks(lm: LoadedModel) -> bool:
    """Whether this model's NLLs come from fused_nll (half precision, fusable) or from whole logits.
    Measured on a 2-layer model with a 49,152-word vocabulary, 128 sequences of 31 tokens: in bfloat16
    the chunks take 0.35 s where whole logits take 0.54 (their float32 copy is the cost); in float32
    there is no copy and one whole product is faster (0.44 s against 0.60)."""
    return FUSED and lm.dtype != torch.float32 and fusable(lm)


def fused_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of each target token given its hidden state, without ever holding [tokens x vocabulary]
    logits (fused_scores). hidden: [..., H] in the model's dtype; weight: [V, H]; targets: [...].
    Returns float32 [...]."""
    return fused_scores(hidden, weight, targets, argmax=False)[0]


def fused_scores(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, argmax: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each target's NLL given its hidden state, and whether it is the argmax (the first of the
    largest logits), without ever holding [tokens x vocabulary] logits: the vocabulary is projected
    VOCAB_CHUNK entries at a time, each chunk's log-sum-exp folded into a running one in float32,
    each target's logit picked from the chunk holding it, and the running largest logit kept (the
    technique of Liger's fused linear cross-entropy and Cut Cross-Entropy).

    hidden: [..., H] in the model's dtype; weight: [V, H]; targets: [...]. Returns float32 [...] and
    bool [...] (None without `argmax`)."""
    flat, wanted = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).to(hidden.device)
    total = torch.full(wanted.shape, -float("inf"), dtype=torch.float32, device=hidden.device)
    picked = torch.zeros(wanted.shape, dtype=torch.float32, device=hidden.device)
    best = torch.full(wanted.shape, -float("inf"), dtype=torch.float32, device=hidden.device)
    best_at = torch.zeros(wanted.shape, dtype=torch.long, device=hidden.device)
    for start in range(0, weight.shape[0], VOCAB_CHUNK):
        logits = torch.nn.functional.linear(flat, weight[start : start + VOCAB_CHUNK]).float()  # [N, c]
        total = torch.logaddexp(total, torch.logsumexp(logits, dim=-1))
        inside = (wanted >= start) & (wanted < start + logits.shape[1])
        at = (wanted - start).clamp(0, logits.shape[1] - 1)[:, None]
        picked = torch.where(inside, logits.gather(1, at)[:, 0], picked)
        if not argmax:
            continue
        top = logits.argmax(dim=-1)  # [N]: the first largest of the chunk
        value = logits.gather(1, top[:, None])[:, 0]
        better = value > best  # an equal logit in a later chunk is not the first
        best, best_at = torch.where(better, value, best), torch.where(better, top + start, best_at)
    return (total - picked).view(targets.shape), (best_at == wanted).view(targets.shape) if argmax else None


def project_prefill(
    lm: LoadedModel,
    tile: Tile,
    feeds: Sequence[tuple[Sequence[int], int] | None],
    last_at: dict[int, int],
    targets: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One prefill call (Tile.forward's feeds) and its projections: the float32 logits after each
    prompt's last token, [rows, vocab] (row r's from its column last_at[r]; None if no row has one
    here), and, given `targets` ([rows, width]), every place's NLL, [rows, width]. Each projection has
    the tile's shape whichever rows ask for it; where the model allows, only the hidden states asked
    for meet the vocabulary (a [rows, hidden] product, not [rows x width, vocab])."""
    rows, width = tile.rows, tile.width
    columns = torch.tensor([last_at.get(row, width - 1) for row in range(rows)])
    if not fusable(lm):
        logits = tile.forward(feeds, last_only=False)  # [R, W, V]
        firsts = logits[torch.arange(rows), columns] if last_at else None
        return firsts, None if targets is None else nll_from_logits(logits, targets)
    hidden = tile.hidden(feeds)  # [R, W, H]
    head = lm.model.get_output_embeddings()
    firsts = None
    if last_at:
        last = hidden[torch.arange(rows), columns.to(hidden.device)]  # [R, H]: the tile's rows, always
        firsts = (head.product(last) if isinstance(head, PackedLinear) else head(last)).float()  # [R, V]
    if targets is None:
        return firsts, None
    if scores_in_chunks(lm):
        return firsts, fused_nll(hidden, head.weight, targets)
    return firsts, nll_from_logits(head(hidden).float(), targets)


def nll_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits: [R, W, V] float32; targets: [R, W]. Each target's NLL, [R, W]."""
    return -torch.log_softmax(logits, dim=-1).gather(2, targets.to(logits.device)[..., None])[..., 0]


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
    fused = lm.model.get_output_embeddings().weight if scores_in_chunks(lm) else None
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
            if fused is not None:
                nll = fused_nll(tile.hidden(feeds), fused, targets)  # [R, W]
            else:
                nll = nll_from_logits(tile.forward(feeds, last_only=False), targets)  # [R, W]
            tick()  # one more call done: the worker is making progress
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
