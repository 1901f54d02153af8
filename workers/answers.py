"""Answer extraction and grading, as the unit-conversion homework grader does it."""

from __future__ import annotations

import math
import re


def parse_answer(completion: str, pattern: re.Pattern[str]) -> str | None:
    """The first match's first group that took part in it (the whole match when the pattern has no
    group): a pattern of alternatives, each with its group, reads whichever matched."""
    match = pattern.search(completion)
    if match is None:
        return None
    return next((group for group in match.groups() if group is not None), match.group(0))


def parse_number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.replace(",", "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def is_close(answer: float, reference: float, tolerance: float) -> bool:
    """The homework rule: compare at 3 decimals, relative to the reference."""
    r = round(reference, 3)
    return abs(round(answer, 3) - r) < tolerance * abs(r)


def grade(answer_text: str | None, reference: str | None, tolerance: float) -> bool | None:
    """None without a reference; numbers by tolerance; text equal after strip and lowercase."""
    if reference is None:
        return None
    if answer_text is None:
        return False
    expected = parse_number(reference)
    if expected is not None:
        answer = parse_number(answer_text)
        return answer is not None and is_close(answer, expected, tolerance)
    return answer_text.strip().lower() == reference.strip().lower()
