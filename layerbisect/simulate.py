"""Fixed-point what-if: the float model with every activation quantized to a number format.

``simulated("ap_fixed<16,8>")`` stands for a quantized model that does not exist yet: the float
model with each float32 activation (graph inputs and every operation's output) rounded to the
format's grid and saturated at its range. Pass it as the quantized side of
``find_first_bad_layer`` to see where the format destroys the signal, and why: *saturation*
(values beyond the range are clipped) or *resolution* (values smaller than the step are rounded
away). Weights stay in float.

Formats:

- ``ap_fixed<W,I>`` / ``ap_ufixed<W,I>``: W bits in all, I of them integer bits (the sign
  included for ap_fixed), so the step is 2^-(W-I); rounding to nearest (ties up, HLS's AP_RND)
  and saturation (AP_SAT) unless other modes are given: ``ap_fixed<16,6,AP_TRN,AP_WRAP>`` is
  HLS's own default (truncation and wrap-around). Modes: AP_RND, AP_RND_CONV (ties to even),
  AP_TRN; AP_SAT, AP_WRAP.
- ``int8``, ``uint8``, ``int16`` (any ``intN``/``uintN``, 2 <= N <= 16): one scale per tensor
  from the range observed over the samples; signed formats are symmetric (zero point 0),
  unsigned ones asymmetric; ties to even and saturation, as QuantizeLinear does.

The simulated model computes in float32 with Div, Floor/Round, Clip and Mul, so it runs
anywhere onnxruntime does; grids of up to 24 bits are exact in float32.

>>> fmt = parse_format("ap_fixed<8,4>")
>>> fmt.step, fmt.low, fmt.high
(0.0625, -8.0, 7.9375)
>>> fixed_grid(fmt).apply(np.array([0.01, 0.5, 100.0], np.float32))[0].tolist()
[0.0, 0.5, 7.9375]
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from layerbisect.align import Alignment, Pair, is_weighted
from layerbisect.errors import NO_SAMPLES, LayerbisectError
from layerbisect.expose import expose
from layerbisect.graph import FLOAT_DTYPES, OpGraph, Readout, build_graph
from layerbisect.inputs import Sample, plan_inputs
from layerbisect.load import ModelLike, declared_inputs, load_model, with_data
from layerbisect.report import LayerComparison
from layerbisect.run import DEFAULT_PROVIDERS, Session, lower_ir_version
from layerbisect.wiring import producers

ROUNDING = {"AP_RND": "half up", "AP_RND_CONV": "half to even", "AP_TRN": "floor"}
OVERFLOW = {"AP_SAT": "saturate", "AP_WRAP": "wrap"}
FIXED = re.compile(r"^(ap_u?fixed)<(-?\d+),(-?\d+)(?:,(AP_\w+))?(?:,(AP_\w+))?>$")
INTEGER = re.compile(r"^(u?int)(\d+)$")
MIN_OPSET = 11  # Round, and Clip with its bounds as inputs
SUFFIX = "__layerbisect_sim"



@dataclass(frozen=True)
class Format:
    """A number format: ``bits`` wide, ``signed`` or not, with ``fraction`` fractional bits
    (fixed point) or None (a scale per tensor from observed ranges); ``rounding`` is "half up",
    "half to even" or "floor", ``overflow`` "saturate" or "wrap"."""

    name: str
    bits: int
    signed: bool
    fraction: int | None
    rounding: str
    overflow: str

    @property
    def qmin(self) -> int:
        """The smallest integer of the format's grid."""
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """The largest integer of the format's grid."""
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def step(self) -> float:
        """The value of one unit in the last place (fixed point only)."""
        if self.fraction is None:
            raise LayerbisectError(f"{self.name} has no fixed step, range or grid: its scale is chosen per "
                                   "tensor from the observed range; ask a fixed-point format (ap_fixed<W,I>)")
        return math.ldexp(1.0, -self.fraction)

    @property
    def low(self) -> float:
        """The smallest value the format holds (fixed point only)."""
        return self.qmin * self.step

    @property
    def high(self) -> float:
        """The largest value the format holds (fixed point only)."""
        return self.qmax * self.step

    def describe(self) -> str:
        """The format and how it rounds, in words."""
        if self.fraction is None:
            kind = "symmetric" if self.signed else "asymmetric"
            return (f"{self.name} (one scale per tensor from the observed range, {kind}, "
                    f"round {self.rounding}, {self.overflow})")
        return (f"{self.name} (step {_g(self.step)}, range [{_g(self.low)}, {_g(self.high)}], "
                f"round {self.rounding}, {self.overflow})")


