"""Pair each value of the float model with the value of the quantized model that stands for it.

Alignment works on the graphs of ``layerbisect.graph`` and trusts structure, not names. It walks
the float graph in topological order, starting from the graph inputs: a float operation pairs
with the quantized operation of the same role whose inputs are the counterparts of its own
inputs. Where several qualify (the Q, K and V projections of one input), the weights decide,
then the names, then the order. A float activation that the quantized graph folded into the
operation before it (onnxruntime drops a Relu after a Conv and gives the Conv's output the
Relu's name) joins that operation's span; so does a quantized operation that absorbed a bias or
an activation the float graph keeps apart.

>>> import onnx
>>> from onnx import helper, TensorProto
>>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
>>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
>>> g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g", [x], [y])
>>> from layerbisect.graph import build_graph
>>> graph = build_graph(helper.make_model(g))
>>> [(p.float_tensor, p.quant_tensor) for p in align(graph, graph).pairs]
[('y', 'y')]
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

from layerbisect.graph import FLOAT_DTYPES, Readout, ValueRef

# Float operations a quantized graph may fold into the operation that produces their input
# (Cast: a cast to the same type that an optimizer removed; Add/Mul/Sub/Div: by a constant,
# a bias or a scale folded into a Gemm, a FusedMatMul or a Conv).
FUSABLE = {
    "Relu", "Clip", "LeakyRelu", "BatchNormalization", "HardSigmoid", "HardSwish", "Sigmoid",
    "Tanh", "Elu", "Selu", "Softplus", "PRelu", "Cast", "Add", "Mul", "Sub", "Div",
}
MAX_REGION = 32  # float operations that one fused operation may stand for

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


@dataclass(frozen=True)
class Pair:
    """One float value and the quantized value that stands for it.

    ``float_nodes`` is the span of float operations whose result the pair compares (the last
    one produces ``float_tensor``); ``quant_nodes`` the quantized operations that compute it.
    ``evidence`` says what decided the pairing: "structure" (the only candidate), "weights",
    "name" or "order" (among several), "fused" (a float operation folded away), or "region"
    (several float operations computed by one fused operation, such as a decomposed Gelu).
    A Transpose right after a graph input that the other model lacks is a layout adapter and
    pairs with nothing.
    """

    float_nodes: tuple[str, ...]
    float_tensor: str
    quant_nodes: tuple[str, ...]
    quant_tensor: str
    op_type: str
    evidence: str
    float_readout: Readout
    quant_readout: Readout


@dataclass(frozen=True)
class Alignment:
    """All pairs, in the float model's topological order, and what found no counterpart."""

    pairs: tuple[Pair, ...]
    unaligned: tuple[str, ...]
    float_ops: int

    @property
    def coverage(self) -> float:
        """Share of the float model's operations that found a counterpart."""
        return 1.0 - len(self.unaligned) / self.float_ops if self.float_ops else 1.0


def align(float_graph: nx.DiGraph, quant_graph: nx.DiGraph) -> Alignment:
    """Align the values of two graphs built by ``layerbisect.graph.build_graph``."""
    return _Aligner(float_graph, quant_graph).run()


class _Aligner:
    def __init__(self, float_graph: nx.DiGraph, quant_graph: nx.DiGraph) -> None:
        self.fg, self.qg = float_graph, quant_graph
        self.vmap: dict[ValueRef, ValueRef] = {}
        self.evidence: dict[str, str] = {}
        self.claimed: set[str] = set()
        self.quant_span: dict[str, tuple[str, ...]] = {}
        self.index: dict[tuple, list[str]] = {}
        self.by_sources: dict[tuple, list[str]] = {}
        self.pending: set[str] = set()
        self.regions: dict[str, tuple[str, ...]] = {}
        self.float_siblings: dict[tuple, list[str]] = {}
        for node in _ordered(float_graph, "op"):
            self.float_siblings.setdefault(_float_key(float_graph.nodes[node]), []).append(node)
        self.quant_consumers = _consumers(quant_graph)
        self.float_consumers = _consumers(float_graph)

    def run(self) -> Alignment:
        baked = self._align_inputs()
        for node in _ordered(self.qg, "op"):
            sources = [src for src in self.qg.nodes[node]["sources"] if src[0] not in baked]
            self.index.setdefault((self.qg.nodes[node]["role"], tuple(sorted(sources))), []).append(node)
            self.by_sources.setdefault(tuple(sorted(sources)), []).append(node)
        float_ops = _ordered(self.fg, "op")
        for node in float_ops:
            if not self._align_op(node):
                self.pending.add(node)
        for node in reversed(float_ops):  # regions that end the graph have no consumer to close them
            if node in self.pending and not any(
                (node, i) in self.float_consumers for i in range(len(self.fg.nodes[node]["outputs"]))
            ):
                closing = self._region_match((node, 0))
                if closing is not None:
                    self._close(*closing)
        unaligned = tuple(node for node in float_ops if node in self.pending)
        return Alignment(self._pairs(), unaligned, len(float_ops))

    def _align_inputs(self) -> set[str]:
        """Pair graph inputs by name, then by position; return the quantized-only ones.

        An input that only one model declares is a constant baked into the other (a sample
        rate, a flag): it is left out of the structure that pairs operations.
        """
        quant_inputs = {self.qg.nodes[n]["name"]: n for n in _ordered(self.qg, "input")}
        leftover = [n for n in _ordered(self.fg, "input")]
        for node in list(leftover):
            match = quant_inputs.pop(self.fg.nodes[node]["name"], None)
            if match is not None:
                self.vmap[(node, 0)] = (match, 0)
                leftover.remove(node)
        for node, match in zip(leftover, list(quant_inputs.values())):
            self.vmap[(node, 0)] = (match, 0)
            quant_inputs.pop(self.qg.nodes[match]["name"])
        self.float_only_inputs = {node for node in leftover if (node, 0) not in self.vmap}
        return set(quant_inputs.values())

    def _align_op(self, node: str) -> bool:
        attrs = self.fg.nodes[node]
        sources = [src for src in attrs["sources"] if src[0] not in self.float_only_inputs]
        closings = {}
        for src in sources:
            if src not in self.vmap:
                closing = self._region_match(src) if src[0] in self.pending else None
                if closing is None:
                    return False
                closings[src] = closing
        mapped = [self.vmap[src] if src in self.vmap else (closings[src][1], 0) for src in sources]
        if closings:  # a region of float operations fused into one: it closes if this op pairs
            if not self._candidates(node, mapped):
                return False
            for closing in closings.values():
                self._close(*closing)
        candidates = self._candidates(node, mapped)
        if not candidates:
            candidates = self._candidates_after_tails(node, mapped)
        if candidates:
            match, evidence = self._choose(node, candidates)
            self.claimed.add(match)
            self.quant_span.setdefault(match, (match,))
            self.evidence[node] = evidence
            for index in range(len(attrs["outputs"])):
                if index < len(self.qg.nodes[match]["outputs"]):
                    self.vmap[(node, index)] = (match, index)
            if attrs["bias"] and not self.qg.nodes[match]["bias"]:
                self._take_bias((match, 0))
            return True
        if len(set(sources)) == 1:
            (source,) = set(sources)
            fused = (
                attrs["role"] in FUSABLE and source[0] in self.evidence
                and len(self.float_consumers.get(source, ())) == 1
            )
            layout = attrs["role"] == "Transpose" and self.fg.nodes[source[0]]["kind"] == "input"
            if fused or layout:
                self.vmap[(node, 0)] = self.vmap[source]
                self.evidence[node] = "fused" if fused else "layout"
                return True
        return False

    def _region_match(self, value: ValueRef) -> tuple[ValueRef, str, tuple[str, ...]] | None:
        """The one unclaimed quantized operation that computes ``value`` from the same inputs
        as the unpaired float operations behind it (a decomposed Gelu or LayerNorm fused into
        one op): (value, that operation, the float operations of the region)."""
        region, frontier, stack = set(), set(), [value[0]]
        while stack:
            node = stack.pop()
            if node in region:
                continue
            region.add(node)
            if len(region) > MAX_REGION:
                return None
            for src in self.fg.nodes[node]["sources"]:
                if src in self.vmap:
                    frontier.add(self.vmap[src])
                elif src[0] in self.pending:
                    stack.append(src[0])
                elif src[0] not in self.float_only_inputs:
                    return None
        candidates = [
            q for q in self.by_sources.get(tuple(sorted(frontier)), [])
            if q not in self.claimed and _shapes_agree(self.fg.nodes[value[0]], self.qg.nodes[q])
        ]
        if len(candidates) != 1 or len(region) < 2:  # one op of another role is no fusion
            return None
        order = sorted(region, key=lambda n: self.fg.nodes[n]["order"])
        return value, candidates[0], tuple(order)

    def _close(self, value: ValueRef, match: str, region: tuple[str, ...]) -> None:
        self.vmap[value] = (match, 0)
        self.claimed.add(match)
        self.quant_span.setdefault(match, (match,))
        self.pending.difference_update(region)
        self.regions[value[0]] = region
        self.evidence[value[0]] = "region"

    def _take_bias(self, value: ValueRef) -> None:
        """The float operation adds its bias inside; the quantized one leaves it to an Add."""
        tail = self._tail(value)
        if tail and self.qg.nodes[tail[0]]["role"] == "Add":
            self._extend(value, tail[:1])

    def _candidates(self, node: str, mapped: list[ValueRef]) -> list[str]:
        attrs = self.fg.nodes[node]
        sources = tuple(sorted(mapped))
        return [
            q
            for role in ROLE_ALIASES.get(attrs["role"], (attrs["role"],))
            for q in self.index.get((role, sources), [])
            if q not in self.claimed and _shapes_agree(attrs, self.qg.nodes[q])
        ]

    def _candidates_after_tails(self, node: str, mapped: list[ValueRef]) -> list[str]:
        """Try again as if a quantized input had absorbed the float graph's next operation."""
        for position, value in enumerate(mapped):
            tail = self._tail(value)
            for step, extended in enumerate(tail):
                trial = mapped[:position] + [(extended, 0)] + mapped[position + 1:]
                candidates = self._candidates(node, trial)
                if candidates:
                    self._extend(value, tail[: step + 1])
                    return candidates
        return []

    def _tail(self, value: ValueRef) -> list[str]:
        """Unclaimed single-input operations that follow ``value`` alone, in chain order.

        A Transpose right after a graph input is a layout adapter (an NHWC input feeding an
        NCHW network) and counts as one of them.
        """
        chain: list[str] = []
        while len(chain) < 4:
            consumers = self.quant_consumers.get(value, ())
            if len(consumers) != 1:
                break
            (nxt,) = consumers
            attrs = self.qg.nodes[nxt]
            layout = attrs["role"] == "Transpose" and self.qg.nodes[value[0]]["kind"] == "input"
            foldable = attrs["role"] in FUSABLE or layout
            if nxt in self.claimed or not foldable or len(attrs["sources"]) != 1:
                break
            chain.append(nxt)
            value = (nxt, 0)
        return chain

    def _extend(self, value: ValueRef, tail: list[str]) -> None:
        end = tail[-1]
        self.claimed.update(tail)
        self.quant_span[end] = self.quant_span.get(value[0], (value[0],)) + tuple(tail)
        for float_value, quant_value in self.vmap.items():
            if quant_value == value:
                self.vmap[float_value] = (end, 0)

    def _choose(self, node: str, candidates: list[str]) -> tuple[str, str]:
        """Pick among several candidates: by weights, matching all of the node's unpaired
        siblings (float ops of the same role on the same inputs) at once, most similar first,
        so that a corrupted weight cannot steal a sibling's partner; then by name, then order."""
        if len(candidates) == 1:
            return candidates[0], "structure"
        attrs = self.fg.nodes[node]
        siblings = [s for s in self.float_siblings[_float_key(attrs)] if s not in self.evidence]
        scores = sorted(
            ((_similarity(self.fg.nodes[s]["fingerprint"], self.qg.nodes[q]["fingerprint"]), i, s, q)
             for i, s in enumerate(siblings) for q in candidates),
            key=lambda item: (-item[0], item[1]),
        )
        if scores and scores[0][0] > 0:
            taken: set[str] = set()
            for score, _, sibling, match in scores:
                if score <= 0 or sibling in taken or match in taken:
                    continue
                if sibling == node:
                    return match, "weights"
                taken.update((sibling, match))
        names = [_name_score(attrs["name"], self.qg.nodes[q]["name"]) for q in candidates]
        if max(names) > 0 and names.count(max(names)) == 1:
            return candidates[names.index(max(names))], "name"
        return candidates[0], "order"

    def _pairs(self) -> tuple[Pair, ...]:
        by_quant: dict[ValueRef, list[ValueRef]] = {}
        for float_value, quant_value in self.vmap.items():
            if self.fg.nodes[float_value[0]]["kind"] == "op" and self.qg.nodes[quant_value[0]]["kind"] == "op":
                by_quant.setdefault(quant_value, []).append(float_value)
        pairs = []
        for quant_value, float_values in by_quant.items():
            float_values.sort(key=lambda v: (self.fg.nodes[v[0]]["order"], v[1]))
            last_node, index = float_values[-1]
            last = self.fg.nodes[last_node]
            if last["dtypes"][index] not in FLOAT_DTYPES | {None}:
                continue
            quant_node, quant_index = quant_value
            quant_readout = self.qg.nodes[quant_node]["readouts"][quant_index]
            span = tuple(dict.fromkeys(
                member for v in float_values for member in self.regions.get(v[0], (v[0],))
            ))
            evidence = self.evidence[last_node] if len(span) == 1 or last_node in self.regions else "fused"
            pairs.append((last["order"], index, Pair(
                float_nodes=tuple(self.fg.nodes[n]["name"] for n in span),
                float_tensor=last["outputs"][index],
                quant_nodes=tuple(self.qg.nodes[n]["name"] for n in self.quant_span[quant_node]),
                quant_tensor=quant_readout.tensor,
                op_type=last["op_type"],
                evidence=evidence,
                float_readout=last["readouts"][index],
                quant_readout=quant_readout,
            )))
        pairs.sort(key=lambda item: item[:2])
        return tuple(pair for _, _, pair in pairs)


def _ordered(graph: nx.DiGraph, kind: str) -> list[str]:
    nodes = [n for n, attrs in graph.nodes(data=True) if attrs["kind"] == kind]
    return sorted(nodes, key=lambda n: graph.nodes[n]["order"])


def _float_key(attrs: dict) -> tuple:
    return attrs["role"], tuple(sorted(attrs["sources"]))


def _consumers(graph: nx.DiGraph) -> dict[ValueRef, list[str]]:
    consumers: dict[ValueRef, list[str]] = {}
    for node, attrs in graph.nodes(data=True):
        for source in dict.fromkeys(attrs["sources"]):
            consumers.setdefault(source, []).append(node)
    return consumers


def _shapes_agree(float_attrs: dict, quant_attrs: dict) -> bool:
    a, b = float_attrs["shapes"][0], quant_attrs["shapes"][0]
    if a is None or b is None:
        return True
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


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
