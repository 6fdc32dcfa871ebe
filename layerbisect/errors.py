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


class SampleError(LayerbisectError):
    """Bad input in one of several samples: ``index`` (from 0) says which, ``reason`` what is
    wrong with it (the message is both)."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"sample {index} (counting from 0): {reason}")
        self.index, self.reason = index, reason

    def __reduce__(self):  # raised in a worker process, re-raised in the caller
        return SampleError, (self.index, self.reason)
