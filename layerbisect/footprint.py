"""The memory plan of a search: what a pass holds, estimated from shapes, and the pieces that fit.

A pass measures some pairs: it holds their float and quantized values (and, for isolated
error, each one's value in the cut model) and the values fed to the cuts. ``value_bytes``
estimates each pair's values from shapes inferred for the sample's inputs, ``Footprint`` adds
up what a set of pairs holds, and ``pieces`` splits the pairs into consecutive pieces that fit
the memory budget.

>>> footprint = Footprint([4, 4, 4], [1, 1, 1], [(), (0,), (1,)], isolated=False)
>>> footprint.of([0, 1, 2]), footprint.groups(12)
(17, [[0, 1], [2]])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from layerbisect.align import Pair
from layerbisect.graph import inferred_types
from layerbisect.load import declared_inputs
from layerbisect.wiring import produced

UNKNOWN_TENSOR_BYTES = 1 << 20  # assumed size of a value whose shape is unknown
DEFAULT_BUDGET_CAP = 1 << 30  # beyond this, holding more activations only costs memory
# A scan of one sample measures at most this many bytes of values a pass, whatever the budget:
# the next pass reuses the memory the last one freed, where larger pieces fault in fresh pages.
# PP-OCRv4 det (medians of 5): at 640x640, pieces of 128 MiB took 1.19 s and peaked at 256 MB,
# pieces of 512 MiB 1.45 s and 548 MB; at 320x320, 0.57 s and 246 MB against one pass's 0.59 s
# and 343 MB. With several samples a pass reuses its memory from one sample to the next, and
# more passes only cost more (32 samples at 640x640: 34.9 s against 32.1 s, 1139 MB against 968).
SCAN_PIECE = 1 << 27
# Bisection probes one layer per pass, each pass a short segment resumed from the values saved
# after the last layer known to pass; once this few layers remain, one pass measures them all.
LAST_PASS_LAYERS = 8


def feeders(model: onnx.ModelProto, pairs: Sequence[Pair]) -> list[tuple[int, ...]]:
    """For each pair, the earlier pairs whose float values its float operations read."""
    nodes = {node.name: node for node in model.graph.node}
    index_of = {pair.float_tensor: i for i, pair in enumerate(pairs)}
    feeders = []
    for i, pair in enumerate(pairs):
        span = [nodes[name] for name in pair.float_nodes if name in nodes]
        read = {name for node in span for name in node.input} - produced(span)
        feeders.append(tuple(sorted(index_of[t] for t in read if t in index_of and index_of[t] < i)))
    return feeders


def value_bytes(model: onnx.ModelProto, types: Mapping[str, onnx.TypeProto], pairs: Sequence[Pair],
                 input_shapes: Mapping) -> tuple[list[int], list[int]]:
    """Estimated bytes of each pair's float value and of its quantized value, from shapes
    inferred for these inputs (``types``, inferred for the declared ones, where they are these).
    A quantized value with a scale is read as integers: of its zero point's type, else 8-bit."""
    if any(spec.shape != tuple(input_shapes.get(spec.name, ())) for spec in declared_inputs(model)):
        types = inferred_types(model, input_shapes)
    sizes, quant_sizes = [], []
    for pair in pairs:
        typ = types.get(pair.float_tensor)
        if typ is None or not typ.HasField("tensor_type") or not typ.tensor_type.HasField("shape"):
            elements, itemsize = UNKNOWN_TENSOR_BYTES // 4, 4
        else:
            elem = typ.tensor_type.elem_type
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).itemsize if elem else 4
            elements = math.prod(max(d.dim_value, 1) for d in typ.tensor_type.shape.dim)
        readout = pair.quant_readout
        if readout.scale is not None:
            itemsize_quant = readout.zero_point.dtype.itemsize if readout.zero_point is not None else 1
        else:
            itemsize_quant = itemsize
        sizes.append(elements * itemsize)
        quant_sizes.append(elements * itemsize_quant)
    return sizes, quant_sizes


def pieces(footprint: Footprint, count: int, budget: float, single: bool) -> tuple[list[list[int]], int]:
    """The pieces a scan of ``count`` pairs measures, one pass each, and how many pairs the
    last pass of a bisection measures at once. A scan runs in one pass when everything fits
    (a piece, for one sample); else half the budget (at most a piece, for one sample) holds
    the values a pass measures, a quarter each the values it resumes from and those it saves
    for the next (saved values past that are dropped: the next pass then starts from the
    inputs)."""
    everything = list(range(count))
    piece = SCAN_PIECE if single else math.inf
    if footprint.of(everything) <= min(budget, piece):
        groups = [everything]
    else:
        groups = footprint.groups(min(budget / 2, piece))
    largest = max(footprint.of([i]) for i in everything)
    return groups, max(1, min(LAST_PASS_LAYERS, int(budget / 2 // largest)))


class Footprint:
    """Estimated bytes a pass holds: the float and quantized values of each pair it measures
    (and its value in the cut model, for isolated error), and for each value fed to the cuts,
    what is fed and, unless a measured pair holds it already, its float value."""

    def __init__(self, sizes: Sequence[int], quant_sizes: Sequence[int], feeders, isolated: bool) -> None:
        self.sizes, self.quant_sizes, self.feeders = sizes, quant_sizes, feeders
        self.copies = 2 if isolated else 1

    def of(self, indices: Sequence[int]) -> int:
        measured = set(indices)
        fed = {f for i in indices for f in self.feeders[i]}
        return sum(self.sizes[i] + self.copies * self.quant_sizes[i] for i in measured) + sum(
            self.quant_sizes[f] + (0 if f in measured else self.sizes[f]) for f in fed
        )

    def groups(self, budget: float) -> list[list[int]]:
        """Consecutive pairs whose values, held together, fit ``budget`` (one pair at least)."""
        groups: list[list[int]] = []
        measured: set[int] = set()
        fed: set[int] = set()
        held = 0
        for index in range(len(self.sizes)):
            cost = self._added(index, measured, fed)
            if not groups or held + cost > budget:
                groups.append([])
                measured, fed = set(), set()
                held, cost = 0, self._added(index, measured, fed)
            groups[-1].append(index)
            measured.add(index)
            fed.update(self.feeders[index])
            held += cost
        return groups

    def _added(self, index: int, measured: set[int], fed: set[int]) -> int:
        """What measuring pair ``index`` adds to a pass that measures ``measured`` and feeds
        ``fed`` (feeders come before the pairs they feed: ``index`` is not fed yet)."""
        new = set(self.feeders[index]) - fed
        return self.sizes[index] + self.copies * self.quant_sizes[index] + sum(
            self.quant_sizes[f] + (0 if f in measured else self.sizes[f]) for f in new
        )
