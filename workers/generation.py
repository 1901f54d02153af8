"""Generation with continuous batching on fixed-shape tiles (tiles.py says why shapes are fixed).

A decode tile runs one token for each of its slots per call. A row that ends (end-of-sequence, a
stop string, max_new_tokens) frees its slot at once; rows still waiting are prefilled in a prefill
tile, in chunks, and their keys and values move into the free slots, so the decode batch stays full.
A row's completion, its NLLs and its continuation's NLL come out the same whichever rows share its
calls, whichever slot it has and whenever it starts.

Sampling is seeded per row, not per batch: each (row, sample) draws its noise from its own generator,
seeded by (seed, row, sample), and picks its token by Gumbel-max over the temperature- and
top-p-filtered logits. That is an exact draw from the filtered distribution (like vLLM's per-request
seed).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from bulkscore.workers.contract import GenerationSettings
from bulkscore.workers.likelihood import Continuations, Scored, score_continuations
from bulkscore.workers.losses import project_prefill, span_nll
from bulkscore.workers.models import LoadedModel
from bulkscore.workers.tiles import (
    CHUNK,
    DECODE_ROWS,
    PREFILL_ROWS,
    SharedPrefix,
    Tile,
    cache_length,
    chunks,
    decode_heights,
    right_aligned,
    tile_rows,
)

Out = TypeVar("Out")


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    seed: int = 0  # from sample_seed, when sampling
    continuation: tuple[int, ...] | None = None  # tokens to score after the prompt (the reference)
    # This request's own max_new_tokens, temperature, top_p and stop (an OpenAI Batch request's);
    # None: the engine's. min_new_tokens and batch_size are the engine's whatever it says.
    settings: GenerationSettings | None = None
    score_prompt: bool | None = None  # its prompt's own NLLs are wanted (None: as the engine's score_prompts says)


@dataclass(frozen=True)
class Generated:
    token_ids: tuple[int, ...]  # the completion's tokens, EOS included when it stopped on one
    text: str
    finish_reason: str  # "stop" | "length"
    token_nlls: tuple[float, ...] = ()  # each of token_ids' NLL given the prompt, from generation's own logits
    continuation_nll: float | None = None  # mean NLL of the request's continuation after the prompt
    prompt_nlls: tuple[float, ...] | None = None  # prompt tokens 1.. each given those before (score_prompts)
    # (token, NLL) of the one token that a "length" completion's last two make when its text is
    # tokenized again ("\n" "\n" -> "\n\n"), where the first of them was chosen (score_prompts)
    merged_tail: tuple[int, float] | None = None

    @property
    def nll(self) -> float | None:
        """Mean NLL of token_ids given the prompt (completion_loss)."""
        return sum(self.token_nlls) / len(self.token_nlls) if self.token_nlls else None


def sample_seed(seed: int, row: int, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}:{row}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def gumbel_noise(generators: Sequence[torch.Generator | None], vocab: int, device) -> torch.Tensor:
    """[rows, vocab] Gumbel noise, row r's from its own generator (zeros where there is none): added to
    a row's scores, it turns their argmax into a draw from their softmax. Made row by row, each at
    the shape [vocab], so a row's noise is its own whatever the tile's rows, and rows without a
    generator (free slots, rows not choosing this round) cost nothing."""
    noise = torch.zeros(len(generators), vocab, device=device)
    for row, generator in enumerate(generators):
        if generator is not None:
            uniform = torch.rand(vocab, generator=generator, device=device, dtype=torch.float32)
            noise[row] = -torch.log(-torch.log(uniform.clamp_(min=1e-20, max=1 - 1e-7)))
    return noise


NUCLEUS_CANDIDATES = 256  # the most likely tokens, where a row's top-p set is looked for first


def top_p_filter(
    scores: torch.Tensor, top_p: float | Sequence[float], rows: Sequence[int] | None = None
) -> torch.Tensor:
    """scores: [R, V]. Each row's scores outside its nucleus set to -inf: the most likely tokens whose
    probability mass ahead of them is under top_p (so at least the likeliest). Found among the
    NUCLEUS_CANDIDATES likeliest tokens (a top-k, ~20x cheaper than sorting 49,152 scores per row),
    by a sort of the whole row where the nucleus is larger than that; only for `rows` (default: all).
    `top_p`: one for all rows, or each row's; a row's at 1 or more leaves it as it is, at 0 keeps
    the likeliest alone."""
    each = [float(top_p)] * scores.shape[0] if isinstance(top_p, (int, float)) else [float(p) for p in top_p]
    limit = torch.tensor(each, dtype=scores.dtype, device=scores.device)[:, None]  # [R, 1]
    probs = torch.softmax(scores, dim=-1)
    top, where = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)  # [R, k], descending
    ahead = top.cumsum(dim=-1) - top
    inside = ahead < limit
    inside[:, 0] = True  # the likeliest token, whatever top_p
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, where, inside)
    # Rows whose nucleus reaches past the candidates: sorted whole (not those left as they are).
    wide = [r for r in (ahead[:, -1:] + top[:, -1:] < limit).flatten().nonzero().flatten().tolist() if each[r] < 1]
    for row in wide if rows is None else sorted(set(wide) & set(rows)):
        ranked, order = probs[row].sort(descending=True)
        keep[row] = torch.zeros_like(keep[row]).scatter_(0, order, ranked.cumsum(dim=0) - ranked < each[row])
    keep[[row for row, p in enumerate(each) if p >= 1]] = True
    return scores.masked_fill(~keep, -float("inf"))


class Chooser:
    """Picks each row's next token from its raw logits: argmax, or (a sampling row: one with a
    generator) argmax of its temperature- and top-p-filtered logits plus its own Gumbel noise.
    Every operation is row by row, so a greedy row gets its argmax beside sampling rows, and a
    sampling row its draw beside rows of other temperatures. End-of-sequence is barred until a row
    has min_new_tokens."""

    def __init__(self, settings: GenerationSettings, eos_ids: Sequence[int]) -> None:
        self.min_new_tokens, self.eos = settings.min_new_tokens, list(eos_ids)
        self.settings = settings

    def __call__(
        self,
        logits: torch.Tensor,
        steps: torch.Tensor,
        generators: Sequence,
        rows: Sequence[int] | None = None,
        settings: Sequence[GenerationSettings | None] | None = None,
    ) -> torch.Tensor:
        """logits: [R, V] float32; steps: [R] tokens each row has so far; generators: each sampling
        row's (None for the others); rows: those whose choice is wanted (default: all); settings:
        each row's own temperature and top_p (default, or None: the job's). Returns [R] token ids."""
        scores = logits
        barred = (steps < self.min_new_tokens)[:, None]  # [R, 1]
        if self.eos and bool(barred.any()):
            scores = scores.clone()
            scores[:, self.eos] = torch.where(barred, -float("inf"), scores[:, self.eos])
        if any(g is not None for g in generators):
            each = settings or [None] * len(generators)
            own = [(s or self.settings) if g is not None else None for g, s in zip(generators, each)]
            # Greedy rows divide by 1 and add no noise: their argmax is unchanged, bit for bit.
            temperature = [s.temperature if s is not None else 1.0 for s in own]
            scores = scores / torch.tensor(temperature, dtype=scores.dtype, device=scores.device)[:, None]
            top_p = [s.top_p if s is not None else 1.0 for s in own]
            if min(top_p) < 1:
                scores = top_p_filter(scores, top_p, rows)
            scores = scores + gumbel_noise(generators, scores.shape[-1], scores.device)
        return scores.argmax(dim=-1)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def trim_completion(new_ids: Sequence[int], lm: LoadedModel, settings: GenerationSettings) -> Generated:
    """Cut one row's generated ids at its first EOS or stop string (whichever comes first)."""
    decode = lambda ids: lm.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    eos_at = next((i for i, t in enumerate(new_ids) if t in lm.eos_token_ids), None)
    body = list(new_ids[:eos_at] if eos_at is not None else new_ids)
    if settings.stop:
        text, stopped = cut_at_stop(decode(body), settings.stop)
        if stopped:
            # Keep the tokens up to the one that completed the stop string.
            n = next(k for k in range(1, len(body) + 1) if cut_at_stop(decode(body[:k]), settings.stop)[1])
            return Generated(tuple(body[:n]), text, "stop")
    if eos_at is not None:
        return Generated(tuple(new_ids[: eos_at + 1]), decode(body), "stop")
    return Generated(tuple(body), decode(body), "length")


