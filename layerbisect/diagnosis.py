"""Why a layer breaks and which fix repairs it, verified (QDQ models, and QOperator and
dynamic models in their QDQ form: ``layerbisect.qdqform``).

For a layer whose own (isolated) error is below the threshold, three questions, answered
from the quantized model's own quantizers and the float model's values on the samples:

- **Which quantizer.** The layer's isolated error is split into its parts: its weights (the
  DequantizeLinear of each constant it reads, with their real scale, zero point and axis), its
  input activations (the QuantizeLinear/DequantizeLinear of values the isolated measurement
  does not feed: graph inputs) and its output activation. Each part is measured by a variant
  of the isolated layer with only that part quantized, against the float model's value.
  (Inputs that other layers produce are fed in float: their quantizer is the output part of
  the layer before, as in a QDQ graph a value is quantized once, by its producer.)
- **Why.** Each quantizer quantizes the float values again, with its scale, zero point and
  type: the share of values outside the representable range, and the error energy of that
  clipping (*saturation*) against the error energy of rounding inside the range
  (*resolution*); the float range against the representable range. For weights, how much of
  the error is more than rounding (integers that are not the float weights rounded), and
  per-channel outliers that set a per-tensor scale.
- **Which fix.** Candidates matched to the cause, smallest first: for an activation, a range
  from percentiles of its float values (8-bit as before), then 16-bit (uint16/int16 over its
  float range), then keeping the layer in float (``fallback.bypass``); for weights,
  per-channel weights requantized from the float ones, then float. Each is verified: the model
  is rebuilt in memory with that change and run on the samples, the layer's cosine and every
  model output's cosine before and after. A fix that does not verify is reported as failing
  and never recommended.

A QOperator or dynamic model is diagnosed in its QDQ form (each integer operation written as
DequantizeLinear -> float operation -> QuantizeLinear with the model's own scales, zero points
and integers). A dynamic model's input quantizer (DynamicQuantizeLinear, uint8 over each
input's own range) is a part of the layer reading it, measured per sample; nothing can set its
range, so only keeping the layer in float is tried for it. QOperator operations take 8-bit
integers and an int32 bias: no 16-bit and no float-bias candidate; per-channel weights are
``per_channel=True`` there, as for ``quantize_dynamic``. A layer that onnxruntime's kernel
breaks while its QDQ form holds (the own cosine of the model as given below the threshold, of
its QDQ form above) breaks in the *kernel*: on x86 without VNNI the int8 products clip
(``layerbisect.kernels``); 7-bit weights (``reduce_range=True``) are tried, then float.

Cost: the float model runs once per sample for the whole diagnosis (the quantized model's
cosines before any fix are the report's), and each candidate fix once per sample; the
variants run the isolated layer alone (``layer_runs``), never the model.

>>> from layerbisect import demo  # conv2's int8 weights negated
>>> report = diagnose(*demo.files(), demo.image())
>>> report.diagnosis.culprit.cause, report.diagnosis.culprit.recommended.kind
('weights', 'per-channel weights')
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from layerbisect.align import Pair
from layerbisect.compare import Aggregate, compare
from layerbisect.errors import NO_SAMPLES, LayerbisectError
from layerbisect.fallback import _activate, _carried, _drop_unread, _dropped_activations, bypass
from layerbisect.find import find_first_bad_layer
from layerbisect.footprint import feeders
from layerbisect.graph import Readout
from layerbisect.grid import broadcastable, dequantize, integer_range, quantize
from layerbisect.inputs import Sample, reusable, samples_of
from layerbisect.isolate import cut
from layerbisect.load import ModelLike, tensor_array
from layerbisect.options import DEFAULT_PROVIDERS, check_threshold
from layerbisect.pipeline import setup
from layerbisect.qdqform import qdq_form
from layerbisect.report import LayerComparison, Report
from layerbisect.run import Session, int8_products_saturate, usable_providers
from layerbisect.segment import Segments
from layerbisect.text import number
from layerbisect.wiring import constants, produced, producers

CAUSES = ("weights", "saturation", "resolution", "kernel")
DEFAULT_TOP = 3  # layers diagnosed, worst isolated cosine first (the culprit always)
# the range a percentile fix gives an activation: values beyond these percentiles clip
PERCENTILES = (0.01, 99.99)
# a per-tensor weight scale is set by outliers when the largest channel's range is this many
# times the median channel's
OUTLIER_RATIO = 4.0
# weights whose quantization error is this many times that of rounding the float weights with
# the same scale hold other integers than the float weights rounded
EXCESS_ERROR = 4.0
# cosine a model output may lose to a verified fix (rounding elsewhere moves outputs this much:
# 16-bit conv1 of the test CNN, 0.9995 -> 0.9993)
OUTPUT_TOLERANCE = 1e-3
FIX_KINDS = ("percentile range", "16-bit", "float bias", "per-channel weights", "7-bit weights", "combined",
             "keep in float")
PARTS = ("weights", "inputs", "output")
_CONTRIB = "com.microsoft"
_WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


@dataclass(frozen=True)
class Quantizer:
    """One quantizer of a layer and what it does to the float values it quantizes.

    ``part`` is "weights", "inputs" or "output"; ``tensor`` the float model's name of the
    value (an activation) or the quantized model's weight initializer. ``scale`` is the
    per-tensor scale, or the largest of ``channels`` per-channel ones. ``float_min``/
    ``float_max`` is the range of the float values on the samples, ``range_min``/``range_max``
    the range the quantizer represents. ``clipped`` is the share of values outside it;
    ``clip_energy`` the share of the quantization error's energy that clipping causes (the
    rest is rounding); ``cosine`` that of the float values with the values quantized (for
    weights, with the weights stored). For weights, ``excess`` is the error energy over that of rounding the
    float weights with this scale (1.0: only rounding; NaN for activations), and ``outlier``
    says which channel sets a per-tensor scale, if one does.
    """

    part: str
    tensor: str
    dtype: str
    scale: float
    zero_point: int
    channels: int
    float_min: float
    float_max: float
    range_min: float
    range_max: float
    clipped: float
    clip_energy: float
    cosine: float
    excess: float = math.nan
    outlier: str = ""
    dynamic: bool = False
    """Whether the scale and zero point are computed from each input at run time
    (DynamicQuantizeLinear: uint8 over the input's own min and max, zero included): then
    ``scale`` is the largest over the samples and ``zero_point`` the first sample's."""
    bulk_steps: float = math.nan
    """For a dynamic quantizer, the median magnitude of the non-zero values in steps of its grid
    (mean over samples): half of them lie within that many steps of zero, few where outliers
    set the range."""

    @property
    def reason(self) -> str:
        """"saturation" when clipping causes most of the error, else "resolution"; for
        weights holding more than rounding error, "weights"."""
        if self.part == "weights" and self.excess >= EXCESS_ERROR:
            return "weights"
        return "saturation" if self.clip_energy > 0.5 else "resolution"

    def describe(self) -> str:
        """One line: the quantizer, its ranges and why it errs."""
        grid = f"{self.dtype} scale {self.scale:.4g} zero point {self.zero_point}"
        if self.channels > 1:
            grid = f"{self.dtype} per-channel ({self.channels}), largest scale {self.scale:.4g}"
        if self.dynamic:
            grid = f"{self.dtype} computed per input (dynamic: its own min and max), scale up to {self.scale:.4g}"
        text = (f"{self.part} {self.tensor!r}: {grid}, represents [{self.range_min:.4g}, {self.range_max:.4g}] "
                f"for float values in [{self.float_min:.4g}, {self.float_max:.4g}]; {self.clipped:.2%} clipped, "
                f"clipping {self.clip_energy:.0%} of the error energy ({self.reason})")
        if self.dynamic:
            text += f"; half the non-zero values lie within {self.bulk_steps:.3g} steps of zero"
        elif self.reason == "resolution":
            text += f"; the float values span {(self.float_max - self.float_min) / self.scale:.3g} steps"
        if self.part == "weights" and self.excess >= EXCESS_ERROR:
            text += (f"; the stored weights are not the float weights rounded (error {number(self.excess, 1)}x "
                     "rounding's)")
        return text + (f"; {self.outlier}" if self.outlier else "")


@dataclass(frozen=True)
class Part:
    """One part of a layer's quantization: ``cosine`` of the isolated layer with only this part
    quantized (NaN where it could not be measured: weights folded with no float twin)."""

    name: str
    cosine: float
    quantizers: tuple[Quantizer, ...]


@dataclass(frozen=True)
class Fix:
    """A candidate fix and what it did, run: ``layer_before``/``layer_after`` the layer's
    cosine in the model (cumulative, mean over samples), ``isolated_after`` its own cosine
    after the fix, ``outputs`` each model output's (name, cosine before, cosine after).
    ``verified`` when the layer's own cosine reaches the threshold after it and no output
    falls below both the threshold and its cosine before; ``repairs`` when, besides, every
    output and the layer reach the threshold. ``nodes_to_exclude``, ``overrides`` (tensor ->
    onnxruntime TensorQuantOverrides entry, ``quant_type`` by its QuantType name) and
    ``options`` (other ``extra_options`` of ``quantize_static``: ``QuantizeBias``) and
    ``precision`` (for vendor tools: "float", "uint16", "int8 per-channel", "float bias", ...)
    say how to apply it when quantizing again, with ``arguments``; ``model`` is the quantized
    model with the fix (the recommended fix's only; for a QOperator or dynamic model, its QDQ
    form with the fix)."""

    kind: str
    description: str
    tensor: str
    layer_before: float
    layer_after: float
    isolated_after: float
    outputs: tuple[tuple[str, float, float], ...]
    verified: bool
    repairs: bool
    precision: str
    nodes_to_exclude: tuple[str, ...] = ()
    overrides: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    options: Mapping[str, object] = field(default_factory=dict)
    model: onnx.ModelProto | None = field(default=None, repr=False, compare=False)
    """The model with the fix, kept for the recommended fix only (None for the others)."""
    arguments: Mapping[str, object] = field(default_factory=dict)
    """Keyword arguments of ``quantize_static``/``quantize_dynamic`` the fix needs besides
    those: ``per_channel=True`` for a QOperator or dynamic model (they take per-channel weights
    for every layer or none)."""

    def describe(self) -> str:
        outs = ", ".join(f"{name!r} {before:.4f} -> {after:.4f}" for name, before, after in self.outputs)
        state = "repairs" if self.repairs else ("verified" if self.verified else "FAILS")
        return (f"{state}: {self.description}: layer cosine {self.layer_before:.4f} -> {self.layer_after:.4f} "
                f"(own {self.isolated_after:.4f}); outputs {outs}")


@dataclass(frozen=True)
class Diagnosis:
    """Why one layer breaks: its parts, the quantizer at fault, its ``cause`` (one of
    ``CAUSES``) and the fixes tried, smallest first. ``isolated_cosine`` is the layer's own
    cosine with every part quantized, as measured here (the report's isolated cosine)."""

    layer: LayerComparison
    isolated_cosine: float
    parts: tuple[Part, ...]
    cause: str
    quantizer: Quantizer | None
    fixes: tuple[Fix, ...]
    note: str = ""
    """What no quantization setting can change, where that limits the fixes (a dynamic
    quantizer's range, 16-bit activations in a QOperator model); empty otherwise."""

    @property
    def recommended(self) -> Fix | None:
        """The smallest verified fix that repairs the model, else the smallest verified one;
        None when none verifies."""
        verified = [fix for fix in self.fixes if fix.verified]
        return next((fix for fix in verified if fix.repairs), verified[0] if verified else None)

    def lines(self) -> list[str]:
        """The diagnosis as text lines (the terminal report's section)."""
        layer = self.layer
        where = f"{self.quantizer.part} {self.quantizer.tensor!r}" if self.quantizer else "?"
        lines = [f"#{layer.index} {layer.op_type} {'+'.join(layer.float_nodes)!r}: own cosine "
                 f"{self.isolated_cosine:.4f}; cause: {self.cause} ({where})"]
        lines += [f"  only {part.name} quantized: cosine {number(part.cosine, 4)}" for part in self.parts]
        lines += [f"  {q.describe()}" for part in self.parts for q in part.quantizers]
        lines += [f"  fix {fix.describe()}" for fix in self.fixes]
        lines += [f"  {self.note}"] if self.note else []
        best = self.recommended
        lines.append(f"  recommended: {best.description}" if best else "  no candidate fix verifies")
        return lines

    def to_dict(self) -> dict:
        """Plain values: the layer, ``cause``, the measured parts, ``fixes`` and ``recommended``."""
        data = asdict(replace(self, fixes=tuple(replace(fix, model=None) for fix in self.fixes)))
        for fix in data["fixes"]:
            del fix["model"]
        for part, record in zip(self.parts, data["parts"]):
            for quantizer, entry in zip(part.quantizers, record["quantizers"]):
                entry["reason"] = quantizer.reason
        data["layer"] = "+".join(self.layer.float_nodes)
        data["index"] = self.layer.index
        data["recommended"] = None if self.recommended is None else self.recommended.kind
        return data


@dataclass(frozen=True)
class Diagnoses:
    """The diagnosis of a report: ``layers`` worst own cosine first, ``culprit`` the diagnosis
    of the report's culprit (its first bad layer when the error is introduced there), and what
    it cost: ``model_runs`` runs of a whole model (the float model, and each fix, once per
    sample; the quantized model too where the report did not measure a layer or output),
    ``layer_runs`` runs of an isolated layer alone."""

    layers: tuple[Diagnosis, ...]
    culprit: Diagnosis | None
    threshold: float
    samples: int
    model_runs: int
    layer_runs: int
    fixes_tried: int
    notes: tuple[str, ...] = ()
    form: str = "qdq"
    """How the model was quantized: "qdq", "qoperator" (quantize_static with
    QuantFormat.QOperator) or "dynamic" (quantize_dynamic): what the pasteable settings are for."""

    def recommended(self) -> list[tuple[Diagnosis, Fix]]:
        """Each diagnosed layer with a verified fix, and that fix."""
        return [(d, d.recommended) for d in self.layers if d.recommended is not None]

    def nodes_to_exclude(self) -> list[str]:
        """onnxruntime ``nodes_to_exclude`` for the recommended keep-in-float fixes."""
        return list(dict.fromkeys(n for _, fix in self.recommended() for n in fix.nodes_to_exclude))

    def tensor_quant_overrides(self) -> dict[str, list[dict[str, Any]]]:
        """The TensorQuantOverrides of the recommended fixes as plain values (``quant_type`` by
        its QuantType name), as the JSON holds them; ``extra_options`` gives them as
        onnxruntime takes them."""
        overrides: dict[str, list[dict[str, object]]] = {}
        for _, fix in self.recommended():
            for tensor, entry in fix.overrides.items():
                overrides.setdefault(tensor, []).append(dict(entry))
        return overrides

    def extra_options(self) -> dict[str, object]:
        """onnxruntime ``extra_options`` for ``quantize_static`` with the recommended fixes:
        ``TensorQuantOverrides`` (``quant_type`` a QuantType, ``rmin``/``rmax`` numpy float32,
        as onnxruntime wants them) and any other option they need (``QuantizeBias``: False
        keeps every bias in float).

        >>> from layerbisect import demo
        >>> diagnosis = diagnose(*demo.files(), demo.image()).diagnosis
        >>> diagnosis.nodes_to_exclude(), diagnosis.extra_options()
        ([], {'TensorQuantOverrides': {'conv2.w': [{'axis': 0}]}})

        which ``quantize_static(..., nodes_to_exclude=..., extra_options=...)`` takes as they are.
        """
        from onnxruntime.quantization import QuantType

        options = self._options()
        overrides = {
            tensor: [{key: getattr(QuantType, value) if key == "quant_type" else
                      np.float32(value) if key in ("rmin", "rmax") else value for key, value in entry.items()}
                     for entry in entries]
            for tensor, entries in self.tensor_quant_overrides().items()
        }
        return {**options, "TensorQuantOverrides": overrides} if overrides else options

    def arguments(self) -> dict[str, object]:
        """Keyword arguments of ``quantize_static``/``quantize_dynamic`` the recommended fixes
        need besides ``nodes_to_exclude`` and ``extra_options`` (``per_channel``)."""
        arguments: dict[str, object] = {}
        for _, fix in self.recommended():
            arguments.update(fix.arguments)
        return arguments

    def _options(self) -> dict[str, object]:
        """The extra_options of the recommended fixes other than TensorQuantOverrides."""
        options: dict[str, object] = {}
        for _, fix in self.recommended():
            options.update(fix.options)
        return options

    def vendor_config(self) -> list[dict[str, object]]:
        """Per layer, the float model's node names and the precision wanted, for a vendor
        toolchain's script to map to its own configuration (layer precision lists)."""
        return [{"float_nodes": list(d.layer.float_nodes), "tensor": fix.tensor, "precision": fix.precision,
                 "cause": d.cause} for d, fix in self.recommended()]

    @property
    def quantizer_call(self) -> str:
        """The onnxruntime call the pasteable settings are for."""
        return {"qoperator": "quantize_static (quant_format=QuantFormat.QOperator)",
                "dynamic": "quantize_dynamic"}.get(self.form, "quantize_static")

    def pasteable(self) -> str:
        """Python to paste into a ``quantize_static`` (or, for a dynamic model,
        ``quantize_dynamic``) call, and the vendor JSON."""
        lines = [f"    {key!r}: {value!r}," for key, value in self._options().items()]
        overrides = self.tensor_quant_overrides()
        if overrides:
            lines.append('    "TensorQuantOverrides": {')
            for tensor, entries in overrides.items():
                written = ", ".join("{" + ", ".join(f"{key!r}: {_python(key, value)}" for key, value in entry.items())
                                    + "}" for entry in entries)
                lines.append(f"        {tensor!r}: [{written}],")
            lines.append("    },")
        arguments = "".join(f"{key}={value!r},\n" for key, value in self.arguments().items())
        return (f"nodes_to_exclude={self.nodes_to_exclude()!r},\n{arguments}"
                "extra_options={\n" + "".join(line + "\n" for line in lines) + "},\n"
                f"# per-layer precision for vendor tools:\n{json.dumps(self.vendor_config(), indent=2)}")

    def lines(self) -> list[str]:
        lines = [f"diagnosis ({len(self.layers)} layer(s), worst first; {self.model_runs} model runs for "
                 f"{self.fixes_tried} candidate fix(es) over {self.samples} sample(s), {self.layer_runs} "
                 "isolated-layer runs):"]
        for diagnosis in self.layers:
            lines += diagnosis.lines()
        lines += [f"note: {note}" for note in self.notes]
        if self.recommended():
            lines += [f"paste into {self.quantizer_call}:", *self.pasteable().splitlines()]
        return lines

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def to_dict(self) -> dict:
        return {"layers": [d.to_dict() for d in self.layers],
                "culprit": None if self.culprit is None else self.culprit.to_dict(),
                "threshold": self.threshold, "samples": self.samples, "model_runs": self.model_runs,
                "layer_runs": self.layer_runs, "fixes_tried": self.fixes_tried, "notes": list(self.notes),
                "nodes_to_exclude": self.nodes_to_exclude(),
                "tensor_quant_overrides": self.tensor_quant_overrides(), "extra_options": self._options(),
                "format": self.form, "arguments": self.arguments(),
                "vendor_config": self.vendor_config()}


def diagnose(
    float_model: ModelLike,
    quant_model: ModelLike,
    inputs: Sample | Iterable[Sample] | None = None,
    threshold: float = 0.98,
    *,
    report: Report | None = None,
    top: int = DEFAULT_TOP,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    providers: str | Sequence[str] = DEFAULT_PROVIDERS,
    allow_swapped: bool = False,
    quiet: bool = True,
) -> Report:
    """The report of ``find_first_bad_layer`` (``report``, when given, made from the same
    models and inputs), with ``diagnosis`` set: for its culprit and the ``top`` layers whose
    own (isolated) cosine is below ``threshold``, worst first (the largest own errors when the
    error accumulates), which quantizer breaks the layer, why, and which fix repairs it,
    each fix verified by running the model with it. QDQ, QOperator and dynamic models (the
    latter two diagnosed in their QDQ form, ``layerbisect.qdqform``).

    >>> from layerbisect import demo
    >>> print(diagnose(*demo.files(), demo.image()).diagnosis.pasteable())  # doctest: +ELLIPSIS
    nodes_to_exclude=[],
    extra_options={
        "TensorQuantOverrides": {
            'conv2.w': [{'axis': 0}],
        },
    },
    ...
    """
    check_threshold(threshold)
    if top < 1:
        raise LayerbisectError(f"top must be at least 1 (layers to diagnose), got {top}")
    providers, _ = usable_providers(providers)
    samples = reusable(samples_of(inputs))
    if not samples:
        raise LayerbisectError(NO_SAMPLES)
    float_proto, quant_proto, plan, _, alignment, *_ = setup(
        float_model, quant_model, shapes=shapes, providers=providers, allow_swapped=allow_swapped)
    form = _form(quant_proto)
    if form is None:
        raise LayerbisectError(
            "diagnosing a layer needs a quantized model: QuantizeLinear/DequantizeLinear pairs (QDQ), "
            "QLinearConv ... (QOperator) or DynamicQuantizeLinear with MatMulInteger ... (dynamic); this one has "
            "none: give the model onnxruntime.quantization made")
    if report is None:
        given = [sample for sample in samples if sample is not None]  # None: a seeded random sample
        report = find_first_bad_layer(float_proto, quant_proto, given or None, threshold, shapes=shapes, seed=seed,
                                      providers=providers, allow_swapped=True, quiet=quiet)
    pairs = alignment.pairs
    chosen = _chosen(report, threshold, top)
    for layer in chosen:
        if layer.index >= len(pairs) or pairs[layer.index].float_tensor != layer.float_tensor:
            raise LayerbisectError(
                f"the report's layer #{layer.index} {layer.float_tensor!r} is not this alignment's: give the "
                "report find_first_bad_layer made from these two models (without ort_optimized)")
    notes: list[str] = []
    work_proto = quant_proto
    if form != "qdq":
        work_proto, rewritten = qdq_form(quant_proto)
        notes.append(f"{form} model diagnosed in its QDQ form: {len(rewritten)} operation(s) written as "
                     "DequantizeLinear -> float operation -> QuantizeLinear with the model's own scales, zero points "
                     "and integers; the fixes are verified on that form")
        left = sorted({node.op_type for node in work_proto.graph.node
                       if _form_of(node) not in (None, "qdq") and node.op_type != "DynamicQuantizeLinear"})
        if left:
            notes.append(f"not rewritten (no QDQ form here): {', '.join(left)}; a layer they compute has no parts")
    work = _Work(float_proto, work_proto, pairs, plan, samples, seed, providers, threshold,
                 [layer.index for layer in chosen], report, form)
    diagnoses = [work.diagnose(layer) for layer in chosen]
    culprit_layer = report.culprit or (report.first_bad if report.first_bad_cause == "introduced" else None)
    culprit = next((d for d in diagnoses if culprit_layer is not None and d.layer.index == culprit_layer.index), None)
    if not chosen:
        notes.append("no layer adds error on its own: nothing to diagnose")
    result = Diagnoses(
        layers=tuple(diagnoses), culprit=culprit, threshold=float(threshold), samples=len(samples),
        model_runs=work.model_runs, layer_runs=work.layer_runs, fixes_tried=work.fixes_tried, notes=tuple(notes),
        form=form)
    return replace(report, diagnosis=result)


def _form(model: onnx.ModelProto) -> str | None:
    """How ``model`` is quantized: "dynamic" (any activation quantized at run time), else
    "qoperator" (any QLinearConv, QGemm ...), else "qdq"; None when it holds no quantizer."""
    forms = {_form_of(node) for node in model.graph.node}
    return next((form for form in ("dynamic", "qoperator", "qdq") if form in forms), None)


def _form_of(node: onnx.NodeProto) -> str | None:
    """The quantization ``node`` belongs to ("qdq", "qoperator", "dynamic"), if any."""
    if node.op_type.startswith("DynamicQuantize") or node.op_type.endswith("Integer") \
            or node.op_type == "MatMulIntegerToFloat":
        return "dynamic"
    if node.op_type.startswith(("QLinear", "QGemm", "QAttention", "QEmbed", "QOrdered")):
        return "qoperator"
    return "qdq" if node.op_type in ("QuantizeLinear", "DequantizeLinear") else None


def _chosen(report: Report, threshold: float, top: int) -> list[LayerComparison]:
    """The layers to diagnose: those whose own cosine is below ``threshold``, worst first, the
    first ``top`` and the culprit; when none is, the report's contributors."""
    own = [layer for layer in report.layers if layer.judged and not layer.isolated_cosine >= threshold
           and not math.isnan(layer.isolated_cosine)]
    if not own and all(math.isnan(layer.isolated_cosine) for layer in report.layers):
        raise LayerbisectError("the report has no isolated error: make it with isolated=True")
    ranked = sorted(own, key=lambda layer: layer.isolated_cosine)[:top] or list(report.contributors[:top])
    if report.culprit is not None and all(layer.index != report.culprit.index for layer in ranked):
        ranked.append(report.culprit)
    return ranked


class _Work:
    """One diagnosis: the models, the samples and their float values, and what was run."""

    def __init__(self, float_proto, quant_proto, pairs, plan, samples, seed, providers, threshold, chosen,
                 report: Report, form: str = "qdq") -> None:
        """``report`` is the quantized model's, on the same samples: the cosines before any fix;
        ``quant_proto`` the quantized model in QDQ form, ``form`` how it was quantized."""
        self.float_proto, self.quant_proto, self.pairs, self.form = float_proto, quant_proto, pairs, form
        self.samples, self.providers, self.threshold = samples, providers, threshold
        self.feeders = feeders(float_proto, pairs)
        self.types = Segments(quant_proto).types
        self.float_constants = constants(float_proto.graph)
        self.model_runs = self.layer_runs = self.fixes_tried = 0
        self.feeds = [plan.feeds(sample, seed) for sample in samples]
        by_tensor = {p.float_tensor: p for p in pairs}
        self.outputs = [(name, by_tensor[tensor]) for name, tensor in report.outputs if tensor in by_tensor]
        self.reported = {layer.index: layer.cosine for layer in report.layers}
        self.read = [*(pairs[i] for i in chosen), *(p for _, p in self.outputs)]
        fed = [pairs[b] for i in chosen for b in self.feeders[i]]
        wanted = {name for p in [*self.read, *fed] for name in (p.float_tensor, p.float_readout.tensor, p.float_output)}
        self.float_values = self._run(float_proto, sorted(wanted - {i.name for i in float_proto.graph.input}),
                                      "float model", float_side=True)
        self._before: list[dict[str, np.ndarray]] | None = None  # run where the report did not measure

    def _run(self, model, names, role, float_side=False) -> list[dict[str, np.ndarray]]:
        """Run ``model`` (whole, its inputs fed) once per sample, reading ``names``."""
        made = produced(model.graph.node)
        names = [n for n in dict.fromkeys(names) if n in made]
        session = Session(Segments(model).extract(names, {}), role, self.providers)
        declared = {i.name for i in session.session.get_inputs()}
        values = []
        for float_feeds, quant_feeds in self.feeds:
            feeds = float_feeds if float_side else quant_feeds
            run = session.run({k: v for k, v in feeds.items() if k in declared}, names)
            values.append({**feeds, **run})
            self.model_runs += 1
        return values

    def float_value(self, index: int, name: str) -> np.ndarray:
        """The float value ``name`` on sample ``index``: the float model's, or for a graph input
        of the quantized model, what it is fed."""
        values = self.float_values[index]
        return values[name] if name in values else self.feeds[index][1][name]

    def diagnose(self, layer: LayerComparison) -> Diagnosis:
        pair = self.pairs[layer.index]
        boundaries = [self.pairs[b] for b in self.feeders[layer.index]]
        found = _quantizers(self.quant_proto, pair)
        everything = self._own_cosine(self.quant_proto, pair, boundaries)
        parts = []
        for name, members in found.items():
            if not members:
                continue
            variant = _variant(self.float_proto, self.quant_proto, pair, keep={name}, constants=self.float_constants)
            cosine = math.nan if variant is None else self._own_cosine(variant, pair, boundaries)
            parts.append(Part(name, cosine, tuple(self._stats(name, node, pair, boundaries) for node in members)))
        cause, quantizer = _cause(parts, self.threshold)
        candidates = self._candidates(cause, quantizer, parts)
        note = ""
        if self.form != "qdq" and layer.isolated_cosine < self.threshold <= everything:
            # the layer's arithmetic, computed exactly, holds: onnxruntime's kernel breaks it
            weights = next((part.quantizers[0] for part in parts if part.name == "weights" and part.quantizers), None)
            cause, quantizer, note = "kernel", weights, self._kernel_note(layer.isolated_cosine, everything)
            candidates = [("7-bit weights", weights)] if weights is not None else []
            candidates.append(("keep in float", weights))
        fixes = tuple(self._fix(candidate, pair, boundaries) for candidate in candidates)
        diagnosis = Diagnosis(layer, everything, tuple(parts), cause, quantizer, fixes,
                              note or self._limits(cause, quantizer, fixes))
        best = diagnosis.recommended  # only its model is kept
        return replace(diagnosis, fixes=tuple(fix if fix is best else replace(fix, model=None) for fix in fixes))

    def _own_cosine(self, model: onnx.ModelProto, pair: Pair, boundaries: Sequence[Pair]) -> float:
        """The isolated cosine of ``pair`` in ``model`` (a variant or a fix of the quantized
        model): the layer alone, fed the float model's values at its cut inputs."""
        read = _readable(self.quant_proto, model, pair)
        sub = Segments(model).extract([read.tensor], {})
        cut_model, cuts = cut(sub, [_readable_pair(self.quant_proto, model, b) for b in boundaries], self.types)
        layer_model = Segments(cut_model).extract([read.tensor], {c.name: c.dtype for c in cuts})
        session = Session(layer_model, "isolated layer", self.providers)
        declared = {i.name for i in session.session.get_inputs()}
        aggregate = Aggregate()
        for index, (_, quant_feeds) in enumerate(self.feeds):
            feeds = {c.name: c.feed(self.float_value(index, c.float_readout.tensor)) for c in cuts}
            feeds.update({k: v for k, v in quant_feeds.items() if k in declared and k not in feeds})
            value = session.run({k: v for k, v in feeds.items() if k in declared}, [read.tensor])[read.tensor]
            aggregate.add(compare(self.float_value(index, pair.float_tensor), read.dequantize(value)))
            self.layer_runs += 1
        return aggregate.cosine

    def _stats(self, part: str, node: onnx.NodeProto, pair: Pair, boundaries: Sequence[Pair]) -> Quantizer:
        """What the quantizer ``node`` does to the float values it stands for."""
        if node.op_type == "DynamicQuantizeLinear":
            return self._dynamic_stats(node, boundaries)
        constants = {init.name: init for init in self.quant_proto.graph.initializer}
        scale = tensor_array(constants[node.input[1]]).astype(np.float64)
        zero_point = tensor_array(constants[node.input[2]]) if len(node.input) > 2 and node.input[2] else \
            np.zeros((), np.uint8)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if part == "weights":
            stored = tensor_array(constants[node.input[0]])
            twin_name, twin = _twin_weight(self.float_proto, self.quant_proto, pair, node, self.float_constants)
            dequantized = dequantize(stored, scale, zero_point, axis, dtype=np.float64)
            values = [dequantized if twin is None else twin]
            stats = _range_stats(values, scale, zero_point, axis)
            excess = math.nan
            if twin is not None:
                # rounding's error: of these weights rounded, at least a uniform error (weights
                # lying on the grid already round without error)
                rounded = dequantize(quantize(twin, scale, zero_point, axis), scale, zero_point, axis, dtype=np.float64)
                uniform = twin.size * float(np.mean(scale)) ** 2 / 12
                expected = max(float(np.sum((twin - rounded) ** 2)), uniform)
                actual = float(np.sum((twin - dequantized) ** 2))
                excess = actual / expected if expected > 0 else (1.0 if actual == 0 else math.inf)
            if twin is not None:
                stats = replace(stats, cosine=_cosine_of(twin, dequantized))
            return replace(stats, part=part, tensor=twin_name or node.input[0], excess=excess,
                           outlier=_outlier(values[0], scale, _weight_axis(pair, node, self.quant_proto)))
        tensor = pair.float_tensor if part == "output" else node.input[0]
        values = [self.float_value(i, tensor) for i in range(len(self.samples))]
        return replace(_range_stats(values, scale, zero_point, axis), part=part, tensor=tensor)

    def _dynamic_stats(self, node: onnx.NodeProto, boundaries: Sequence[Pair]) -> Quantizer:
        """What a DynamicQuantizeLinear does to the float values it stands for: on each sample,
        uint8 over that value's own range (zero included), as onnxruntime computes it."""
        tensor = self._float_name(node.input[0], boundaries)
        values = [np.asarray(self.float_value(i, tensor), np.float64) for i in range(len(self.samples))]
        grids, bulk = [], []
        for value in values:
            low, high = min(float(value.min()), 0.0), max(float(value.max()), 0.0)
            scale = (high - low) / 255 if high > low else 1.0
            grids.append((np.array(scale), np.array(np.clip(np.rint(-low / scale), 0, 255), np.uint8)))
            nonzero = np.abs(value[value != 0])
            bulk.append(float(np.median(nonzero)) / scale if nonzero.size else 0.0)
        stats = _range_stats(values, grids[0][0], grids[0][1], 1, grids)
        return replace(stats, part="inputs", tensor=tensor, dynamic=True, bulk_steps=float(np.mean(bulk)))

    def _float_name(self, tensor: str, boundaries: Sequence[Pair]) -> str:
        """The float model's name of the quantized model's value ``tensor`` that a layer reads:
        the float tensor of the layer before that makes it, else ``tensor`` (a graph input)."""
        for pair in boundaries:
            if tensor in (pair.quant_tensor, pair.quant_readout.tensor,
                          _readable_pair(self.quant_proto, self.quant_proto, pair).quant_tensor):
                return pair.float_tensor
        return tensor

    def _kernel_note(self, given: float, exact: float) -> str:
        """Why a layer of a QOperator or dynamic model breaks in onnxruntime's kernel only."""
        why = ("this CPU's int8 kernels add uint8 x int8 products in pairs into int16, which clips past 32767 "
               "(x86 without VNNI; layerbisect.kernels)" if int8_products_saturate() else
               "onnxruntime's kernel computes it otherwise than its integers say")
        return (f"onnxruntime computes this layer at own cosine {given:.4f}, its arithmetic computed exactly (its "
                f"QDQ form) at {exact:.4f}: {why}; the fixes are verified on the QDQ form, which no CPU clips, "
                "and 7-bit weights (255 x 64 x 2 fits an int16) are computed so by every kernel")

    def _limits(self, cause: str, quantizer: Quantizer | None, fixes: Sequence[Fix]) -> str:
        """What no setting can change about ``quantizer``, where that limits the fixes tried."""
        if quantizer is None:
            return ""
        if quantizer.dynamic:
            return ("no range or type can be set for a dynamic quantizer: quantize_dynamic quantizes each input to "
                    "uint8 over its own min and max at run time; keeping the layer in float is the fix")
        if self.form == "qoperator" and quantizer.part != "weights" and not any(
                fix.verified for fix in fixes if fix.kind != "keep in float"):
            return ("16-bit is not tried: QOperator operations take 8-bit integers (quant_format=QuantFormat.QDQ "
                    "takes 16-bit activations)")
        if self.form != "qdq" and quantizer.dtype == "int32":
            return f"a {self.form} model's operations take an int32 bias: only keeping the layer in float frees it"
        return ""

    def _candidates(self, cause: str, quantizer: Quantizer | None, parts: Sequence[Part]) -> list[tuple]:
        """The fixes to try, smallest first: those matched to the cause; both parts' first
        fixes together when another part is below the threshold alone too; keeping the layer
        in float."""
        if quantizer is None:
            return [("keep in float", None)]
        matched = _matched(cause, quantizer, self.form)
        others = [part for part in parts if part.cosine < self.threshold and quantizer not in part.quantizers]
        combined = []
        for part in others[:1]:
            other_cause, other = _cause([part])
            second = [] if other is None else _matched(other_cause, other, self.form)
            if matched and second:
                combined = [("combined", ((matched[0], quantizer), (second[0], other)))]
        return [*((kind, quantizer) for kind in matched), *combined, ("keep in float", quantizer)]

    def _fix(self, candidate, pair: Pair, boundaries: Sequence[Pair]) -> Fix:
        """Apply ``candidate`` (a kind and its quantizer), run the model with it, and judge it."""
        kind, quantizer = candidate
        self.fixes_tried += 1
        model, description, precision, overrides, exclude, options, arguments = self._fixed(kind, quantizer, pair)
        reads = [pair, *(p for _, p in self.outputs)]
        layer_before = self.before(pair)
        try:
            after = self._run(model, [_readable(self.quant_proto, model, p).tensor for p in reads], "fixed model")
        except LayerbisectError as exc:  # a fix this onnxruntime cannot run fails
            outs = tuple((name, self.before(p), math.nan) for name, p in self.outputs)
            return Fix(kind, f"{description} ({exc})", _tensor(quantizer, pair), layer_before, math.nan, math.nan,
                       outs, False, False, precision, exclude, overrides, options, arguments=arguments)
        layer_after = self._cosine(model, after, pair)
        isolated_after = self._own_cosine(model, pair, boundaries)
        outs = tuple((name, self.before(p), self._cosine(model, after, p))
                     for name, p in self.outputs)
        verified = isolated_after >= self.threshold and all(_kept(before, after_, self.threshold)
                                                            for _, before, after_ in outs)
        repairs = verified and layer_after >= self.threshold and all(a >= self.threshold for _, _, a in outs)
        return Fix(kind, description, _tensor(quantizer, pair), layer_before, layer_after, isolated_after, outs,
                   verified, repairs, precision, exclude, overrides, options, model, arguments)

    def before(self, pair: Pair) -> float:
        """The cosine of ``pair`` in the quantized model: the report's, where it measured it
        (the same samples, the same readout), else measured once, running the model."""
        index = self.pairs.index(pair)
        if index in self.reported:
            return self.reported[index]
        if self._before is None:
            self._before = self._run(self.quant_proto, [_readable(self.quant_proto, self.quant_proto, p).tensor
                                                        for p in self.read], "quantized model")
        return self._cosine(self.quant_proto, self._before, pair)

    def _cosine(self, model, values, pair: Pair) -> float:
        read = _readable(self.quant_proto, model, pair)
        aggregate = Aggregate()
        for index, sample in enumerate(values):
            aggregate.add(compare(self.float_value(index, pair.float_tensor), read.dequantize(sample[read.tensor])))
        return aggregate.cosine

    def _fixed(self, kind: str, quantizer, pair: Pair, base: onnx.ModelProto | None = None):
        """The model (``base``, by default the quantized model) with fix ``kind`` applied, its
        description, the precision it gives, its TensorQuantOverrides, nodes to exclude, other
        options and keyword arguments. A "combined" fix's ``quantizer`` holds the fixes it
        combines."""
        base = self.quant_proto if base is None else base
        if kind == "combined":
            (first, first_quantizer), (second, second_quantizer) = quantizer
            model, text, precision, overrides, exclude, options, arguments = self._fixed(
                first, first_quantizer, pair, base)
            model, more, other, more_overrides, _, more_options, more_arguments = self._fixed(
                second, second_quantizer, pair, model)
            return (model, f"{text} and {more}", f"{precision} + {other}", {**overrides, **more_overrides}, exclude,
                    {**options, **more_options}, {**arguments, **more_arguments})
        if kind == "keep in float":
            # nodes_to_exclude names the nodes of the model given to the quantizer: a QDQ model's
            # operations keep them; a QOperator or dynamic model's are renamed (conv2 -> conv2_quant)
            exclude = tuple(pair.quant_nodes) if self.form == "qdq" else tuple(pair.float_nodes)
            model = bypass(self.float_proto, base, [pair])
            if self.form != "qdq":  # bypass reads past a QuantizeLinear and twins of the same operation;
                # here past a dynamic quantizer too, and a MatMul's weight from the Gemm it stands for
                model = (_variant(self.float_proto, model, pair, keep={"output"}, constants=self.float_constants)
                         or _variant(self.float_proto, model, pair, keep={"weights", "output"},
                                     constants=self.float_constants) or model)
            return model, f"keep {'+'.join(pair.float_nodes)} in float", "float", {}, exclude, {}, {}
        if kind == "7-bit weights":
            model = _seven_bit(base, pair)
            return (model, f"7-bit weights for {'+'.join(pair.float_nodes)} (reduce_range=True sets every layer's)",
                    "int8 7-bit", {}, (), {}, {"reduce_range": True})
        if kind == "float bias":
            dqs = [dq for dq in _quantizers(self.quant_proto, pair)["weights"] if _int(self.quant_proto,
                                                                                     dq.input[0]).dtype == np.int32]
            model = _variant(self.float_proto, base, pair, keep=PARTS, constants=self.float_constants,
                             floated=[dq.output[0] for dq in dqs])
            if model is None:
                model = base
            return (model, f"float bias for {'+'.join(pair.float_nodes)} (the int32 bias's scale is its input's "
                    "times its weight's)", "float bias", {}, (), {"QuantizeBias": False}, {})
        if kind == "per-channel weights":
            model, overrides = _per_channel(self.float_proto, base, pair, self.float_constants)
            description = f"per-channel weights for {'+'.join(pair.float_nodes)} (requantized from the float weights)"
            if self.form == "qdq":
                return model, description, f"{quantizer.dtype} per-channel", overrides, (), {}, {}
            # quantize_static(QOperator) and quantize_dynamic take per-channel weights for all layers or
            # none, and requantize an int32 bias with the input's scale times the new weight scales:
            # at int32's resolution, the float bias
            biases = [dq.output[0] for dq in _quantizers(model, pair)["weights"]
                      if _int(model, dq.input[0]).dtype == np.int32]
            model = _variant(self.float_proto, model, pair, keep=PARTS, constants=self.float_constants,
                             floated=biases) or model
            return (model, f"{description}; per_channel=True sets every layer's", f"{quantizer.dtype} per-channel",
                    {}, (), {}, {"per_channel": True})
        node = _activation_quantizer(self.quant_proto, pair, quantizer)
        values = np.concatenate([self.float_value(i, quantizer.tensor).ravel().astype(np.float64)
                                 for i in range(len(self.samples))])
        dtype = np.dtype(quantizer.dtype)
        if kind == "percentile range":
            low, high = (float(v) for v in np.percentile(values, PERCENTILES))
        else:
            low, high = float(values.min()), float(values.max())
            dtype = np.dtype(np.uint16 if dtype.kind == "u" else np.int16)
        low, high = min(low, 0.0), max(high, 0.0)
        model = _requantized(base, node, low, high, dtype)
        entry: dict[str, object] = {"rmin": low, "rmax": high}
        if kind == "16-bit":
            entry = {"quant_type": "QUInt16" if dtype.kind == "u" else "QInt16", **entry}
            description = f"{dtype.name} activation {quantizer.tensor!r} over its float range [{low:.4g}, {high:.4g}]"
        else:
            description = (f"{dtype.name} range [{low:.4g}, {high:.4g}] for {quantizer.tensor!r} (percentiles "
                           f"{PERCENTILES[0]}-{PERCENTILES[1]} of its float values)")
        return model, description, dtype.name, {quantizer.tensor: entry}, (), {}, {}


def _python(key: str, value: object) -> str:
    """A TensorQuantOverrides value as Python for onnxruntime: a QuantType, a numpy float32."""
    if key == "quant_type":
        return f"QuantType.{value}"
    if key in ("rmin", "rmax"):
        return f"np.float32({value!r})"
    return repr(value)


def _tensor(quantizer, pair: Pair) -> str:
    """The tensor a fix is for: its quantizer's (a combined fix's first), else the layer's."""
    if isinstance(quantizer, tuple):
        quantizer = quantizer[0][1]
    return pair.float_tensor if quantizer is None else quantizer.tensor


def _matched(cause: str, quantizer: Quantizer, form: str = "qdq") -> list[str]:
    """The fixes for ``cause`` in ``quantizer`` of a ``form`` model, smallest first (keeping in
    float aside): none for a dynamic activation (its range is each input's own), no 16-bit
    and no float bias for QOperator operations (8-bit integers, an int32 bias)."""
    if cause == "weights" and quantizer.dtype == "int32":  # a bias, on the grid of its inputs x weights
        return ["float bias"] if form == "qdq" else []
    if quantizer.part == "weights":  # requantized from the float weights, where there are some
        return [] if math.isnan(quantizer.excess) else ["per-channel weights"]
    if quantizer.dynamic:
        return []
    return ["percentile range", "16-bit"] if form == "qdq" else ["percentile range"]


def _kept(before: float, after: float, threshold: float) -> bool:
    """Whether a fix leaves a model output whole: it reaches the threshold, or loses at most
    ``OUTPUT_TOLERANCE`` of its cosine before."""
    return after >= threshold or after >= before - OUTPUT_TOLERANCE


def _quantizers(model: onnx.ModelProto, pair: Pair) -> dict[str, list[onnx.NodeProto]]:
    """The quantizers of ``pair`` in a QDQ ``model``, by part: the DequantizeLinear of each
    constant its operations read (weights), the QuantizeLinear of each graph input they read
    through a shell and each DynamicQuantizeLinear whose result they read (inputs: a dynamic
    quantizer is computed from the layer's own input), the QuantizeLinear making its value
    (output)."""
    producer = producers(model.graph)
    constants = {init.name for init in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    nodes = {node.name: node for node in model.graph.node}
    found: dict[str, list[onnx.NodeProto]] = {"weights": [], "inputs": [], "output": []}
    for name in pair.quant_nodes:
        for tensor in nodes[name].input:
            dq = producer.get(tensor)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if dq.input[0] in constants and _int(model, dq.input[0]).ndim >= 1:
                found["weights"].append(dq)
            elif q is not None and q.op_type == "QuantizeLinear" and q.input[0] in graph_inputs:
                found["inputs"].append(q)
            elif q is not None and q.op_type == "DynamicQuantizeLinear" and q not in found["inputs"]:
                found["inputs"].append(q)
    maker = producer.get(pair.quant_tensor)
    if maker is not None and maker.op_type == "QuantizeLinear":
        found["output"].append(maker)
    # the main weight first: the statistics of its quantizer say the most
    found["weights"].sort(key=lambda dq: -_int(model, dq.input[0]).ndim)
    return found


def _weights(model: onnx.ModelProto, pair: Pair) -> list[onnx.NodeProto]:
    """The DequantizeLinear of each weight of ``pair`` stored in at most 16 bits (not int32
    biases)."""
    return [dq for dq in _quantizers(model, pair)["weights"] if _int(model, dq.input[0]).itemsize < 4]


def _int(model: onnx.ModelProto, name: str) -> np.ndarray:
    return tensor_array(next(init for init in model.graph.initializer if init.name == name))


def _variant(float_proto, quant_proto, pair: Pair, *, keep: Iterable[str], constants,
             floated: Iterable[str] = ()) -> onnx.ModelProto | None:
    """A copy of ``quant_proto`` where ``pair`` has only its ``keep`` parts quantized: the others
    read the float model's weights, the unquantized inputs, and hand on their output
    unquantized (the activations its quantization stood for put back); the weights whose
    DequantizeLinear output is one of ``floated`` are read in float too. None when a weight
    has no float twin (folded from a BatchNorm)."""
    keep, floated = set(keep), set(floated)
    model = onnx.ModelProto()
    model.CopyFrom(quant_proto)
    graph = model.graph
    found = _quantizers(model, pair)
    producer = producers(graph)
    nodes = {node.name: node for node in graph.node}
    float_nodes = {node.name: node for node in float_proto.graph.node}
    weights = {dq.output[0] for dq in found["weights"]} if "weights" not in keep else floated
    inputs = {q.output[0]: q for q in found["inputs"]}
    for name in pair.quant_nodes:
        node = nodes[name]
        for position, tensor in enumerate(node.input):
            if tensor in weights:
                _, value = _float_weight(float_proto, pair, node, position, constants)
                if value is None:
                    return None
                node.input[position] = f"{tensor}__layerbisect_float"
                graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), node.input[position]))
            dq = producer.get(tensor)
            if "inputs" not in keep and dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inputs:
                node.input[position] = inputs[dq.input[0]].input[0]
    if "output" not in keep and found["output"]:
        q = found["output"][0]
        dropped = _dropped_activations(pair, nodes, float_nodes)
        activated = _activate(graph, q.input[0], dropped, constants)
        for dq in [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]]:
            dq.CopyFrom(helper.make_node("Identity", [activated], [dq.output[0]], name=dq.name))
    _drop_unread(graph)  # with the output's QuantizeLinear, unless something else reads it
    return model


