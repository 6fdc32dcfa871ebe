"""Which layers to keep in float: a small set whose quantization, removed, lets the model pass.

Keeping a layer of a QDQ model in float (``bypass``) means: its operations read the float
model's weights and constants instead of dequantized ones, and hand on their outputs
unquantized, with any activation the quantizer had folded into the output's quantization put
back (a Relu as a uint8 range, a Clip). Graph inputs they read are read unquantized: no layer
produces them, and onnxruntime's ``nodes_to_exclude`` leaves in float an input that only
excluded nodes read. Their other inputs stay as the layers before produce them. Keeping every
layer in float therefore computes what the float model computes.

A set of layers *repairs* the model when the repaired model passes as ``find_first_bad_layer``
judges a model: every aligned layer, measured at the same points in the same way (cumulative
error, mean cosine over the samples, NaN failing, a layer whose float value is not finite not
judged), reaches the threshold. The verdict and the repair share this one meaning: the report
says FAIL exactly when keeping nothing in float does not repair the model, and a repaired model
passes the report. The model outputs alone would not do: a model can fail at an inner layer
while its outputs, after a softmax or a sigmoid, still point the right way.

The search bisects over the layers in topological order for the shortest prefix that repairs,
then drops each member that is not needed (the latest start that still repairs, by bisection
again, then one member at a time). Each set is judged by running the repaired model. When even
every layer in float does not repair the model, nothing is suggested, and the result says what
the best attempt reached.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from os import PathLike

import onnx
from onnx import helper, numpy_helper

from layerbisect import assemble
from layerbisect.align import ACTIVATIONS, Pair
from layerbisect.errors import NO_SAMPLES, LayerbisectError
from layerbisect.files import sources, write
from layerbisect.graph import outer_scope_reads
from layerbisect.inputs import Sample, reusable, samples_of
from layerbisect.load import ModelLike, tensor_array, with_data
from layerbisect.measure import Saved, Totals, measure, prepare
from layerbisect.options import DEFAULT_PROVIDERS, check_past_length, check_threshold
from layerbisect.pipeline import setup
from layerbisect.progress import steps
from layerbisect.report import LayerComparison
from layerbisect.run import usable_providers
from layerbisect.search import bisect_first_failing
from layerbisect.segment import Segments
from layerbisect.wiring import constants, consumers, produced, producers

FOLDED_INTO_WEIGHTS = {"BatchNormalization"}


@dataclass(frozen=True)
class FloatFallback:
    """Layers to keep in float, and what keeping them does to the model.

    ``float_nodes`` names the float model's operations (for per-layer precision settings of
    vendor tools); ``nodes_to_exclude`` is the list for onnxruntime.quantization's
    ``nodes_to_exclude``. Both are empty when the model needs nothing, and when no set repairs
    it: a suggestion is made only when it repairs. ``cosine_before``/``cosine_after`` are the
    lowest cosine of any judged layer (mean over samples, as the report judges them) of the
    quantized and of the repaired model; ``worst_before``/``worst_after`` describe those
    layers. ``repaired`` is the model with the layers ``attempted`` kept in float (the
    suggestion, or, when nothing repairs, the best attempt), written only by ``save_model``;
    ``freed`` the tensors it computes in float with no QuantizeLinear/DequantizeLinear on
    them; ``sources`` the files it was made from, which ``save_model`` refuses to write over.
    """

    float_nodes: tuple[str, ...]
    nodes_to_exclude: tuple[str, ...]
    cosine_before: float
    cosine_after: float
    threshold: float
    executions: int
    repaired: onnx.ModelProto = field(repr=False, compare=False)
    sources: tuple[str, ...] = field(default=(), repr=False, compare=False)
    worst_before: str = ""
    worst_after: str = ""
    attempted: tuple[str, ...] = ()
    freed: tuple[str, ...] = field(default=(), repr=False)

    def __bool__(self) -> bool:
        """Whether the repaired model passes: every judged layer reaches the threshold."""
        return self.cosine_after >= self.threshold

    def __str__(self) -> str:
        if not self:
            return (
                f"no set of layers kept in float repairs the model: lowest layer cosine "
                f"{self.cosine_before:.4f} at {self.worst_before}; the best attempt (keeping "
                f"{len(self.attempted)} float operation(s) in float) reaches {self.cosine_after:.4f} "
                f"at {self.worst_after} (threshold {self.threshold}); nothing to exclude"
            )
        if not self.float_nodes:
            return (
                f"nothing to keep in float: every layer already reaches cosine {self.threshold} "
                f"(lowest {self.cosine_before:.4f} at {self.worst_before})"
            )
        return (
            f"keeping {len(self.nodes_to_exclude)} node(s) in float repairs the model: lowest layer "
            f"cosine {self.cosine_before:.4f} -> {self.cosine_after:.4f} (threshold "
            f"{self.threshold})\nnodes_to_exclude = {list(self.nodes_to_exclude)}"
        )

    def to_json(self) -> str:
        """The settings to paste: float-model node names and onnxruntime's exclusion list, with
        whether they repair the model and how close it comes."""
        return json.dumps({
            "keep_in_float": list(self.float_nodes),
            "nodes_to_exclude": list(self.nodes_to_exclude),
            "repairs": bool(self),
            "cosine_before": self.cosine_before,
            "cosine_after": self.cosine_after,
            "worst_before": self.worst_before,
            "worst_after": self.worst_after,
            "attempted": list(self.attempted),
            "threshold": self.threshold,
        }, indent=2)

    def save_model(self, path: str | PathLike) -> None:
        """Write the repaired model to ``path`` (the only file this module writes), whole; a
        path that is one of ``sources`` is refused (``LayerbisectError``)."""
        model = with_data(self.repaired)
        write(path, lambda temporary: onnx.save(model, str(temporary)), reads=self.sources)


def keep_in_float(
    float_model: ModelLike,
    quant_model: ModelLike,
    inputs: Sample | Iterable[Sample] | None = None,
    threshold: float = 0.98,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    past_length: int | None = None,
    seed: int = 0,
    providers: str | Sequence[str] = DEFAULT_PROVIDERS,
    allow_swapped: bool = False,
    quiet: bool = False,
) -> FloatFallback:
    """Find a small set of layers of a QDQ model to keep in float so that the repaired model
    passes: every aligned layer reaches ``threshold`` (cosine with the float model, mean over
    samples), judged as ``find_first_bad_layer`` judges it on the same inputs.
    ``providers`` is an order of preference, and ``past_length`` a decoder's past for random
    inputs, as for ``find_first_bad_layer``. On long runs a
    bar counts the repaired models tried (after those of loading and alignment), unless ``quiet``.

    >>> from layerbisect import demo
    >>> fix = keep_in_float(*demo.files(), inputs=demo.image())
    >>> fix.nodes_to_exclude
    ('conv2',)
    """
    check_threshold(threshold)
    providers, _ = usable_providers(providers)
    float_proto, quant_proto, plan, _, alignment, *_ = setup(
        float_model, quant_model, shapes=shapes, providers=providers, allow_swapped=allow_swapped, quiet=quiet,
        past_length=check_past_length(past_length),
    )
    if not any(node.op_type == "DequantizeLinear" for node in quant_proto.graph.node):
        raise LayerbisectError("keeping layers in float needs a QDQ model (QuantizeLinear/DequantizeLinear pairs)")
    samples = reusable(samples_of(inputs))
    if not samples:
        raise LayerbisectError(NO_SAMPLES)
    pairs = alignment.pairs
    bypassable = _bypassable(quant_proto)
    candidates = [p for p in pairs if bypassable(p)]
    float_segments = Segments(float_proto)
    carriers = _carriers(quant_proto)
    executions = 0
    cache: dict[frozenset, LayerComparison | None] = {}
    float_values: Saved | None = None  # the float model's values, measured once
    tried = steps(None, "model", quiet=quiet, desc="keep in float: repaired models tried")  # how many is not known

    def lowest(chosen: Sequence[Pair]) -> LayerComparison | None:
        """The lowest judged layer of the model with ``chosen`` kept in float."""
        nonlocal executions, float_values
        key = frozenset(p.float_tensor for p in chosen)
        if key not in cache:
            model = bypass(float_proto, quant_proto, chosen)
            read = _read_in(carriers, model, pairs)
            measurement = prepare(
                float_segments, Segments(model), read, None, plan, seed=seed, providers=providers, start=float_values,
                saves=([p.float_tensor for p in pairs], ()) if float_values is None else ((), ()),
            )
            totals, saved = measure(measurement, samples, start=float_values)
            if float_values is None:
                float_values = Saved(tuple((values, {}) for values, _ in saved.values)) if saved else None
            cache[key] = _lowest_layer(read, totals)
            executions += totals.executions
            tried.advance()
        return cache[key]

    def repairs(chosen: Sequence[Pair]) -> bool:
        return _cosine(lowest(chosen)) >= threshold

    chosen: list[Pair] = []
    attempted: list[Pair] = []
    if not repairs([]) and repairs(candidates):
        found, _ = bisect_first_failing(
            lambda ks, final: {k: not repairs(candidates[: k + 1]) for k in ks}, len(candidates)
        )
        assert found is not None, "the whole list repairs: its last prefix does"
        end = found + 1
        latest, _ = bisect_first_failing(  # then the latest start that still repairs
            lambda ks, final: {k: repairs(candidates[k:end]) for k in ks}, end
        )
        chosen = candidates[(end - 1 if latest is None else latest - 1): end]
        changed = True
        while changed:  # drop every member the others do not need
            changed = False
            for member in reversed(chosen):
                rest = [p for p in chosen if p is not member]
                if repairs(rest):
                    chosen, changed = rest, True
        attempted = chosen
    elif not repairs([]) and _cosine(lowest(candidates)) > _cosine(lowest([])):
        attempted = candidates  # no repair: the best attempt, never one that makes things worse
    repaired = bypass(float_proto, quant_proto, attempted)
    nodes = {node.name: node for node in quant_proto.graph.node}
    before, after = lowest([]), lowest(attempted)
    tried.close()
    return FloatFallback(
        float_nodes=tuple(name for p in chosen for name in p.float_nodes),
        nodes_to_exclude=tuple(name for p in chosen for name in p.quant_nodes),
        cosine_before=_cosine(before),
        cosine_after=_cosine(after),
        threshold=float(threshold),
        executions=executions,
        repaired=repaired,
        sources=sources(float_model, quant_model, float_proto, quant_proto),
        worst_before=_described(before),
        worst_after=_described(after),
        attempted=tuple(name for p in attempted for name in p.float_nodes),
        freed=tuple(out for p in attempted for name in p.quant_nodes for out in nodes[name].output if out),
    )


def _lowest_layer(pairs: Sequence[Pair], totals: Totals) -> LayerComparison | None:
    """The judged layer with the lowest cosine (NaN lowest) among ``pairs`` as ``totals``
    measured them, judged as ``find_first_bad_layer`` judges them; None when none is judged."""
    layers = assemble.layers(pairs, {i: (totals, i) for i in range(len(pairs))})
    judged = [layer for layer in layers if layer.judged]
    return min(judged, key=lambda layer: -math.inf if math.isnan(layer.cosine) else layer.cosine, default=None)


def _cosine(layer: LayerComparison | None) -> float:
    """The cosine a set is judged by: its lowest judged layer's (1.0 when none is judged)."""
    return 1.0 if layer is None else layer.cosine