class Batch:
    """One caller's requests: their results as they finish, or the error that ended them."""

    def __init__(self, size: int) -> None:
        self.results: list[Generated | None] = [None] * size
        self.left = size
        self.error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.left == 0 or self.error is not None

    def finish(self, index: int, generated: Generated) -> None:
        self.results[index] = generated
        self.left -= 1


@dataclass(frozen=True)
class Pending:
    request: Request
    batch: Batch
    index: int  # into the batch


@dataclass
class Running:
    """A request in a decode slot."""

    pending: Pending
    generator: torch.Generator | None
    continuation_nll: float | None
    prompt_nlls: tuple[float, ...] | None
    settings: GenerationSettings  # the request's own, else the job's
    tokens: list[int] = field(default_factory=list)
    nlls: list[float] = field(default_factory=list)

    @property
    def stop_tail(self) -> int:
        """How many of the last tokens can hold a stop string (0: no stop strings)."""
        return 2 * max(map(len, self.settings.stop)) + 4 if self.settings.stop else 0


@dataclass
class Prefilling:
    """A prompt (and its continuation, if any) in a prefill tile row, fed a chunk per call."""

    pendings: list[Pending]  # the requests that share it (samples)
    pieces: list[tuple[Sequence[int], int]]  # chunks of the fed tokens: (tokens, first position)
    targets: list[Sequence[int]]  # each piece's tokens' next ones
    prompt_last: int  # index, among the fed tokens, of the prompt's last
    scores_prompt: bool  # its prompt's NLLs are wanted (score_prompts, no shared prefix)
    continued: bool  # it has a continuation to score
    fed: int = 0  # pieces fed so far
    done: int = 0  # tokens fed so far
    nlls: list[float] = field(default_factory=list)  # each fed token's target's NLL, when scored
    first: torch.Tensor | None = None  # [V]: logits after the prompt's last token

    @property
    def scored(self) -> bool:
        return self.scores_prompt or self.continued


