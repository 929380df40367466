"""Parsing and printing byte sizes ("8GiB", "512MB", "1.5G")."""

import re
from fractions import Fraction

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
    "p": 1024**5, "pb": 1000**5, "pib": 1024**5,
}
# The largest size any option takes: far above any machine offbatch runs on, far below where arithmetic on
# sizes (and the allocator's own) stops being exact. A larger value is a typo, not a budget.
MAX_BYTES = 1 << 50  # 1 PiB
# Digits, at most one point, a unit: no sign, exponent, inf or nan.
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*")
_EXAMPLES = "examples: 8GiB, 24G, 512MiB"


def parse_bytes(text: str | int) -> int:
    """'8GiB' -> 8589934592. Bare K/M/G/T mean binary units, as memory sizes usually do. The value is a
    whole number of bytes from 1 to MAX_BYTES; anything else (zero, a sign, an exponent, inf, nan, two
    units, more digits than any size has) is a ValueError whose message says what is wrong."""
    if isinstance(text, bool):
        raise ValueError(f"not a byte size: {text!r} ({_EXAMPLES})")
    if isinstance(text, int):
        value = Fraction(text)
    else:
        m = _SIZE.fullmatch(str(text))
        if str(text).strip()[:1] in ("-", "+"):
            raise ValueError(f"not a byte size: {_shown(text)} (a size has no sign; {_EXAMPLES})")
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"not a byte size: {_shown(text)} ({_EXAMPLES})")
        number = m.group(1).lstrip("0")
        number = "0" + number if not number or number.startswith(".") else number
        if len(number.split(".")[0]) > 20:  # more digits than any size below the ceiling has
            raise ValueError(f"{_shown(text)} is more than {format_bytes(MAX_BYTES)}, the largest size offbatch "
                             "takes: no machine has that much memory")
        # Exact decimal arithmetic: no float rounding, no overflow to inf.
        value = Fraction(number[:60]) * _UNITS[m.group(2).lower()]
    n = int(value)  # whole bytes, rounded down
    if n < 1:
        raise ValueError(f"{_shown(text)} is not a size: give at least one byte ({_EXAMPLES})")
    if n > MAX_BYTES:
        raise ValueError(f"{_shown(text)} is more than {format_bytes(MAX_BYTES)}, the largest size offbatch "
                         "takes: no machine has that much memory")
    return n


def _shown(text) -> str:
    """The value as a message quotes it: a long one cut short, so the message stays one line."""
    text = str(text)
    return repr(text) if len(text) <= 24 else f"{text[:12]!r}...({len(text)} characters)"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError
