"""Where a sequence of checks first fails. Knows nothing of ONNX.

>>> first_failing([True, True, False, True, False])
2
>>> first_failing([True]) is None
True
"""

from __future__ import annotations

from collections.abc import Iterable


def first_failing(passed: Iterable[bool]) -> int | None:
    """Index of the first False in ``passed``, or None when all pass."""
    return next((index for index, ok in enumerate(passed) if not ok), None)
