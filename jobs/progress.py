"""The one place progress is drawn: a bar on stderr (rows done of total, rows/s, ETA), off with --quiet."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int, done: int, quiet: bool) -> tqdm:
    return tqdm(
        total=total,
        initial=done,
        unit="row",
        desc="scoring",
        file=sys.stderr,
        disable=quiet,
        dynamic_ncols=True,
        smoothing=0.1,
    )
