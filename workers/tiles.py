"""Fixed-shape model calls: each row's numbers depend on the row alone.

Matrix kernels choose their blocking, and so the order in which they add, by the shapes they are
given: the same row run in a batch of 3 or of 64, or with 8 tokens of left padding, comes out
different in the last bits, and in bfloat16 by enough to flip a greedy choice. So every forward
pass here has one of a few shapes fixed in advance: a tile of `rows` rows, `width` tokens each,
over a cache of `length` positions per row. Which rows share a call changes no shape:

- each row's keys and values sit at fixed places of a preallocated cache (its own positions
  0..n-1), whatever other rows hold;
- a row's tokens are cut into chunks by the row's own length, right-aligned, so that its last
  token is the last column of its last call;
- free places of a call carry padding that writes only to a scratch area past `length`, which no
  real token attends to; a real token attends to its own row's positions up to its own.

A row's own length picks its cache length, so a long prompt never widens the calls of its
neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bulkscore.workers.models import LoadedModel

DECODE_ROWS = 128  # rows of the widest decode call: [128, 1]
DECODE_HEIGHTS = (16, 32, 64, 128)  # the rows a decode call may have (decode_heights)
PREFILL_ROWS = 16  # rows of every prefill call: [16, CHUNK]
CHUNK = 8  # tokens per row of a prefill call
MIN_LENGTH = 128  # fewest cache positions per row
TILE_POSITIONS = 32768  # rows x length of one tile: rows of long sequences share narrower tiles


def cache_length(need: int) -> int:
    """Cache positions for a row that needs `need`: the first of 128, 192, 256, 384, 512, 768, ...
    (powers of two and halfway between) that holds it. Attention runs over all of them, so a row
    pays for at most half as many again as it needs; rows of different lengths share no tile, so
    the steps are not finer."""
    length = MIN_LENGTH
    while length < need:
        length = length * 3 // 2 if length & (length - 1) == 0 else length * 4 // 3
    return length


def tile_rows(widest: int, length: int, scale: int = 1) -> int:
    """Rows of a tile over `length` positions: `widest` for short rows, fewer for long ones (at most
    TILE_POSITIONS positions in all), each times the model's `scale` (models.tile_scale)."""
    return max(1, min(widest, TILE_POSITIONS // length)) * scale


def decode_heights(widest: int, scale: int, fixed_products: bool) -> tuple[int, ...]:
    """The heights (rows) a decode tile of at most `widest` rows may take, each times the model's
    `scale`: a decoder runs the smallest that holds its rows, so a small job pays for the rows it has.
    Only where every matrix product runs at one height whatever a call's rows (models.PackedLinear):
    what else a decode call computes (attention's products per row, norms, softmax) gives each row the
    same bits at every height (tested). Elsewhere (a GPU) every call has the widest height."""
    if not fixed_products:
        return (widest,)
    return tuple(sorted({min(widest, height * scale) for height in DECODE_HEIGHTS}))


class SlotCache:
    """Keys and values of a tile, [rows, kv_heads, positions, head_dim] per layer, written at the
    places the tile gives (`writes`: [rows, tokens] positions). Each layer's tensors are allocated
    at its first write, with that layer's heads and dtype."""

    def __init__(self, rows: int, positions: int) -> None:
        self.rows, self.positions = rows, positions
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.writes: torch.Tensor | None = None  # [rows, tokens]: where this call's tokens go
        self.row_index = torch.arange(rows)

    def _allocate(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        if layer == len(self.keys):
            self.keys.append(key.new_zeros(self.rows, key.shape[1], self.positions, key.shape[3]))
            self.values.append(value.new_zeros(self.rows, value.shape[1], self.positions, value.shape[3]))

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """The model's call: store this call's keys and values ([rows, heads, tokens, dim]), return the
        layer's whole cache."""
        self._allocate(layer_idx, key, value)
        rows = self.row_index[: self.rows, None]  # [R, 1]: with writes [R, T], one place per token
        self.keys[layer_idx][rows, :, self.writes] = key.transpose(1, 2)  # [R, T, heads, dim]
        self.values[layer_idx][rows, :, self.writes] = value.transpose(1, 2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always given explicitly

    def take(self, rows: Sequence[int], source: SlotCache, source_rows: Sequence[int], count: int) -> None:
        """Copy positions 0..count-1 of another cache's rows into this cache's `rows`, one copy per
        layer for them all. (Past a row's own length a copy carries stale keys and values, which no
        token attends to: decoding writes each place before any token can see it.)"""
        to, of = torch.tensor(rows), torch.tensor(source_rows)
        for layer, (key, value) in enumerate(zip(source.keys, source.values)):
            self._allocate(layer, key, value)
            self.keys[layer][to, :, :count] = key[of, :, :count]
            self.values[layer][to, :, :count] = value[of, :, :count]


class Tile:
    """`rows` rows of `length` cache positions, fed `width` tokens per row per call."""

    def __init__(self, lm: LoadedModel, rows: int, length: int, width: int) -> None:
        self.lm, self.rows, self.length, self.width = lm, rows, length, width
        self.cache = SlotCache(rows, length + width)
        self.positions = torch.arange(length + width, device=lm.device)  # [S]
        self.scratch = length + torch.arange(width, device=lm.device)  # [W]: where padding writes

    def forward(self, feeds: Sequence[tuple[Sequence[int], int] | None], last_only: bool) -> torch.Tensor:
        """One call. feeds[r] = (tokens, first position) for row r (at most `width` tokens, placed in
        the last columns), or None for a row that only carries padding.

        Returns float32 logits: [rows, vocab] of the last column if `last_only`, else [rows, width, vocab].
        """
        kwargs = self.inputs(feeds)
        if self.lm.keeps_logits:
            kwargs["logits_to_keep"] = 1 if last_only else 0
        logits = self.lm.model(**kwargs).logits  # [R, 1 or W, V]
        return logits[:, -1].float() if last_only else logits.float()

    def hidden(self, feeds: Sequence[tuple[Sequence[int], int] | None]) -> torch.Tensor:
        """The same call without the vocabulary projection: the last layer's normed hidden states,
        [rows, width, hidden], in the model's dtype (losses.fused_nll projects them a chunk at a time)."""
        return self.lm.model.get_decoder()(**self.inputs(feeds)).last_hidden_state

    def inputs(self, feeds: Sequence[tuple[Sequence[int], int] | None]) -> dict:
        """The model's keyword arguments for one call (forward's `feeds`), the cache's writes set."""
        device = self.lm.device
        ids, real = right_aligned([feed and feed[0] for feed in feeds], self.rows, self.width, self.lm.pad_token_id)
        firsts = torch.tensor([feed[1] - (self.width - len(feed[0])) if feed else 0 for feed in feeds])
        firsts = torch.nn.functional.pad(firsts, (0, self.rows - len(feeds)))
        position = torch.where(real, firsts[:, None] + torch.arange(self.width), 0)  # [R, W]
        ids, position, real = ids.to(device), position.to(device), real.to(device)
        self.cache.writes = torch.where(real, position, self.scratch)  # [R, W]
        self.cache.row_index = self.cache.row_index.to(device)
        # A real token sees its row's positions up to its own; padding sees only its scratch place.
        sees_row = (self.positions <= position[..., None]) & (self.positions < self.length)  # [R, W, S]
        sees_scratch = self.positions == self.scratch[:, None]  # [W, S]
        mask = torch.where(real[..., None], sees_row, sees_scratch)[:, None]  # [R, 1, W, S]
        return {
            "input_ids": ids,
            "position_ids": position,
            "attention_mask": mask,
            "use_cache": True,
            self.lm.cache_argument: self.cache,
        }


def right_aligned(
    lists: Sequence[Sequence[int] | None], rows: int, width: int, fill: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, width] tensor with lists[r] in the last columns of row r and `fill` elsewhere (rows past
    len(lists), and None, are all fill), and the [rows, width] mask of the places the lists fill.
    One tensor is built for all rows: no per-row tensor."""
    counts = torch.tensor([len(x) if x else 0 for x in lists] + [0] * (rows - len(lists)))
    real = torch.arange(width) >= width - counts[:, None]  # row-major order = each list's order
    out = torch.full((rows, width), fill, dtype=torch.long)
    out[real] = torch.tensor([t for x in lists if x for t in x], dtype=torch.long)
    return out, real


def chunks(tokens: Sequence[int], first: int, width: int) -> list[tuple[Sequence[int], int]]:
    """A row's tokens as (chunk, first position) pieces of `width`, cut from the end: only the first
    chunk may be short. The cut depends on the row's own length alone."""
    pieces = []
    end = len(tokens)
    while end > 0:
        start = max(0, end - width)
        pieces.append((tokens[start:end], first + start))
        end = start
    return pieces[::-1]


MIN_SHARED_PREFIX = 8  # tokens; a shorter common start is not worth a cache of its own


class SharedPrefix:
    """The start every prompt of the job shares (a chat template's system turn, cot's examples),
    computed once, in one call of its own shape; rows that start with it copy its keys and values
    (vLLM calls this prefix caching). It comes from the prompt settings, never from the rows at
    hand, so a row uses it or not whatever its neighbours."""

    def __init__(self, lm: LoadedModel, tokens: Sequence[int]) -> None:
        self.lm = lm
        self.tokens = tuple(tokens) if len(tokens) >= MIN_SHARED_PREFIX else ()
        self.tile: Tile | None = None

    def length_for(self, sequence: Sequence[int], scored_from: int | None = None) -> int:
        """How many of the sequence's first tokens come from the prefix: all of it or none. The
        sequence keeps at least one token of its own, and every token from `scored_from` on."""
        n = len(self.tokens)
        own = min(len(sequence), scored_from if scored_from is not None else len(sequence))
        return n if n and own > n and tuple(sequence[:n]) == self.tokens else 0

    def copy_into(self, tile: Tile, row: int) -> None:
        if self.tile is None:
            computed = Tile(self.lm, 1, len(self.tokens), len(self.tokens))
            computed.forward([(self.tokens, 0)], last_only=True)
            self.tile = computed  # only once computed: a failed call leaves no half-filled cache
        tile.cache.take([row], self.tile.cache, [0], len(self.tokens))