def _described(layer: LayerComparison | None) -> str:
    return "no judged layer" if layer is None else layer.describe()


def _read_in(carriers: Mapping[str, str], model: onnx.ModelProto, pairs: Sequence[Pair]) -> list[Pair]:
    """``pairs`` as read in ``model``, a bypass of the quantized model whose ``_carriers`` are
    given: a value kept in float has lost its QuantizeLinear, and is read where the
    DequantizeLinear that read it was (now an Identity)."""
    made = produced(model.graph.node) | {i.name for i in model.graph.input}
    read = []
    for pair in pairs:
        if pair.quant_tensor not in made:
            tensor = carriers.get(pair.quant_tensor, pair.quant_tensor)
            pair = replace(pair, quant_tensor=tensor, quant_readout=replace(pair.quant_readout, tensor=tensor))
        read.append(pair)
    return read


def bypass(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, pairs: Iterable[Pair]) -> onnx.ModelProto:
    """A copy of the QDQ ``quant_model`` with the operations of ``pairs`` kept in float (see
    the module's docstring). Each input they read through a DequantizeLinear becomes the float
    value behind it where there is one: what a QuantizeLinear quantized, when that is a
    constant or a graph input; else the float model's constant at the same input of the same
    operation (not for weights folded from a BatchNorm, which have no float twin). Each output
    loses its QuantizeLinear, and the DequantizeLinear that read it becomes an Identity of the
    float value. Nodes and initializers nothing reads any more are dropped."""
    model = onnx.ModelProto()
    model.CopyFrom(quant_model)
    graph = model.graph
    producer, readers = producers(graph), consumers(graph)
    initializers = {init.name for init in graph.initializer}
    unquantized = initializers | {i.name for i in graph.input} | {
        out for node in graph.node if node.op_type == "Constant" for out in node.output
    }
    float_nodes = {node.name: node for node in float_model.graph.node}
    float_constants = constants(float_model.graph)
    nodes = {node.name: node for node in graph.node}
    for pair in pairs:
        span_ops = {float_nodes[n].op_type for n in pair.float_nodes if n in float_nodes}
        for name in pair.quant_nodes:
            node = nodes[name]
            twin = next((float_nodes[n] for n in pair.float_nodes
                         if n in float_nodes and float_nodes[n].op_type == node.op_type), None)
            folded = bool(span_ops & FOLDED_INTO_WEIGHTS) and node.op_type not in FOLDED_INTO_WEIGHTS
            for position, tensor in enumerate(node.input):
                dq = producer.get(tensor)
                if dq is None or dq.op_type != "DequantizeLinear":
                    continue
                q = producer.get(dq.input[0])
                if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in unquantized:
                    node.input[position] = q.input[0]
                elif dq.input[0] in initializers and not folded:
                    weight = _float_constant(twin, position, float_constants, graph)
                    if weight is not None:
                        node.input[position] = weight
            dropped = _dropped_activations(pair, nodes, float_nodes) if name == pair.quant_nodes[-1] else []
            for output in node.output:  # the value goes on unquantized
                quantizers = [c for c in readers.get(output, []) if c.op_type == "QuantizeLinear"]
                if not quantizers:
                    continue
                value = _activate(graph, output, dropped, float_constants)
                for q in quantizers:
                    for dq in [c for c in readers.get(q.output[0], []) if c.op_type == "DequantizeLinear"]:
                        dq.CopyFrom(helper.make_node("Identity", [value], [dq.output[0]], name=dq.name))
    _drop_unread(graph)  # with the QuantizeLinear nodes that nothing reads any more
    return model


