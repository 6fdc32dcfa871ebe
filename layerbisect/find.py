"""find_first_bad_layer: load -> align -> expose -> run -> compare -> search -> report."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from layerbisect.align import Alignment, align
from layerbisect.compare import Aggregate, compare
from layerbisect.errors import LayerbisectError
from layerbisect.expose import expose
from layerbisect.graph import build_graph
from layerbisect.inputs import plan_inputs
from layerbisect.load import ModelLike, declared_inputs, load_model
from layerbisect.report import LayerComparison, Report
from layerbisect.run import DEFAULT_PROVIDERS, Session
from layerbisect.run import ort_optimized as ort_optimized_model
from layerbisect.search import first_failing

Sample = Mapping[str, np.ndarray]


def find_first_bad_layer(
    float_model: ModelLike,
    quant_model: ModelLike,
    inputs: Sample | Iterable[Sample] | None = None,
    threshold: float = 0.98,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    ort_optimized: bool = False,
) -> Report:
    """Compare every aligned layer of two models and find the first below ``threshold``.

    ``float_model`` and ``quant_model`` are paths or ``onnx.ModelProto`` (never modified).
    ``inputs`` is one sample (a dict of input name -> array), several (a list or any iterable
    of such dicts), or None for one seeded random sample; ``shapes`` gives the full shape of
    inputs with dynamic dimensions when inputs are random. A layer's cosine is its mean over
    samples. ``ort_optimized=True`` compares the graph onnxruntime actually runs for the
    quantized model (after its fusions), to find errors that appear only after fusion.

    >>> report = find_first_bad_layer("model_fp32.onnx", "model_int8.onnx")  # doctest: +SKIP
    >>> report.first_bad.float_nodes  # doctest: +SKIP
    ('conv2', 'bn2', 'relu2')
    """
    if not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise LayerbisectError(f"threshold must be in (0, 1], got {threshold!r}")
    float_proto = load_model(float_model, role="float model")
    quant_proto = load_model(quant_model, role="quantized model")
    if ort_optimized:
        quant_proto = load_model(ort_optimized_model(quant_proto, "quantized model", providers), role="quantized model")
    plan = plan_inputs(declared_inputs(float_proto), declared_inputs(quant_proto), shapes)
    float_graph = build_graph(float_proto)
    alignment = align(float_graph, build_graph(quant_proto))
    if not alignment.pairs:
        raise LayerbisectError(
            "no layer of the float model could be paired with the quantized model: "
            "do the two models compute the same network, from the same inputs?"
        )
    float_names = list(dict.fromkeys(p.float_tensor for p in alignment.pairs))
    quant_names = list(dict.fromkeys(p.quant_tensor for p in alignment.pairs))
    float_session = Session(expose(float_proto, float_names), "float model", providers, float_proto)
    quant_session = Session(expose(quant_proto, quant_names), "quantized model", providers, quant_proto)

    aggregates = [Aggregate() for _ in alignment.pairs]
    shapes_seen: list[tuple[int, ...] | None] = [None] * len(alignment.pairs)
    mismatched: dict[int, str] = {}
    samples = 0
    for sample in _samples(inputs):
        samples += 1
        float_feeds, quant_feeds = plan.feeds(sample, seed)
        float_values = float_session.run(float_feeds, float_names)
        quant_values = quant_session.run(quant_feeds, quant_names)
        for index, pair in enumerate(alignment.pairs):
            reference = pair.float_readout.dequantize(float_values[pair.float_tensor])
            actual = pair.quant_readout.dequantize(quant_values[pair.quant_tensor])
            if reference.dtype.kind != "f":
                mismatched[index] = "not a float tensor"
            elif reference.shape != actual.shape:
                mismatched[index] = f"shapes differ: {reference.shape} vs {actual.shape}"
            if index not in mismatched:
                aggregates[index].add(compare(reference, actual))
                shapes_seen[index] = reference.shape
        del float_values, quant_values

    if not samples:
        raise LayerbisectError("inputs holds no sample: give at least one dict of input name -> array")
    layers = _records(alignment, aggregates, shapes_seen, mismatched)
    if not layers:
        raise LayerbisectError("no aligned layer holds comparable float values; nothing to compare")
    bad = first_failing(layer.passes(threshold) for layer in layers)
    notes = list(plan.notes)
    notes += [
        f"{alignment.pairs[i].float_tensor!r} left out: {why}"
        for i, why in mismatched.items() if why != "not a float tensor"
    ]
    return Report(
        layers=layers,
        first_bad=None if bad is None else layers[bad],
        threshold=float(threshold),
        samples=samples,
        outputs=_output_tensors(float_graph, float_proto),
        unaligned=alignment.unaligned,
        coverage=alignment.coverage,
        notes=tuple(notes),
        float_model=_label(float_model),
        quant_model=_label(quant_model),
    )


def _samples(inputs) -> Iterable[Sample | None]:
    if inputs is None:
        return [None]
    if isinstance(inputs, Mapping):
        return [inputs]
    if isinstance(inputs, (str, bytes, np.ndarray)):
        raise LayerbisectError(
            "inputs must be a dict of input name -> array, or a list of such dicts"
        )
    return inputs


def _records(alignment: Alignment, aggregates, shapes_seen, mismatched) -> tuple[LayerComparison, ...]:
    records = []
    for index, (pair, agg) in enumerate(zip(alignment.pairs, aggregates)):
        if index in mismatched or not agg.samples:
            continue
        records.append(LayerComparison(
            index=len(records),
            op_type=pair.op_type,
            float_nodes=pair.float_nodes,
            float_tensor=pair.float_tensor,
            quant_nodes=pair.quant_nodes,
            quant_tensor=pair.quant_tensor,
            shape=tuple(shapes_seen[index]),
            cosine=agg.cosine,
            sqnr_db=agg.sqnr_db,
            mse=agg.mse,
            max_abs=agg.max_abs,
            cosine_worst=agg.cosine_worst,
            worst_sample=agg.worst_sample,
            nonfinite=agg.nonfinite,
            evidence=pair.evidence,
        ))
    return tuple(records)


def _output_tensors(graph, model: onnx.ModelProto) -> tuple[tuple[str, str], ...]:
    """Each output of the model with the tensor holding it, seen through Identity and the like."""
    pairs = []
    for output in model.graph.output:
        ref = graph.graph["tensors"].get(output.name)
        if ref is not None and graph.nodes[ref[0]]["kind"] == "op":
            pairs.append((output.name, graph.nodes[ref[0]]["outputs"][ref[1]]))
    return tuple(pairs)


def _label(model: ModelLike) -> str:
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or "<ModelProto>"
    return str(Path(model))
