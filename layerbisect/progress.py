"""A progress bar over samples, from tqdm when it is installed (it is optional).

>>> progress([{"x": 1}], quiet=False)  # one sample: no bar
[{'x': 1}]
"""

from __future__ import annotations

from collections.abc import Iterable, Sized
from typing import TypeVar

T = TypeVar("T")
DELAY_S = 2.0  # work shorter than this shows no bar


def progress(samples: Iterable[T], quiet: bool = False) -> Iterable[T]:
    """``samples`` behind a tqdm bar, unless ``quiet``, tqdm is missing, or there is one sample.

    The bar shows on a terminal or in a notebook, only once the work has taken two seconds, and
    is removed when done, so short runs and scripts with redirected output see nothing.
    """
    if quiet or (isinstance(samples, Sized) and len(samples) < 2):
        return samples
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return samples
    return tqdm(samples, desc="samples", unit="sample", delay=DELAY_S, disable=None, leave=False)
