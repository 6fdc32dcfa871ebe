"""Pair each value of the float model with the value of the quantized model that stands for it.

Alignment works on the graphs of ``layerbisect.graph`` and trusts structure, not names. It walks
the float graph in topological order, starting from the graph inputs: a float operation pairs
with the quantized operation of the same role whose inputs are the counterparts of its own
inputs. Where several qualify (the Q, K and V projections of one input), the weights decide,
then the names, then the order.

What one graph computes in one operation the other may compute in several. A float operation
with no counterpart waits until an operation that reads it pairs, and is then settled:

- *fused*: the quantized graph folded it into the operation before it (a BatchNormalization
  folded into a Conv, a Relu that onnxruntime drops after a Conv, giving the Conv's output the
  Relu's name); it joins that operation's span; so does a BatchNormalization between a Conv
  and a region, which the region does not take (the quantized Conv computes its output);
- *region*: several operations on one side compute what one or several operations compute on
  the other (a decomposed Gelu or LayerNorm against a fused one, in either direction, x *
  HardSigmoid(x) against HardSwish). A region is closed on both sides: the operations
  between paired values, each value but the last read inside the region only; it computes
  something (not Transposes and Reshapes alone) and holds no more weighted operations than
  the other side, and at most three of the float model's (never most of them).

A weighted float operation that structure cannot pair pairs with its anchor (the weighted
quantized operation of ``layerbisect.anchors``), the value it reads settled first by what the
anchor reads: what lies between two pairs of anchors is settled on its own, not as part of
the next weighted operation. Projections of one value fused into one weighted operation
and then split (Q, K and V in one MatMul) pair output by output with separate ones, by
the weights of each block of the fused weight's columns.

What nothing reads (graph ends) is settled last, by where both graphs end; the weights tell
two foldable operations in a row apart (of two BatchNormalizations, the one folded away).

A quantized operation that absorbed a bias (Gemm for MatMul + Add) or an activation (FusedConv)
takes the float operation that follows at once. A float weighted operation whose
BatchNormalization was folded, where the quantized graph keeps it, pairs with its output.

Layouts: Transposes are seen through on both sides. A quantized operation reading a value
through Transposes, or computing channels-last, pairs when the layouts work out; the pair's
quantized readout then carries the permutation back to the float model's layout, and values
are compared after it. A float Transpose that the other graph lacks pairs with nothing. Only
channels-first/last moves count as layouts, except where an optimizer moved the float graph's
Transposes past a Concat or element-wise operations (cancelling two across them).

>>> import onnx
>>> from onnx import helper, TensorProto
>>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
>>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
>>> g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g", [x], [y])
>>> from layerbisect.graph import OpGraph, build_graph
>>> graph = build_graph(helper.make_model(g))
>>> [(p.float_tensor, p.quant_tensor) for p in align(graph, graph).pairs]
[('y', 'y')]
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, replace
from itertools import islice, product, takewhile

import numpy as np

from layerbisect.anchors import anchor_pairs
from layerbisect.graph import FLOAT_DTYPES, Op, OpGraph, Readout, ValueRef
from layerbisect.layouts import Perm, channel_moves, compose, inverse
from layerbisect.weights import UNRELATED_WEIGHTS, agreement, channel_agreement, output_channels, standardized_channels

ACTIVATIONS = {
    "Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Elu", "Selu",
    "Softplus", "PRelu",
}
# Float operations a quantized graph may fold into the operation that produces their input
# (Cast: a cast that an optimizer removed; Add/Mul/Sub/Div: by a constant, a bias or a scale
# folded into a Gemm, a FusedMatMul or a Conv).
FUSABLE = ACTIVATIONS | {"BatchNormalization", "Cast", "Add", "Mul", "Sub", "Div"}
# Activations that a QuantizeLinear's range can stand for.
CLAMPS = {"Relu", "Clip"}
# Quantized operations that carry the activation after them.
ACTIVATION_FUSIONS = {"FusedConv", "FusedGemm", "NhwcFusedConv"}
# Operations that work element by element: they compute the same in any layout.
LAYOUT_FREE = (FUSABLE - {"BatchNormalization"}) | {
    "Erf", "Sqrt", "Pow", "Exp", "Log", "Neg", "Abs", "Reciprocal", "Gelu", "FastGelu",
    "QuickGelu", "Max", "Min", "Sum", "Mean", "Where", "Mish", "Softsign", "Celu",
    "ThresholdedRelu", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign",
}
# Operations that carry weights: a region of one graph holds no more of them than the other's.
ANCHORS = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
# Weighted float operations (anchors with a constant weight) one region may hold, and never
# more than half the model's: quantization, BatchNorm folding and Gemm fusion keep every
# weighted operation, and no region of the test suite's models or of the real ones holds one;
# onnxruntime's Attention fusion (not in the tests) computes three, Q, K and V, in one.
MAX_REGION_WEIGHTED = 3
# Operations that only move values: a region side made of them alone computes nothing.
MOVES = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Cast", "Identity"}
# Operations that may only change how a value's dimensions are grouped: a Gemm computes on a
# 2-D view of a MatMul's input, a Reshape brings the leading dimensions back.
VIEWS = {"Reshape", "Flatten"}
SAME_WEIGHTS = 0.999  # weight fingerprints this similar are the same weights
MAX_REGION = 48  # operations on one side of a region
MAX_VISIT = 4 * MAX_REGION  # quantized operations one region search looks at
MAX_TRIALS = MAX_VISIT  # ways to settle an operation's waiting inputs that are tried

# Roles that may stand for one another, the shapes permitting: a Gemm computes a MatMul (plus
# a bias, see ``bias``), a ReduceMean over H and W a GlobalAveragePool, a Flatten a Reshape.
ROLE_ALIASES = {
    "Gemm": ("Gemm", "MatMul"),
    "MatMul": ("MatMul", "Gemm"),
    "ReduceMean": ("ReduceMean", "GlobalAveragePool"),
    "GlobalAveragePool": ("GlobalAveragePool", "ReduceMean"),
    "Flatten": ("Flatten", "Reshape"),
    "Reshape": ("Reshape", "Flatten"),
}

Mapped = tuple[ValueRef, Perm]
"""A float value's counterpart: a quantized value and the permutation from it to the float one."""


@dataclass(frozen=True)
class Pair:
    """One float value and the quantized value that stands for it.

    ``float_nodes`` is the span of float operations whose result the pair compares (the last
    one produces it); ``quant_nodes`` the quantized operations that compute it. Both values
    are read where their readouts say: ``float_tensor`` is ``float_readout.tensor`` and
    ``quant_tensor`` is ``quant_readout.tensor``. In a float model that is the operation's
    output; in a quantized model compared as the float side, it is the end of the output's
    quantization shell, as on the quantized side, so a model compared with itself compares
    each value with itself. ``float_output`` is the operation's output itself (before that
    shell), what a float reader of the value there reads.
    ``evidence`` says what decided the pairing: "structure" (the only candidate), "weights",
    "name" or "order" (among several), "fused" (a float operation folded away), or "region"
    (operations of one graph computed by other operations of the other, such as a decomposed
    Gelu and a fused one). ``quant_readout.perm`` is set when the quantized value is held in
    another layout. A Transpose that only the float graph has pairs with nothing.
    """

    float_nodes: tuple[str, ...]
    float_tensor: str
    quant_nodes: tuple[str, ...]
    quant_tensor: str
    op_type: str
    evidence: str
    float_readout: Readout
    quant_readout: Readout
    float_output: str


