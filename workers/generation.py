"""Batched generation: left-padded prompts through `generate`, trimmed at EOS and stop strings.

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
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

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


def sampling_processors(settings: GenerationSettings, seeds: Sequence[int], device: torch.device) -> LogitsProcessorList:
    processors = LogitsProcessorList([TemperatureLogitsWarper(settings.temperature)])
    if settings.top_p < 1:
        processors.append(TopPLogitsWarper(settings.top_p))
    processors.append(SeededGumbel(seeds, device))
    return processors


def generation_kwargs(settings: GenerationSettings, lm: LoadedModel, seeds: Sequence[int] = ()) -> dict:
    """Every knob spelled out, so a model's own generation_config cannot change the job.

    Sampling runs as greedy search over noised scores (see SeededGumbel), never generate's own RNG.
    """
    kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=list(lm.eos_token_ids),
        pad_token_id=lm.pad_token_id,
        return_dict_in_generate=True,
        output_logits=True,  # the raw logits of each step: completion_loss without a second pass
    )
    if not settings.greedy:
        kwargs.update(logits_processor=sampling_processors(settings, seeds, lm.device))
    if settings.stop:
        kwargs.update(stop_strings=list(settings.stop), tokenizer=lm.tokenizer)
    return kwargs


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


def prefix_cache(lm: LoadedModel, prefix: Sequence[int], rows: int):
    """The KV cache of the shared prefix, computed once and repeated for each row: generation then
    runs only the tokens after it (vLLM calls this prefix caching)."""
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=lm.device)
    last_only = {"logits_to_keep": 1} if takes_logits_to_keep(lm.model) else {}
    cache = lm.model(input_ids=ids, use_cache=True, **last_only).past_key_values
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
    own KV cache, which generation has already computed: only their few tokens run.
    """
    shared = shared_prefix(prompts)
    ids, mask = pad_after_prefix(prompts, shared, lm.pad_token_id, lm.device)  # [B, T]
    kwargs = generation_kwargs(settings, lm, seeds)
    if shared:
        kwargs[cache_argument(lm.model)] = prefix_cache(lm, prompts[0][:shared], len(prompts))
    out = lm.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    new = out.sequences[:, ids.shape[1] :]  # [B, S], S <= max_new_tokens
    step_nll = token_nll(out.logits, new)  # [B, S]
    rows = [trim_completion(row, lm, settings) for row in new.tolist()]
    rows = [replace(g, nll=step_nll[i, : len(g.token_ids)].mean().item()) for i, g in enumerate(rows)]
    if any(continuations):
        try:
            scored = continuation_nll(lm, out, mask, continuations)
        except Exception:  # a cache that cannot be cut back: the caller scores them by a forward pass
            scored = [None] * len(rows)
        rows = [replace(g, continuation_nll=nll) for g, nll in zip(rows, scored)]
    return rows


def continuation_nll(
    lm: LoadedModel, out, prompt_mask: torch.Tensor, continuations: Sequence[Sequence[int] | None]
) -> list[float | None]:
    """Mean NLL of each continuation after its (left-padded) prompt, reusing generation's cache.

    The cache, cut back to the prompts, holds every prompt token's keys and values; the first
    continuation token is scored by generation's first-step logits, the rest by one forward pass
    over the continuations (right-padded) at the positions that follow each prompt.
    """
    width = prompt_mask.shape[1]
    real = [c if c else [lm.pad_token_id] for c in continuations]  # rows without one ride along
    ids, mask = pad_batch(real, lm.pad_token_id, "right", lm.device)  # [B, R]
    cache = out.past_key_values
    extra = cache.get_seq_length() - width
    if extra > 0:
        cache.crop(-extra)  # a negative count removes that many tokens from the end
    if cache.get_seq_length() != width:
        raise ValueError(f"cache holds {cache.get_seq_length()} tokens after cropping to {width}")
    positions = prompt_mask.sum(dim=1, keepdim=True) + torch.arange(ids.shape[1], device=lm.device)  # [B, R]
    logits = lm.model(
        input_ids=ids, attention_mask=torch.cat([prompt_mask, mask], dim=1), position_ids=positions,
        **{cache_argument(lm.model): cache},
    ).logits  # [B, R, V]: position j predicts continuation token j + 1
    first = -torch.log_softmax(out.logits[0].float(), dim=-1).gather(1, ids[:, :1])  # [B, 1]
    rest = -torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)  # [B, R-1]
    nll = torch.cat([first, rest], dim=1)  # [B, R]
    return [nll[i, : len(c)].mean().item() if c else None for i, c in enumerate(continuations)]


def token_nll(logits: Sequence[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """NLL of each generated token under the raw logits of its step: [B, S] from S x [B, V]."""
    steps = [
        -torch.log_softmax(step.float(), dim=-1).gather(1, tokens[:, s : s + 1]).squeeze(1)
        for s, step in enumerate(logits)
    ]
    return torch.stack(steps, dim=1)
