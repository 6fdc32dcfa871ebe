"""The quantized side as any source of named tensors: a vendor simulator, a folder of dumps.

A ``TensorSource`` turns the feeds of one sample into named float tensors, in the float
model's layout (NCHW where the model is NCHW), already dequantized, in the order they were
computed. A plain Python function qualifies; so does ``layerbisect.dumps.DumpFolder``. Given
the graph the tensors come from (``quant_graph``), they pair by structure, as a model's values
do (``align``). Else they are paired with the float model's values:

1. by name: a tensor named like a float value (exactly, or once ``dumps.sanitise`` wrote both
   names as file names do, when that is unambiguous), settled by data: a backend that fused a Conv
   with its BatchNorm or Relu names the result after the Conv, and onnxruntime's QDQ
   quantizer gives a dropped Relu's name to its input, so a named tensor that agrees much
   better with a value next to its namesake (along a chain of foldable operations) is paired
   with that one, and one that agrees with none (a broken layer) follows how the tensors of
   chains like its own were named;
2. by shape and order: the others, in their order, with the float values left, in the float
   model's order, of the same shape (or the same shape in NHWC), the closest values winning
   among candidates. A source with no names at all is paired this way.

Only cumulative error is measured: a source cannot be fed the float model's values inside.
The pairs are measured and reported by the code that measures and reports a model's
(``measure.compare_pairs``, ``assemble.build_report``).

>>> import onnxruntime as ort
>>> from layerbisect import demo, find_first_bad_layer
>>> session = ort.InferenceSession(demo.quantized_model().SerializeToString())
>>> def simulator(feeds):  # a vendor's simulator wrapped in a function: here, onnxruntime
...     return {"y": session.run(["y"], dict(feeds))[0]}  # the values it can give, by name
>>> report = find_first_bad_layer(demo.float_model(), simulator, inputs=demo.image())
>>> [(layer.float_nodes[-1], layer.passes(0.98)) for layer in report.layers]  # the whole model, one span
[('fc', False)]
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import onnx

from layerbisect import assemble
from layerbisect.align import FUSABLE, Alignment, Pair, align
from layerbisect.compare import Aggregate
from layerbisect.decoder import vocabularies
from layerbisect.dumps import DumpFolder, sanitise
from layerbisect.errors import NO_SAMPLES, LayerbisectError, first_line
from layerbisect.expose import expose
from layerbisect.files import sources
from layerbisect.graph import FLOAT_DTYPES, OpGraph, Readout, build_graph
from layerbisect.inputs import Sample, plan_inputs
from layerbisect.layouts import permuted, to_channels_first
from layerbisect.load import ModelLike, declared_inputs, load_model
from layerbisect.measure import Totals, compare_pairs
from layerbisect.progress import progress
from layerbisect.report import Report
from layerbisect.run import DEFAULT_PROVIDERS, Session, lower_ir_version

PROBE_SIZE = 4096  # values per tensor compared when pairing by order
CLOSEST = 6.0  # digits of agreement that count as equal
# A named tensor moves to a value its namesake's operation is fused with when it agrees closely
# with that value, ten times more closely than with its namesake: an int8 tensor agrees with its
# own float value 0.999 and more, a Relu with its input about 0.7 (half the values cut), a Conv
# with the BatchNormalization after it 0.98 in the test CNN. It stays when it agrees above
# MOVED_BELOW with its namesake; below, unsure, it follows how the others were named.
MOVED_BELOW, MOVED_ABOVE, CLOSER = 0.95, 0.99, 10.0
FUSED_CHAIN = 3  # Conv -> BatchNormalization -> activation, and one more


@runtime_checkable
class TensorSource(Protocol):
    """Anything that turns one sample's feeds into named tensors.

    ``__call__(feeds)`` gets the float model's feeds (input name -> array) and returns an
    ordered mapping of tensor name -> float array in the float model's layout, dequantized,
    in the order the tensors were computed (the order pairs tensors whose names match no
    float value). An optional ``label`` attribute names the source in reports; an optional
    ``expect(shapes)`` method is called before the first call with the shape of the float
    value each name stands for (``DumpFolder`` shapes files that hold no shape by it).

    >>> isinstance(lambda feeds: {}, TensorSource)
    True
    """

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        ...


@dataclass(frozen=True)
class Match:
    """A float value and the source tensor (``key``) that stands for it; ``perm`` brings the
    source tensor to the float layout (None: same layout); ``evidence`` is "name", "data",
    "order" or "structure" (aligned through the quantized graph the source came from)."""

    float_tensor: str
    key: str
    evidence: str
    perm: tuple[int, ...] | None = None
    readout: Readout | None = None
    """How to turn the source's integers into float values (from a quantized graph)."""


