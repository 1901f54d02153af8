"""Attention as two matrix products per key-value head, for the fixed-shape tiles.

torch's CPU scaled_dot_product_attention spends most of a tile's attention time on its own work
split (5.7-15.7 ms for a [64 rows, 9 heads, 8 tokens] prefill call over 136 positions, where two
batched products take 2.3-3.4 ms), and transformers repeats the key-value heads for it first. Here
the query heads that share a key-value head are stacked, so each product is one [groups x tokens,
positions] block per row and head, the same shape for every row; the softmax runs in float32.
"""

from __future__ import annotations

import torch

NAME = "bulkscore"


def tile_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, heads, T, D]
    key: torch.Tensor,  # [B, kv_heads, S, D]
    value: torch.Tensor,  # [B, kv_heads, S, Dv]
    attention_mask: torch.Tensor | None,  # [B, 1, T, >=S]: bool (True: attend) or additive; None: causal
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if kwargs.get("s_aux") is not None:
        raise ValueError("attention sinks (s_aux) are not supported by bulkscore's attention")
    batch, heads, tokens, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    stacked = query.reshape(batch, kv_heads, groups * tokens, dim)  # query heads of a kv head, stacked
    scores = torch.matmul(stacked, key.transpose(-1, -2)).float()  # [B, kv_heads, groups * T, S]
    scores = scores.view(batch, kv_heads, groups, tokens, length) * (dim**-0.5 if scaling is None else scaling)
    if kwargs.get("softcap"):
        scores = kwargs["softcap"] * torch.tanh(scores / kwargs["softcap"])
    if attention_mask is None:
        # Causal, the queries being the last `tokens` positions.
        attention_mask = torch.ones(tokens, length, dtype=torch.bool, device=query.device).tril(length - tokens)
        attention_mask = attention_mask[None, None]
    mask = attention_mask[..., :length]
    mask = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(mask.shape[0], kv_heads, groups, tokens, length)
    if mask.dtype == torch.bool:
        # The smallest float rather than -inf: a row with nothing to attend to gets even weights, not NaN.
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    else:
        scores = scores + mask.float()
    weights = torch.softmax(scores, dim=-1).to(value.dtype).view(batch, kv_heads, groups * tokens, length)
    out = torch.matmul(weights, value)  # [B, kv_heads, groups * T, Dv]
    return out.view(batch, heads, tokens, -1).transpose(1, 2).contiguous(), None  # [B, T, heads, Dv]


def use_tile_attention(model) -> None:
    """Switch a model that runs torch's SDPA to tile_attention. Models on another implementation (eager
    for its own reasons, flash attention on a GPU) keep it: their calls keep the tiles' fixed shapes."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(NAME, tile_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the masks transformers builds for SDPA suit it
    model.set_attn_implementation(NAME)
