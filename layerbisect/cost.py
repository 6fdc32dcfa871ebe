"""What each search strategy would cost, estimated before anything runs: ``auto`` takes the
cheapest where everything does not fit one pass (where it does, it scans: every layer for a
run of each model).

Knows nothing of ONNX: a layer is the bytes of its float and quantized values, a piece a run
of consecutive layers that one pass measures (the scan's pieces, which fit the memory budget).
Each strategy's passes are laid out as ``layerbisect.passes`` runs them, and priced from what
they run and compare: a fixed cost a pass, a cost a layer of the segments it cuts and makes
sessions for, a cost a byte of values computed, and one a byte of values compared. Where the
first bad layer is matters (the prefix stops there, bisection probes towards it), and is not
known beforehand: the estimate is the mean over every position of the first bad layer and
none, equally likely (at most ``POSITIONS`` of them, evenly spaced).

>>> sizes = [4096] * 40  # 40 layers of 1024 float32 values each, int8 quantized
>>> quant = [1024] * 40
>>> pieces = [list(range(i, i + 4)) for i in range(0, 40, 4)]  # ten pieces of four layers
>>> costs = estimates(sizes, quant, pieces, isolated=True, last_pass=8)
>>> round(costs["scan"].passes), round(costs["prefix"].passes, 1), cheapest(costs)
(10, 5.6, 'prefix')
>>> cheapest(estimates(sizes, quant, [list(range(40))], isolated=True, last_pass=8))  # one pass
'scan'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from layerbisect.search import bisect_first_failing

# Prices, from the passes of benchmarks/bench_search.py on a 2-core machine (onnxruntime 1.32,
# CPU): a probe over 177 layers of 3.2 MB float and 0.8 MB int8 values made its two sessions
# in 0.20 s (1.1 ms a layer) and ran in 0.68 s (about 1 ns a byte of values computed); the
# scan of bench_scan.py's large CNN compared 819 MB in 0.24 s (0.3 ns a byte); cutting the
# segments and the rest of a pass's bookkeeping takes about 10 ms.
PASS_SECONDS = 0.01
LAYER_SECONDS = 1.1e-3  # a layer in a pass's segments: cut, and in the sessions made
RUN_BYTE_SECONDS = 1e-9  # a byte of values computed, a sample
COMPARE_BYTE_SECONDS = 3e-10  # a byte of values compared, a sample
POSITIONS = 64  # positions of the first bad layer the estimate averages over, at most


@dataclass(frozen=True)
class Cost:
    """What a search is estimated to run: ``passes``, ``layers`` cut into segments (summed over
    the passes), ``bytes_run`` and ``bytes_compared`` a sample, and the ``seconds`` all that
    takes for ``samples`` samples; means over the positions of the first bad layer."""

    passes: float
    layers: float
    bytes_run: float
    bytes_compared: float
    samples: int = 1

    @property
    def seconds(self) -> float:
        return (self.passes * PASS_SECONDS + self.layers * LAYER_SECONDS
                + self.samples * (self.bytes_run * RUN_BYTE_SECONDS + self.bytes_compared * COMPARE_BYTE_SECONDS))


def estimates(
    sizes: Sequence[int], quant_sizes: Sequence[int], pieces: Sequence[Sequence[int]], *, isolated: bool,
    last_pass: int, samples: int = 1,
) -> dict[str, Cost]:
    """The estimated cost of ``scan``, ``prefix`` and ``bisect`` over layers whose values take
    ``sizes`` (float) and ``quant_sizes`` bytes, measured in ``pieces`` (every layer in one,
    in order), with isolated error or not; bisection's last pass measures ``last_pass``
    layers at most."""
    n = len(sizes)
    passes = _Layout(sizes, quant_sizes, isolated)
    count = min(n + 1, POSITIONS)
    positions = sorted({round(k * n / (count - 1)) for k in range(count)}) if count > 1 else [n]
    layouts = {
        "scan": lambda end: passes.pieces(pieces, n),
        "prefix": lambda end: passes.pieces(pieces, end),
        "bisect": lambda end: passes.bisection(pieces, end, last_pass),
    }
    return {name: _mean([layout(end) for end in positions], samples) for name, layout in layouts.items()}


def cheapest(costs: Mapping[str, Cost]) -> str:
    """The strategy of least estimated time; ties go to the one measuring the most (scan, then
    prefix, then bisect), as ``costs`` lists them."""
    return min(costs, key=lambda name: costs[name].seconds)


class _Layout:
    """The passes of each strategy, as (first layer run, layers measured, isolated) triples,
    priced as tuples (passes, layers, bytes run, bytes compared)."""

    def __init__(self, sizes: Sequence[int], quant_sizes: Sequence[int], isolated: bool) -> None:
        self.sizes, self.quant_sizes, self.isolated = sizes, quant_sizes, isolated

    def pieces(self, pieces: Sequence[Sequence[int]], end: int) -> tuple[float, ...]:
        """The pieces in order, each resumed after the last, up to the one holding layer
        ``end`` (all of them when ``end`` is past the last layer)."""
        total: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
        for piece in pieces:
            total = _plus(total, self.priced(piece[0], piece, self.isolated))
            if piece[-1] >= end:
                break
        return total

    def bisection(self, pieces: Sequence[Sequence[int]], end: int, last_pass: int) -> tuple[float, ...]:
        """The probes towards a first bad layer at ``end``, one a pass, each resumed after the
        last passing one; then the last pass, or, with isolated error once a probe failed, the
        pieces up to the earliest failing probe."""
        total: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
        start = 0
        failing: list[int] = []

        def check(indices: Sequence[int], final: bool) -> dict[int, bool]:
            nonlocal total, start
            if final and self.isolated and failing:
                return {}
            measured = list(indices) if final else [indices[-1]]
            total = _plus(total, self.priced(start, measured, False))
            results = {i: i < end for i in measured}
            if not final and results[measured[-1]]:
                start = measured[-1] + 1
            failing.extend(i for i, ok in results.items() if not ok)
            return results

        bisect_first_failing(check, len(self.sizes), last_pass, probes=1)
        if self.isolated and failing:
            total = _plus(total, self.pieces([[i for i in piece if i <= min(failing)] for piece in pieces
                                              if piece[0] <= min(failing)], min(failing)))
        return total

    def priced(self, start: int, measured: Sequence[int], isolated: bool) -> tuple[float, ...]:
        """One pass: both models run from layer ``start`` to the last measured one; with isolated
        error, the cut model computes each measured quantized value again and it is compared."""
        run = range(start, measured[-1] + 1)
        computed = sum(self.sizes[i] + self.quant_sizes[i] for i in run)
        compared = sum(self.sizes[i] + self.quant_sizes[i] for i in measured)
        again = sum(self.quant_sizes[i] for i in measured) if isolated else 0
        layers = len(run) + (len(measured) if isolated else 0)
        return 1.0, float(layers), float(computed + again), float(compared + again)


def _plus(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(x + y for x, y in zip(a, b))


def _mean(totals: Sequence[tuple[float, ...]], samples: int) -> Cost:
    passes, layers, run, compared = (sum(column) / len(totals) for column in zip(*totals))
    return Cost(passes, layers, run, compared, samples)
