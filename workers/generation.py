"""Batched generation: left-padded prompts, a decode loop over the KV cache, rows trimmed at EOS
and stop strings. A row leaves the batch the step it ends, so short answers stop costing compute.

Sampling is seeded per row, not per batch: each (row, sample) draws its noise from its own generator,
seeded by (seed, row, sample), and picks its token by Gumbel-max over the temperature- and
top-p-filtered logits. That is an exact draw from the filtered distribution, and it does not depend
on which other rows share the batch, the shard or the worker (like vLLM's per-request seed).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

from workers.contract import GenerationSettings
from workers.losses import takes_logits_to_keep
from workers.models import LoadedModel
from workers.padding import pad_batch


@dataclass(frozen=True)
class Generated:
    token_ids: tuple[int, ...]  # the completion's tokens, EOS included when it stopped on one
    text: str
    finish_reason: str  # "stop" | "length"
    nll: float | None = None  # mean NLL of token_ids given the prompt, from generation's own logits
    continuation_nll: float | None = None  # mean NLL of the given continuation (the reference) after the prompt


def sample_seed(seed: int, row: int, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}:{row}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SeededGumbel(LogitsProcessor):
    """Adds each row's own Gumbel noise to its scores, so that the argmax is that row's sample.

    Row i's noise at step t is the t-th draw of a generator seeded by its key alone.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        vocab = scores.shape[-1]
        uniform = torch.stack([
            torch.rand(vocab, generator=g, device=scores.device, dtype=torch.float32) for g in self.generators
        ])
        gumbel = -torch.log(-torch.log(uniform.clamp_(min=1e-20, max=1 - 1e-7)))
        return scores.float() + gumbel


class Chooser:
    """Picks each row's next token from its raw logits: argmax, or (sampling) argmax of the
    temperature- and top-p-filtered logits plus the row's own Gumbel noise. End-of-sequence is
    barred until min_new_tokens."""

    def __init__(self, settings: GenerationSettings, seeds: Sequence[int], eos_ids: Sequence[int], device):
        self.min_new_tokens, self.eos = settings.min_new_tokens, list(eos_ids)
        self.warpers: list = []
        self.noise = None
        if not settings.greedy:
            self.warpers.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_p < 1:
                self.warpers.append(TopPLogitsWarper(settings.top_p))
            self.noise = SeededGumbel(seeds, device)

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        scores = logits.float()
        if step < self.min_new_tokens and self.eos:
            scores = scores.clone()
            scores[:, self.eos] = -float("inf")
        for warp in self.warpers:
            scores = warp(None, scores)
        if self.noise is not None:
            scores = self.noise(None, scores)
        return scores.argmax(dim=-1)

    def keep(self, rows: Sequence[int]) -> None:
        """Only these rows (indices into the current batch) go on."""
        if self.noise is not None:
            self.noise.generators = [self.noise.generators[i] for i in rows]


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def trim_completion(
    new_ids: Sequence[int], lm: LoadedModel, settings: GenerationSettings
) -> Generated:
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


MIN_SHARED_PREFIX = 8  # tokens; a shorter common start is not worth a cache of its own


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every prompt shares (the chat template's system turn, cot's examples),
    leaving each prompt at least one token of its own; 0 when that is under MIN_SHARED_PREFIX."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return n if n >= MIN_SHARED_PREFIX else 0


def pad_after_prefix(
    prompts: Sequence[Sequence[int]], shared: int, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding placed after the shared prefix, so that the prefix sits at the same place in
    every row. Masked pads in the middle change nothing: positions come from the attention mask."""
    ids, mask = pad_batch([p[shared:] for p in prompts], pad_id, "left", device)
    if shared:
        prefix = torch.tensor([prompts[0][:shared]], dtype=torch.long, device=device).expand(len(prompts), -1)
        ids = torch.cat([prefix, ids], dim=1)
        mask = torch.cat([torch.ones_like(prefix), mask], dim=1)
    return ids, mask


def cache_argument(model) -> str:
    """transformers 5 names the KV cache argument `cache`; earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output):
    """The KV cache a forward pass returned, under either version's name."""
    return output.cache if "cache" in output else output.past_key_values


def prefix_cache(lm: LoadedModel, prefix: Sequence[int], rows: int):
    """The KV cache of the shared prefix, computed once and repeated for each row: generation then
    runs only the tokens after it (vLLM calls this prefix caching)."""
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=lm.device)
    last_only = {"logits_to_keep": 1} if takes_logits_to_keep(lm.model) else {}
    cache = cache_of(lm.model(input_ids=ids, use_cache=True, **last_only))
    cache.batch_repeat_interleave(rows)
    return cache