def _twin_weight(float_proto, quant_proto, pair: Pair, dq: onnx.NodeProto,
                 constants) -> tuple[str | None, np.ndarray | None]:
    """The name and float value of the constant the DequantizeLinear ``dq`` stands for (see
    ``_float_weight``)."""
    for name in pair.quant_nodes:
        node = next(n for n in quant_proto.graph.node if n.name == name)
        if dq.output[0] in node.input:
            return _float_weight(float_proto, pair, node, list(node.input).index(dq.output[0]), constants, dq)
    return None, None


def _float_weight(float_proto, pair: Pair, node: onnx.NodeProto, position: int, constants,
                  dq: onnx.NodeProto | None = None) -> tuple[str | None, np.ndarray | None]:
    """The float value of what quantized ``node`` reads at ``position``, and its name as a
    quantizer sees it: the float model's constant at the same input of the same operation; for
    a Conv whose BatchNorm the quantizer folded into it (the float span holds the
    BatchNormalization, the quantized one does not), the weight or bias folded from the float
    ones, named as the quantized model names it. (None, None) where there is none."""
    float_nodes = {n.name: n for n in float_proto.graph.node if n.name in pair.float_nodes}
    twin = next((n for n in float_nodes.values() if n.op_type == node.op_type), None)
    norms = [n for n in float_nodes.values() if n.op_type == "BatchNormalization"]
    if twin is None or (norms and node.op_type == "BatchNormalization"):
        norms = []
    gemm = next((n for n in float_nodes.values() if n.op_type == "Gemm"), None)
    if twin is None and gemm is not None and node.op_type == "MatMul" and position == 1 and gemm.input[1] in constants:
        # quantize_dynamic writes a Gemm as a MatMul of its B, transposed when transB
        b = tensor_array(constants[gemm.input[1]]).astype(np.float64)
        transposed = any(a.name == "transB" and a.i for a in gemm.attribute)
        return gemm.input[1], b.T if transposed else b
    if twin is None:
        return None, None
    value: np.ndarray | None = None
    if position < len(twin.input) and twin.input[position] in constants:
        value = tensor_array(constants[twin.input[position]]).astype(np.float64)
    if not norms:
        return (twin.input[position], value) if value is not None else (None, None)
    if node.op_type != "Conv" or len(norms) != 1 or not all(name in constants for name in norms[0].input[1:5]):
        return None, None
    gamma, beta, mean, variance = (tensor_array(constants[name]).astype(np.float64) for name in norms[0].input[1:5])
    epsilon = next((a.f for a in norms[0].attribute if a.name == "epsilon"), 1e-5)
    factor = gamma / np.sqrt(variance + epsilon)
    if position == 1 and value is not None:
        value = value * factor.reshape(-1, *[1] * (value.ndim - 1))
    elif position == 2:
        value = ((0.0 if value is None else value) - mean) * factor + beta
    else:
        return None, None
    name = dq.input[0].removesuffix("_quantized") if dq is not None else node.input[position]
    return name, value


