"""A progress bar over samples (or a one-sample run's passes), from tqdm when it is installed
(it is optional).

The bar goes to stderr on a terminal, or to the notebook (a widget with ipywidgets, else the
text bar, with no warning about the missing widget); it shows once the work has taken two
seconds, with the count and time left when the number of samples is known, and is removed when
done. Scripts with redirected output, short runs and ``quiet`` see nothing.

>>> progress([{"x": 1}], quiet=False)  # one sample: no bar
[{'x': 1}]
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Sized
from typing import IO, Any, TypeVar

T = TypeVar("T")
DELAY_S = 2.0  # work shorter than this shows no bar


def progress(samples: Iterable[T], quiet: bool = False, total: int | None = None,
             stream: IO[str] | None = None, unit: str = "sample") -> Iterable[T]:
    """``samples`` behind a tqdm bar on ``stream`` (stderr), unless ``quiet``, tqdm is missing,
    there is one sample, or the stream is neither a terminal nor in a notebook.

    ``total`` is the number of samples, when ``samples`` has no length but it is known: the bar
    then shows how many are left and the time left. ``unit`` names what is counted ("pass" for
    the passes of a run over one sample).
    """
    total = len(samples) if isinstance(samples, Sized) else total
    stream = sys.stderr if stream is None else stream
    if quiet or (total is not None and total < 2) or not (_in_notebook() or _is_terminal(stream)):
        return samples
    bar = _tqdm()
    if bar is None:
        return samples
    return bar(samples, total=total, desc=f"{unit}es" if unit.endswith("s") else f"{unit}s", unit=unit,
               delay=DELAY_S, leave=False, file=stream, disable=False)


def _tqdm() -> Any:
    """tqdm's bar class for here (tqdm.auto: the notebook widget where it can show), or None
    when tqdm is not installed."""
    try:
        with warnings.catch_warnings():
            # in a notebook without ipywidgets tqdm.auto warns "IProgress not found", then
            # falls back to the text bar: that fallback is all that is wanted
            warnings.simplefilter("ignore")
            from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