@dataclass(frozen=True)
class _Value:
    """A float value the source may hold: the operation producing it and its tensor."""

    node: str
    op_type: str
    tensor: str


def tensor_source(quantized: object) -> TensorSource | None:
    """The quantized side as a tensor source: a folder of dumps, or any callable; None for an
    ONNX model (a path to a file, or a ModelProto) and anything else."""
    if isinstance(quantized, (str, PathLike)) and Path(quantized).is_dir():
        return DumpFolder(quantized)
    if isinstance(quantized, onnx.ModelProto) or not callable(quantized):
        return None
    return quantized


def compare_source(
    float_model: ModelLike,
    source: TensorSource,
    samples: Iterable[Sample | None],
    threshold: float = 0.98,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    quiet: bool = False,
    quant_graph: ModelLike | None = None,
    past_length: int | None = None,
) -> Report:
    """Compare the float model's values with the tensors ``source`` returns for each sample
    (None: seeded random inputs), pairing them at the first sample; see the module docstring.
    With ``quant_graph``, the graph the source's tensors come from (the vendor's compiled or
    optimized ONNX, whose tensor names the dump uses), tensors pair by structure: the float
    model is aligned with that graph, and each pair reads the tensor named after its quantized
    value (integers dequantized with the graph's scale and zero point). The pairs are measured
    and reported as a model's are (``measure.compare_pairs``, ``assemble.build_report``).

        >>> from layerbisect import demo
    >>> folder = DumpFolder(demo.dump(demo.scratch()))
    >>> compare_source(demo.float_model(), folder, [demo.image()]).first_bad.quant_tensor
    'conv2'

    """
    proto = load_model(float_model, role="float model")
    lowered = lower_ir_version(proto, "float model")
    graph = build_graph(proto)
    quant_proto = None if quant_graph is None else load_model(quant_graph, role="quantized graph")
    alignment = None if quant_proto is None else align(graph, build_graph(quant_proto))
    names = None if alignment is None or quant_proto is None else _dumped_names(alignment, quant_proto)
    values = _float_values(graph)
    specs = declared_inputs(proto)
    plan = plan_inputs(specs, specs, shapes, past_length=past_length, vocabulary=vocabularies(proto))
    session = Session(expose(proto, [v.tensor for v in values], prune=True), "float model", providers, proto)
    samples = _checked_samples(source, samples)
    inputs = {name for spec in specs for name in (spec.name, sanitise(spec.name))}  # fed, not compared
    readings: list[Reading] | None = None
    totals = Totals([], [], {}, {})
    generated = False
    for sample in progress(samples, quiet):
        generated |= sample is None
        feeds, _ = plan.feeds(sample, seed)
        reference = session.run(feeds, [v.tensor for v in values])
        expect = getattr(source, "expect", None)  # optional (see TensorSource)
        if readings is None and callable(expect):
            expect(_expected(values, reference, names))
        produced = {k: v for k, v in _call(source, feeds).items() if k not in inputs}
        totals.peak_bytes = max(totals.peak_bytes, _nbytes(reference) + _nbytes(produced))
        if readings is None:
            readings = (_by_name(graph, values, reference, produced) if names is None
                        else _by_structure(names, produced))
            totals.cumulative = [Aggregate() for _ in readings]
            totals.isolated = [Aggregate() for _ in readings]  # a source cannot be fed float values
        totals.samples += 1
        totals.executions += 2  # the float model's run and the source's call
        _measure(readings, reference, produced, totals)
    if readings is None:
        raise LayerbisectError(NO_SAMPLES)
    pairs = _reported_pairs(graph, values, readings, totals, alignment)
    records = assemble.layers(pairs, {i: (totals, i) for i in range(len(pairs))})
    if not records:
        raise LayerbisectError(
            f"no tensor of {assemble.label(source)} could be paired with a float value: name the "
            "tensors after the float model's tensors, keep them in the order they were computed, or "
            "give the graph they were dumped from (quant_graph=, --quant-graph)" if alignment is None else
            f"no tensor of {assemble.label(source)} is named after a value of the quantized graph: give "
            "the graph whose tensor names the dump uses (the compiled or optimized model it was run from)"
        )
    return assemble.build_report(
        records, threshold,
        float_side=assemble.Side(proto, assemble.label(float_model)),
        quant_side=assemble.Side(quant_proto, assemble.label(source),
                                 None if quant_graph is None else assemble.label(quant_graph)),
        float_graph=graph, alignment=_alignment(graph, pairs, alignment),
        run=assemble.Run(samples=totals.samples, executions=totals.executions, peak_bytes=totals.peak_bytes,
                         providers=tuple(providers), seed=seed),
        notes=[*lowered, *(plan.generated_notes if generated else ()), *_notes(readings)],
        problems=totals.problems.values(), generated=generated,
        sources=sources(float_model, proto, getattr(source, "path", None), quant_graph),
    )