def _weight_axis(pair: Pair, dq: onnx.NodeProto, model: onnx.ModelProto) -> int:
    """The output-channel axis of the weight ``dq`` dequantizes, for the op reading it."""
    for node in model.graph.node:
        if node.name in pair.quant_nodes and dq.output[0] in node.input:
            if node.op_type == "ConvTranspose":
                return 1
            if node.op_type == "MatMul" or (node.op_type == "Gemm" and not any(
                    a.name == "transB" and a.i for a in node.attribute)):
                return -1
    return 0


def _readable(quant_proto: onnx.ModelProto, model: onnx.ModelProto, pair: Pair) -> Readout:
    """Where ``pair``'s value is read in ``model`` (the quantized model, a variant or a fix of
    it) as float: the DequantizeLinear output (or the Identity standing for it) carrying its
    quantized tensor on, else the tensor as the pair reads it."""
    carried = _carried(model, pair.quant_tensor)
    made = produced(model.graph.node)
    if carried == pair.quant_tensor and pair.quant_tensor not in made:
        carried = _carried(quant_proto, pair.quant_tensor)
    if carried != pair.quant_tensor:
        return Readout(carried, perm=pair.quant_readout.perm)
    return pair.quant_readout


def _readable_pair(quant_proto: onnx.ModelProto, model: onnx.ModelProto, pair: Pair) -> Pair:
    """``pair`` as read in ``model``: its quantized tensor if still made there, else where it
    is carried on."""
    made = produced(model.graph.node) | {i.name for i in model.graph.input}
    if pair.quant_tensor in made:
        return pair
    tensor = _carried(quant_proto, pair.quant_tensor)
    return replace(pair, quant_tensor=tensor, quant_readout=Readout(tensor, perm=pair.quant_readout.perm))


