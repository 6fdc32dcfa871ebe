"""Progress bars for long work, from tqdm when it is installed (it is optional): ``progress``
over the items of an iterable (samples), ``steps`` for work counted by hand (models loaded,
phases of alignment, passes, models tried).

A bar goes to stderr on a terminal, or to the notebook (a widget with ipywidgets, else the
text bar, with no warning about the missing widget); it shows once the work has taken two
seconds, with the count and time left when the total is known, and is removed when done.
A ``steps`` bar also shows, with the time taken, while one long step runs (a model loading).
Scripts with redirected output, short runs and ``quiet`` see nothing.

>>> progress([{"x": 1}], quiet=False)  # one sample: no bar
[{'x': 1}]
>>> with steps(2, "model", desc="loading") as bar:  # off a terminal: nothing shows
...     bar.advance()
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Sized
from typing import IO, Any, TypeVar

T = TypeVar("T")
DELAY_S = 2.0  # work shorter than this shows no bar
REFRESH_S = 0.1  # a bar is redrawn at most this often
TICK_S = 1.0  # while a step runs, its bar's time taken is redrawn this often


def progress(samples: Iterable[T], quiet: bool = False, total: int | None = None,
             stream: IO[str] | None = None, unit: str = "sample", desc: str | None = None) -> Iterable[T]:
    """``samples`` behind a tqdm bar on ``stream`` (stderr), unless ``quiet``, tqdm is missing,
    there is one sample, or the stream is neither a terminal nor in a notebook.

    ``total`` is the number of samples, when ``samples`` has no length but it is known: the bar
    then shows how many are left and the time left. ``unit`` names what is counted ("pass" for
    the passes of a run over one sample); ``desc`` labels the bar (default: the unit, plural).
    """
    total = len(samples) if isinstance(samples, Sized) else total
    bar = _bar(quiet or (total is not None and total < 2), stream, samples, total=total, unit=unit, desc=desc)
    return samples if bar is None else bar


class Steps:
    """A bar counted by hand (see ``steps``); without a bar (quiet, no terminal, no tqdm) its
    methods do nothing."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if bar is not None:  # the ticker holds no reference to this object: it ends with it
            threading.Thread(target=_tick, args=(weakref.ref(self), self._stop), daemon=True).start()

    def advance(self, desc: str | None = None) -> None:
        """One step done; ``desc`` labels the next (a phase: "aligning")."""
        if self.bar is None:
            return
        with self._lock:
            if desc is not None:
                self.bar.set_description_str(desc, refresh=False)
            self.bar.update()

    def close(self) -> None:
        """Remove the bar (also when the object is dropped unclosed, after an error)."""
        self._stop.set()
        if self.bar is not None:
            with self._lock:
                self.bar.close()

    def _redraw(self) -> None:
        """Draw the bar with the time taken so far, once past the delay."""
        with self._lock:
            now = time.time()
            if now >= self.bar.start_t + self.bar.delay:
                self.bar.refresh()
                self.bar.last_print_t = now  # drawn: close() clears it (the rate is a mean, not smoothed)

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def steps(total: int | None, unit: str, *, quiet: bool = False, desc: str | None = None,
          stream: IO[str] | None = None) -> Steps:
    """A bar over ``total`` steps (None: not known, the count and rate show) of ``unit``, on
    ``stream`` (stderr), shown as ``progress``'s are; call ``advance()`` as each step ends,
    ``close()`` (or leave the ``with`` block) when done.

    >>> with steps(3, "pass", desc="bisect (at most 3 passes)", quiet=True) as bar:
    ...     for _ in range(3):
    ...         bar.advance()
    """
    # the rate (and time left) is the mean over all steps so far: steps are few and long
    return Steps(_bar(quiet or total == 0, stream, None, total=total, unit=unit, desc=desc, smoothing=0))


def _bar(hidden: bool, stream: IO[str] | None, items: Iterable | None, *, total: int | None, unit: str,
         desc: str | None, smoothing: float = 0.3) -> Any:
    """A tqdm bar over ``items`` (None: counted by hand) with these settings, or None when
    ``hidden``, tqdm is missing, or ``stream`` (stderr) is neither a terminal nor in a notebook."""
    stream = sys.stderr if stream is None else stream
    if hidden or not (_in_notebook() or _is_terminal(stream)):
        return None
    tqdm = _tqdm()
    if tqdm is None:
        return None
    plural = f"{unit}es" if unit.endswith("s") else f"{unit}s"
    counted = None if total is not None or isinstance(items, Sized) else "{desc}: {n_fmt} [{elapsed}, {rate_fmt}]"
    return tqdm(items, total=total, desc=plural if desc is None else desc, unit=unit, delay=DELAY_S,
                mininterval=REFRESH_S, leave=False, file=stream, disable=False, bar_format=counted, smoothing=smoothing)


def _tick(ref: weakref.ref, stop: threading.Event) -> None:
    """Redraw the bar ``ref`` points to every ``TICK_S`` until it is closed or dropped."""
    while not stop.wait(TICK_S):
        owner = ref()
        if owner is None:
            return
        owner._redraw()
        del owner


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
