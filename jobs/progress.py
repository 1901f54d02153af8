"""The one place progress is drawn: a bar on stderr (rows done of total, rows/s, ETA), off with --quiet."""

from __future__ import annotations

import sys
from collections.abc import Callable

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


def announcer(bar: tqdm, quiet: bool) -> Callable[[str], None]:
    """Print a message above the bar without breaking it; nothing with --quiet."""
    return (lambda text: None) if quiet else (lambda text: bar.write(text, file=sys.stderr))
