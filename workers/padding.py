"""Pack token-id lists of different lengths into one [B, T] batch with an attention mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids: [B, T] int64, mask: [B, T] int64 (1 on real tokens); `side` is "left" or "right"."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids.to(device), mask.to(device)