def parse_format(text: str) -> Format:
    """Read a format: ``ap_fixed<W,I>``, ``ap_ufixed<W,I>`` (optionally with quantization and
    overflow modes), ``int8``, ``uint8``, ``int16``.

    >>> parse_format("ap_fixed<16,6,AP_TRN,AP_WRAP>").describe()
    'ap_fixed<16,6,AP_TRN,AP_WRAP> (step 0.0009765625, range [-32, 31.9990234375], round floor, wrap)'
    """
    compact = re.sub(r"\s+", "", str(text))
    fixed, integer = FIXED.match(compact), INTEGER.match(compact.lower())
    if fixed:
        kind, width, integer_bits, rounding, overflow = fixed.groups()
        bits, signed = int(width), kind == "ap_fixed"
        if not 1 + signed <= bits <= 32:
            raise LayerbisectError(f"{compact}: W (total bits) must be in {1 + signed}..32, got {bits}")
        for mode, known in ((rounding, ROUNDING), (overflow, OVERFLOW)):
            if mode is not None and mode not in known:
                raise LayerbisectError(
                    f"{compact}: unsupported mode {mode}; supported: {', '.join([*ROUNDING, *OVERFLOW])}"
                )
        if rounding in OVERFLOW and overflow is None:  # ap_fixed<W,I,AP_SAT> is not HLS syntax
            raise LayerbisectError(
                f"{compact}: the quantization mode comes first, e.g. {kind}<{bits},{integer_bits},AP_RND,{rounding}>"
            )
        return Format(compact, bits, signed, bits - int(integer_bits),
                      ROUNDING[rounding or "AP_RND"], OVERFLOW[overflow or "AP_SAT"])
    if integer and 2 <= int(integer.group(2)) <= 16:
        return Format(compact.lower(), int(integer.group(2)), integer.group(1) == "int", None, "half to even",
                      "saturate")
    raise LayerbisectError(
        f"unknown format {text!r}: expected ap_fixed<W,I> (W total bits, I integer bits), "
        "ap_ufixed<W,I>, int8, uint8 or int16"
    )


@dataclass(frozen=True)
class Effect:
    """What a grid does to a tensor's values, summed over samples: how many ``values``, how many
    were ``nonzero``, ``clipped`` (beyond the range) or ``zeroed`` (non-zero, rounded to 0), and
    the energy of the signal and of the errors clipping and rounding made."""

    values: int = 0
    nonzero: int = 0
    clipped: int = 0
    zeroed: int = 0
    signal: float = 0.0
    clip_error: float = 0.0
    round_error: float = 0.0

    def __add__(self, other: Effect) -> Effect:
        return Effect(*(a + b for a, b in zip(astuple(self), astuple(other))))

    @property
    def cause(self) -> str | None:
        """Which error is larger: "saturation" (values beyond the range, clipped or wrapped
        around) or "resolution" (values rounded to the step); None when there is no error."""
        if self.clip_error == 0.0 and self.round_error == 0.0:
            return None
        return "saturation" if self.clip_error >= self.round_error else "resolution"

    @property
    def error_ratio(self) -> float:
        """Error energy over signal energy (inf for a signal of zeros made non-zero)."""
        error = self.clip_error + self.round_error
        return error / self.signal if self.signal else (math.inf if error else 0.0)

    def describe(self, grid: Grid) -> str:
        """The cause first, then both shares, e.g. 'saturation: 37.0% of values clipped ...'."""
        saturates = grid.format.overflow == "saturate"
        overflow = (f"{_share(self.clipped, self.values)} of values "
                    f"{'clipped to' if saturates else 'wrapped around, beyond'} [{_g(grid.low)}, {_g(grid.high)}]")
        zeroed = f"{_share(self.zeroed, self.nonzero)} of non-zero values rounded to zero (step {_g(grid.scale)})"
        if self.cause == "saturation":
            cause, first, second = "saturation" if saturates else "overflow", overflow, zeroed
        else:
            cause, first, second = "resolution", zeroed, overflow
        sqnr = -10 * math.log10(self.error_ratio) if 0 < self.error_ratio < math.inf else math.inf
        return f"{cause}: {first}; {second}; SQNR of the format alone {sqnr + 0.0:.1f} dB"