def _cause(parts: Sequence[Part], threshold: float = math.inf) -> tuple[str, Quantizer | None]:
    """The part that errs most (lowest cosine alone) and, within it, the quantizer that errs
    most: its reason is the cause. When every part alone reaches ``threshold`` (only together
    do they break the layer) and stored weights are not the float weights rounded, the cause
    is those weights: a weight scale off by a factor scales the layer's result, which a cosine
    does not see, until the output's range clips it."""
    measured = [part for part in parts if not math.isnan(part.cosine)]
    if not measured:
        return "weights" if any(p.name == "weights" for p in parts) else "resolution", None
    off = [q for part in parts if part.name == "weights" for q in part.quantizers if q.excess >= EXCESS_ERROR]
    if off and all(part.cosine >= threshold for part in measured):
        return "weights", off[0]  # the main weight first (see _quantizers)
    worst = min(measured, key=lambda part: part.cosine)
    if not worst.quantizers:
        return worst.name if worst.name == "weights" else "resolution", None
    quantizer = min(worst.quantizers, key=lambda q: q.cosine)  # the one that alters its values most
    return ("weights" if worst.name == "weights" else quantizer.reason), quantizer


def _activation_quantizer(model: onnx.ModelProto, pair: Pair, quantizer: Quantizer) -> onnx.NodeProto:
    found = _quantizers(model, pair)
    members = found["output"] if quantizer.part == "output" else found["inputs"]
    return next(q for q in members if quantizer.part == "output" or q.input[0] == quantizer.tensor)


