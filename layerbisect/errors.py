"""The one exception layerbisect raises for bad input."""


class LayerbisectError(ValueError):
    """Bad input: the message names what is wrong, what was expected and what to do.

    The CLI prints it on one line and exits with status 2.
    """