def _float_constant(twin, position: int, float_constants: Mapping, graph: onnx.GraphProto) -> str | None:
    """The float model's constant at input ``position`` of ``twin`` as an initializer of
    ``graph`` (see ``_float_copy``), if there is one; its name."""
    if twin is None or position >= len(twin.input) or twin.input[position] not in float_constants:
        return None
    return _float_copy(graph, float_constants, twin.input[position])


def _float_copy(graph: onnx.GraphProto, float_constants: Mapping, name: str) -> str:
    """Add the float model's constant ``name`` to ``graph`` as an initializer, once, under a
    name of its own (the quantized graph may use ``name`` for something else); return it."""
    copy = f"{name}__layerbisect_float"
    if not any(init.name == copy for init in graph.initializer):
        graph.initializer.append(numpy_helper.from_array(tensor_array(float_constants[name]), copy))
    return copy


def _drop_unread(graph: onnx.GraphProto) -> None:
    """Remove the nodes whose outputs nothing reads (the Q/DQ of values now read in float),
    then the initializers nothing reads: one pass from the last node back (the graph is
    topologically sorted, as ONNX requires), a node kept when a graph output or a node kept
    after it reads one of its outputs."""
    read = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in read for out in node.output):
            kept.append(node)
            read.update(node.input)
            read.update(outer_scope_reads(node))
    _keep_only(graph.node, kept[::-1])
    _keep_only(graph.initializer, [init for init in graph.initializer if init.name in read])