class Decoder:
    """One cache length's rows: a decode tile whose free slots are refilled from a prefill tile."""

    def __init__(
        self, lm: LoadedModel, length: int, settings: GenerationSettings, prefix: SharedPrefix, score_prompts: bool
    ) -> None:
        self.lm, self.settings, self.prefix, self.score_prompts = lm, settings, prefix, score_prompts
        self.length = length
        widest = tile_rows(DECODE_ROWS, length, lm.tile_scale)
        self.heights = decode_heights(widest, lm.tile_scale, lm.fixed_products)
        self.tiles: dict[int, Tile] = {}  # decode tiles by height, each allocated at its first use
        self.decode = self.tile_of(self.heights[0])
        self.prefill = Tile(lm, tile_rows(PREFILL_ROWS, length, lm.tile_scale), length, CHUNK)
        # --batch-size: how many rows decode at once (the tile's height holds them; no result changes).
        self.in_flight = min(widest, settings.batch_size or widest)
        self.waiting: deque[Pending] = deque()
        self.filling: list[Prefilling | None] = []  # the prefill tile's rows, while refill runs
        self.slots: list[Running | None] = [None] * self.decode.rows
        self.logits: torch.Tensor | None = None  # [R, V]: each slot's next-token logits
        self.previous: torch.Tensor | None = None  # [R, V]: the logits before those (merged_tail)
        self.fresh: set[int] = set()  # slots whose logits no token was chosen from yet
        self.chooser = Chooser(settings, lm.eos_token_ids)
        self.merges: dict[tuple[int, int], int | None] = {}  # merged_tail's answers, by token pair

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(self.slots)

    def round(self) -> None:
        """Choose each running row's next token, fill the slots of the rows that ended (and of any
        before), choose the newcomers' first tokens, and run the decode call. Rows end as they choose,
        so refilling after choosing keeps their slots from riding one call empty."""
        self.choose()
        self.fit()
        self.refill()
        self.choose()
        if any(self.slots):
            self.step()

    def free_slots(self) -> list[int]:
        """The decode tile's free slots among those --batch-size lets run."""
        return [s for s in range(min(self.in_flight, self.decode.rows)) if self.slots[s] is None]

    def tile_of(self, height: int) -> Tile:
        if height not in self.tiles:
            self.tiles[height] = Tile(self.lm, height, self.length, 1)
        return self.tiles[height]

    def fit(self) -> None:
        """Run on the smallest decode height that holds the running and waiting rows (as many as
        --batch-size lets run at once): the running rows move there, keys, values and logits, in one
        copy per layer. A row's numbers are the same at every height (decode_heights)."""
        running = [slot for slot, run in enumerate(self.slots) if run is not None]
        need = min(self.in_flight, len(running) + len(self.waiting))
        height = next((h for h in self.heights if h >= need), self.heights[-1])
        if height == self.decode.rows:
            return
        tile = self.tile_of(height)
        if running:
            written = max(len(self.slots[s].pending.request.prompt) + len(self.slots[s].tokens) for s in running)
            tile.cache.take(list(range(len(running))), self.decode.cache, running, written)
        moved = {old: new for new, old in enumerate(running)}
        for name in ("logits", "previous"):
            logits = getattr(self, name)
            if logits is not None:
                kept = logits.new_zeros(height, logits.shape[-1])
                kept[: len(running)] = logits[running]
                setattr(self, name, kept)
        self.slots = [self.slots[s] for s in running] + [None] * (height - len(running))
        self.fresh = {moved[s] for s in self.fresh}
        self.decode = tile

    def fail(self, error: BaseException) -> None:
        """A round raised: every request here ends with that error (the callers retry row by row)."""
        filling = [pending for run in self.filling if run is not None for pending in run.pendings]
        for pending in [*self.waiting, *filling, *(run.pending for run in self.slots if run is not None)]:
            pending.batch.error = pending.batch.error or error
        self.waiting.clear()
        self.filling = []
        self.slots = [None] * self.decode.rows
        self.fresh.clear()

    def refill(self) -> None:
        """Move waiting rows into free slots through the prefill tile (when a prefill tile's worth of
        slots is free, or all that remain are waiting, or nothing runs). Each prefill row streams
        through prompts, a chunk per call: the next prompt starts in the call after the last one's
        last chunk, so short prompts do not wait on long ones. A prompt's continuation is fed after
        it, in the same calls, and scored on the way."""
        free = self.free_slots()
        waiting = self.waiting
        if not waiting or not free or (any(self.slots) and len(free) < min(len(waiting), self.prefill.rows)):
            return
        self.filling = [None] * self.prefill.rows
        unreserved = len(free)
        while True:
            for row in range(self.prefill.rows):
                if self.filling[row] is None and waiting and unreserved:
                    self.start_prefill(row, unreserved)
                    unreserved -= len(self.filling[row].pendings)
            if not any(self.filling):
                return
            finished = self.feed_prefill()
            self.admit(finished)
            for row in finished:
                self.filling[row] = None

    def start_prefill(self, row: int, room: int) -> None:
        """The next waiting prompt into prefill row `row`, with the samples waiting after it that share
        it (as many as `room` slots take). It is in `filling` before any model call, so that a failing
        call fails its requests too."""
        first = self.waiting.popleft()

        def key(pending: Pending) -> tuple:
            return pending.request.prompt, pending.request.continuation, pending.request.score_prompt

        pendings = [first]
        while self.waiting and len(pendings) < room and key(self.waiting[0]) == key(first):
            pendings.append(self.waiting.popleft())
        prompt, tail, _ = key(first)
        shared = self.prefix.length_for(prompt)
        own = prompt[shared:]
        fed = own + (tail[:-1] if tail else ())  # the continuation's last token is only a target
        following = own[1:] + (tail or (0,))  # each fed token's next one (a stand-in after a bare prompt)
        self.filling[row] = Prefilling(
            pendings,
            chunks(fed, shared, self.prefill.width),
            [piece for piece, _ in chunks(following, 0, self.prefill.width)],
            prompt_last=len(own) - 1,
            scores_prompt=(self.score_prompts if first.request.score_prompt is None else first.request.score_prompt)
            and not shared,
            continued=bool(tail),
        )
        if shared:
            self.prefix.copy_into(self.prefill, row)

    def feed_prefill(self) -> list[int]:
        """One prefill call: each filling row's next chunk. Returns the rows whose last chunk it was.
        Every call has the tile's shape, and so does every projection of its states: the prompts'
        last-token logits ([rows, hidden] -> [rows, vocab]) and, when a row here wants them, the NLLs
        of all its places."""
        tile, width = self.prefill, self.prefill.width
        feeds = [run.pieces[run.fed] if run else None for run in self.filling]
        wanted = any(run.scored for run in self.filling if run)
        last_at = {}  # row -> column of its prompt's last token, where this call holds it
        for row, run in enumerate(self.filling):
            if run and run.done <= run.prompt_last < run.done + len(feeds[row][0]):
                last_at[row] = width - (run.done + len(feeds[row][0]) - run.prompt_last)
        targets = right_aligned([run and run.targets[run.fed] for run in self.filling], tile.rows, width, 0)[0]
        firsts, nll = project_prefill(self.lm, tile, feeds, last_at, targets if wanted else None)
        if firsts is not None and self.logits is None:
            self.logits = torch.zeros((self.decode.rows, firsts.shape[-1]), device=firsts.device)
        finished = []
        for row, run in enumerate(self.filling):
            if run is None:
                continue
            if run.scored:
                run.nlls += nll[row, width - len(feeds[row][0]) :].tolist()
            if row in last_at:
                run.first = firsts[row]
            run.done += len(feeds[row][0])
            run.fed += 1
            if run.fed == len(run.pieces):
                finished.append(row)
        return finished

    def admit(self, rows: Sequence[int]) -> None:
        """The prompts prefilled in prefill rows `rows` into free decode slots, in order: their keys
        and values (one copy per layer for them all, up to the longest prompt's length), and their
        logits. Nothing is in a slot before the copy is done, so a failing copy fails them all."""
        if not rows:
            return
        free = iter(self.free_slots())
        runs = [self.filling[row] for row in rows]
        taken = [[next(free) for _ in run.pendings] for run in runs]
        self.decode.cache.take(
            [slot for slots in taken for slot in slots],
            self.prefill.cache,
            [row for row, slots in zip(rows, taken) for _ in slots],
            max(len(run.pendings[0].request.prompt) for run in runs),
        )
        for run, slots in zip(runs, taken):
            self.logits[slots] = run.first
            self.fresh.update(slots)
            continuation = run.nlls[run.prompt_last :] if run.continued else None
            mean = sum(continuation) / len(continuation) if continuation else None
            prompt_nlls = tuple(run.nlls[: run.prompt_last]) if run.scores_prompt else None
            for pending, slot in zip(run.pendings, slots):
                settings = pending.request.settings or self.settings
                generator = None
                if not settings.greedy:
                    generator = torch.Generator(device=self.lm.device).manual_seed(pending.request.seed)
                self.slots[slot] = Running(pending, generator, mean, prompt_nlls, settings)

    def choose(self) -> None:
        """Each fresh slot's next token, from its logits; rows that end leave their slot."""
        fresh, running = self.fresh, sorted(self.fresh)
        self.fresh = set()
        if not running:
            return
        # Other slots count as done, so that no end-of-sequence bar is computed for them.
        steps = torch.full((self.decode.rows,), self.settings.min_new_tokens, device=self.logits.device)
        steps[running] = torch.tensor([len(self.slots[slot].tokens) for slot in running], device=steps.device)
        generators = [run.generator if run and slot in fresh else None for slot, run in enumerate(self.slots)]
        settings = [run.settings if run else None for run in self.slots]
        chosen = self.chooser(self.logits, steps, generators, running, settings)  # [R]
        nll = -torch.log_softmax(self.logits, dim=-1).gather(1, chosen[:, None]).squeeze(1)  # [R]
        eos = self.lm.eos_token_ids
        for slot, token, value in zip(running, chosen[running].tolist(), nll[running].tolist()):
            run = self.slots[slot]
            run.tokens.append(token)
            run.nlls.append(value)
            stopped = False
            if run.stop_tail:
                tail = self.lm.tokenizer.decode(run.tokens[-run.stop_tail :], skip_special_tokens=True)
                stopped = cut_at_stop(tail, run.settings.stop)[1]
            if token in eos or stopped or len(run.tokens) == run.settings.max_new_tokens:
                run.pending.batch.finish(run.pending.index, self.finish(run, slot))
                self.slots[slot] = None

    def finish(self, run: Running, slot: int) -> Generated:
        g = trim_completion(run.tokens, self.lm, run.settings)
        kept = run.nlls[: len(g.token_ids)]
        merged = (
            self.merged_tail(g.token_ids, slot) if run.prompt_nlls is not None and g.finish_reason == "length" else None
        )
        return Generated(
            g.token_ids, g.text, g.finish_reason, tuple(kept), run.continuation_nll, run.prompt_nlls, merged
        )

    def merged_tail(self, tokens: Sequence[int], slot: int) -> tuple[int, float] | None:
        """A completion cut by max_new_tokens can end in two tokens that its text, tokenized again,
        makes one (greedy chose "\n" twice where the text holds "\n\n"): then `loss`'s sequence
        differs from the generated one in its last token only, whose NLL the logits that chose the
        first of the two give."""
        if len(tokens) < 2 or self.previous is None:
            return None
        pair = (tokens[-2], tokens[-1])
        if pair not in self.merges:
            if len(self.merges) >= MERGES_KEPT:
                self.merges.clear()
            merged = self.lm.tokenizer(self.lm.tokenizer.decode(pair), add_special_tokens=False)["input_ids"]
            self.merges[pair] = merged[0] if len(merged) == 1 else None
        token = self.merges[pair]
        if token is None:
            return None
        return token, -torch.log_softmax(self.previous[slot], dim=-1)[token].item()

    def step(self) -> None:
        """One decode call: each running slot feeds its last token, at the position after its others."""
        feeds = [None] * self.decode.rows
        for slot, run in enumerate(self.slots):
            if run is not None:
                prompt = len(run.pending.request.prompt)
                feeds[slot] = ([run.tokens[-1]], prompt + len(run.tokens) - 1)
        self.previous, self.logits = self.logits, self.decode.forward(feeds, last_only=True)
        self.fresh = {slot for slot, run in enumerate(self.slots) if run is not None}


