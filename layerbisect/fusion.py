"""What onnxruntime's optimized graph computes differently from the quantized model as given.

``ort_optimized=True`` compares the graph onnxruntime writes after its extended-level fusions
instead of the quantized model given. That graph pairs with the float model by other
operations (a ``QLinearConv`` for a QDQ group, a ``FusedConv`` for a Conv and its activation),
and where a fusion changes the arithmetic, it computes other values. This module tells which
layers those are: it aligns the float model with the model as given too, and runs both
quantized graphs once, on the first sample, reading each layer's value in each where it pairs
with the same float value. A layer whose two values differ, anywhere, is computed differently;
a layer that pairs in one graph only is listed as such (in the model as given only: computed
inside another operation of the optimized graph). The note says which, or that none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import onnx

from layerbisect.align import Pair, align
from layerbisect.graph import OpGraph, build_graph
from layerbisect.report import LayerComparison

SHOWN = 10  # layers named in the note, at most; the others are counted


@dataclass(frozen=True)
class Changed:
    """A layer the optimized graph computes differently: its position among the aligned
    layers, a description, and (where it pairs in both graphs) the cosine and largest
    difference between the value of the model as given and that of the optimized graph."""

    index: int
    layer: str
    cosine: float | None = None
    max_abs: float | None = None

    def describe(self) -> str:
        if self.cosine is None:
            return f"#{self.index} {self.layer} (paired in the optimized graph only)"
        return (f"#{self.index} {self.layer} (cosine {self.cosine:.6f} to the model as given, largest "
                f"difference {self.max_abs:.3g})")


@dataclass(frozen=True)
class Counterparts:
    """The layers of the optimized graph that pair in the model as given too: their positions
    among the aligned layers, and for each a pair of the model as given's value (on the float
    side, dequantized by its own readout) with the optimized graph's; and the layers that pair
    in the optimized graph only."""

    indices: tuple[int, ...]
    pairs: tuple[Pair, ...]
    only_optimized: tuple[Changed, ...]
    only_given: tuple[str, ...] = ()  # layers of the model as given with no optimized counterpart


def counterparts(float_graph: OpGraph, given: onnx.ModelProto, pairs: Sequence[Pair]) -> Counterparts:
    """Align the float model with ``given`` too, and pair each of ``pairs`` (the float model
    aligned with the optimized graph) with the value of ``given`` paired with the same float
    value."""
    given_pairs = {pair.float_tensor: pair for pair in align(float_graph, build_graph(given)).pairs}
    both = [(i, given_pairs[pair.float_tensor], pair) for i, pair in enumerate(pairs)
            if pair.float_tensor in given_pairs]
    return Counterparts(
        indices=tuple(i for i, _, _ in both),
        pairs=tuple(replace(optimized, float_nodes=plain.quant_nodes, float_tensor=plain.quant_tensor,
                            float_readout=plain.quant_readout, float_output=plain.quant_tensor)
                    for _, plain, optimized in both),
        only_optimized=tuple(Changed(i, _name(pair)) for i, pair in enumerate(pairs)
                             if pair.float_tensor not in given_pairs),
        only_given=tuple(_name(pair) for tensor, pair in given_pairs.items()
                         if tensor not in {optimized.float_tensor for optimized in pairs}),
    )


def changed(
    found: Counterparts, pairs: Sequence[Pair], layers: Sequence[LayerComparison | None],
) -> tuple[Changed, ...]:
    """The layers whose values in the two graphs differ (``layers``: each of ``found.pairs``
    compared on the first sample, None where it could not be), and those paired in the
    optimized graph only, in order."""
    differ = [Changed(i, _name(pairs[i]), m.cosine, m.max_abs) for i, m in zip(found.indices, layers)
              if m is not None and (m.max_abs > 0 or m.nonfinite)]
    return tuple(sorted([*differ, *found.only_optimized], key=lambda change: change.index))


def fusion_note(changed: Sequence[Changed], found: Counterparts) -> str:
    """What the report says of the optimized graph."""
    compared = len(found.pairs)
    if not changed:
        note = (f"onnxruntime's optimized graph computes each of the {compared} layers it shares with the "
                "quantized model as given as that model does (the same values on the first sample)")
    else:
        shown = "; ".join(change.describe() for change in changed[:SHOWN])
        more = f"; and {len(changed) - SHOWN} more" if len(changed) > SHOWN else ""
        note = (f"onnxruntime's optimized graph computes {len(changed)} layer(s) differently from the "
                f"quantized model as given (on the first sample): {shown}{more}; the other layers compute "
                "the same values")
    if found.only_given:
        names = ", ".join(found.only_given[:SHOWN]) + (", ..." if len(found.only_given) > SHOWN else "")
        note += (f"; {len(found.only_given)} layer(s) of the model as given have no counterpart in it (fused "
                 f"into other operations, not compared here): {names}")
    return note


def _name(pair: Pair) -> str:
    return f"{pair.op_type} {'+'.join(pair.float_nodes)!r}"