@dataclass(frozen=True)
class Grid:
    """The grid of one tensor: value = (k - zero_point) * scale for integers k in [qmin, qmax]."""

    scale: float
    zero_point: int
    format: Format

    @property
    def low(self) -> float:
        """The smallest value on the grid."""
        return (self.format.qmin - self.zero_point) * self.scale

    @property
    def high(self) -> float:
        """The largest value on the grid."""
        return (self.format.qmax - self.zero_point) * self.scale

    def apply(self, x: np.ndarray) -> tuple[np.ndarray, Effect]:
        """The values of ``x`` on the grid (float32, as the simulated model computes them), and
        what that did to them."""
        x = np.asarray(x, dtype=np.float32)
        k = _round(x / np.float32(self.scale), self.format.rounding) + np.float32(self.zero_point)
        held = self._overflow(k)
        scale = np.float32(self.scale)
        unclipped = (k - np.float32(self.zero_point)) * scale
        y = (held - np.float32(self.zero_point)) * scale
        wide = x.astype(np.float64)
        effect = Effect(
            values=x.size,
            nonzero=int(np.count_nonzero(x)),
            clipped=int(np.count_nonzero(held != k)),
            zeroed=int(np.count_nonzero((x != 0) & (y == 0) & (held == k))),
            signal=float(np.dot(wide.ravel(), wide.ravel())),
            clip_error=_energy(y.astype(np.float64) - unclipped),
            round_error=_energy(unclipped.astype(np.float64) - wide),
        )
        return y, effect

    def _overflow(self, k: np.ndarray) -> np.ndarray:
        qmin, qmax = np.float32(self.format.qmin), np.float32(self.format.qmax)
        if self.format.overflow == "saturate":
            return np.clip(k, qmin, qmax)
        modulus = np.float32(2.0 ** self.format.bits)
        return k - modulus * np.floor((k - qmin) / modulus)


def fixed_grid(fmt: Format) -> Grid:
    """The grid of a fixed-point format: scale 2^-fraction, zero point 0."""
    return Grid(fmt.step, 0, fmt)


def observed_grid(fmt: Format, low: float, high: float) -> Grid:
    """The grid of an integer format for values observed in [low, high]: symmetric around 0 for
    signed formats, covering [min(low, 0), max(high, 0)] for unsigned ones.

    >>> g = observed_grid(parse_format("uint8"), -1.0, 3.0)
    >>> round(g.scale, 6), g.zero_point
    (0.015686, 64)
    """
    if fmt.signed:
        scale = max(abs(low), abs(high)) / fmt.qmax
        return Grid(float(np.float32(scale or 1.0)), 0, fmt)
    low, high = min(low, 0.0), max(high, 0.0)
    scale = float(np.float32((high - low) / fmt.qmax or 1.0))
    return Grid(scale, int(np.clip(round(-low / scale), fmt.qmin, fmt.qmax)), fmt)