NO_SECONDS = {"generate_s": 0.0, "loss_s": 0.0, "score_s": 0.0}
MERGES_KEPT = 1 << 16  # token pairs whose re-tokenization a decoder remembers (merged_tail)


def model_thread(threads: int) -> ThreadPoolExecutor:
    """The one thread a worker runs torch on, loading included. Each thread that runs torch brings its
    own OpenMP team, and once two have computed, every call is slower, the first thread's too
    (measured, a 64-row SmolLM2 decode call: 88 ms, then 153 ms once a second thread had computed;
    91 ms with the model loaded on the thread that runs it)."""
    return ThreadPoolExecutor(1, "bulkscore-model", initializer=torch.set_num_threads, initargs=(threads,))


class Engine:
    """Continuous batching for every caller of one worker: requests from concurrent callers (the two
    shards a worker has in flight) share the decode tiles, so a slot freed by one shard's row is
    refilled from the other's. All model work runs on one thread (model_thread, given or the engine's
    own). Callers add their requests and wait for their results.
    """

    def __init__(
        self,
        lm: LoadedModel,
        settings: GenerationSettings,
        prefix: Sequence[int] = (),
        score_prompts: bool = False,
        thread: ThreadPoolExecutor | None = None,
    ) -> None:
        """`score_prompts`: each result also gets its prompt's own NLLs (Generated.prompt_nlls), from the
        prefill's logits, for prompts that do not start with `prefix`. `thread`: the model_thread the
        model was loaded on."""
        self.lm, self.settings, self.score_prompts = lm, settings, score_prompts
        self.prefix = SharedPrefix(lm, prefix)
        self.decoders: dict[int, Decoder] = {}  # cache length -> its tiles
        self.condition = threading.Condition()  # guards decoders' queues and `driving`
        self.tokenizer = threading.RLock()  # the tokenizer is used by one thread at a time
        self.driving = False
        self.model_thread = thread or model_thread(torch.get_num_threads())
        self.seconds = dict(NO_SECONDS)  # model time, by kind, since take_seconds()
        self.calls = 0  # decode rounds and scoring calls finished: progress, for the driver's hang check

    def generate(self, requests: Sequence[Request]) -> list[Generated]:
        """One Generated per request, each as it would be alone."""
        batch = Batch(len(requests))
        # Prompts of similar length share prefill calls: less padding.
        order = sorted(range(len(requests)), key=lambda i: (-len(requests[i].prompt), i))
        with self.condition:
            for i in order:
                request = requests[i]
                longest = (request.settings or self.settings).max_new_tokens
                need = len(request.prompt) + max(longest, len(request.continuation or ()))
                length = cache_length(need)
                if length not in self.decoders:
                    self.decoders[length] = Decoder(self.lm, length, self.settings, self.prefix, self.score_prompts)
                self.decoders[length].waiting.append(Pending(request, batch, i))
            if not self.driving:
                self.driving = True
                self.model_thread.submit(self.drive)
            while not batch.finished:
                self.condition.wait()
        if batch.error is not None:
            raise batch.error
        return batch.results

    def drive(self) -> None:
        """On the model thread: one round of every busy decoder, then again from the back of the
        thread's queue, so that a loss pass queued meanwhile runs between rounds (its shard can
        return, and the next one come in, while the others' rows go on)."""
        with self.condition:
            busy = [d for d in self.decoders.values() if d.busy]
        with torch.inference_mode():
            for decoder in busy:
                error = None
                started = time.perf_counter()
                try:
                    with self.tokenizer:
                        decoder.round()
                except Exception as raised:  # confined to this decoder's requests: they fail with it
                    error = raised
                self.seconds["generate_s"] += time.perf_counter() - started
                self.tick()
                with self.condition:
                    if error is not None:
                        decoder.fail(error)
                    self.condition.notify_all()
        with self.condition:
            self.driving = any(d.busy for d in self.decoders.values())
            if self.driving:
                self.model_thread.submit(self.drive)

    def span_nll(self, sequences: Sequence[Sequence[int]], starts: Sequence[int], prefixed: bool = False):
        """workers.losses.span_nll on this worker's model (on the model thread); `prefixed`: with the
        job's shared prefix."""

        prefix = self.prefix.tokens if prefixed else ()
        return self.on_model_thread("loss_s", lambda: span_nll(self.lm, sequences, starts, prefix, self.tick))

    def likelihood(self, requests: Sequence[Continuations]) -> list[list[Scored]]:
        """workers.likelihood.score_continuations on this worker's model (on the model thread), as many
        tile rows at once as --batch-size says."""

        in_flight = self.settings.batch_size
        return self.on_model_thread("score_s", lambda: score_continuations(self.lm, requests, in_flight, self.tick))

    def on_model_thread(self, kind: str, work: Callable[[], Out]) -> Out:
        """`work` on the model thread under inference mode, its time counted as `kind`; its result."""

        def timed() -> Out:
            started = time.perf_counter()
            try:
                with torch.inference_mode():
                    return work()
            finally:
                self.seconds[kind] += time.perf_counter() - started

        return self.model_thread.submit(timed).result()

    def tick(self) -> None:
        """One more model call finished (on the model thread)."""
        self.calls += 1

    def take_seconds(self) -> dict[str, float]:
        """The model time spent since the last call, by kind (on the model thread, between its tasks)."""

        def take() -> dict[str, float]:
            taken, self.seconds = self.seconds, dict(NO_SECONDS)
            return taken

        return self.model_thread.submit(take).result()


def generate(
    lm: LoadedModel, requests: Sequence[Request], settings: GenerationSettings, prefix: Sequence[int] = ()
) -> list[Generated]:
    """One Generated per request, each as it would be alone. `prefix`: the tokens every prompt of the
    job starts with (prompts.shared_start), computed once and shared."""
    return Engine(lm, settings, prefix).generate(requests)
