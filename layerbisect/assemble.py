"""Measured pairs -> ``Report``: the one place a report is built, whatever the quantized side.

Every side ends here the same way: a quantized ONNX model (as given, or as onnxruntime runs it
after its fusions), the fixed-point simulator, a user's simulator callable and a folder of
dumps each yield an ``Alignment`` (the pairs, what found no counterpart, the weighted layers)
and, per measured pair, its ``Totals`` over the samples. From those, ``layers`` makes the
records and ``build_report`` the report: the first bad layer, the notes that come from the
measurements (NaN/Inf, all-zero and faint values, left-out pairs, unrelated weights), the
declared outputs, both models' summaries and the nodes around the first bad layer. ``cause``
tells how the first bad layer came to fail, from isolated error, which only a side that can
be fed the float model's values measures (the others give an empty ``Cause``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import onnx

from layerbisect.align import Alignment, Pair
from layerbisect.errors import LayerbisectError
from layerbisect.graph import OpGraph
from layerbisect.measure import Totals
from layerbisect.report import LayerComparison, Report, faint_notes, nonfinite_notes
from layerbisect.search import first_failing
from layerbisect.summary import neighbourhood, summarize
from layerbisect.weights import UNRELATED_WEIGHTS

NOT_FLOAT = "not a float tensor"  # a pair left out without a note: integers, indices, masks


@dataclass(frozen=True)
class Side:
    """One side of a comparison as the report shows it: its graph (None for a tensor source
    given without one), its label, and the label of its graph where that is another (a
    dump's graph file)."""

    proto: onnx.ModelProto | None
    label: str
    graph_label: str | None = None


@dataclass(frozen=True)
class Run:
    """The settings of a comparison and what it cost."""

    samples: int
    executions: int
    peak_bytes: int
    providers: tuple[str, ...]
    seed: int | None
    strategy: str = "scan"
    ort_optimized: bool = False


@dataclass(frozen=True)
class Cause:
    """How the first bad layer came to fail (see ``Report``); empty where isolated error was
    not measured."""

    culprit: LayerComparison | None = None
    first_bad_cause: str | None = None
    contributors: tuple[LayerComparison, ...] = ()


def cause(records: Sequence[LayerComparison], first_bad: LayerComparison | None, threshold: float) -> Cause:
    """How ``first_bad`` came to fail, from the records' isolated cosines: where the error
    starts (the culprit), whether it is introduced there, inherited or accumulated, and, when
    accumulated, the layers that add the most.

    >>> from layerbisect import demo, find_first_bad_layer
    >>> report = find_first_bad_layer(*demo.files(), inputs=demo.image(), quiet=True)
    >>> cause(report.layers, report.first_bad, 0.98).first_bad_cause
    'introduced'
    """
    culprit = _culprit(records, first_bad, threshold)
    how = _cause(first_bad, culprit, threshold)
    return Cause(culprit, how, _contributors(records, first_bad, culprit) if how == "accumulated" else ())


def layer(pair: Pair, index: int, totals: Totals, position: int) -> LayerComparison:
    """The record of pair ``index``, measured at ``position`` of a pass's ``totals``."""
    cumulative, isolated = totals.cumulative[position], totals.isolated[position]
    return LayerComparison(
        index=index, op_type=pair.op_type, float_nodes=pair.float_nodes, float_tensor=pair.float_tensor,
        quant_nodes=pair.quant_nodes, quant_tensor=pair.quant_tensor, shape=totals.shapes.get(position, ()),
        cosine=cumulative.cosine, sqnr_db=cumulative.sqnr_db, mse=cumulative.mse, max_abs=cumulative.max_abs,
        cosine_worst=cumulative.cosine_worst, cosine_p10=cumulative.cosine_p10,
        worst_sample=cumulative.worst_sample, nonfinite=cumulative.nonfinite,
        float_nonfinite=cumulative.reference_nonfinite, float_zero=cumulative.degenerate, faint=cumulative.faint,
        evidence=pair.evidence, worst_token=cumulative.worst_token,
        token_cosine=math.nan if math.isnan(cumulative.token_cosine) else cumulative.token_cosine,
        isolated_cosine=isolated.cosine if isolated.samples else math.nan,
        isolated_sqnr_db=isolated.sqnr_db if isolated.samples else math.nan,
    )


def comparable(totals: Totals, position: int) -> bool:
    """Whether the pair at ``position`` was compared on some sample (float values of one shape)."""
    aggregate = totals.cumulative[position]
    return position not in totals.problems and aggregate.samples + aggregate.degenerate > 0


def layers(pairs: Sequence[Pair], measured: Mapping[int, tuple[Totals, int]]) -> tuple[LayerComparison, ...]:
    """The records of the measured pairs that could be compared, in the pairs' order."""
    return tuple(layer(pairs[i], i, *measured[i]) for i in sorted(measured) if comparable(*measured[i]))


def first_bad(records: Sequence[LayerComparison], threshold: float) -> LayerComparison | None:
    """The first layer below ``threshold`` (``LayerComparison.passes``), or None."""
    bad = first_failing(record.passes(threshold) for record in records)
    return None if bad is None else records[bad]


def build_report(
    records: Sequence[LayerComparison],
    threshold: float,
    *,
    float_side: Side,
    quant_side: Side,
    float_graph: OpGraph,
    alignment: Alignment,
    run: Run,
    cause: Cause = Cause(),
    notes: Sequence[str] = (),
    problems: Iterable[str] = (),
    generated: bool = False,
    sources: tuple[str, ...] = (),
) -> Report:
    """The report of ``records`` (see ``layers``), judged against ``threshold``.

    ``notes`` are the caller's (inputs, providers, what loading did); the notes that come
    from the measurements follow: NaN/Inf in the float model, all-zero float values, faint
    ones on ``generated`` inputs, each of ``problems`` (why a pair was left out), and weights
    that share nothing. Refuses an empty ``records``: nothing could be compared."""
    if not records:
        raise LayerbisectError("no aligned layer holds comparable float values; nothing to compare")
    records = tuple(records)
    bad = first_bad(records, threshold)
    notes = [*notes, *nonfinite_notes(records), *faint_notes(records, generated)]
    notes += [f"left out: {why}" for why in problems if why != NOT_FLOAT]
    if alignment.weight_agreement < UNRELATED_WEIGHTS:
        notes.append(
            f"the weights share nothing: the {alignment.weighted_paired} weighted layers paired agree "
            f"{alignment.weight_agreement:.2f} (median of the correlation of each output channel's "
            "weights; 1.0 for the same weights quantized, rescaled or folded). The quantized model "
            "computes this network with other weights (another training, seed or checkpoint): "
            "every layer differs, and the first bad layer says nothing; compare it with the float "
            "model it was made from"
        )
    float_proto, quant_proto = float_side.proto, quant_side.proto
    assert float_proto is not None, "the float side is always a model; only a tensor source may have none"
    quant_summary = None if quant_proto is None else summarize(quant_proto, quant_side.graph_label or quant_side.label)
    return Report(
        layers=records, first_bad=bad, threshold=float(threshold), samples=run.samples,
        outputs=outputs(float_graph, float_proto), unaligned=alignment.unaligned, coverage=alignment.coverage,
        notes=tuple(dict.fromkeys(notes)), float_model=float_side.label, quant_model=quant_side.label,
        strategy=run.strategy, executions=run.executions, peak_bytes=run.peak_bytes,
        culprit=cause.culprit, first_bad_cause=cause.first_bad_cause, contributors=cause.contributors,
        aligned=len(alignment.pairs),
        float_summary=summarize(float_proto, float_side.label),
        quant_summary=quant_summary,
        providers=tuple(run.providers), seed=run.seed, ort_optimized=run.ort_optimized,
        float_neighbourhood=() if bad is None else neighbourhood(float_proto, bad.float_nodes),
        quant_neighbourhood=() if bad is None or quant_proto is None else neighbourhood(quant_proto, bad.quant_nodes),
        sources=sources, weighted=alignment.weighted, weighted_paired=alignment.weighted_paired,
        weight_agreement=alignment.weight_agreement,
    )


def outputs(graph: OpGraph, model: onnx.ModelProto) -> tuple[tuple[str, str], ...]:
    """Each output ``model`` declares with the operation output holding it, seen through
    Identity and the like."""
    tensors = graph.graph["tensors"]
    found = []
    for output in model.graph.output:
        ref = tensors.get(output.name)
        if ref is not None and graph.op(ref[0]).kind == "op":
            found.append((output.name, graph.op(ref[0]).outputs[ref[1]]))
    return tuple(found)


def label(model: object) -> str:
    """How a report names a model or a quantized side: its path, a ModelProto's graph name, a
    source's ``label`` attribute or a function's name.

    >>> label("models/int8.onnx"), label(lambda feeds: {})
    ('models/int8.onnx', '<lambda>')
    """
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or "<ModelProto>"
    if isinstance(model, (str, PathLike)):
        return str(Path(model))
    return getattr(model, "label", None) or getattr(model, "__name__", None) or type(model).__name__


def _cause(first_bad: LayerComparison | None, culprit: LayerComparison | None, threshold: float) -> str | None:
    """How the first bad layer came to fail (see docs/concepts.md): "introduced" there, when its
    own (isolated) cosine is below the threshold; "inherited" from the culprit, an earlier layer
    whose own cosine is; "accumulated" when no layer up to it is below the threshold on its own.
    None when isolated error was not measured."""
    if first_bad is None or math.isnan(first_bad.isolated_cosine):
        return None
    if not first_bad.isolated_cosine >= threshold:
        return "introduced"
    return "inherited" if culprit is not None else "accumulated"


def _culprit(layers, first_bad, threshold) -> LayerComparison | None:
    """Up to the first bad layer, the earliest judged layer whose isolated cosine is below the
    threshold: where the error starts. None when no layer is bad, or none is on its own."""
    if first_bad is None:
        return None
    return next((layer for layer in _up_to(layers, first_bad) if not layer.isolated_cosine >= threshold), None)


def _contributors(layers, first_bad, culprit, count: int = 3) -> tuple[LayerComparison, ...]:
    """When the error accumulates (a first bad layer, no culprit), the ``count`` layers up to
    the first bad one that add the most error on their own, the most first; only those adding
    at least a tenth of the most (the others are rounding: isolated cosines of 1.0000)."""
    if first_bad is None or culprit is not None:
        return ()
    ranked = sorted(_up_to(layers, first_bad), key=lambda layer: layer.isolated_cosine)[:count]
    most = 1.0 - ranked[0].isolated_cosine if ranked else 0.0
    return tuple(layer for layer in ranked if 1.0 - layer.isolated_cosine >= most / 10 and most > 0)


def _up_to(layers, first_bad) -> list[LayerComparison]:
    """The judged layers up to and including the first bad one whose isolated error is known."""
    return [layer for layer in layers
            if layer.index <= first_bad.index and not math.isnan(layer.isolated_cosine) and layer.judged]