def _keep_only(field, kept: list) -> None:
    """Leave only ``kept`` (a sublist, in order) in a repeated message field, in one sweep
    (removing one element at a time is quadratic)."""
    if len(kept) == len(field):
        return
    copies = [type(item)() for item in kept]
    for copy, item in zip(copies, kept):
        copy.CopyFrom(item)
    del field[:]
    field.extend(copies)


def _dropped_activations(pair: Pair, nodes: Mapping, float_nodes: Mapping) -> list[onnx.NodeProto]:
    """Float activations of the pair that the quantizer dropped, leaving their clamp to the
    output's quantization (a Relu before a uint8 QuantizeLinear with zero point 0)."""
    kept = {nodes[n].op_type for n in pair.quant_nodes}
    return [
        float_nodes[n] for n in pair.float_nodes
        if n in float_nodes and float_nodes[n].op_type in ACTIVATIONS and float_nodes[n].op_type not in kept
    ]


def _activate(graph, output: str, activations, float_constants: Mapping) -> str:
    """Apply to ``output`` the activations the quantization stood for; return the result.
    Their constants (a Clip's bounds) are the float model's. The new nodes follow the producer
    of ``output``, keeping the graph topologically sorted."""
    current = output
    if not activations:
        return current
    position = next(i for i, node in enumerate(graph.node) if output in node.output) + 1
    for activation in activations:
        constants = [_float_copy(graph, float_constants, name) if name in float_constants else name
                     for name in activation.input[1:]]
        result = f"{activation.output[0]}__kept_float"
        node = helper.make_node(activation.op_type, [current, *constants], [result],
                                name=f"{activation.name}__kept_float")
        node.attribute.extend(activation.attribute)
        graph.node.insert(position, node)
        position += 1
        current = result
    return current


def _bypassable(model: onnx.ModelProto) -> Callable[[Pair], bool]:
    """Whether a pair's quantized operations read anything through a DequantizeLinear."""
    dequantized = {node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    inputs = {node.name: node.input for node in model.graph.node}
    return lambda pair: any(t in dequantized for n in pair.quant_nodes for t in inputs.get(n, ()))


def _carried(quant_model: onnx.ModelProto, tensor: str) -> str:
    """The float tensor that carries ``tensor`` on (see ``_carriers``); else ``tensor`` itself."""
    return _carriers(quant_model).get(tensor, tensor)


def _carriers(quant_model: onnx.ModelProto) -> dict[str, str]:
    """For each tensor a DequantizeLinear reads, the float tensor that carries it on: the
    output of the first such DequantizeLinear, which a repaired model keeps (as the output of
    an Identity where the layer is kept in float)."""
    carriers: dict[str, str] = {}
    for node in quant_model.graph.node:
        if node.op_type == "DequantizeLinear":
            carriers.setdefault(node.input[0], node.output[0])
    return carriers