def _range_stats(values: Sequence[np.ndarray], scale: np.ndarray, zero_point: np.ndarray, axis: int,
                 grids: Sequence[tuple[np.ndarray, np.ndarray]] | None = None) -> Quantizer:
    """Clipped share, clipping against rounding error, float and representable ranges of
    quantizing ``values`` (one array per sample) with ``scale``/``zero_point``, or with each
    sample's own (scale, zero point) in ``grids`` (a dynamic quantizer)."""
    lo, hi = integer_range(zero_point.dtype)
    clipped = total = 0
    clip_energy = round_energy = product = square = rounded_square = 0.0
    low, high = math.inf, -math.inf
    grids = [(scale, zero_point)] * len(values) if grids is None else grids
    for value, (scale, zero_point) in zip(values, grids):
        x = np.asarray(value, np.float64)
        s = broadcastable(scale, x.shape, axis)
        zp = broadcastable(zero_point.astype(np.float64), x.shape, axis)
        # a value up to half a step beyond the grid's ends rounds to them: clipping starts there
        bottom, top = (lo - zp - 0.5) * s, (hi - zp + 0.5) * s
        inside = np.clip(x, bottom, top)
        rounded = dequantize(quantize(inside, scale, zero_point, axis), scale, zero_point, axis, dtype=np.float64)
        clipped += int(np.count_nonzero(x != inside))
        total += x.size
        clip_energy += float(np.sum((x - inside) ** 2))
        round_energy += float(np.sum((inside - rounded) ** 2))
        product += float(np.sum(x * rounded))
        square += float(np.sum(x * x))
        rounded_square += float(np.sum(rounded * rounded))
        if x.size:
            low, high = min(low, float(x.min())), max(high, float(x.max()))
    energy = clip_energy + round_energy
    bottom = min(float(np.min((lo - zp.astype(np.float64)) * s)) for s, zp in grids)
    top = max(float(np.max((hi - zp.astype(np.float64)) * s)) for s, zp in grids)
    scale, zero_point = grids[0]
    return Quantizer(
        part="", tensor="", dtype=zero_point.dtype.name, scale=max(float(np.max(s)) for s, _ in grids),
        zero_point=int(np.ravel(zero_point)[0]) if zero_point.size else 0, channels=int(scale.size),
        float_min=low, float_max=high, range_min=bottom, range_max=top,
        clipped=clipped / total if total else 0.0, clip_energy=clip_energy / energy if energy else 0.0,
        cosine=product / math.sqrt(square * rounded_square) if square and rounded_square else float(square == 0),
    )


