"""Batched generation: left-padded prompts through `generate`, trimmed at EOS and stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from workers.contract import GenerationSettings
from workers.models import LoadedModel
from workers.padding import pad_batch


@dataclass(frozen=True)
class Generated:
    token_ids: tuple[int, ...]  # the completion's tokens, EOS included when it stopped on one
    text: str
    finish_reason: str  # "stop" | "length"
    nll: float | None = None  # mean NLL of token_ids given the prompt, from generation's own logits


def generation_kwargs(settings: GenerationSettings, lm: LoadedModel) -> dict:
    """Every knob spelled out, so a model's own generation_config cannot change the job."""
    kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens,
        do_sample=not settings.greedy,
        num_beams=1,
        repetition_penalty=1.0,
        eos_token_id=list(lm.eos_token_ids),
        pad_token_id=lm.pad_token_id,
        return_dict_in_generate=True,
        output_logits=True,  # the raw logits of each step: completion_loss without a second pass
    )
    if not settings.greedy:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
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


def generate_batch(
    lm: LoadedModel, prompts: Sequence[Sequence[int]], settings: GenerationSettings, seed: int
) -> list[Generated]:
    ids, mask = pad_batch(prompts, lm.pad_token_id, "left", lm.device)  # [B, T]
    if not settings.greedy:
        torch.manual_seed(seed)
    out = lm.model.generate(input_ids=ids, attention_mask=mask, **generation_kwargs(settings, lm))
    new = out.sequences[:, ids.shape[1] :]  # [B, S], S <= max_new_tokens
    step_nll = token_nll(out.logits, new)  # [B, S]
    rows = [trim_completion(row, lm, settings) for row in new.tolist()]
    return [replace(g, nll=step_nll[i, : len(g.token_ids)].mean().item()) for i, g in enumerate(rows)]


def token_nll(logits: Sequence[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """NLL of each generated token under the raw logits of its step: [B, S] from S x [B, V]."""
    steps = [
        -torch.log_softmax(step.float(), dim=-1).gather(1, tokens[:, s : s + 1]).squeeze(1)
        for s, step in enumerate(logits)
    ]
    return torch.stack(steps, dim=1)