@dataclass(frozen=True)
class Simulated:
    """A format to simulate on the float model, given as the quantized side.

    >>> import layerbisect
    >>> layerbisect.simulated("ap_fixed<16,8>")
    simulated('ap_fixed<16,8>')
    >>> from layerbisect import demo
    >>> report = layerbisect.find_first_bad_layer(demo.float_model(), layerbisect.simulated("int8"),
    ...                                           inputs=demo.image())
    >>> report.quant_model
    'simulated int8'
    """

    format: Format

    def __repr__(self) -> str:
        return f"simulated({self.format.name!r})"

    def __str__(self) -> str:
        return f"simulated {self.format.name}"

    def build(
        self,
        float_model: ModelLike,
        samples: Sequence[Sample | None] = (None,),
        *,
        shapes: Mapping[str, Sequence[int]] | None = None,
        seed: int = 0,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
    ) -> Simulation:
        """The simulated model of ``float_model``, with the grid of each activation and what it
        does to the values over ``samples`` (None: one seeded random sample). Integer formats
        take their ranges from the samples.

        >>> import os
        >>> from layerbisect import demo
        >>> simulation = simulated("ap_fixed<16,8>").build(demo.float_model())
        >>> onnx.save(simulation.model, os.path.join(demo.scratch(), "float_ap_fixed_16_8.onnx"))
        """
        proto = load_model(float_model, role="float model")
        lower_ir_version(proto, "float model")  # the report notes it, when setup loads the float model again
        _check_opset(proto)
        graph = build_graph(proto)
        tensors = _activations(graph)
        if not tensors:
            raise LayerbisectError("the float model has no float32 activation to simulate a format on")
        observe = _Observer(proto, tensors, samples, shapes, seed, providers)
        if self.format.fraction is None:
            ranges = observe.ranges()
            grids = {t: observed_grid(self.format, *ranges[t]) for t in tensors}
        else:
            grids = dict.fromkeys(tensors, fixed_grid(self.format))
        model, names = _simulated_model(proto, grids, f"{proto.graph.name} {self}".strip())
        return Simulation(
            format=self.format,
            model=with_data(model),  # the user may save it
            names=names,
            grids=grids,
            effects=observe.effects(grids),
            reads={node.name: tuple(node.input) for node in proto.graph.node},
            samples=observe.samples,
            label=str(self),
        )


def simulated(format: str) -> Simulated:
    """The quantized side as the float model with every activation in ``format``:
    ``"ap_fixed<16,8>"`` (W total bits, I integer bits including the sign; round to nearest,
    saturate), ``"ap_ufixed<8,4>"``, ``"int8"``, ``"uint8"``, ``"int16"``.

    >>> simulated("ap_fixed<8,4>").format.step
    0.0625
    """
    return Simulated(parse_format(format))