@dataclass(frozen=True)
class Alignment:
    """All pairs, in the float model's topological order, and what found no counterpart."""

    pairs: tuple[Pair, ...]
    unaligned: tuple[str, ...]
    float_ops: int
    weighted: int = 0
    """The float model's weighted operations: Conv, ConvTranspose, MatMul, Gemm with a constant
    weight."""
    weighted_paired: int = 0
    """Those paired one for one: the only weighted operation of a pair's float span, computed by
    the only one of its quantized span (a region computing several pairs none of them)."""
    weight_agreement: float = math.nan
    """The median over weighted pairs of ``weights.channel_agreement``: near 1 when the
    quantized model holds the float model's weights, near 0.1 when it holds other weights; NaN
    when no pair's weights could be compared."""
    first_unpaired: str | None = None
    """The first weighted float operation (in topological order) not paired one for one."""

    @property
    def coverage(self) -> float:
        """Share of the float model's operations that found a counterpart."""
        return 1.0 - len(self.unaligned) / self.float_ops if self.float_ops else 1.0


@dataclass(frozen=True)
class _Settlement:
    """How a waiting float value finds its counterpart: ``float_ops`` (ending with the one that
    produces ``value``) map to ``target``; ``quant_ops`` is the quantized region computing it
    (empty when the float operations were folded into the target's operation). ``folded``:
    float operations before a region that join the span of the operation they read instead
    (a BatchNormalization folded into its Conv)."""

    value: ValueRef
    target: Mapped
    float_ops: tuple[str, ...]
    quant_ops: tuple[str, ...]
    folded: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Block:
    """One output of a Split after fused projections, and its counterpart: the float values
    that map to ``quant_value``; ``float_ops``, where the float graph fuses, the float span
    (weighted operation, bias, Split); ``quant_ops`` the quantized operations computing it."""

    float_values: tuple[ValueRef, ...]
    quant_value: ValueRef
    float_ops: tuple[str, ...]
    quant_ops: tuple[str, ...]


def align(float_graph: OpGraph, quant_graph: OpGraph) -> Alignment:
    """Align the values of two graphs built by ``layerbisect.graph.build_graph``."""
    return _Aligner(float_graph, quant_graph).run()


