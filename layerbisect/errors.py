"""The one exception layerbisect raises for bad input."""

import numbers

NO_SAMPLES = "inputs holds no sample: give at least one dict of input name -> array"


class LayerbisectError(ValueError):
    """Bad input: the message names what is wrong, what was expected and what to do.

    The CLI prints it on one line and exits with status 2.
    """


def first_line(exc: BaseException, limit: int = 400) -> str:
    """The first line of an exception's message, for a one-line error."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]


def check_threshold(threshold: object) -> None:
    """Refuse a cosine threshold that is not a number in (0, 1] (numpy scalars are numbers)."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 < threshold <= 1.0:
        raise LayerbisectError(f"threshold must be in (0, 1], got {threshold!r}")
