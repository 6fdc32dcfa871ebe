"""Which layers to keep in float: a small set whose quantization, removed, repairs the outputs.

For a QDQ model, keeping a layer in float means its operations use the float model's weights
and hand on their outputs unquantized (with any activation the quantizer had folded into the
output's quantization put back); their inputs stay as the layers before produce them, as
with onnxruntime's ``nodes_to_exclude``. The search bisects over the layers in topological order for the shortest prefix
whose removal brings every model output back to the threshold, then drops each member that is
not needed (the latest start that still repairs, by bisection again, then one member at a
time), and verifies the result by running the repaired model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike

import onnx
from onnx import numpy_helper

from layerbisect.align import ACTIVATIONS, Pair
from layerbisect.compare import Aggregate, compare
from layerbisect.errors import NO_SAMPLES, LayerbisectError
from layerbisect.expose import expose
from layerbisect.files import sources, write
from layerbisect.find import setup
from layerbisect.inputs import Sample, samples_of
from layerbisect.load import ModelLike, tensor_array, with_data
from layerbisect.options import DEFAULT_PROVIDERS, check_threshold
from layerbisect.run import Session, usable_providers
from layerbisect.search import bisect_first_failing

FOLDED_INTO_WEIGHTS = {"BatchNormalization"}


@dataclass(frozen=True)
class FloatFallback:
    """Layers to keep in float, and what keeping them does to the model outputs.

    ``float_nodes`` names the float model's operations (for per-layer precision settings of
    vendor tools); ``nodes_to_exclude`` is the list for onnxruntime.quantization's
    ``nodes_to_exclude``. ``cosine_before``/``cosine_after`` are the lowest output cosine
    (mean over samples) of the quantized and of the repaired model; ``repaired`` is the
    repaired model, written only by ``save_model``; ``sources`` the files it was made from,
    which ``save_model`` refuses to write over.
    """

    float_nodes: tuple[str, ...]
    nodes_to_exclude: tuple[str, ...]
    cosine_before: float
    cosine_after: float
    threshold: float
    executions: int
    repaired: onnx.ModelProto = field(repr=False, compare=False)
    sources: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __bool__(self) -> bool:
        return self.cosine_after >= self.threshold

    def __str__(self) -> str:
        verdict = "repairs" if self else "does not repair"
        return (
            f"keeping {len(self.float_nodes)} layer(s) in float {verdict} the outputs: lowest "
            f"output cosine {self.cosine_before:.4f} -> {self.cosine_after:.4f} "
            f"(threshold {self.threshold})\nnodes_to_exclude = {list(self.nodes_to_exclude)}"
        )

    def to_json(self) -> str:
        """The settings to paste: float-model node names and onnxruntime's exclusion list."""
        return json.dumps({
            "keep_in_float": list(self.float_nodes),
            "nodes_to_exclude": list(self.nodes_to_exclude),
            "cosine_before": self.cosine_before,
            "cosine_after": self.cosine_after,
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
    seed: int = 0,
    providers: str | Sequence[str] = DEFAULT_PROVIDERS,
    allow_swapped: bool = False,
) -> FloatFallback:
    """Find a small set of layers of a QDQ model to keep in float so that every output of the
    repaired model reaches ``threshold`` (cosine with the float model, mean over samples).
    ``providers`` is an order of preference, as for ``find_first_bad_layer``.

    >>> fix = keep_in_float("model_fp32.onnx", "model_int8_qdq.onnx", inputs)  # doctest: +SKIP
    >>> fix.nodes_to_exclude  # doctest: +SKIP
    ('conv2',)
    """
    check_threshold(threshold)
    providers, _ = usable_providers(providers)
    float_proto, quant_proto, plan, _, alignment = setup(
        float_model, quant_model, shapes=shapes, providers=providers, allow_swapped=allow_swapped
    )
    if not any(node.op_type == "DequantizeLinear" for node in quant_proto.graph.node):
        raise LayerbisectError("keeping layers in float needs a QDQ model (QuantizeLinear/DequantizeLinear pairs)")
    samples = list(samples_of(inputs))
    if not samples:
        raise LayerbisectError(NO_SAMPLES)
    outputs = _output_pairs(float_proto, alignment.pairs)
    read = [_carried(quant_proto, p.quant_tensor) for p in outputs]
    float_session = Session(expose(float_proto, [p.float_tensor for p in outputs]), "float model", providers)
    feeds = [plan.feeds(sample, seed) for sample in samples]
    references = [float_session.run(f, [p.float_tensor for p in outputs]) for f, _ in feeds]
    bypassable = _bypassable(quant_proto)
    candidates = [p for p in alignment.pairs if bypassable(p)]
    executions = len(samples)
    cache: dict[frozenset, float] = {}

    def score(chosen: Sequence[Pair]) -> float:
        nonlocal executions
        key = frozenset(p.float_tensor for p in chosen)
        if key not in cache:
            model = bypass(float_proto, quant_proto, chosen)
            session = Session(expose(model, read), "repaired model", providers)
            aggregates = [Aggregate() for _ in outputs]
            for (_, quant_feeds), reference in zip(feeds, references):
                values = session.run(quant_feeds, read)
                for agg, pair, name in zip(aggregates, outputs, read):
                    agg.add(compare(pair.float_readout.dequantize(reference[pair.float_tensor]),
                                    pair.quant_readout.dequantize(values[name])))
            executions += len(samples)
            cache[key] = min(agg.cosine for agg in aggregates)
        return cache[key]

    before = score([])
    chosen: list[Pair] = []
    if before < threshold and score(candidates) >= threshold:
        found, _ = bisect_first_failing(
            lambda ks, final: {k: score(candidates[: k + 1]) < threshold for k in ks}, len(candidates)
        )
        end = found + 1
        latest, _ = bisect_first_failing(  # then the latest start that still repairs
            lambda ks, final: {k: score(candidates[k:end]) >= threshold for k in ks}, end
        )
        chosen = candidates[(end - 1 if latest is None else latest - 1): end]
        changed = True
        while changed:  # drop every member the others do not need
            changed = False
            for member in reversed(chosen):
                rest = [p for p in chosen if p is not member]
                if score(rest) >= threshold:
                    chosen, changed = rest, True
    elif before < threshold:
        chosen = candidates
    repaired = bypass(float_proto, quant_proto, chosen)
    return FloatFallback(
        float_nodes=tuple(name for p in chosen for name in p.float_nodes),
        nodes_to_exclude=tuple(name for p in chosen for name in p.quant_nodes),
        cosine_before=before,
        cosine_after=score(chosen),
        threshold=float(threshold),
        executions=executions,
        repaired=repaired,
        sources=sources(float_model, quant_model, float_proto, quant_proto),
    )


def bypass(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, pairs: Iterable[Pair]) -> onnx.ModelProto:
    """A copy of the QDQ ``quant_model`` with the operations of ``pairs`` kept in float."""
    model = onnx.ModelProto()
    model.CopyFrom(quant_model)
    graph = model.graph
    producer = {o: node for node in graph.node for o in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {init.name: init for init in graph.initializer}
    float_nodes = {node.name: node for node in float_model.graph.node}
    float_inits = {init.name: init for init in float_model.graph.initializer}
    nodes = {node.name: node for node in graph.node}
    for pair in pairs:
        span_ops = {float_nodes[n].op_type for n in pair.float_nodes if n in float_nodes}
        for name in pair.quant_nodes:
            node = nodes[name]
            twin = next((float_nodes[n] for n in pair.float_nodes
                         if n in float_nodes and float_nodes[n].op_type == node.op_type), None)
            # weights folded from another float op (a BatchNorm) have no float twin to take
            folded = bool(span_ops & FOLDED_INTO_WEIGHTS) and node.op_type not in FOLDED_INTO_WEIGHTS
            for position, tensor in enumerate(node.input):
                dq = producer.get(tensor)
                if dq is None or dq.op_type != "DequantizeLinear":
                    continue
                source = dq.input[0]
                if source in initializers and not folded:
                    weight = _float_weight(twin, position, float_inits, initializers[source])
                    if weight is not None:
                        graph.initializer.append(weight)
                        node.input[position] = weight.name
            dropped = _dropped_activations(pair, nodes, float_nodes) if name == pair.quant_nodes[-1] else []
            for output in node.output:  # the value goes on unquantized
                quantizers = [c for c in consumers.get(output, []) if c.op_type == "QuantizeLinear"]
                if not quantizers:
                    continue
                value = _activate(graph, output, dropped, float_inits)
                for q in quantizers:
                    for dq in [c for c in consumers.get(q.output[0], []) if c.op_type == "DequantizeLinear"]:
                        dq.CopyFrom(onnx.helper.make_node("Identity", [value], [dq.output[0]], name=dq.name))
                    graph.node.remove(q)
    return model


def _dropped_activations(pair: Pair, nodes: Mapping, float_nodes: Mapping) -> list[onnx.NodeProto]:
    """Float activations of the pair that the quantizer dropped, leaving their clamp to the
    output's quantization (a Relu before a uint8 QuantizeLinear with zero point 0)."""
    kept = {nodes[n].op_type for n in pair.quant_nodes}
    return [
        float_nodes[n] for n in pair.float_nodes
        if n in float_nodes and float_nodes[n].op_type in ACTIVATIONS and float_nodes[n].op_type not in kept
    ]


def _activate(graph, output: str, activations, float_inits) -> str:
    """Apply to ``output`` the activations the quantization stood for; return the result.
    The new nodes follow the producer of ``output``, keeping the graph topologically sorted."""
    current = output
    position = next(i for i, node in enumerate(graph.node) if output in node.output) + 1
    for activation in activations:
        constants = []
        for name in activation.input[1:]:
            if name in float_inits:
                copy = onnx.TensorProto()
                copy.CopyFrom(float_inits[name])
                copy.name = f"{name}__kept_float"
                graph.initializer.append(copy)
                name = copy.name
            constants.append(name)
        result = f"{activation.output[0]}__kept_float"
        node = onnx.helper.make_node(activation.op_type, [current, *constants], [result], name=f"{activation.name}__kept_float")
        node.attribute.extend(activation.attribute)
        graph.node.insert(position, node)
        position += 1
        current = result
    return current


def _float_weight(twin, position, float_inits, quantized) -> onnx.TensorProto | None:
    """The float model's constant at the same input of the same operation, if it fits."""
    if twin is None or position >= len(twin.input) or twin.input[position] not in float_inits:
        return None
    value = tensor_array(float_inits[twin.input[position]])
    if tuple(value.shape) != tuple(quantized.dims):
        return None
    return numpy_helper.from_array(value, twin.input[position] + "__layerbisect_float")


def _bypassable(model: onnx.ModelProto) -> Callable[[Pair], bool]:
    """Whether a pair's quantized operations read anything through a DequantizeLinear."""
    dequantized = {node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    inputs = {node.name: node.input for node in model.graph.node}
    return lambda pair: any(t in dequantized for n in pair.quant_nodes for t in inputs.get(n, ()))


def _carried(quant_model: onnx.ModelProto, tensor: str) -> str:
    """The float tensor that carries an integer readout on: the output of the
    DequantizeLinear reading it, which a repaired model keeps (as the output of an Identity
    where the layer is kept in float); else ``tensor`` itself."""
    return next(
        (node.output[0] for node in quant_model.graph.node
         if node.op_type == "DequantizeLinear" and node.input[0] == tensor),
        tensor,
    )


def _output_pairs(float_model: onnx.ModelProto, pairs: Sequence[Pair]) -> list[Pair]:
    outputs = {o.name for o in float_model.graph.output}
    found = [p for p in pairs if p.float_tensor in outputs]
    if not found:
        found = [pairs[-1]]
    return found