def _cosine_of(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.sum(a * b)) / norm if norm else float(not a.any() and not b.any())


def _outlier(weight: np.ndarray, scale: np.ndarray, axis: int) -> str:
    """Which channel sets a per-tensor weight scale, when one's range is far above the others'."""
    if scale.size > 1 or weight.ndim < 2:
        return ""
    moved = np.moveaxis(np.abs(weight), axis, 0).reshape(weight.shape[axis], -1)
    ranges = moved.max(axis=1)
    median = float(np.median(ranges))
    worst = int(np.argmax(ranges))
    if median <= 0 or ranges[worst] < OUTLIER_RATIO * median:
        return ""
    return (f"channel {worst}'s range ({ranges[worst]:.4g}) is {ranges[worst] / median:.1f}x the median channel's "
            "and sets the per-tensor scale")


def _per_channel(float_proto, quant_proto, pair: Pair, constants) -> tuple[onnx.ModelProto, dict[str, dict]]:
    """A copy of ``quant_proto`` whose weights of ``pair`` (not int32 biases) are requantized per
    output channel from the float model's weights (symmetric for signed types, as onnxruntime
    does), and the TensorQuantOverrides saying so. Weights with no float twin (folded from a
    BatchNorm) stay as they are."""
    model = onnx.ModelProto()
    model.CopyFrom(quant_proto)
    graph = model.graph
    overrides: dict[str, dict] = {}
    for dq in _weights(model, pair):
        name, twin = _twin_weight(float_proto, model, pair, dq, constants)
        if twin is None or name is None:
            continue
        stored = _int(model, dq.input[0])
        axis = _weight_axis(pair, dq, model) % twin.ndim
        lo, hi = integer_range(stored.dtype)
        moved = np.moveaxis(twin, axis, 0).reshape(twin.shape[axis], -1)
        if stored.dtype.kind == "i":
            scale = np.maximum(np.abs(moved).max(axis=1), 1e-12) / hi
            zero_point = np.zeros(scale.shape, stored.dtype)
        else:
            low, high = np.minimum(moved.min(axis=1), 0), np.maximum(moved.max(axis=1), 0)
            scale = np.maximum(high - low, 1e-12) / (hi - lo)
            zero_point = np.clip(np.rint(lo - low / scale), lo, hi).astype(stored.dtype)
        scale = scale.astype(np.float32)
        values = quantize(twin, scale.astype(np.float64), zero_point, axis)
        base = f"{dq.input[0]}__layerbisect_per_channel"
        graph.initializer.extend([numpy_helper.from_array(values, base),
                                  numpy_helper.from_array(scale, f"{base}_scale"),
                                  numpy_helper.from_array(zero_point, f"{base}_zero_point")])
        node = next(n for n in graph.node if n.name == dq.name and n.output[0] == dq.output[0])
        node.input[:] = [base, f"{base}_scale", f"{base}_zero_point"]
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("axis", axis))
        if _opset(model) < 13:  # DequantizeLinear takes an axis from opset 13; onnxruntime's own always
            _contrib(model, [node])
        overrides[name] = {"axis": axis}
    _drop_unread(graph)
    return model, overrides