class _Aligner:
    def __init__(self, float_graph: OpGraph, quant_graph: OpGraph) -> None:
        self.fg, self.qg = float_graph, quant_graph
        self.fa, self.qa = dict(float_graph.ops()), dict(quant_graph.ops())
        self.vmap: dict[ValueRef, ValueRef] = {}
        self.layout: dict[ValueRef, Perm] = {}
        self.standing_for: dict[ValueRef, list[ValueRef]] = {}  # quantized value -> float values
        self.evidence: dict[str, str] = {}
        self.claimed: set[str] = set()
        self.quant_span: dict[str, tuple[str, ...]] = {}
        self.index: dict[tuple, list[str]] = {}
        self.quant_inputs: dict[str, list[tuple[ValueRef, ValueRef, Perm]]] = {}
        self.roots: dict[ValueRef, tuple[ValueRef, Perm]] = {}
        self.pending: set[str] = set()
        self.regions: dict[str, tuple[str, ...]] = {}
        self.float_siblings: dict[tuple, list[str]] = {}
        for node in _ordered(float_graph, "op"):
            self.float_siblings.setdefault(_float_key(float_graph.op(node)), []).append(node)
        self.quant_consumers = _consumers(quant_graph)
        self.float_consumers = _consumers(float_graph)
        self.baked: set[str] = set()
        self.float_only_inputs: set[str] = set()
        self.float_masks: set[str] = set()
        self.weighted_total = sum(is_weighted(attrs) for attrs in self.fa.values())
        self.anchors = anchor_pairs(float_graph, quant_graph)
        # roles that a quantized operation of another type stands for (LayerNormalization for
        # SkipLayerNormalization): a float operation of such a role may end a region
        self.fused_roles = {a.role for a in self.qa.values() if a.kind == "op" and a.role != a.op_type}
        # anchors whose weights agree: no other operation may take them
        self.trusted = {q: f for f, (q, agreement) in self.anchors.items() if agreement >= UNRELATED_WEIGHTS}

    def run(self) -> Alignment:
        self._align_inputs()
        self.float_masks = self._float_masks()
        for node in _ordered(self.qg, "op"):
            attrs = self.qa[node]
            inputs = [(src, *self._root(src)) for src in attrs.sources if src[0] not in self.baked]
            self.quant_inputs[node] = inputs
            self.index.setdefault((attrs.role, tuple(sorted(root for _, root, _ in inputs))), []).append(node)
        float_ops = _ordered(self.fg, "op")
        for node in float_ops:
            if node not in self.evidence and not self._align_op(node):  # (a fused projection
                # pairs its siblings at once)
                self.pending.add(node)
        self._align_pending(float_ops)  # once more: what paired later may settle what waited
        self._settle_graph_ends(float_ops)
        masks = self._masks_accounted()
        unaligned = tuple(node for node in float_ops if node in self.pending and node not in masks)
        spans = self._pairs()
        weighted = [node for node in float_ops if is_weighted(self.fa[node])]
        matches = self._weighted_matches(spans)
        agreements = [a for _, a in matches.values() if a is not None]
        return Alignment(
            tuple(pair for pair, _, _ in spans), unaligned, len(float_ops),
            weighted=len(weighted), weighted_paired=len(matches),
            weight_agreement=statistics.median(agreements) if agreements else math.nan,
            first_unpaired=next((self.fa[n].name for n in weighted if n not in matches), None),
        )

    def _align_pending(self, float_ops: list[str]) -> None:
        for node in float_ops:
            if node in self.pending and self._align_op(node):
                self.pending.discard(node)

    def _pair_anchor(self, node: str) -> bool:
        """Pair a weighted float operation that structure leaves waiting with its anchor,
        unclaimed, where their outputs have one shape (or one with the leading dimensions
        merged: a Gemm on a 2-D view), settling first the value it reads by what the anchor
        reads; the walk goes on from there: an operation that did not pair (a shape computed
        in another way, an unknown operation) costs its neighbourhood, not the rest of the
        graph. Whether it paired."""
        match, _ = self.anchors.get(node, (None, None))
        if match is None or match in self.claimed:
            return False
        shapes = self.fa[node].shapes[0], self.qa[match].shapes[0]
        if not (_shapes_agree(*shapes, None) or _rows_merged(*shapes)):
            return False
        self._fill_input(node, match)
        self._pair(node, match, None, "weights")
        return True

    def _fill_input(self, node: str, match: str) -> None:
        """Settle the waiting value a weighted float operation reads, about to pair with the
        quantized ``match`` by their weights: by a fold or a region ending in the value that
        ``match`` reads. Both are read through the Reshapes or Flattens of a 2-D view, on either
        side. The anchor pins the region's end, so that a region between two pairs of anchors
        is one layer of its own, not a part of the next weighted one's."""
        sources, quant_sources = self.fa[node].sources, self.qa[match].sources
        if len(sources) != 1 or len(quant_sources) != 1:
            return
        quant_values = [quant_sources[0]]
        while (op := quant_values[-1][0]) not in self.claimed and _is_view(self.qa[op]):
            quant_values.append(self.qa[op].sources[0])
        value = sources[0]
        while value not in self.vmap and value[0] in self.pending:
            fits = [s for s in self._folding(value) + self._region_settlements(value)
                    if s.target[0] in quant_values and s.target[1] is None]
            if fits:
                self._settle(fits[0])
                return
            if not _is_view(self.fa[value[0]]):
                return
            value = self.fa[value[0]].sources[0]

    # Inputs and layouts

    def _align_inputs(self) -> None:
        """Pair graph inputs by name, then by position, noting an NCHW/NHWC difference.

        An input that only one model declares is a constant baked into the other (a sample
        rate, a flag, an attention mask): it and what is computed from it alone are left out
        of the structure that pairs operations.
        """
        quant_inputs = {self.qa[n].name: n for n in _ordered(self.qg, "input")}
        leftover = _ordered(self.fg, "input")
        for node in list(leftover):
            match = quant_inputs.pop(self.fa[node].name, None)
            if match is not None:
                self._map((node, 0), (match, 0), self._input_layout(node, match))
                leftover.remove(node)
        for node, match in zip(leftover, list(quant_inputs.values())):
            self._map((node, 0), (match, 0), self._input_layout(node, match))
            quant_inputs.pop(self.qa[match].name)
        self.float_only_inputs = {node for node in leftover if (node, 0) not in self.vmap}
        self.baked = set(quant_inputs.values())
        for node in _ordered(self.qg, "op"):  # and what is computed from such inputs alone (an
            # attention mask's (1 - mask) * -10000, which the other model does not compute)
            if all(src[0] in self.baked for src in self.qa[node].sources):
                self.baked.add(node)

    def _float_masks(self) -> set[str]:
        """The float operations that compute from the attention mask alone, where the quantized
        graph reads that mask in a fused operator's own form (``graph``'s ``mask_inputs``): the
        float graph's additive mask, which nothing there computes. Regions leave them out; they
        are compared with nothing (see ``_masks_accounted``)."""
        quant_masks = set(self.qg.graph.get("mask_inputs", frozenset()))
        if quant_masks:  # and the inputs it declares but does not read (position ids, which a
            # GroupQueryAttention reads as cos/sin caches of its own)
            quant_masks |= {node for node in _ordered(self.qg, "input") if not self.qg.out_degree(node)}
        masks = {node for node in _ordered(self.fg, "input") if self.vmap.get((node, 0), ("",))[0] in quant_masks}
        inputs = set(masks)
        for node in _ordered(self.fg, "op"):
            sources = self.fa[node].sources
            if sources and all(src[0] in masks for src in sources) and not is_weighted(self.fa[node]):
                masks.add(node)
        return masks - inputs

    def _masks_accounted(self) -> set[str]:
        """The waiting float mask operations (``_float_masks``) whose value the paired
        operations read, directly or through other mask operations: the other graph reads that
        mask in its own form. A mask operation whose readers wait too is unpaired."""
        accounted: set[str] = set()
        for node in reversed(_ordered(self.fg, "op")):
            if node in self.float_masks and node in self.pending:
                outputs = range(len(self.fa[node].outputs))
                readers = {r for out in outputs for r in self.float_consumers.get((node, out), ())}
                if any(r in accounted or (r not in self.float_masks and r not in self.pending) for r in readers):
                    accounted.add(node)
        return accounted

    def _input_layout(self, node: str, match: str) -> Perm:
        return _input_layout(self.fa[node].shapes[0], self.qa[match].shapes[0])

    def _root(self, value: ValueRef) -> tuple[ValueRef, Perm]:
        """The quantized value that ``value`` is a transposition of (itself if none), and the
        permutation that takes the one to the other."""
        chain = []
        while value not in self.roots:
            attrs = self.qa[value[0]]
            if attrs.kind != "op" or not _is_transpose(attrs):
                self.roots[value] = (value, None)
                break
            chain.append(value)
            value = attrs.sources[0]
        root, perm = self.roots[value]
        for step in reversed(chain):
            perm = compose(perm, self.qa[step[0]].perm)
            self.roots[step] = (root, perm)
        return self.roots[chain[0]] if chain else self.roots[value]

    def _mapped(self, value: ValueRef) -> Mapped:
        return self.vmap[value], self.layout.get(value)

    def _map(self, value: ValueRef, quant_value: ValueRef, perm: Perm) -> None:
        """Record that the float ``value`` is ``quant_value`` permuted by ``perm``."""
        self.vmap[value] = quant_value
        self.layout[value] = perm
        self.standing_for.setdefault(quant_value, []).append(value)

    # One float operation

    def _sources(self, node: str) -> list[ValueRef]:
        """The values a float operation reads but those of inputs only the float model declares."""
        return [src for src in self.fa[node].sources if src[0] not in self.float_only_inputs]

    def _align_op(self, node: str) -> bool:
        attrs = self.fa[node]
        sources = self._sources(node)
        mapped = self._resolve(node, sources)
        if mapped is None:
            return self._pair_anchor(node) or self._settle_by_role(node)
        found = self._search(node, mapped)
        if found is not None:
            candidates, extension = found
            (match, perm), evidence = self._choose(node, candidates)
            if self._belongs_to_next(node, match) or self._belongs_to_sibling(node, match):
                return False
            if extension is not None:
                self._extend(*extension)
            self._pair(node, match, perm, evidence)
            return True
        plan = self._split_plan(node, mapped)
        if plan:
            self._apply_split(plan)
            return True
        folded = self._folding((node, 0))
        if folded and self._absorbed(node, sources):
            self._settle(folded[0])
            return True
        if _is_transpose(attrs) and len(mapped) == 1:
            (value, perm), = mapped
            self._map((node, 0), value, compose(perm, attrs.perm))
            self.evidence[node] = "layout"
            return True
        if _is_view(attrs) and len(mapped) == 1 and self._restores_rows(node, mapped[0]):
            self._map((node, 0), *mapped[0])
            self.evidence[node] = "fused"
            return True
        return self._pair_anchor(node) or self._settle_by_role(node)

    def _settle_by_role(self, node: str) -> bool:
        """Settle a waiting float operation as the end of a region whose quantized end has its
        role, where that region is the only one: a fused operator that stands for the last
        operation of a span (EmbedLayerNormalization for the embeddings' Gathers, their sum
        and its LayerNormalization; SkipLayerNormalization for a bias, a residual sum and a
        LayerNormalization). Whether it settled."""
        role = self.fa[node].role
        if role not in self.fused_roles or len(self.fa[node].outputs) != 1:
            return False
        found = [s for s in self._region_settlements((node, 0)) if self.qa[s.target[0][0]].role == role]
        if len(found) != 1:
            return False
        self._settle(found[0])
        return True

    def _restores_rows(self, node: str, target: Mapped) -> bool:
        """Whether the float view ``node`` (a Reshape or Flatten) brings back the shape of its
        input's counterpart ``target``, of which its input is a 2-D view (leading dimensions
        merged): the other graph computes without it."""
        (quant_value, perm), (source,) = target, self.fa[node].sources
        quant_shape, shape = self.qa[quant_value[0]].shapes[quant_value[1]], self.fa[node].shapes[0]
        return (perm is None and shape is not None and _shapes_agree(shape, quant_shape, None)
                and _rows_merged(quant_shape, self.fa[source[0]].shapes[source[1]]))

    # Projections fused into one weighted operation, then split

    def _split_plan(self, node: str, mapped: list[Mapped]) -> list[_Block]:
        """Where one graph computes, in one weighted operation (and a bias) followed by a
        Split of its last axis, what the other computes in several reading the same value (Q,
        K and V fused into one MatMul), and ``node`` is one of those operations on either
        side: each Split output that pairs with one of them (an empty list if none does)."""
        attrs = self.fa[node]
        matmul = attrs.role in ROLE_ALIASES["MatMul"]  # a Split of the last axis splits its columns
        if not matmul or not is_weighted(attrs) or len(mapped) != 1 or mapped[0][1] is not None:
            return []
        root, perm = self._root(mapped[0][0])
        if perm is not None:
            return []
        quant_readers = [q for role in ROLE_ALIASES[attrs.role] for q in self.index.get((role, (root,)), ())
                         if q not in self.claimed and is_weighted(self.qa[q])]
        split = _split_after(self.fa, self.float_consumers, node)
        if split is not None:  # the float graph fuses: its Split's outputs pair with the quantized ends
            singles = [q for q in quant_readers if q not in self.trusted]
            return [_Block(((split[-1], index),), (end[-1], 0), split, end)
                    for index, end in _assign_blocks(self.fa, split, self.qa, self.quant_consumers, singles)]
        siblings = [f for f in self.float_siblings[_float_key(attrs)]
                    if f not in self.evidence and is_weighted(self.fa[f])]
        for fused in quant_readers:
            split = _split_after(self.qa, self.quant_consumers, fused)
            if split is None:
                continue
            blocks = _assign_blocks(self.qa, split, self.fa, self.float_consumers, siblings)
            if any(end[0] == node for _, end in blocks):
                return [_Block(tuple((f, 0) for f in end), (split[-1], index), (), split) for index, end in blocks]
        return []

    def _apply_split(self, plan: list[_Block]) -> None:
        """Pair the values of ``plan`` (``_split_plan``), by the weights."""
        for block in plan:
            self.claimed.update(block.quant_ops)
            self.quant_span[block.quant_value[0]] = block.quant_ops
            for value in block.float_values:
                self._map(value, block.quant_value, None)
                self.evidence[value[0]] = "weights"
            for member in block.float_ops:
                self.evidence[member] = "weights"
            if block.float_ops:
                self.regions[block.float_values[-1][0]] = block.float_ops
            self.pending.difference_update(value[0] for value in block.float_values)
            self.pending.difference_update(block.float_ops)

    def _belongs_to_next(self, node: str, match: str) -> bool:
        """Whether ``match`` is rather the counterpart of the node's reader of the same role, a
        foldable operation whose weights it carries, or, where weights cannot tell, whose
        readers' roles it has where the node's are others (of two BatchNormalizations in a
        row, the quantized graph folded the first one, whatever else reads it, and kept the
        second)."""
        role = self.fa[node].role
        readers = [r for r in self.float_consumers.get((node, 0), ()) if self.fa[r].role == role]
        if len(readers) != 1 or role not in FUSABLE:
            return False
        (reader,) = readers
        fingerprint = self.qa[match].fingerprint
        if fingerprint is None or self.fa[reader].fingerprint is None:
            roles = _reader_roles(self.qa, self.quant_consumers, match)
            return _reader_roles(self.fa, self.float_consumers, reader) == roles != _reader_roles(
                self.fa, self.float_consumers, node)
        theirs = _similarity(self.fa[reader].fingerprint, fingerprint)
        return theirs > SAME_WEIGHTS and theirs > _similarity(self.fa[node].fingerprint, fingerprint) + 0.01

    def _belongs_to_sibling(self, node: str, match: str) -> bool:
        """Whether ``match`` is rather the counterpart of an unpaired float sibling (same role,
        same inputs), whose readers' roles are those of the match's readers where the node's
        are not (of two Relus on one value, quantization clamped one away and kept the other)."""
        readers = _reader_roles(self.qa, self.quant_consumers, match)
        if _reader_roles(self.fa, self.float_consumers, node) == readers:
            return False
        return any(
            _reader_roles(self.fa, self.float_consumers, sibling) == readers
            for sibling in self.float_siblings[_float_key(self.fa[node])]
            if sibling != node and sibling not in self.evidence
        )

    def _pair(self, node: str, match: str, perm: Perm, evidence: str) -> None:
        attrs = self.fa[node]
        self.claimed.add(match)
        self.quant_span.setdefault(match, (match,))
        self.evidence[node] = evidence
        for index in range(min(len(attrs.outputs), len(self.qa[match].outputs))):
            self._map((node, index), (match, index), perm)
        if attrs.bias and not self.qa[match].bias:
            self._take_bias((match, 0))
        if attrs.role in ANCHORS:
            self._take_batchnorms(node, (match, 0))

    def _absorbed(self, node: str, sources: list[ValueRef]) -> bool:
        """Whether the quantized operation behind the node's one input already computes the
        node: a bias the float producer lacks (Gemm for MatMul + Add), or a fused activation."""
        if len(set(sources)) != 1 or sources[0] not in self.vmap:
            return False
        source = sources[0]
        if self.evidence.get(source[0]) in (None, "fused", "layout") or len(self.float_consumers[source]) != 1:
            return False
        quant = self.qa[self.vmap[source][0]]
        role = self.fa[node].role
        if role == "Add":
            return quant.bias and not self.fa[source[0]].bias
        return role in ACTIVATIONS and quant.op_type in ACTIVATION_FUSIONS

    # Candidates

    def _search(self, node: str, mapped: list[Mapped]) -> tuple[list, tuple | None] | None:
        """Candidates for ``node`` given its inputs' counterparts, trying again, if none, as if
        a quantized input had absorbed the float graph's next operation; with the tail that
        then needs claiming. None when nothing qualifies."""
        candidates = self._candidates(node, mapped)
        if candidates:
            return candidates, None
        # an operation of the role of the node's own reader is rather that reader's counterpart
        # (a Relu the quantized graph clamped away, then a Mul on both sides): not absorbed
        readers = {self.fa[reader].role for reader in self.float_consumers.get((node, 0), ())}
        for position, (source, (value, perm)) in enumerate(zip(self._sources(node), mapped)):
            view = self._view_back(source, value) if perm is None else None
            tail = [view] if view is not None else list(
                takewhile(lambda op: self.qa[op].role not in readers, self._tail(value)))
            for step, extended in enumerate(tail):
                trial = mapped[:position] + [((extended, 0), perm)] + mapped[position + 1:]
                candidates = self._candidates(node, trial)
                if candidates:
                    return candidates, (value, tail[: step + 1])
        return None

    def _view_back(self, value: ValueRef, quant_value: ValueRef) -> str | None:
        """The unclaimed Reshape or Flatten that alone reads ``quant_value``, a 2-D view (leading
        dimensions merged) of the float ``value``, and brings back ``value``'s shape; None if
        there is none."""
        readers = self.quant_consumers.get(quant_value, ())
        if len(readers) != 1 or readers[0] in self.claimed or not _is_view(self.qa[readers[0]]):
            return None
        shape = self.fa[value[0]].shapes[value[1]]
        view = self.qa[readers[0]].shapes[0]
        fits = shape is not None and view is not None and _shapes_agree(shape, view, None)
        return readers[0] if fits and _rows_merged(shape, self.qa[quant_value[0]].shapes[quant_value[1]]) else None

    def _candidates(self, node: str, mapped: list[Mapped]) -> list[tuple[str, Perm]]:
        """Unclaimed quantized operations that compute ``node`` from ``mapped`` (through
        Transposes), each with the permutation from its output to the node's."""
        attrs = self.fa[node]
        roots, read_as_mapped = [], True
        for value, perm in mapped:
            root, root_perm = self._root(value)
            roots.append((root, compose(root_perm, perm)))
            read_as_mapped = read_as_mapped and root_perm is None
        key = tuple(sorted(root for root, _ in roots))
        found: list[tuple[str, Perm]] = []
        views: list[tuple[str, Perm]] = []
        for role in ROLE_ALIASES.get(attrs.role, (attrs.role,)):
            for match in self.index.get((role, key), ()):
                if match in self.claimed:
                    continue
                fits, perm = self._layout_fits(attrs, self.qa[match], roots, self.quant_inputs[match], read_as_mapped)
                if not fits or not self._keeps_anchors(node, match):
                    continue
                shapes = attrs.shapes[0], self.qa[match].shapes[0]
                if _shapes_agree(*shapes, perm):
                    found.append((match, perm))
                elif perm is None and attrs.role in VIEWS and _rows_merged(*shapes):
                    views.append((match, perm))  # one reshapes to the other's 2-D view
        return found or views

    def _keeps_anchors(self, node: str, match: str) -> bool:
        """Whether pairing ``node`` with ``match`` leaves the anchors whose weights agree
        alone: such an anchor pairs with its own float operation only, and that one with it."""
        owner = self.trusted.get(match)
        if owner is not None:
            return owner == node
        partner, agreement = self.anchors.get(node, (None, 0.0))
        return partner is None or agreement < UNRELATED_WEIGHTS or partner == match

    def _layout_fits(
        self, attrs: Op, quant: Op, roots: list, inputs: list, read_as_mapped: bool
    ) -> tuple[bool, Perm]:
        """Whether a quantized operation with ``inputs`` computes the float operation whose
        inputs are ``roots`` in the layouts they have, and the permutation of its output.
        ``read_as_mapped``: the inputs' counterparts are no quantized Transposes' outputs."""
        layouts = []
        free = list(range(len(inputs)))
        for position, (root, perm) in enumerate(roots):
            options = [i for i in free if inputs[i][1] == root]
            chosen = position if position in options else options[0]
            free.remove(chosen)
            source, _, quant_perm = inputs[chosen]
            shape = self.qa[source[0]].shapes[source[1]]
            layouts.append((compose(inverse(quant_perm), perm), None if shape is None else len(shape)))
            read_as_mapped = read_as_mapped and quant_perm is None
        if attrs.role == "Transpose":  # the same permutation of the same value, so that
            # Transposes that cancel out cannot stand for one the other graph lacks
            return layouts[0][0] is None and attrs.perm is not None and quant.perm == attrs.perm, None
        if attrs.role in LAYOUT_FREE:  # with no quantized Transpose on the way, any layout
            # is the float graph's own Transposes, which an optimizer pushed past the operation
            return _common_layout(layouts, any_perm=read_as_mapped)
        if attrs.role == "Concat":  # inputs in one layout join along the permuted axis (an
            # optimizer moves Transposes through a Concat); the output shapes tell which axis
            perms = {perm for perm, _ in layouts}
            return len(perms) == 1, next(iter(perms)) if len(perms) == 1 else None
        expected = compose(quant.layout, inverse(attrs.layout))
        return all(perm == expected for perm, _ in layouts), expected

    def _tail(self, value: ValueRef) -> list[str]:
        """Unclaimed single-input operations that follow ``value`` alone, in chain order."""
        chain: list[str] = []
        while len(chain) < 4:
            consumers = self.quant_consumers.get(value, ())
            if len(consumers) != 1:
                break
            (nxt,) = consumers
            attrs = self.qa[nxt]
            if nxt in self.claimed or attrs.role not in FUSABLE or len(attrs.sources) != 1:
                break
            chain.append(nxt)
            value = (nxt, 0)
        return chain

    def _extend(self, value: ValueRef, tail: list[str]) -> None:
        """The quantized value continues through ``tail`` (element-wise operations the float
        graph folded): the float values it stood for now stand at the tail's end."""
        end = tail[-1]
        self.claimed.update(tail)
        self.quant_span[end] = self.quant_span.get(value[0], (value[0],)) + tuple(tail)
        for float_value in self.standing_for.pop(value, []):
            self._map(float_value, (end, 0), self.layout[float_value])

    def _take_bias(self, value: ValueRef) -> None:
        """The float operation adds its bias inside; the quantized one leaves it to an Add."""
        tail = self._tail(value)
        if tail and self.qa[tail[0]].role == "Add":
            self._extend(value, tail[:1])

    def _take_batchnorms(self, node: str, value: ValueRef) -> None:
        """Where the quantized operation is followed by more BatchNormalizations in a row (each
        its input's only reader) than the float one, the float graph folded the first of them
        into its weights: the float operation's value is the last of those."""
        quant = list(takewhile(lambda op: self.qa[op].role == "BatchNormalization", self._tail(value)))
        extra = len(quant) - _batchnorms_after(self.fa, self.float_consumers, (node, 0))
        if extra > 0:
            self._extend(value, quant[:extra])

    def _choose(self, node: str, candidates: list[tuple[str, Perm]]) -> tuple[tuple[str, Perm], str]:
        """Pick among several candidates: by weights, matching all of the node's unpaired
        siblings (float ops of the same role on the same inputs) at once, most similar first,
        so that a corrupted weight cannot steal a sibling's partner; then by name, then order."""
        attrs = self.fa[node]
        siblings = [s for s in self.float_siblings[_float_key(attrs)] if s not in self.evidence]
        if len(candidates) == 1:  # where siblings read the same inputs, the only one their
            # anchors' or its own weights left
            by_weights = len(siblings) > 1 and any(
                self.anchors.get(s, (None, 0.0))[1] >= UNRELATED_WEIGHTS for s in siblings)
            return candidates[0], "weights" if by_weights else "structure"
        perms = dict(candidates)
        names = list(perms)
        scores = sorted(
            ((_similarity(self.fa[s].fingerprint, self.qa[q].fingerprint), i, s, q)
             for i, s in enumerate(siblings) for q in names),
            key=lambda item: (-item[0], item[1]),
        )
        if scores and scores[0][0] > 0:
            taken: set[str] = set()
            for score, _, sibling, match in scores:
                if score <= 0 or sibling in taken or match in taken:
                    continue
                if sibling == node:
                    return (match, perms[match]), "weights"
                taken.update((sibling, match))
        by_name = [_name_score(attrs.name, self.qa[q].name) for q in names]
        if max(by_name) > 0 and by_name.count(max(by_name)) == 1:
            best = names[by_name.index(max(by_name))]
            return (best, perms[best]), "name"
        return candidates[0], "order"

    # Waiting float operations

    def _resolve(self, node: str, sources: list[ValueRef]) -> list[Mapped] | None:
        """The counterparts of the node's inputs, settling inputs that wait (folded, else
        regions) in the first way that lets the node pair; None if there is none."""
        waiting = list(dict.fromkeys(src for src in sources if src not in self.vmap))
        if not waiting:
            return [self._mapped(src) for src in sources]
        if any(src[0] not in self.pending for src in waiting):
            return None
        # a fold is the simpler explanation: try it before regions
        options = [self._folding(src) + self._region_settlements(src) for src in waiting]
        for combination in islice(product(*options), MAX_TRIALS):
            if not _disjoint(combination):
                continue
            chosen = {settlement.value: settlement.target for settlement in combination}
            mapped = [chosen[src] if src in chosen else self._mapped(src) for src in sources]
            if self._search(node, mapped) is not None or self._split_plan(node, mapped):
                for settlement in combination:
                    self._settle(settlement)
                return mapped
        return None

    def _folding(self, value: ValueRef) -> list[_Settlement]:
        """Settle ``value`` as folded into the quantized operation before it, or into a
        quantization that clamps like a Relu: a chain of single-input foldable float
        operations, each its input's only reader, and Transposes the other graph lacks. A
        Relu or Clip may share its input: onnxruntime removes one whose QuantizeLinear clamps
        anyway, and the values before and after it stand for one quantized value here."""
        chain: list[str] = []
        node = value[0]
        while len(chain) < MAX_REGION:
            attrs = self.fa[node]
            sources = {src for src in attrs.sources if src[0] not in self.float_only_inputs}
            waiting = node in self.pending or node == value[0]
            foldable = attrs.role in FUSABLE or _is_transpose(attrs)
            if not waiting or not foldable or len(sources) != 1:
                return []
            (source,) = sources
            shared = len(self.float_consumers[source]) > 1
            if shared and attrs.role in FUSABLE - CLAMPS:
                return []
            chain.append(node)
            if source in self.vmap:
                quant_value, perm = self._mapped(source)
                if not self._can_fold(chain, quant_value):
                    return []
                for member in reversed(chain):
                    perm = compose(perm, self.fa[member].perm)
                return [_Settlement(value, (quant_value, perm), tuple(reversed(chain)), ())]
            node = source[0]
        return []

    def _can_fold(self, chain: list[str], quant_value: ValueRef) -> bool:
        """Whether the quantized operation behind ``quant_value`` can hold what ``chain``
        computes: a constant added or subtracted needs a bias of its own (a MatMul has none,
        and what adds onnxruntime's fused bias is the next operation, SkipLayerNormalization)."""
        adds = any(self.fa[member].role in ("Add", "Sub") for member in chain)
        return not adds or self.qa[quant_value[0]].bias

    def _region_settlements(self, value: ValueRef) -> list[_Settlement]:
        """Settle ``value`` as the end of a region: the waiting float operations behind it,
        computed by a closed region of unclaimed quantized operations from the same values."""
        found = self._float_region(value[0])
        if found is None:
            return []
        region, frontier = found
        if not _sealed(self.fa, self.float_consumers, value[0], region):
            return []
        folded = self._folded_batchnorms(value[0], region)
        region = tuple(node for node in region if node not in folded)
        shape = self.fa[value[0]].shapes[value[1]]
        settlements = []
        for end, (members, uses, perm) in self._quant_closure(frontier).items():
            if (uses != frontier.keys() or len(region) + len(members) < 3 or not _channel_move(perm)
                    or any(self.trusted.get(member, region[-1]) not in region for member in members)
                    or not _shapes_agree(shape, self.qa[end].shapes[0], perm)
                    or _anchors(self.qa, members) > _anchors(self.fa, region)
                    or not self._region_weighted_fits(region)
                    or _moves_only(self.qa, members) != _moves_only(self.fa, region)
                    or not _sealed(self.qa, self.quant_consumers, end, members)):
                continue
            order = tuple(sorted(members, key=lambda n: self.qa[n].order))
            settlements.append(_Settlement(value, ((end, 0), perm), region, order, folded))
        return settlements

    def _folded_batchnorms(self, end: str, region: tuple[str, ...]) -> tuple[str, ...]:
        """The BatchNormalizations at the head of a float region (not its end) that read a
        paired weighted operation's output, as its only reader. A BatchNormalization with
        nothing of its role on the other side was folded into that operation's weights: the
        quantized operation computes its output, not the bare Conv's (taking it into the region
        would pair the float Conv with a value it does not compute, a false alarm at a sound
        layer), whatever the weights are, so that a corrupted Conv still pairs the same way."""
        folded = []
        for node in region:
            if node == end or self.fa[node].role != "BatchNormalization":
                continue
            source = self.fa[node].sources[0]
            if source in self.vmap and self.fa[source[0]].role in ANCHORS and len(self.float_consumers[source]) == 1:
                folded.append(node)
        return tuple(folded)

    def _region_weighted_fits(self, region: tuple[str, ...]) -> bool:
        """Whether a float region holds few enough weighted operations to be one layer: at most
        ``MAX_REGION_WEIGHTED``, and at most half of the model's (a region computing the whole
        model against another network is no layer)."""
        inside = sum(is_weighted(self.fa[n]) for n in region)
        return inside <= MAX_REGION_WEIGHTED and 2 * inside <= self.weighted_total

    def _float_region(self, node: str) -> tuple[tuple[str, ...], dict[ValueRef, Perm]] | None:
        """The waiting float operations behind ``node`` (itself included), in order, and the
        counterparts of the paired values they read, with their layouts; None if too large,
        if not all are paired, or if one quantized value stands for two layouts."""
        region, stack = set(), [node]
        frontier: dict[ValueRef, Perm] = {}
        while stack:
            current = stack.pop()
            if current in region:
                continue
            region.add(current)
            if len(region) > MAX_REGION:
                return None
            for src in self.fa[current].sources:
                if src in self.vmap:
                    value, perm = self._mapped(src)
                    if frontier.setdefault(value, perm) != perm:
                        return None
                elif src[0] in self.float_masks and current not in self.float_masks:
                    continue  # the other graph reads the mask in its own form, outside structure
                elif src[0] in self.pending:
                    stack.append(src[0])
                elif src[0] not in self.float_only_inputs:
                    return None
        return tuple(sorted(region, key=lambda n: self.fa[n].order)), frontier

    def _quant_closure(self, frontier: dict[ValueRef, Perm]) -> dict[str, tuple[frozenset, frozenset, Perm]]:
        """Unclaimed quantized operations computed from ``frontier`` alone, in order, each with
        the operations its value needs (itself included), the frontier values it reads and the
        permutation from its output to the float model's layout (Transposes inside a region
        and channels-last operations are followed)."""
        closed: dict[str, tuple[frozenset, frozenset, Perm]] = {}
        heap: list[tuple[float, str]] = []
        seen: set[str] = set()

        def push_readers(value: ValueRef) -> None:
            for reader in self.quant_consumers.get(value, ()):
                if reader not in seen and reader not in self.claimed:
                    seen.add(reader)
                    heapq.heappush(heap, (self.qa[reader].order, reader))

        for value in frontier:
            push_readers(value)
        for _ in range(MAX_VISIT):
            if not heap:
                break
            _, op = heapq.heappop(heap)
            members, uses, layouts = {op}, set(), []
            for src in self.qa[op].sources:
                shape = self.qa[src[0]].shapes[src[1]]
                rank = None if shape is None else len(shape)
                if src in frontier:
                    uses.add(src)
                    layouts.append((frontier[src], rank))
                elif src[0] in closed:
                    members |= closed[src[0]][0]
                    uses |= closed[src[0]][1]
                    layouts.append((closed[src[0]][2], rank))
                elif src[0] not in self.baked:
                    break
            else:
                fits, perm = _quant_layout(self.qa[op], layouts)
                if fits and len(members) <= MAX_REGION:
                    closed[op] = (frozenset(members), frozenset(uses), perm)
                    for index in range(len(self.qa[op].outputs)):
                        push_readers((op, index))
        return closed

    def _settle(self, settlement: _Settlement) -> None:
        value, float_ops, quant_ops = settlement.value, settlement.float_ops, settlement.quant_ops
        self.pending.difference_update(float_ops)
        for node in settlement.folded:
            self._settle(_Settlement((node, 0), self._mapped(self.fa[node].sources[0]), (node,), ()))
        if quant_ops:
            (end, _), _ = settlement.target
            self.claimed.update(quant_ops)
            self.quant_span[end] = quant_ops
            self._map(value, (end, 0), settlement.target[1])
            self.regions[value[0]] = float_ops
            self.evidence[value[0]] = "region"
            return
        quant_value, perm = settlement.target
        for node in reversed(float_ops):
            self._map((node, 0), quant_value, perm)
            self.evidence[node] = "fused"
            if _is_transpose(self.fa[node]):
                self.evidence[node] = "layout"
                perm = compose(perm, inverse(self.fa[node].perm))

    def _settle_graph_ends(self, float_ops: list[str]) -> None:
        """Settle waiting float operations that nothing reads: a region ending where the
        quantized graph ends, or else folded into the operation before, if that one ends the
        quantized graph too (with no reader to verify it, a fold must end both graphs)."""
        for node in reversed(float_ops):
            outputs = range(len(self.fa[node].outputs))
            if node not in self.pending or any((node, i) in self.float_consumers for i in outputs):
                continue
            value = (node, 0)
            ends = [s for s in self._region_settlements(value) if self._unread(s.target[0][0])]
            if len(ends) > 1:  # alike ends: the one the quantized model declares in the same place
                ends = [s for s in ends if self._same_output(value, s.target[0])]
            folds = [s for s in self._folding(value) if self._unread(s.target[0][0])]
            options = (ends if len(ends) == 1 else []) + folds
            if options:
                self._settle(options[0])

    def _same_output(self, value: ValueRef, quant_value: ValueRef) -> bool:
        """Whether the two values are declared outputs of their models at the same position."""
        float_outputs, quant_outputs = self.fg.outputs, self.qg.outputs
        return value in float_outputs and quant_outputs[float_outputs.index(value):][:1] == (quant_value,)

    def _unread(self, op: str) -> bool:
        """Whether nothing reads the quantized node's outputs but Transposes left unread."""
        return all(
            self.qa[reader].role == "Transpose" and self._unread(reader)
            for index in range(len(self.qa[op].readouts))
            for reader in self.quant_consumers.get((op, index), ())
        )

    # Result

    def _weighted_matches(self, spans) -> dict[str, tuple[str, float | None]]:
        """Each weighted float operation paired one for one, with the quantized operation
        computing it and how well their weights agree (``weights.channel_agreement``): pairs
        whose float span holds one weighted operation and whose quantized span one anchor, and
        the weighted operations of a region whose quantized side holds their weights packed in
        one (Q, K and V in an Attention), each with its block of the packed weight's columns."""
        matches = {}
        for _, span, quant in spans:
            weighted = [n for n in span if is_weighted(self.fa[n])]
            anchors = [n for n in quant if self.qa[n].role in ANCHORS]
            if len(weighted) == len(anchors) == 1:
                matches[weighted[0]] = anchors[0], channel_agreement(self.fa[weighted[0]], self.qa[anchors[0]])
                continue
            packed = [n for n in quant if self.qa[n].weight_shape is not None]
            if len(weighted) > 1 and len(packed) == 1 and not anchors:
                blocks = _packed_blocks(self.qa[packed[0]], [self.fa[n] for n in weighted])
                for node, agreement in zip(weighted, blocks):
                    matches[node] = packed[0], agreement
        return matches

    def _pairs(self) -> list[tuple[Pair, tuple[str, ...], tuple[str, ...]]]:
        """Every pair, in the float model's order, with the float and quantized graph nodes of
        its spans."""
        by_quant: dict[ValueRef, list[ValueRef]] = {}
        for float_value, quant_value in self.vmap.items():
            if (self.fa[float_value[0]].kind == "op" and self.qa[quant_value[0]].kind == "op"
                    and self.evidence[float_value[0]] != "layout"):
                by_quant.setdefault(quant_value, []).append(float_value)
        pairs = []
        for quant_value, float_values in by_quant.items():
            float_values.sort(key=lambda v: (self.fa[v[0]].order, v[1]))
            last_value = float_values[-1]
            last_node, index = last_value
            last = self.fa[last_node]
            float_readout = last.readouts[index]
            if not _reads_float(last, index):
                continue
            quant_node, quant_index = quant_value
            quant_readout = self.qa[quant_node].readouts[quant_index]
            span = tuple(dict.fromkeys(
                member for v in float_values for member in self.regions.get(v[0], (v[0],))
            ))
            evidence = self.evidence[last_node] if len(span) == 1 or last_node in self.regions else "fused"
            pairs.append((last.order, index, span, self.quant_span[quant_node], Pair(
                float_nodes=tuple(self.fa[n].name for n in span),
                float_tensor=float_readout.tensor,
                quant_nodes=tuple(self.qa[n].name for n in self.quant_span[quant_node]),
                quant_tensor=quant_readout.tensor,
                op_type=last.op_type,
                evidence=evidence,
                float_readout=float_readout,
                quant_readout=_permuted(quant_readout, self.layout.get(last_value)),
                float_output=last.outputs[index],
            )))
        pairs.sort(key=lambda item: item[:2])
        return [(pair, span, quant) for _, _, span, quant, pair in pairs]