@dataclass(frozen=True)
class Simulation:
    """A format simulated on a float model: the simulated ``model``, the simulated tensor that
    stands for each float activation (``names``), its ``grids`` and ``effects`` (what the grid
    does to the float model's values over the samples)."""

    format: Format
    model: onnx.ModelProto
    names: Mapping[str, str]
    grids: Mapping[str, Grid]
    effects: Mapping[str, Effect]
    reads: Mapping[str, tuple[str, ...]] = field(repr=False)
    samples: int
    label: str

    def __str__(self) -> str:
        return self.label

    def alignment(self, float_graph: OpGraph) -> Alignment:
        """Each float value paired with its simulated counterpart, known by construction."""
        pairs = []
        for node in sorted(
            (n for n, a in float_graph.ops() if a.kind == "op"),
            key=lambda n: float_graph.op(n).order,
        ):
            attrs = float_graph.op(node)
            for index, tensor in enumerate(attrs.outputs):
                if attrs.dtypes[index] not in FLOAT_DTYPES | {None}:
                    continue
                quant = self.names.get(tensor, tensor)
                pairs.append(Pair(
                    float_nodes=(attrs.name,), float_tensor=tensor, quant_nodes=(attrs.name,),
                    quant_tensor=quant, op_type=attrs.op_type, evidence="structure",
                    float_readout=Readout(tensor), quant_readout=Readout(quant), float_output=tensor,
                ))
        ops = sum(1 for _, a in float_graph.ops() if a.kind == "op")
        weighted = sum(is_weighted(a) for _, a in float_graph.ops())
        return Alignment(tuple(pairs), (), ops, weighted=weighted, weighted_paired=weighted, weight_agreement=1.0)

    def notes(self, layers: Iterable[LayerComparison | None]) -> list[str]:
        """What was simulated, then why each of ``layers`` (the first bad one, the culprit)
        breaks: the cause and the shares of values clipped and rounded to zero."""
        notes = [f"quantized side: the float model with its {len(self.grids)} float32 activations in "
                 f"{self.format.describe()} over {self.samples} sample{'s' if self.samples != 1 else ''}; "
                 "weights in float"]
        for layer in dict.fromkeys(layer for layer in layers if layer is not None):
            diagnosis = self.diagnose(layer)
            if diagnosis:
                notes.append(diagnosis)
        return notes

    def diagnose(self, layer: LayerComparison) -> str | None:
        """Why ``layer`` loses its signal in this format: the worst-hit of its value and the
        values it reads, e.g. "saturation: 37.0% of values clipped to [-8, 7.9375]; ..."."""
        own = [layer.float_tensor]
        read = [t for node in layer.float_nodes for t in self.reads.get(node, ()) if t in self.effects]
        candidates = [t for t in dict.fromkeys(own + read) if t in self.effects and self.effects[t].cause]
        if not candidates:
            return None
        worst = max(candidates, key=lambda t: self.effects[t].error_ratio)
        where = "" if worst == layer.float_tensor else f", in its input {worst!r}"
        return (f"{self.format.name} at #{layer.index} {layer.op_type} {'+'.join(layer.float_nodes)!r}{where}: "
                f"{self.effects[worst].describe(self.grids[worst])}")


class _Observer:
    """Runs the float model over the samples and looks at the activations to simulate."""

    def __init__(self, proto, tensors, samples, shapes, seed, providers) -> None:
        self.tensors = tensors
        specs = declared_inputs(proto)
        self.plan = plan_inputs(specs, specs, shapes)
        inputs = {spec.name for spec in specs}
        self.computed = [t for t in tensors if t not in inputs]
        self.session = Session(expose(proto, self.computed, prune=True), "float model", providers, proto)
        self.sample_list = list(samples)
        self.seed = seed
        if not self.sample_list:
            raise LayerbisectError(NO_SAMPLES)

    @property
    def samples(self) -> int:
        """How many samples were looked at."""
        return len(self.sample_list)

    def _values(self) -> Iterable[dict[str, np.ndarray]]:
        for sample in self.sample_list:
            feeds, _ = self.plan.feeds(sample, self.seed)
            values = self.session.run(feeds, self.computed)
            yield {**{t: feeds[t] for t in self.tensors if t in feeds}, **values}

    def ranges(self) -> dict[str, tuple[float, float]]:
        """The smallest and largest finite value of each activation over the samples."""
        low = dict.fromkeys(self.tensors, math.inf)
        high = dict.fromkeys(self.tensors, -math.inf)
        for values in self._values():
            for tensor, array in values.items():
                finite = array[np.isfinite(array)]
                if finite.size:
                    low[tensor] = min(low[tensor], float(finite.min()))
                    high[tensor] = max(high[tensor], float(finite.max()))
        return {t: (low[t], high[t]) if low[t] <= high[t] else (0.0, 0.0) for t in self.tensors}

    def effects(self, grids: Mapping[str, Grid]) -> dict[str, Effect]:
        """What each grid does to its activation, summed over the samples."""
        effects = dict.fromkeys(self.tensors, Effect())
        for values in self._values():
            for tensor, array in values.items():
                effects[tensor] = effects[tensor] + grids[tensor].apply(array)[1]
        return effects


