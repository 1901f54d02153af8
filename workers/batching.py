"""Cut a shard's prompts into batches: longest first, bounded by rows and by a token budget."""

from __future__ import annotations

from collections.abc import Sequence

AUTO_MAX_ROWS = 64
AUTO_TOKEN_BUDGET = 8192


def plan_batches(
    lengths: Sequence[int], max_new_tokens: int, max_rows: int, token_budget: int
) -> list[list[int]]:
    """Indices into `lengths`, grouped so that rows * (longest prompt + max_new_tokens) fits.

    Rows of similar length share a batch, so little of each batch is padding; a single row that
    alone exceeds the budget still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (
            len(current) + 1 > max_rows or (len(current) + 1) * (longest + max_new_tokens) > token_budget
        ):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
