"""Where a sequence of checks first fails. Knows nothing of ONNX.

>>> first_failing([True, True, False, True, False])
2
>>> first_failing([True]) is None
True

``bisect_first_failing`` finds the same index with few calls of an expensive check, when
failures, once they start, go on (a layer below the threshold damages the layers after it):

>>> flags = [True] * 70 + [False] * 30
>>> bisect_first_failing(lambda indices, final: {i: flags[i] for i in indices}, len(flags), batch=1)
(70, 7)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence


def first_failing(passed: Iterable[bool]) -> int | None:
    """Index of the first False in ``passed``, or None when all pass."""
    return next((index for index, ok in enumerate(passed) if not ok), None)


def bisect_first_failing(
    check: Callable[[Sequence[int], bool], Mapping[int, bool]], n: int, batch: int = 1,
    probes: int | None = None,
) -> tuple[int | None, int]:
    """First index in ``range(n)`` whose check fails, and the number of ``check`` calls.

    ``check`` evaluates indices and says which pass; it may leave out those after the
    first failing one. Each call probes ``probes`` (default ``batch``) evenly spaced indices
    of the interval still in question and narrows it to the gap before the first failing
    probe, so the calls number about ``log(n / batch) / log(probes + 1)``; the last call
    (second argument True) checks every index still in question, ``batch`` at most. The
    answer equals ``first_failing`` of all checks when failing is monotone (nothing passes
    after the first failure).
    """
    probes = batch if probes is None else probes
    if n < 0 or batch < 1 or probes < 1:
        raise ValueError(f"need n >= 0, batch >= 1 and probes >= 1, got {n}, {batch}, {probes}")
    low, high, found, calls = 0, n, None, 0
    while low < high:
        span = high - low
        final = span <= batch
        if final:
            checked = list(range(low, high))
        else:
            checked = sorted({low + (j + 1) * span // (probes + 1) for j in range(probes)})
        results = check(checked, final)
        calls += 1
        failing = [i for i in checked if i in results and not results[i]]
        if failing:
            found = failing[0]
            high = found
            passed = [i for i in checked if i < found]
            low = passed[-1] + 1 if passed else low
        else:
            low = checked[-1] + 1
    return found, calls


def bisect_calls(n: int, batch: int = 1, probes: int | None = None) -> int:
    """The most ``check`` calls ``bisect_first_failing(check, n, batch, probes)`` makes,
    whatever the checks say (the interval left is at most the widest gap between probes).

    >>> bisect_calls(100), bisect_calls(100, batch=8, probes=1), bisect_calls(0)
    (7, 5, 0)
    """
    probes = batch if probes is None else probes
    calls, span = 0, n
    while span > 0:
        calls += 1
        if span <= batch:
            break
        edges = [-1, *sorted({(j + 1) * span // (probes + 1) for j in range(probes)}), span]
        span = max(right - left - 1 for left, right in zip(edges, edges[1:]))
    return calls