@dataclass(frozen=True)
class Reading:
    """Where a pair's quantized value is in the source's tensors: the tensor ``key``, read
    through ``readout`` (its tensor is ``key``: the permutation to the float layout, and the
    scale and zero point of integers). ``pair`` is the alignment's pair (pairing by structure),
    else None, and ``match`` how the tensor was paired."""

    match: Match
    readout: Readout
    pair: Pair | None = None


def _by_name(graph: OpGraph, values: Sequence[_Value], reference: Mapping[str, np.ndarray],
             produced: Mapping[str, np.ndarray]) -> list[Reading]:
    """The source's tensors paired with float values by name, data and order (``pair_tensors``)."""
    matches = pair_tensors([(v.tensor, reference[v.tensor]) for v in values], produced, _fused_with(graph))
    return [Reading(m, Readout(m.key, perm=m.perm)) for m in matches]


def _dumped_names(alignment: Alignment, quant_proto: onnx.ModelProto) -> list[tuple[Pair, tuple[str, ...]]]:
    """Each aligned pair with the names a dump may give its quantized value, in order of
    preference: the tensor read (integers, dequantized with its readout), the
    DequantizeLinear output carrying it as float, the pair's quantized tensor."""
    dequantized: dict[str, list[str]] = {}
    for node in quant_proto.graph.node:
        if node.op_type == "DequantizeLinear":
            dequantized.setdefault(node.input[0], []).append(node.output[0])
    return [(pair, tuple(dict.fromkeys((pair.quant_readout.tensor, *dequantized.get(pair.quant_readout.tensor, ()),
                                        pair.quant_tensor))))
            for pair in alignment.pairs]


def _by_structure(names: Sequence[tuple[Pair, tuple[str, ...]]], produced: Mapping[str, np.ndarray]) -> list[Reading]:
    """The aligned pairs whose quantized value the source holds, by exact or sanitised name
    (``_dumped_names``)."""
    available = {**{sanitise(key): key for key in produced}, **{key: key for key in produced}}
    readings = []
    for pair, candidates in names:
        readout = pair.quant_readout
        found = next(((name, available[candidate]) for name in candidates
                      for candidate in (name, sanitise(name)) if candidate in available), None)
        if found is not None:
            name, key = found
            scaled = readout if name == readout.tensor else replace(readout, scale=None, zero_point=None)
            readings.append(Reading(Match(pair.float_tensor, key, "structure"), replace(scaled, tensor=key), pair))
    return readings