def is_weighted(attrs: Op) -> bool:
    """Whether a graph node is a weighted operation: an anchor with a constant weight (a
    MatMul of two activations is none)."""
    return attrs.kind == "op" and attrs.role in ANCHORS and attrs.fingerprint is not None


def _reads_float(attrs: Op, index: int) -> bool:
    """Whether an output of a float-graph operation is read as float values: a float tensor,
    or one its readout carries through a quantization shell, which ends in integers with
    their scale, or in float (a DequantizeLinear, an integer operator's Cast and rescaling
    Mul). A quantized model compared as the float side has such outputs."""
    readout = attrs.readouts[index]
    return (attrs.dtypes[index] in FLOAT_DTYPES | {None} or readout.scale is not None
            or readout.tensor != attrs.outputs[index])


def _permuted(readout: Readout, perm: Perm) -> Readout:
    return readout if perm is None else replace(readout, perm=perm)


def _ordered(graph: OpGraph, kind: str) -> list[str]:
    nodes = [n for n, attrs in graph.ops() if attrs.kind == kind]
    return sorted(nodes, key=lambda n: graph.op(n).order)


def _float_key(attrs: Op) -> tuple:
    return attrs.role, tuple(sorted(attrs.sources))


def _consumers(graph: OpGraph) -> dict[ValueRef, list[str]]:
    consumers: dict[ValueRef, list[str]] = {}
    for node, attrs in graph.ops():
        for source in dict.fromkeys(attrs.sources):
            consumers.setdefault(source, []).append(node)
    return consumers


