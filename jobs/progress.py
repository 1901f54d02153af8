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


def announcer(say: Callable[[str], None]) -> Callable[[str], None]:
    """Pass a message on to `say` (stderr, or a caller's own) without breaking the bar: bars are
    cleared while it is written, then drawn again."""

    def announce(text: str) -> None:
        with tqdm.external_write_mode(file=sys.stderr):
            say(text)

    return announce
