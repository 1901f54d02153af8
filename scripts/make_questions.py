"""Write the bundled unit-conversion question set: python scripts/make_questions.py [PATH].

Deterministic (a fixed seed, exact decimal arithmetic): running it again writes the same bytes, and
a test checks that the shipped file is what this script writes.
"""

from __future__ import annotations

import json
import random
import sys
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "jobs" / "data" / "unit_conversions.jsonl"
QUESTIONS_PER_CATEGORY = 50
SEED = 20261127

# Each unit's size in the category's base unit, as an exact fraction.
UNITS: dict[str, dict[str, Fraction]] = {
    "length": {
        "mm": Fraction(1, 1000),
        "cm": Fraction(1, 100),
        "m": Fraction(1),
        "km": Fraction(1000),
        "inch": Fraction(254, 10000),
        "foot": Fraction(3048, 10000),
        "yard": Fraction(9144, 10000),
        "mile": Fraction(1609344, 1000),
    },
    "mass": {
        "mg": Fraction(1, 1000),
        "gram": Fraction(1),
        "kg": Fraction(1000),
        "tonne": Fraction(10**6),
        "pound": Fraction(45359237, 100000),
        "ounce": Fraction(45359237, 1600000),
    },
    "volume": {
        "mL": Fraction(1, 1000),
        "liter": Fraction(1),
        "cubic meter": Fraction(1000),
        "gallon": Fraction(3785411784, 10**9),
        "quart": Fraction(3785411784, 4 * 10**9),
        "cup": Fraction(3785411784, 16 * 10**9),
    },
    "time": {
        "second": Fraction(1),
        "minute": Fraction(60),
        "hour": Fraction(3600),
        "day": Fraction(86400),
        "week": Fraction(604800),
        "millisecond": Fraction(1, 1000),
    },
    "data": {
        "bit": Fraction(1, 8),
        "byte": Fraction(1),
        "kilobyte": Fraction(1000),
        "kibibyte": Fraction(1024),
        "megabyte": Fraction(10**6),
        "mebibyte": Fraction(1024**2),
        "gigabyte": Fraction(10**9),
    },
    "speed": {
        "m/s": Fraction(1),
        "km/h": Fraction(1000, 3600),
        "mph": Fraction(44704, 100000),
        "knot": Fraction(1852, 3600),
        "cm/s": Fraction(1, 100),
    },
}

PHRASINGS = [
    "How many {to} are there per {amount} {frm}?",
    "Convert {amount} {frm} to {to}.",
    "What is {amount} {frm} in {to}?",
    "How many {to} are in {amount} {frm}?",
    "Express {amount} {frm} in {to}.",
    "{amount} {frm} equals how many {to}?",
    "Could you convert {amount} {frm} into {to}?",
    "If something measures {amount} {frm}, how many {to} is that?",
]

AMOUNTS = [Fraction(n) for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 25, 50, 100, 250)] + [
    Fraction(1, 2),
    Fraction(3, 2),
    Fraction(5, 2),
    Fraction(3, 4),
    Fraction(1, 4),
    Fraction(1, 10),
]


def is_terminating(value: Fraction) -> bool:
    """A fraction has an exact decimal form when its denominator has no prime but 2 and 5."""
    d = value.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def decimal_text(value: Fraction) -> str:
    """The exact decimal text of a terminating fraction, without trailing zeros."""
    digits = 0
    while (value * 10**digits).denominator != 1:
        digits += 1
    text = f"{Decimal(value.numerator * 10**digits // value.denominator).scaleb(-digits):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def as_json_number(value: Fraction) -> int | float:
    text = decimal_text(value)
    return int(text) if "." not in text else float(text)


def make_questions(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    for category, units in UNITS.items():
        pairs = [(a, b) for a in units for b in units if a != b]
        made = 0
        while made < QUESTIONS_PER_CATEGORY:
            frm, to = rng.choice(pairs)
            amount = rng.choice(AMOUNTS)
            answer = amount * units[frm] / units[to]
            # Exact, and neither tiny nor huge: the grader rounds to 3 decimals before comparing.
            if not is_terminating(answer) or not Fraction(1, 20) <= answer <= 10**8:
                continue
            question = rng.choice(PHRASINGS).format(amount=decimal_text(amount), frm=frm, to=to)
            if question in seen:
                continue
            seen.add(question)
            rows.append({"question": question, "answer": as_json_number(answer), "category": category})
            made += 1
    rng.shuffle(rows)
    return [{"id": i, **row} for i, row in enumerate(rows)]


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in make_questions():
            f.write(json.dumps(row) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
