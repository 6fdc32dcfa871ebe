"""The one exception layerbisect raises for bad input."""

NO_SAMPLES = "inputs holds no sample: give at least one dict of input name -> array"


class LayerbisectError(ValueError):
    """Bad input: the message names what is wrong, what was expected and what to do.

    The CLI prints it on one line and exits with status 2.
    """


def first_line(exc: BaseException, limit: int = 400) -> str:
    """The first line of an exception's message, for a one-line error."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]
