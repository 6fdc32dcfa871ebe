"""Options as users write them, validated in one place for the API and the CLI.

Each function takes what either front door receives (a number, or the text of a flag) and
returns the value the engine uses, or raises ``LayerbisectError`` naming the option, what it
got and what it takes. The CLI passes its flags' text through the same functions.

>>> memory_size("2G"), memory_size("500M"), memory_size(1 << 20), memory_size("1.5k")
(2147483648, 524288000, 1048576, 1536)
>>> memory_size("lots")
Traceback (most recent call last):
...
layerbisect.errors.LayerbisectError: memory_budget must be a size such as 2G, 500M or 1048576 (bytes), got 'lots'
"""

from __future__ import annotations

import math
import numbers

from layerbisect.errors import LayerbisectError

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
STRATEGIES = ("auto", "scan", "prefix", "bisect")
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def memory_size(value: object, name: str = "memory_budget") -> int:
    """Bytes from an int, a float or a text such as "2G", "500M", "64KiB" or "1048576"."""
    if isinstance(value, str):
        text = value.strip().upper().removesuffix("B").removesuffix("I")
        try:
            number = float(text[:-1]) * UNITS[text[-1]] if text and text[-1] in UNITS else float(text)
        except ValueError:
            raise LayerbisectError(
                f"{name} must be a size such as 2G, 500M or 1048576 (bytes), got {value!r}"
            ) from None
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    else:
        raise LayerbisectError(
            f"{name} must be a number of bytes or a size such as 2G or 500M, got {type(value).__name__} {value!r}"
        )
    if not math.isfinite(number) or number < 1:
        raise LayerbisectError(f"{name} must be a positive, finite size (at least 1 byte), got {value!r}")
    return int(number)


def check_threshold(threshold: object) -> float:
    """A cosine threshold in (0, 1] (numpy scalars are numbers, booleans are not)."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 < float(threshold) <= 1.0:
        raise LayerbisectError(f"threshold must be in (0, 1], got {threshold!r}")
    return float(threshold)


def check_strategy(strategy: object) -> str:
    """One of ``STRATEGIES``."""
    if strategy not in STRATEGIES:
        raise LayerbisectError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    return str(strategy)


def check_past_length(past_length: object) -> int | None:
    """A KV-cache decoder's number of past positions for generated inputs: None (the default,
    ``decoder.DEFAULT_PAST``) or 0 (no past: empty past tensors) and more.

    >>> check_past_length(0), check_past_length(None)
    (0, None)
    """
    if past_length is None:
        return None
    if isinstance(past_length, bool) or not isinstance(past_length, numbers.Integral) or past_length < 0:
        raise LayerbisectError(f"past_length must be a whole number, 0 or more, got {past_length!r}")
    return int(past_length)


def check_workers(workers: object, name: str = "workers") -> int:
    """A count of worker processes: 0 (none) or more."""
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 0:
        raise LayerbisectError(f"{name} must be 0 or more, got {workers!r}")
    return int(workers)