def _reader_roles(attrs: Mapping[str, Op], consumers: dict, node: str) -> list[str]:
    return sorted(attrs[reader].role for reader in consumers.get((node, 0), ()))


def _sealed(attrs: Mapping[str, Op], consumers: dict, end: str, members) -> bool:
    """Whether every value of a region but its end is read inside the region only: a value
    read outside exists in the other graph too, and a region must not swallow it."""
    return all(
        reader in members
        for member in members if member != end
        for index in range(len(attrs[member].outputs))
        for reader in consumers.get((member, index), ())
    )


def _batchnorms_after(attrs: Mapping[str, Op], consumers: dict, value: ValueRef) -> int:
    """How many BatchNormalizations read ``value`` in a row, each the previous one's output."""
    count = 0
    while True:
        readers = [r for r in consumers.get(value, ()) if attrs[r].role == "BatchNormalization"]
        if not readers:
            return count
        count, value = count + 1, (readers[0], 0)


def _anchors(attrs: Mapping[str, Op], nodes) -> int:
    return sum(attrs[n].role in ANCHORS for n in nodes)


def _moves_only(attrs: Mapping[str, Op], nodes) -> bool:
    return all(attrs[n].role in MOVES for n in nodes)


def _disjoint(settlements: tuple[_Settlement, ...]) -> bool:
    """Whether no two settlements share a float or a quantized operation."""
    ops = [("f", n) for s in settlements for n in s.float_ops + s.folded]
    ops += [("q", n) for s in settlements for n in s.quant_ops]
    return len(ops) == len(set(ops))