def generate_batch(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings,
    seeds: Sequence[int] = (),
    continuations: Sequence[Sequence[int] | None] = (),
) -> list[Generated]:
    """One Generated per prompt; `seeds` (one per prompt, from sample_seed) when sampling.

    `continuations` (token ids to score after each prompt, or None) are scored from the prompts'
    own KV cache before decoding starts: only their few tokens run.
    """
    shared = shared_prefix(prompts)
    ids, mask = pad_after_prefix(prompts, shared, lm.pad_token_id, lm.device)  # [B, T]
    cache = prefix_cache(lm, prompts[0][:shared], len(prompts)) if shared else None
    logits, cache = prefill(lm, ids, mask, cache)
    scored: list[float | None] = [None] * len(prompts)
    if any(continuations) and getattr(cache, "is_croppable", True):
        scored = continuation_nll(lm, cache, logits, mask, continuations)
    chooser = Chooser(settings, seeds, lm.eos_token_ids, lm.device)
    tokens, nlls = decode(lm, cache, logits, mask, settings, chooser)
    rows = []
    for new, step_nll, reference_nll in zip(tokens, nlls, scored):
        g = trim_completion(new, lm, settings)
        rows.append(replace(g, nll=sum(step_nll[: len(g.token_ids)]) / len(g.token_ids) if g.token_ids else None,
                            continuation_nll=reference_nll))
    return rows


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position among its row's real tokens (left padding and gaps skipped)."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def prefill(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, cache):
    """Run the prompt tokens the cache does not hold yet: ([B, V] logits of the last position, cache)."""
    held = cache.get_seq_length() if cache is not None else 0
    kwargs = {"logits_to_keep": 1} if takes_logits_to_keep(lm.model) else {}
    if cache is not None:
        kwargs[cache_argument(lm.model)] = cache
    out = lm.model(input_ids=ids[:, held:], attention_mask=mask, position_ids=positions_of(mask)[:, held:],
                   use_cache=True, **kwargs)
    return out.logits[:, -1], cache_of(out)


def decode(lm: LoadedModel, cache, logits: torch.Tensor, mask: torch.Tensor, settings: GenerationSettings,
           chooser: Chooser) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy (or seeded) decoding with the KV cache, one token per row per step. A row that ends
    (end-of-sequence, stop string, max_new_tokens) leaves the batch at once: the steps after it run
    only the rows still going, instead of carrying it to the longest row's end.

    Returns each row's new tokens and each token's NLL under its step's raw logits.
    """
    rows = len(mask)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    nlls: list[list[float]] = [[] for _ in range(rows)]
    active = list(range(rows))  # prompt index of each row still in the batch
    position = positions_of(mask)[:, -1:]  # [A, 1]
    stop_tail = 2 * max(map(len, settings.stop)) + 4 if settings.stop else 0  # tokens that can hold a stop string
    eos = set(lm.eos_token_ids)
    for step in range(settings.max_new_tokens):
        chosen = chooser(logits, step)  # [A]
        nll = -torch.log_softmax(logits.float(), dim=-1).gather(1, chosen[:, None]).squeeze(1)  # [A]
        going = []
        for j, (token, value) in enumerate(zip(chosen.tolist(), nll.tolist())):
            row = active[j]
            tokens[row].append(token)
            nlls[row].append(value)
            tail = lm.tokenizer.decode(tokens[row][-stop_tail:], skip_special_tokens=True) if stop_tail else ""
            if token not in eos and not (stop_tail and cut_at_stop(tail, settings.stop)[1]):
                going.append(j)
        if not going or step + 1 == settings.max_new_tokens:
            break
        if len(going) < len(active):
            keep = torch.tensor(going, device=mask.device)
            cache.batch_select_indices(keep)
            mask, position, chosen = mask[keep], position[keep], chosen[keep]
            chooser.keep(going)
            active = [active[j] for j in going]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        logits = lm.model(input_ids=chosen[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                          **{cache_argument(lm.model): cache}).logits[:, -1]
    return tokens, nlls


def continuation_nll(
    lm: LoadedModel, cache, first_logits: torch.Tensor, prompt_mask: torch.Tensor,
    continuations: Sequence[Sequence[int] | None],
) -> list[float | None]:
    """Mean NLL of each continuation after its (left-padded) prompt, from the prompts' KV cache.

    The prompts' last logits score each continuation's first token; one forward pass over the
    continuations (right-padded, at the positions after each prompt) scores the rest. The cache is
    then cut back to the prompts, for decoding to go on from there. A cache that cannot be cut back
    leaves every row None (the caller scores them by a forward pass of their own).
    """
    width = prompt_mask.shape[1]
    real = [c if c else [lm.pad_token_id] for c in continuations]  # rows without one ride along
    ids, mask = pad_batch(real, lm.pad_token_id, "right", lm.device)  # [B, R]
    positions = prompt_mask.sum(dim=1, keepdim=True) + torch.arange(ids.shape[1], device=lm.device)  # [B, R]
    try:
        logits = lm.model(
            input_ids=ids, attention_mask=torch.cat([prompt_mask, mask], dim=1), position_ids=positions,
            use_cache=True, **{cache_argument(lm.model): cache},
        ).logits  # [B, R, V]: position j predicts continuation token j + 1
    except Exception:
        logits = None
    if cache.get_seq_length() > width:
        cache.crop(width - cache.get_seq_length())  # a negative count removes that many from the end
    if cache.get_seq_length() != width:  # decoding cannot go on from this cache
        raise RuntimeError(f"the KV cache holds {cache.get_seq_length()} tokens after cutting it to {width}")
    if logits is None:
        return [None] * len(continuations)
    first = -torch.log_softmax(first_logits.float(), dim=-1).gather(1, ids[:, :1])  # [B, 1]
    rest = -torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)  # [B, R-1]
    nll = torch.cat([first, rest], dim=1)  # [B, R]
    return [nll[i, : len(c)].mean().item() if c else None for i, c in enumerate(continuations)]