def _seven_bit(quant_proto: onnx.ModelProto, pair: Pair) -> onnx.ModelProto:
    """A copy of ``quant_proto`` whose int8 weights of ``pair`` are on a 7-bit grid, as
    ``reduce_range=True`` quantizes them: half the integers (rounded, within [-64, 64]) at twice
    the scale, so that no two products of a uint8 input with them overflow an int16."""
    model = onnx.ModelProto()
    model.CopyFrom(quant_proto)
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    for dq in _weights(model, pair):
        stored = _int(model, dq.input[0])
        if stored.dtype != np.int8:
            continue
        scale = tensor_array(constants[dq.input[1]])
        zero_point = tensor_array(constants[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else \
            np.zeros((), np.int8)
        base = f"{dq.input[0]}__layerbisect_7bit"
        graph.initializer.extend([
            numpy_helper.from_array(np.clip(np.rint(stored / 2), -64, 64).astype(np.int8), base),
            numpy_helper.from_array((scale * 2).astype(scale.dtype), f"{base}_scale"),
            numpy_helper.from_array(np.rint(zero_point / 2).astype(np.int8), f"{base}_zero_point")])
        node = next(n for n in graph.node if n.name == dq.name and n.output[0] == dq.output[0])
        node.input[:] = [base, f"{base}_scale", f"{base}_zero_point"]
    _drop_unread(graph)
    return model


def _requantized(quant_proto: onnx.ModelProto, q: onnx.NodeProto, low: float, high: float,
                 dtype: np.dtype) -> onnx.ModelProto:
    """A copy of ``quant_proto`` whose quantizer ``q`` (and every QuantizeLinear/DequantizeLinear
    sharing its scale and zero point, as onnxruntime shares them through MaxPool, Reshape
    ...) represents [``low``, ``high``] in ``dtype``. 16-bit types in a model before opset 21
    use onnxruntime's contrib QuantizeLinear/DequantizeLinear."""
    model = onnx.ModelProto()
    model.CopyFrom(quant_proto)
    graph = model.graph
    lo, hi = integer_range(dtype)
    scale = max(high - low, 1e-12) / (hi - lo)
    zero_point = int(np.clip(np.rint(lo - low / scale), lo, hi))
    if low == 0.0:
        zero_point = lo  # a range starting at zero keeps zero exact at the bottom of the grid
    scale_name, zp_name = q.input[1], q.input[2]
    for init in graph.initializer:
        if init.name == scale_name:
            init.CopyFrom(numpy_helper.from_array(np.array(scale, np.float32), scale_name))
        elif init.name == zp_name:
            init.CopyFrom(numpy_helper.from_array(np.array(zero_point, dtype), zp_name))
    if dtype.itemsize > 1 and _opset(model) < 21:
        _contrib(model, [node for node in graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
                         and list(node.input[1:3]) == [scale_name, zp_name]])
    return model


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _contrib(model: onnx.ModelProto, nodes: Iterable[onnx.NodeProto]) -> None:
    """Make ``nodes`` onnxruntime's contrib QuantizeLinear/DequantizeLinear (16-bit types and
    an axis in any opset)."""
    for node in nodes:
        node.domain = _CONTRIB
    if not any(o.domain == _CONTRIB for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_CONTRIB, 1))