def _with_bias(attrs: Mapping[str, Op], consumers: dict, op: str) -> tuple[str, ...]:
    """``op`` and the bias Add after it, if one alone reads it (an Add of a constant)."""
    readers = consumers.get((op, 0), ())
    if len(readers) == 1 and attrs[readers[0]].role == "Add" and len(attrs[readers[0]].sources) == 1:
        return op, readers[0]
    return (op,)


def _has_bias(attrs: Mapping[str, Op], ops: tuple[str, ...]) -> bool:
    return len(ops) > 1 or attrs[ops[0]].bias


def _split_after(attrs: Mapping[str, Op], consumers: dict, op: str) -> tuple[str, ...] | None:
    """The weighted ``op``, its bias Add if any, and the Split of its last axis that alone
    reads them (into as many parts as it has outputs, each of a known size); None if not so."""
    ops = _with_bias(attrs, consumers, op)
    readers = consumers.get((ops[-1], 0), ())
    if len(readers) != 1 or attrs[readers[0]].role != "Split" or len(attrs[readers[0]].sources) != 1:
        return None
    shape, weight_shape = attrs[op].shapes[0], attrs[op].weight_shape
    sizes = _last_sizes(attrs[readers[0]])
    if shape is None or weight_shape is None or sizes is None or not all(
            _shapes_agree(shape[:-1], part[:-1], None) for part in attrs[readers[0]].shapes if part is not None):
        return None
    return (*ops, readers[0]) if sum(sizes) == weight_shape[-1] else None


