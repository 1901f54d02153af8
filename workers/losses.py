"""Teacher-forced mean negative log-likelihood of token spans, batched, in float32."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from workers.batching import plan_batches
from workers.models import LoadedModel
from workers.padding import pad_batch

# Tokens per loss forward pass: logits are [tokens, vocab] floats (~200 KB a token for SmolLM2).
LOSS_TOKEN_BUDGET = 4096


def span_nll(
    lm: LoadedModel, sequences: Sequence[Sequence[int]], starts: Sequence[int]
) -> list[float | None]:
    """Mean NLL of tokens sequences[i][starts[i]:], each given the tokens before it.

    None where there is no token to score. Right padding keeps every row's positions from 0, and
    the causal mask keeps padding out of the real tokens' logits, so a batch scores each row as it
    would alone.
    """
    results: list[float | None] = [None] * len(sequences)
    lengths = [len(s) for s in sequences]
    for batch in plan_batches(lengths, 0, max_rows=len(sequences) or 1, token_budget=LOSS_TOKEN_BUDGET):
        for i, value in zip(batch, batch_nll(lm, [sequences[i] for i in batch], [starts[i] for i in batch])):
            results[i] = value
    return results


def takes_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def batch_nll(
    lm: LoadedModel, sequences: Sequence[Sequence[int]], starts: Sequence[int]
) -> list[float | None]:
    ids, mask = pad_batch(sequences, lm.pad_token_id, "right", lm.device)  # [B, T]
    # Token t is predicted by the logits at t-1; only positions lo..hi-1 predict a scored token.
    firsts = [max(s, 1) for s in starts]
    lo = min(firsts) - 1
    hi = max(lo + 1, ids.shape[1] - 1)
    if takes_logits_to_keep(lm.model):
        # Project onto the vocabulary only where needed: the rest is most of the cost for prompts.
        keep = torch.arange(lo, hi, device=lm.device)
        logits = lm.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # [B, hi-lo, V]
    else:
        logits = lm.model(input_ids=ids, attention_mask=mask).logits[:, lo:hi]  # [B, hi-lo, V]
    targets = ids[:, lo + 1 : hi + 1]  # [B, hi-lo]
    vocab = logits.shape[-1]
    nll = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1), reduction="none")
    nll = nll.view(len(sequences), -1)  # [B, hi-lo]
    out: list[float | None] = []
    for row, (seq, first) in enumerate(zip(sequences, firsts)):
        out.append(nll[row, first - 1 - lo : len(seq) - 1 - lo].mean().item() if first < len(seq) else None)
    return out