def _activations(graph: OpGraph) -> list[str]:
    """The float32 values to quantize: graph inputs, then operation outputs, in order."""
    float32 = TensorProto.FLOAT
    tensors = [attrs.name for _, attrs in sorted(graph.ops(), key=lambda item: item[1].order)
               if attrs.kind == "input" and attrs.dtypes[0] == float32]
    ops = (n for n, a in graph.ops() if a.kind == "op")
    for node in sorted(ops, key=lambda n: graph.op(n).order):
        attrs = graph.op(node)
        tensors += [t for t, dtype in zip(attrs.outputs, attrs.dtypes) if t and dtype == float32]
    return list(dict.fromkeys(tensors))


def _simulated_model(
    proto: onnx.ModelProto, grids: Mapping[str, Grid], name: str
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``proto`` in which every reader of a tensor of ``grids`` reads it on its grid,
    and the tensor of the copy that holds each of them so. The model's outputs keep their
    names: they hold the values on the grid, computed from their producer's renamed output."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    outputs = {output.name for output in graph.output}
    producer = producers(graph)
    names = {t: t if t in outputs and t in producer else t + SUFFIX for t in grids}
    for node in graph.node:
        node.input[:] = [names.get(x, x) for x in node.input]
    for tensor, target in names.items():
        source = tensor
        if target == tensor:
            source = tensor + SUFFIX + "_raw"
            node = producer[tensor]
            node.output[:] = [source if out == tensor else out for out in node.output]
        nodes, constants = _chain(source, target, grids[tensor], tensor + SUFFIX)
        graph.node.extend(nodes)
        graph.initializer.extend(constants)
    graph.name = name
    return model, names


def _chain(
    tensor: str, target: str, grid: Grid, prefix: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and constants (named ``prefix``...) computing ``target``, ``tensor`` on ``grid``:
    divide by the scale, round, shift by the zero point, saturate or wrap, shift back and
    multiply by the scale."""
    fmt = grid.format
    nodes: list[onnx.NodeProto] = []
    constants: dict[str, onnx.TensorProto] = {}

    def const(key: str, value: float) -> str:
        name = f"{prefix}_{key}"
        constants[name] = numpy_helper.from_array(np.array(value, dtype=np.float32), name)
        return name

    def op(op_type: str, inputs: list[str], out: str | None = None) -> str:
        node_name = f"{prefix}_{len(nodes)}"
        nodes.append(helper.make_node(op_type, inputs, [out or node_name], name=node_name))
        return out or node_name

    value = op("Div", [tensor, const("scale", grid.scale)])
    if fmt.rounding == "half up":
        value = op("Floor", [op("Add", [value, const("half", 0.5)])])
    else:
        value = op("Round" if fmt.rounding == "half to even" else "Floor", [value])
    if grid.zero_point:
        value = op("Add", [value, const("zero_point", grid.zero_point)])
    if fmt.overflow == "saturate":
        value = op("Clip", [value, const("qmin", fmt.qmin), const("qmax", fmt.qmax)])
    else:
        modulus = const("modulus", 2.0 ** fmt.bits)
        wraps = op("Floor", [op("Div", [op("Sub", [value, const("qmin", fmt.qmin)]), modulus])])
        value = op("Sub", [value, op("Mul", [wraps, modulus])])
    if grid.zero_point:
        value = op("Sub", [value, const("zero_point", grid.zero_point)])
    op("Mul", [value, const("scale", grid.scale)], target)
    return nodes, list(constants.values())


def _check_opset(proto: onnx.ModelProto) -> None:
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset < MIN_OPSET:
        raise LayerbisectError(
            f"simulating a format needs opset {MIN_OPSET} or newer (Round, Clip with bounds as "
            f"inputs); the float model declares opset {opset}: convert it with "
            "onnx.version_converter.convert_version(model, 13)"
        )


def _round(v: np.ndarray, rounding: str) -> np.ndarray:
    if rounding == "half up":
        return np.floor(v + np.float32(0.5))
    return np.rint(v) if rounding == "half to even" else np.floor(v)


def _energy(error: np.ndarray) -> float:
    flat = error[np.isfinite(error)].ravel()
    return float(np.dot(flat, flat))


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0%"


def _g(value: float) -> str:
    return f"{value:.12g}"