def _last_sizes(op: Op) -> list[int] | None:
    """The size of the last axis of each output of ``op``; None where one is unknown."""
    sizes = [None if shape is None else shape[-1] for shape in op.shapes]
    return None if any(size is None for size in sizes) else [int(size) for size in sizes if size is not None]


def _assign_blocks(fused_attrs: Mapping[str, Op], chain: tuple[str, ...], attrs: Mapping[str, Op], consumers: dict,
                   singles: list[str]) -> list[tuple[int, tuple[str, ...]]]:
    """Which of the weighted operations ``singles`` (of the other graph) computes each output
    of the Split ending ``chain`` (``_split_after``): ``(output index, the single and its bias
    Add)``. Each output takes the single whose weights agree the most with the output's block
    of the fused weight's columns, at least ``UNRELATED_WEIGHTS``, most agreeing first; then
    the one output left takes the one single of its size left (a corrupted weight). Both add
    a bias, or neither."""
    fused, split = chain[0], chain[-1]
    sizes, fused_shape = _last_sizes(fused_attrs[split]), fused_attrs[fused].weight_shape
    if sizes is None or fused_shape is None:
        return []
    starts = np.cumsum([0, *sizes[:-1]])
    ends = {single: _with_bias(attrs, consumers, single) for single in singles}
    shapes = {single: attrs[single].weight_shape or () for single in singles}
    fitting = [single for single in singles if _has_bias(attrs, ends[single]) == _has_bias(fused_attrs, chain[:-1])
               and shapes[single] and shapes[single][:-1] == fused_shape[:-1]]
    scores = sorted(
        ((agreement, index, single) for index, (start, size) in enumerate(zip(starts, sizes))
         for single in fitting if shapes[single][-1] == size
         if (agreement := _block_agreement(fused_attrs[fused], int(start), size, attrs[single])) is not None),
        key=lambda item: -item[0],
    )
    taken: dict[int, str] = {}
    for agreement, index, single in scores:
        if agreement >= UNRELATED_WEIGHTS and index not in taken and single not in taken.values():
            taken[index] = single
    left = [index for index in range(len(sizes)) if index not in taken]
    if taken and len(left) == 1:
        rest = [single for single in fitting if single not in taken.values() and shapes[single][-1] == sizes[left[0]]]
        if len(rest) == 1:
            taken[left[0]] = rest[0]
    return sorted((index, ends[single]) for index, single in taken.items())


def _packed_blocks(packed: Op, singles: list[Op]) -> list[float | None]:
    """How well each of the weighted operations ``singles`` agrees with its block of the
    columns of ``packed``'s weight, which holds all of theirs side by side (an empty list
    where it does not: other rows, or other columns in all). Blocks are taken in the singles'
    order, the way onnxruntime packs Q, K and V."""
    shape = packed.weight_shape or ()
    shapes = [single.weight_shape or () for single in singles]
    fits = all(s and tuple(s[:-1]) == tuple(shape[:-1]) for s in shapes)
    if (not fits or len(shape) != 2 or sum(s[-1] for s in shapes) != shape[-1] or packed.fingerprint is None
            or any(single.fingerprint is None for single in singles)):
        return []
    starts = np.cumsum([0, *[s[-1] for s in shapes[:-1]]])
    return [_block_agreement(packed, int(start), s[-1], single) for start, s, single in zip(starts, shapes, singles)]


def _block_agreement(fused: Op, start: int, size: int, single: Op) -> float | None:
    """``weights.channel_agreement`` of ``single`` with the columns ``start`` to ``start +
    size`` of the weight of ``fused`` (both in MatMul orientation), over the rows both
    fingerprints hold."""
    if fused.weight_shape is None or fused.fingerprint is None or single.fingerprint is None:
        return None
    columns = fused.weight_shape[-1]
    rows = min(fused.fingerprint.size // columns, single.fingerprint.size // size)
    block = fused.fingerprint[: rows * columns].reshape(rows, columns)[:, start:start + size]
    part = single.fingerprint[: rows * size]
    x, y = (standardized_channels(output_channels(values, (rows, size), "MatMul")) for values in (block.ravel(), part))
    return agreement(x, y)


def _is_view(attrs: Op) -> bool:
    """Whether an operation is a Reshape or a Flatten of one value (its target shape, if
    computed, a constant): it keeps the values in their order."""
    return attrs.role in VIEWS and len(attrs.sources) == 1


def _is_transpose(attrs: Op) -> bool:
    """Whether an operation is a Transpose whose permutation is known."""
    return attrs.role == "Transpose" and attrs.perm is not None


def _common_layout(layouts: list[tuple[Perm, int | None]], any_perm: bool = False) -> tuple[bool, Perm]:
    """For an element-wise operation whose inputs have these layouts (permutation, rank):
    whether they agree, and the layout of its output. An input read as it is alongside
    permuted ones must be a broadcast operand of lower rank. Only channels-first/last moves
    count as layouts, unless ``any_perm``: any other permutation is a computation of its own."""
    perms = {perm for perm, _ in layouts if perm is not None}
    if len(perms) != 1:
        return not perms, None
    (perm,) = perms
    broadcast = all(rank is not None and rank != len(perm) for p, rank in layouts if p is None)
    return broadcast and (any_perm or _channel_move(perm)), perm


def _quant_layout(quant: Op, layouts: list[tuple[Perm, int | None]]) -> tuple[bool, Perm]:
    """Whether a quantized operation computes what it stands for with inputs in these layouts
    (relative to the float model's), and the layout of its output."""
    if quant.role == "Transpose":
        return quant.perm is not None, compose(inverse(quant.perm), layouts[0][0])
    if quant.role in LAYOUT_FREE:
        return _common_layout(layouts)
    return all(perm == quant.layout for perm, _ in layouts), quant.layout


def _channel_move(perm: Perm) -> bool:
    """Whether ``perm`` is no permutation or moves channels between first and last."""
    if perm is None:
        return True
    return perm in channel_moves(len(perm))


def _input_layout(float_shape: tuple | None, quant_shape: tuple | None) -> Perm:
    """The channels-first/last permutation taking a quantized input to the float one, if the
    shapes differ by exactly that."""
    if float_shape is None or quant_shape is None or len(float_shape) != len(quant_shape) or len(quant_shape) < 3:
        return None
    if _shapes_agree(float_shape, quant_shape, None):
        return None
    for perm in channel_moves(len(quant_shape)):
        if _shapes_agree(float_shape, quant_shape, perm):
            return perm
    return None


def _rows_merged(float_shape: tuple | None, quant_shape: tuple | None) -> bool:
    """Whether one shape can be the other with its leading dimensions merged into one ([1, 8,
    32] and [8, 32]: a MatMul over a batch and a Gemm over its 2-D view): ranks of 2 or more
    that differ, and last and merged dimensions that agree where known."""
    if float_shape is None or quant_shape is None or len(float_shape) == len(quant_shape):
        return False
    if min(len(float_shape), len(quant_shape)) < 2 or not _shapes_agree(float_shape[-1:], quant_shape[-1:], None):
        return False
    leading = float_shape[:-1] + quant_shape[:-1]
    return None in leading or math.prod(float_shape[:-1]) == math.prod(quant_shape[:-1])


def _shapes_agree(float_shape: tuple | None, quant_shape: tuple | None, perm: Perm) -> bool:
    """Whether the shapes can be equal once the quantized one is permuted by ``perm``."""
    if float_shape is None or quant_shape is None:
        return True
    if perm is not None:
        if len(perm) != len(quant_shape):
            return False
        quant_shape = tuple(quant_shape[axis] for axis in perm)
    return len(float_shape) == len(quant_shape) and all(
        x is None or y is None or x == y for x, y in zip(float_shape, quant_shape)
    )


def _similarity(a: np.ndarray | None, b: np.ndarray | None) -> float:
    if a is None or b is None or a.size != b.size:
        return 0.0
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return abs(float(np.dot(a, b))) / norm if norm else 0.0


def _name_score(float_name: str, quant_name: str) -> float:
    if float_name == quant_name:
        return 1.0
    if quant_name.startswith(float_name) or float_name.startswith(quant_name):
        return 0.5
    return 0.0