def _expected(values: Sequence[_Value], reference: Mapping[str, np.ndarray],
              names: Sequence[tuple[Pair, tuple[str, ...]]] | None) -> dict[str, tuple[int, ...]]:
    """The shape of the float value each name a source may use stands for, exact and
    sanitised: the float model's tensor names, or the quantized graph's (``_dumped_names``)."""
    named = ([(v.tensor, v.tensor) for v in values] if names is None
             else [(name, pair.float_tensor) for pair, candidates in names for name in candidates])
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in named:
        for key in (name, sanitise(name)):
            shapes.setdefault(key, tuple(np.shape(reference[tensor])))
    return shapes


def pair_tensors(
    reference: Sequence[tuple[str, np.ndarray]], produced: Mapping[str, np.ndarray],
    fused_with: Mapping[str, tuple[str, Mapping[int, tuple[str, str]]]] | None = None,
) -> list[Match]:
    """Pair source tensors with float values (``reference``: name and value, in the float
    model's order): by name, then by sanitised name, then by shape and order.

    A name can lie: a backend that fuses a Conv with its BatchNorm or Relu dumps the fused
    result under the Conv's name. ``fused_with`` gives, for a float value, the values a
    backend may dump under its name; a named tensor that agrees poorly with its namesake but
    closely with one of those is paired with that one (evidence "data").

    >>> a, b = np.ones((1, 2)), np.arange(3.0)
    >>> [(m.float_tensor, m.key, m.evidence) for m in pair_tensors([("x/a:0", a), ("b", b)], {"x_a_0": a, "t7": b})]
    [('x/a:0', 'x_a_0', 'name'), ('b', 't7', 'order')]
    >>> conv, relu = np.array([1.0, -2.0, 3.0]), np.array([1.0, 0.0, 3.0])
    >>> [(m.float_tensor, m.evidence) for m in pair_tensors([("conv", conv), ("relu", relu)], {"conv": relu},
    ...                                                     {"conv": ("Conv", {1: ("relu", "Relu")})})]
    [('relu', 'data')]
    """
    names = [name for name, _ in reference]
    values = dict(reference)
    by_name = {key: key for key in produced if key in values}
    by_sanitised = _unique({sanitise(n): n for n in names if n not in by_name}, names)
    for key in produced:
        if key not in by_name and sanitise(key) in by_sanitised:
            by_name[key] = by_sanitised.pop(sanitise(key))
    named = set(by_name.values())
    by_name.update(_settled(by_name, produced, values, fused_with or {}))
    matches = {key: Match(tensor, key, "name" if tensor in named else "data",
                          _fit(np.shape(produced[key]), values[tensor].shape)[1])
               for key, tensor in by_name.items()}
    taken = {m.float_tensor for m in matches.values()}
    left = [(n, v) for n, v in reference if n not in taken]
    unnamed = [(k, np.asarray(v)) for k, v in produced.items() if k not in matches]
    ordered = {m.key: m for m in _by_order(left, unnamed)}
    found = [matches.get(key) or ordered.get(key) for key in produced]
    position = {name: i for i, name in enumerate(names)}
    return sorted((m for m in found if m is not None), key=lambda m: position[m.float_tensor])


def _settled(by_name: Mapping[str, str], produced: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray],
             fused_with: Mapping[str, tuple[str, Mapping[int, tuple[str, str]]]]) -> dict[str, str]:
    """The named tensors that stand for another float value than their namesake's, by key.

    One that agrees closely with a value near its namesake, and much more closely than with the
    namesake, moves there; one that agrees with its namesake stays (see ``_choice``). Each
    such choice says how this source names tensors: for the namesake's op type, the option
    taken (stay; or the offset and op type moved to, a Relu's name on the value before it) is
    voted for, and the options left are voted against. A tensor that agrees with nothing
    closely (a broken layer, or any after it) takes its best-voted option, staying on ties.
    Agreement is unsigned (a sign flip keeps its name)."""
    named = set(by_name.values())
    choices = {key: _choice(np.asarray(produced[key]), tensor, fused_with.get(tensor, ("", {}))[1], values)
               for key, tensor in by_name.items()}
    votes: Counter = Counter()
    for key, offset in choices.items():
        kind, near = fused_with.get(by_name[key], ("", {}))
        if offset is not None:
            for option in (0, *near):
                votes[_option(kind, option, near)] += 1 if option == offset else -1
    moved, claimed = {}, set()
    for key, tensor in by_name.items():
        kind, near = fused_with.get(tensor, ("", {}))
        offset = choices[key]
        if offset is None:
            offset = max((0, *near), key=lambda option: (votes[_option(kind, option, near)], option == 0))
        target = near.get(offset, (None,))[0]
        if target is not None and target not in named and target not in claimed:
            moved[key] = target
            claimed.add(target)
    return moved


def _option(kind: str, offset: int, near: Mapping[int, tuple[str, str]]) -> tuple:
    """What moving a tensor named after an op of ``kind`` by ``offset`` means: the op type it
    then stands for (its own for 0)."""
    return kind, offset, near[offset][1] if offset else kind


def _choice(dumped: np.ndarray, named: str, near: Mapping[int, tuple[str, str]],
            values: Mapping[str, np.ndarray]) -> int | None:
    """Where a named tensor sits among the values near its namesake (``near``: tensor and op
    type by offset along the chain, -1 the one before): the offset of one it agrees with
    closely (above ``MOVED_ABOVE``) and ``CLOSER`` times more closely than with its namesake
    (a BatchNormalization near the identity leaves a Conv's value at cosine 0.98 of its own;
    a tensor equal to both, a Relu whose input is never negative, keeps its name);
    else 0 when it agrees with its namesake, the offset of the one it
    agrees with closely, None when it agrees with none closely."""
    def agreement(tensor: str) -> float:
        fits, perm = _fit(dumped.shape, values[tensor].shape)
        return abs(_cosine(_probe(values[tensor], None), _probe(dumped, perm))) if fits else 0.0

    own = agreement(named)
    offset = max(near, key=lambda o: agreement(near[o][0]), default=None)
    best = 0.0 if offset is None else agreement(near[offset][0])
    if best >= MOVED_ABOVE and (1.0 - best) * CLOSER <= 1.0 - own and best > own:  # a tie keeps the name
        return offset
    return 0 if own >= MOVED_BELOW else None


def _fused_with(graph: OpGraph) -> dict[str, tuple[str, dict[int, tuple[str, str]]]]:
    """For each float value, its operation's type and the values a backend may dump under its
    name, with their op types, by offset (-1 the value before it, 1 the one after): along the
    chain of foldable operations around it (a BatchNormalization, an activation), each the
    only reader of the value before it, up to ``FUSED_CHAIN`` steps either way.
    Backends name a fused result after its first operation (conv1 holding the Relu's value);
    onnxruntime's QDQ quantizer, dropping a Relu, gives the Relu's name to its input."""
    readers: dict[tuple, list[str]] = {}
    for node, attrs in graph.ops():
        for source in dict.fromkeys(attrs.sources):
            readers.setdefault(source, []).append(node)

    def foldable(node: str) -> bool:
        attrs = graph.op(node)
        return attrs.kind == "op" and attrs.role in FUSABLE and len(set(attrs.sources)) == 1

    def alone(value: tuple) -> bool:  # the value's one reader is foldable
        return len(readers.get(value, ())) == 1 and foldable(readers[value][0])

    kinds = {out: attrs.op_type for _, attrs in graph.ops() if attrs.kind == "op"
             for out in attrs.outputs}
    around: dict[str, tuple[str, dict[int, tuple[str, str]]]] = {}
    for node, attrs in graph.ops():
        if attrs.kind != "op" or not attrs.outputs:
            continue
        after: list[str] = []
        value = (node, 0)
        while len(after) < FUSED_CHAIN and alone(value):
            value = (readers[value][0], 0)
            after.append(graph.op(value[0]).outputs[0])
        before: list[str] = []
        current = node
        while len(before) < FUSED_CHAIN and foldable(current) and alone(graph.op(current).sources[0]):
            current = graph.op(current).sources[0][0]
            if graph.op(current).kind != "op":
                break
            before.append(graph.op(current).outputs[0])
        near = {-step: t for step, t in enumerate(before, 1)} | {step: t for step, t in enumerate(after, 1)}
        around[attrs.outputs[0]] = (attrs.op_type, {o: (t, kinds[t]) for o, t in near.items()})
    return around


def _unique(candidates: dict[str, str], names: Sequence[str]) -> dict[str, str]:
    """The sanitised names that stand for one float value only."""
    counts: dict[str, int] = {}
    for name in names:
        counts[sanitise(name)] = counts.get(sanitise(name), 0) + 1
    return {s: n for s, n in candidates.items() if counts[s] == 1}


def _by_order(left: list[tuple[str, np.ndarray]], unnamed: list[tuple[str, np.ndarray]]) -> list[Match]:
    """Pair ``unnamed`` source tensors, in their order, with float values ``left``, in theirs:
    the order-keeping assignment of tensors of compatible shapes with the most pairs and, among
    those, the closest values, as a diff aligns lines. Closeness counts the digits of agreement
    (a cosine of 0.999 is worth 3, of 0.7 about 0.5): the exact partners of the good tensors
    outweigh the loose resemblance of a broken one to anything, so it cannot pull them off."""
    rows, cols = len(unnamed), len(left)
    weight = rows * CLOSEST + 1.0  # one more pair outweighs any gain in closeness
    score = np.zeros((rows + 1, cols + 1))
    gains: dict[tuple[int, int], tuple[float, tuple[int, ...] | None]] = {}
    probes = [_probe(value, None) for _, value in left]
    source_probes: dict[tuple[int, tuple[int, ...] | None], np.ndarray] = {}
    for i in range(rows - 1, -1, -1):
        for j in range(cols - 1, -1, -1):
            score[i, j] = max(score[i + 1, j], score[i, j + 1])
            fits, perm = _fit(unnamed[i][1].shape, left[j][1].shape)
            if fits:
                if (i, perm) not in source_probes:
                    source_probes[(i, perm)] = _probe(unnamed[i][1], perm)
                gain = weight + _closeness(_cosine(probes[j], source_probes[(i, perm)]))
                gains[(i, j)] = (gain, perm)
                score[i, j] = max(score[i, j], gain + score[i + 1, j + 1])
    matches, i, j = [], 0, 0
    while i < rows and j < cols:  # on ties, the later float value: what a fused operation computes
        if score[i, j] == score[i, j + 1]:
            j += 1
        elif (i, j) in gains and math.isclose(score[i, j], gains[(i, j)][0] + score[i + 1, j + 1]):
            matches.append(Match(left[j][0], unnamed[i][0], "order", gains[(i, j)][1]))
            i, j = i + 1, j + 1
        else:
            i += 1
    return matches


def _fit(shape: tuple[int, ...], float_shape: tuple[int, ...]) -> tuple[bool, tuple[int, ...] | None]:
    """Whether a source tensor of ``shape`` can hold a float value of ``float_shape``, and the
    NHWC -> NCHW permutation it then needs (None: none)."""
    if tuple(shape) == tuple(float_shape):
        return True, None
    perm = to_channels_first(len(shape))
    if len(shape) >= 3 and permuted(shape, perm) == tuple(float_shape):
        return True, perm
    return False, None


def _permuted(array: np.ndarray, perm: tuple[int, ...] | None) -> np.ndarray:
    return array if perm is None else np.transpose(array, perm)


def _probe(array: np.ndarray, perm: tuple[int, ...] | None) -> np.ndarray:
    """At most PROBE_SIZE values of ``array`` (in the float layout), evenly spaced: enough to
    tell candidates apart cheaply."""
    flat = np.asarray(_permuted(np.asarray(array), perm), dtype=np.float64).ravel()
    return flat[:: max(1, flat.size // PROBE_SIZE)]


def _closeness(cosine: float) -> float:
    """Digits of agreement of a cosine, from 0 (orthogonal or worse) to CLOSEST (equal)."""
    return min(CLOSEST, -math.log10(max(1.0 - max(cosine, 0.0), 10.0 ** -CLOSEST)))


def _cosine(x: np.ndarray, y: np.ndarray) -> float:
    if x.size != y.size or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return 0.0
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(np.dot(x, y)) / norm if norm else float(not x.any() and not y.any())


def _measure(readings: Sequence[Reading], reference: Mapping[str, np.ndarray], produced: Mapping[str, np.ndarray],
             totals: Totals) -> None:
    """Fold one sample's comparison of each reading into ``totals``, or record why it cannot be
    (``totals.problems``, by position), as a model's pass does (``measure.compare_pairs``)."""
    problems: dict[int, str] = {}
    usable = []
    for index, reading in enumerate(readings):
        key = reading.match.key
        actual = np.asarray(produced[key]) if key in produced else None
        if actual is None:
            problems[index] = f"the source returned no {key!r} for a later sample"
        elif actual.dtype.kind != "f" and reading.readout.scale is None:
            problems[index] = f"{key!r} holds {actual.dtype} values: dequantize them first"
        usable.append(index not in problems and index not in totals.problems)
    pairs = [_reading_pair(reading) for reading in readings]
    quant = {reading.match.key: produced[reading.match.key] for reading, ok in zip(readings, usable) if ok}
    kept = [i for i, ok in enumerate(usable) if ok]
    refused: dict[int, str] = {}
    outcomes = compare_pairs([pairs[i] for i in kept], reference, quant, refused)
    for position, index in enumerate(kept):
        if position in refused:
            why = refused[position]
            problems[index] = why if why == assemble.NOT_FLOAT else f"{readings[index].match.key!r}: {why}"
        elif (metrics := outcomes[position]) is not None:
            totals.cumulative[index].add(metrics)
            totals.shapes[index] = tuple(np.shape(reference[readings[index].match.float_tensor]))
    for index, why in problems.items():
        totals.problems.setdefault(index, why)


def _reading_pair(reading: Reading) -> Pair:
    """The pair ``compare_pairs`` measures: the float value against the source's tensor."""
    tensor = reading.match.float_tensor
    return Pair((), tensor, (reading.match.key,), reading.match.key, "", reading.match.evidence,
                Readout(tensor), reading.readout, tensor)


def _reported_pairs(graph: OpGraph, values: Sequence[_Value], readings: Sequence[Reading], totals: Totals,
                    alignment: Alignment | None) -> list[Pair]:
    """The pairs as the report shows them: the alignment's own (pairing by structure), else
    each float value's span (see ``_span``) against the source's tensor."""
    if alignment is not None:
        aligned = [reading.pair for reading in readings if reading.pair is not None]
        assert len(aligned) == len(readings), "pairing by structure gives every reading its pair"
        return aligned
    by_tensor = {v.tensor: v for v in values}
    paired = {by_tensor[r.match.float_tensor].node for i, r in enumerate(readings)
              if assemble.comparable(totals, i)}
    pairs = []
    for reading in readings:
        value, key = by_tensor[reading.match.float_tensor], reading.match.key
        pairs.append(Pair(_span(graph, value.node, paired), value.tensor, (key,), key, value.op_type,
                          reading.match.evidence, Readout(value.tensor), reading.readout, value.tensor))
    return pairs


def _alignment(graph: OpGraph, pairs: Sequence[Pair], alignment: Alignment | None) -> Alignment:
    """What the pairs cover of the float model: the alignment, less the pairs the source does
    not hold (their float operations then have no counterpart)."""
    ops = [attrs.name for _, attrs in sorted(graph.ops(), key=lambda i: i[1].order)
           if attrs.kind == "op"]
    covered = {node for pair in pairs for node in pair.float_nodes}
    if alignment is None:
        return Alignment(tuple(pairs), tuple(op for op in ops if op not in covered), len(ops))
    unheld = {node for pair in alignment.pairs for node in pair.float_nodes} - covered
    unaligned = set(alignment.unaligned) | unheld
    return replace(alignment, pairs=tuple(pairs), unaligned=tuple(op for op in ops if op in unaligned))


def _span(graph: OpGraph, node: str, paired: set[str]) -> tuple[str, ...]:
    """The float operations a source tensor stands for: ``node`` and the chain of unpaired
    operations before it, each read by the next alone (what a backend fuses: conv+bn+relu)."""
    span = [node]
    while True:
        sources = {src for src, _ in graph.op(span[0]).sources}
        previous = next(iter(sources)) if len(sources) == 1 else None
        if (previous is None or graph.op(previous).kind != "op" or previous in paired
                or graph.out_degree(previous) != 1):
            return tuple(graph.op(n).name for n in span)
        span.insert(0, previous)


def _notes(readings: Sequence[Reading]) -> list[str]:
    by_order = [r for r in readings if r.match.evidence == "order"]
    notes = ["quantized side: a tensor source; only cumulative error is measured (a source "
             "cannot be fed the float model's values)"]
    if by_order:
        notes.append(f"{len(by_order)} source tensor{'s' if len(by_order) != 1 else ''} paired by "
                     "shape and order, not by name")
    return notes


def _float_values(graph: OpGraph) -> list[_Value]:
    """Every float value an operation of the float model computes, in order."""
    values = []
    for _, attrs in sorted(graph.ops(), key=lambda item: item[1].order):
        if attrs.kind != "op":
            continue
        for tensor, dtype in zip(attrs.outputs, attrs.dtypes):
            if tensor and dtype in FLOAT_DTYPES | {None}:
                values.append(_Value(attrs.name, attrs.op_type, tensor))
    return values


def _checked_samples(source: TensorSource, samples: Iterable[Sample | None]) -> Iterable[Sample | None]:
    """The samples, checked against what a dump can answer: the one run it was made from."""
    if not getattr(source, "single_run", False):
        return samples
    samples = list(samples)
    if samples == [None]:
        raise LayerbisectError(
            f"{assemble.label(source)} holds the tensors of one run: give the inputs it was made "
            "from (inputs=, or --inputs FILE.npz)"
        )
    if len(samples) != 1:
        raise LayerbisectError(
            f"{assemble.label(source)} holds the tensors of one run, but {len(samples)} samples were given"
        )
    return samples


def _call(source: TensorSource, feeds: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    try:
        produced = source(feeds)
    except LayerbisectError:
        raise
    except Exception as exc:
        raise LayerbisectError(f"{assemble.label(source)} failed: {first_line(exc)}") from exc
    if not isinstance(produced, Mapping):
        raise LayerbisectError(f"{assemble.label(source)} must return a dict of tensor name -> array, "
                               f"got {type(produced).__name__}")
    return produced


def _nbytes(values: Mapping[str, np.ndarray]) -> int:
    return sum(np.asarray(v).nbytes for v in values.values())
