"""What a comparison found: a record per aligned layer and the report that holds them.

Plain frozen dataclasses. ``print(report)`` gives the verdict then a table (``rich.print`` a
rich table); in a notebook the report renders as HTML with a chart; ``save_html`` writes that
page to one self-contained file; ``to_dict``/``to_json`` give the content to scripts;
``to_dataframe`` and ``plot`` need pandas and matplotlib (``layerbisect.render`` draws all).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from os import PathLike
from typing import TYPE_CHECKING, Any

from layerbisect.text import number, plural, shortened
from layerbisect.weights import UNRELATED_WEIGHTS

if TYPE_CHECKING:
    from layerbisect.diagnosis import Diagnoses


@dataclass(frozen=True, repr=False)
class LayerComparison:
    """One aligned layer: a float value, the quantized value that stands for it, and metrics.

    ``float_nodes`` lists the float operations the layer spans (the last one produces
    ``float_tensor``); ``quant_nodes`` the quantized operations that compute ``quant_tensor``.
    ``cosine``, ``sqnr_db`` and ``mse`` are means over samples, ``max_abs`` the largest over
    samples; ``cosine_worst`` is the lowest cosine, seen on sample ``worst_sample``, and
    ``cosine_p10`` its 10th percentile over samples;
    ``float_zero`` counts the samples left out of the metrics because the float value was all
    zeros while the quantized one was not; ``faint`` the samples whose float value was, root
    mean square, below half the quantized tensor's step (a range far too wide, or a quiet sample).
    ``nonfinite`` counts, over all samples, NaN/Inf values of the quantized model where the
    float model's are finite; ``float_nonfinite`` the NaN/Inf values of the float model itself,
    left out of the metrics (the reference is broken there, so the layer is not judged).
    ``isolated_cosine``/``isolated_sqnr_db`` measure the layer fed the float model's own values
    at its inputs: the error it adds by itself (NaN where not measured). For a declared output
    of shape ``[batch, seq, features]`` (a language model's logits), ``token_cosine`` is the
    lowest cosine of one position (one token's logits) over samples, ``worst_token`` its
    (sample, position flattened over batch and seq); NaN and (-1, -1) for other layers.
    ``index`` is the layer's position among all aligned layers. Its ``repr`` is one line (``describe()``).
    """

    index: int
    op_type: str
    float_nodes: tuple[str, ...]
    float_tensor: str
    quant_nodes: tuple[str, ...]
    quant_tensor: str
    shape: tuple[int, ...]
    cosine: float
    sqnr_db: float
    mse: float
    max_abs: float
    cosine_worst: float
    worst_sample: int
    nonfinite: int
    evidence: str
    isolated_cosine: float = math.nan
    isolated_sqnr_db: float = math.nan
    cosine_p10: float = math.nan
    float_nonfinite: int = 0
    float_zero: int = 0
    faint: int = 0
    token_cosine: float = math.nan
    worst_token: tuple[int, int] = (-1, -1)

    @property
    def judged(self) -> bool:
        """Whether the layer is held against a threshold: not when its float value holds
        NaN/Inf (the float model breaks there itself), nor when it was all zeros on every
        sample (no direction to compare with)."""
        unmeasured = self.float_zero > 0 and math.isnan(self.cosine) and not self.nonfinite
        return not self.float_nonfinite and not unmeasured

    def passes(self, threshold: float) -> bool:
        """Whether the (mean) cosine reaches ``threshold``; NaN never does. A layer not
        ``judged`` passes."""
        return not self.judged or self.cosine >= threshold

    def describe(self) -> str:
        """One line: index, op, where, and how close."""
        return (
            f"#{self.index} {self.op_type} {'+'.join(self.float_nodes)!r} "
            f"(cosine {number(self.cosine, 4)}, SQNR {number(self.sqnr_db, 1)} dB)"
        )

    def __repr__(self) -> str:
        return f"<LayerComparison {self.describe()}>"


@dataclass(frozen=True)
class ModelSummary:
    """A model at a glance: its path (or graph name), node count and op-type counts, most
    frequent first."""

    path: str
    nodes: int
    op_types: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class GraphNode:
    """A node near a layer: its name, op type, input and output tensors, and ``distance``, the
    number of operations between it and the layer (0 for the layer's own nodes)."""

    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    distance: int


@dataclass(frozen=True, repr=False)
class Report:
    """The result of ``find_first_bad_layer``.

    ``layers`` holds every aligned layer in the float model's topological order; ``first_bad``
    is the first whose cosine is below ``threshold``, or None. ``bool(report)`` is True when no
    layer is below the threshold. ``unaligned`` lists float operations with no counterpart
    in the quantized model; ``coverage`` is the share of float operations that found one.
    ``outputs`` pairs each output the float model declares with the tensor behind it (they
    differ when an Identity carries it). ``notes`` says how inputs were fed and what was left out.
    ``first_bad_cause`` is "introduced" when the first bad layer's isolated cosine is itself
    below the threshold, "inherited" when an earlier layer's is (that layer is ``culprit``:
    the earliest whose isolated cosine is below the threshold), and "accumulated" when no
    layer up to it is below the threshold on its own: then there is no culprit, and
    ``contributors`` are the layers adding the most error on their own, the most first.
    ``strategy`` ("scan", "prefix" or "bisect"), ``executions`` (model runs) and ``peak_bytes``
    (activations held at once) say what it cost;
    ``aligned`` counts all aligned layers, of which bisection measures only those it probes.
    ``float_summary``/``quant_summary`` describe the two models; ``providers``, ``seed`` and
    ``ort_optimized`` are the run settings; ``float_neighbourhood``/``quant_neighbourhood``
    are the nodes within two operations of the first bad layer in each model.
    ``weighted`` counts the float model's weighted layers (Conv, ConvTranspose, MatMul, Gemm
    with a constant weight), ``weighted_paired`` those paired one for one with a quantized
    one; ``weight_agreement`` is the median over those pairs of how much their weights agree,
    channel by channel (1.0 for the same weights quantized, rescaled or folded; NaN where
    nothing could be compared). Below 0.5 the verdict says the weights share nothing.
    ``sources`` are the files the report was made from (model files and their external data),
    which ``save_html`` refuses to write over. ``diagnosis`` is set by ``layerbisect.diagnose``:
    why the culprit and the worst layers break and which verified fix repairs each.

    ``repr(report)`` is one line (the verdict's head, the layers, the first bad one);
    ``print(report)`` gives the table, and a notebook the HTML report.
    """

    layers: tuple[LayerComparison, ...]
    first_bad: LayerComparison | None
    threshold: float
    samples: int
    outputs: tuple[tuple[str, str], ...]
    unaligned: tuple[str, ...]
    coverage: float
    notes: tuple[str, ...]
    float_model: str
    quant_model: str
    strategy: str = "scan"
    executions: int = 0
    peak_bytes: int = 0
    culprit: LayerComparison | None = None
    first_bad_cause: str | None = None
    contributors: tuple[LayerComparison, ...] = ()
    aligned: int = 0
    float_summary: ModelSummary | None = None
    quant_summary: ModelSummary | None = None
    providers: tuple[str, ...] = ()
    seed: int | None = None
    ort_optimized: bool = False
    float_neighbourhood: tuple[GraphNode, ...] = ()
    quant_neighbourhood: tuple[GraphNode, ...] = ()
    weighted: int = 0
    weighted_paired: int = 0
    weight_agreement: float = math.nan
    sources: tuple[str, ...] = ()
    diagnosis: Diagnoses | None = None

    def __bool__(self) -> bool:
        return self.first_bad is None

    @property
    def weights_unrelated(self) -> bool:
        """Whether the paired weighted layers hold other weights than the float model's: the
        median agreement is below ``weights.UNRELATED_WEIGHTS`` (False where not measured)."""
        return self.weight_agreement < UNRELATED_WEIGHTS

    @property
    def verdict(self) -> str:
        """One line saying whether a layer fails, which, and how the outputs fare."""
        by_tensor = {layer.float_tensor: layer for layer in self.layers}
        outputs = "; ".join(
            f"output {name!r} cosine {number(by_tensor[tensor].cosine, 4)}{self._worst_token(by_tensor[tensor])}"
            for name, tensor in self.outputs if tensor in by_tensor
        )
        if self.first_bad is None:
            head = f"PASS: all {len(self.layers)} aligned layers reach cosine {self.threshold}"
        else:
            head = f"FAIL: first layer below cosine {self.threshold} is {self.first_bad.describe()}"
            if self.first_bad_cause == "introduced":
                head += ", error introduced there"
            elif self.first_bad_cause == "inherited":
                head += ", error inherited"
            elif self.first_bad_cause == "accumulated":
                grows = ", ".join(f"#{layer.index} {layer.op_type} {'+'.join(layer.float_nodes)!r} (isolated cosine "
                                  f"{number(layer.isolated_cosine, 4)})" for layer in self.contributors)
                head += (f", error accumulated: no layer up to it is below {self.threshold} on its own"
                         + (f"; the largest own errors: {grows}" if grows else ""))
            if self.culprit is not None and self.culprit.index != self.first_bad.index:
                head += (f"; culprit #{self.culprit.index} {self.culprit.op_type} "
                         f"{'+'.join(self.culprit.float_nodes)!r} (isolated cosine "
                         f"{number(self.culprit.isolated_cosine, 4)})")
        if outputs:
            head = f"{head}; {outputs}"
        if self.weights_unrelated:
            head += f"; the weights share nothing (weight agreement {number(self.weight_agreement, 2)})"
        elif self.weighted_paired < self.weighted:
            head += (f"; only {self.weighted_paired} of {self.weighted} weighted layers paired one for one "
                     "(a fault in the others is placed only to the region holding them)")
        return head

    def _worst_token(self, layer: LayerComparison) -> str:
        """`` (worst token 0.91, position 5)`` for an output compared by token, else nothing."""
        if math.isnan(layer.token_cosine):
            return ""
        sample, position = layer.worst_token
        where = f"position {position}" + ("" if self.samples == 1 else f" of sample {sample}")
        return f" (worst token {number(layer.token_cosine, 4)}, {where})"

    def __repr__(self) -> str:
        head = "PASS" if self.first_bad is None else f"FAIL, first bad {self.first_bad.describe()}"
        return (f"<Report {head}; {plural(len(self.layers), 'layer')}, threshold {self.threshold}, "
                f"{plural(self.samples, 'sample')}; print() it for the table>")

    def __str__(self) -> str:
        lines = [self.verdict, self.summary_line(), ""]
        rows = [("", "#", "op", "float node(s)", "quant node(s)", "cosine", "SQNR dB", "isolated")]
        for layer in self.layers:
            rows.append((
                "!" if not layer.passes(self.threshold) else "",
                str(layer.index), layer.op_type, shortened("+".join(layer.float_nodes)),
                shortened("+".join(layer.quant_nodes)), number(layer.cosine, 4), number(layer.sqnr_db, 1),
                "" if math.isnan(layer.isolated_cosine) else number(layer.isolated_cosine, 4),
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        right = {1, 5, 6, 7}
        for row in rows:
            cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells).rstrip())
        lines.extend(f"note: {note}" for note in self.notes)
        if self.diagnosis is not None:
            lines += ["", *self.diagnosis.lines()]
        return "\n".join(lines)

    def summary_line(self) -> str:
        """Layers measured, coverage, weighted layers paired and their weights' agreement,
        samples, strategy, model runs and activations held."""
        measured = f"{len(self.layers)} aligned layers"
        if self.aligned > len(self.layers):  # bisection measures the layers it probes
            measured = f"{len(self.layers)} of {self.aligned} aligned layers measured"
        parts = [measured, f"coverage {self.coverage:.0%} of float ops"]
        if self.unaligned:
            parts.append(f"{len(self.unaligned)} float ops without counterpart")
        if self.weighted:
            parts.append(f"weighted layers paired: {self.weighted_paired} of {self.weighted}")
        if not math.isnan(self.weight_agreement):
            parts.append(f"weight agreement {number(self.weight_agreement, 2)}")
        parts.append(f"{self.samples} sample{'s' if self.samples != 1 else ''}")
        parts.append(f"{self.strategy}: {self.executions} model runs, {self.peak_bytes / 2**20:.1f} MiB held at peak")
        return ", ".join(parts)

    def __rich__(self) -> Any:
        """A rich Table (verdict and summary as its title), for ``rich.print(report)``."""
        from layerbisect.render import rich_table

        return rich_table(self)

    def _repr_html_(self) -> str:
        from layerbisect.render import html_fragment

        return html_fragment(self)

    def to_html(self) -> str:
        """The report as one self-contained HTML page: verdict, chart, table, the two models,
        the run settings and the nodes around the first bad layer. Nothing is fetched."""
        from layerbisect.render import html_document

        return html_document(self)

    def save_html(self, path: str | PathLike) -> None:
        """Write ``to_html()`` to ``path``; the file opens offline in any browser. A path that
        is one of ``sources`` is refused (``LayerbisectError``).

        >>> import os
        >>> from layerbisect import demo
        >>> demo.report().save_html(os.path.join(demo.scratch(), "report.html"))
        """
        from layerbisect.files import write_text

        write_text(path, self.to_html(), reads=self.sources)

    def to_model_explorer(self, folder: str | PathLike, float_model: Any = None, quant_model: Any = None) -> list:
        """Write Model Explorer overlays into ``folder`` (which must exist) and return their
        paths: ``float_cosine.json``, ``float_isolated_cosine.json``, ``float_sqnr_db.json``,
        ``float_marks.json`` (first bad layer 1, culprit 2), the same ``quant_*`` files, and
        ``sync_mapping.json`` (float nodes to quantized nodes, for the split view's sync
        navigation). The models default to the report's, when they are .onnx files; pass the
        ``onnx.ModelProto`` (or path) of a model the report was made from in memory. Files of
        ``sources`` are refused. See ``layerbisect.explorer``.

                >>> from layerbisect import demo
        >>> [path.name for path in demo.report().to_model_explorer(demo.scratch())][:2]
        ['float_cosine.json', 'float_isolated_cosine.json']
        """
        from layerbisect.explorer import write_overlays

        return write_overlays(self, folder, float_model, quant_model)

    def explore(self, folder: str | PathLike | None = None, port: int = 8080) -> None:
        """Open both models in Model Explorer, with the overlays (written into ``folder``, else
        a temporary folder), on its local server at ``port``; in a notebook, in the notebook.
        Needs ``pip install 'layerbisect[explorer]'`` and the models as .onnx files."""
        from layerbisect.explorer import explore

        explore(self, folder, port)

    def to_dataframe(self) -> Any:
        """One row per layer as a pandas DataFrame indexed by layer index (needs pandas).

        >>> from layerbisect import demo
        >>> demo.report().to_dataframe().query("not passes")["float_nodes"].iloc[0]
        'conv2'
        """
        from layerbisect.render import dataframe

        return dataframe(self)

    def plot(self) -> Any:
        """A matplotlib Figure of cosine and SQNR per layer (needs matplotlib).

        >>> import os
        >>> from layerbisect import demo
        >>> demo.report().plot().savefig(os.path.join(demo.scratch(), "layers.png"))
        """
        from layerbisect.render import figure

        return figure(self)

    def to_dict(self) -> dict:
        """Everything in the report as plain Python values (floats may be inf or nan)."""
        data = asdict(replace(self, diagnosis=None))  # the diagnosis says itself what it holds
        data["passed"] = self.first_bad is None
        if self.diagnosis is not None:  # the culprit's diagnosis is the first bad layer's answer
            data["diagnosis"] = self.diagnosis.to_dict()
            if data["first_bad"] is not None:
                layers = data["diagnosis"]["layers"]
                data["first_bad"]["diagnosis"] = data["diagnosis"]["culprit"] or (layers[0] if layers else None)
        data["verdict"] = self.verdict
        return data

    def to_json(self) -> str:
        """The report as strict JSON: non-finite numbers become "inf", "-inf" or "nan"."""
        return json.dumps(_json_safe(self.to_dict()), indent=2)


def nonfinite_notes(layers: tuple[LayerComparison, ...]) -> list[str]:
    """A note for where the float model itself produced NaN/Inf (its inputs are finite: they
    are checked), and how many layers after it carry them; none if it never does."""
    broken = [layer for layer in layers if layer.float_nonfinite]
    if not broken:
        return []
    first, later = broken[0], len(broken) - 1
    carried = f", and {later} later layer{'s' if later != 1 else ''} carry them" if later else ""
    return [
        f"float model produced NaN/Inf: {first.float_nonfinite} values at #{first.index} {first.op_type} "
        f"{'+'.join(first.float_nodes)!r} from finite inputs{carried}; the float model itself breaks "
        "there (an overflow, a division by zero, a log of zero?), so those layers are compared where "
        "both models are finite and not judged against the threshold"
    ]


def faint_notes(layers: tuple[LayerComparison, ...], generated: bool) -> list[str]:
    """Notes for layers whose float value was all zeros on some samples (left out there), and,
    with generated inputs, for those whose float value fell below the quantized tensor's step."""
    notes = []
    zero = [layer for layer in layers if layer.float_zero]
    if zero:
        notes.append(
            f"{_layers(zero)} left out on samples where the float value is all zeros and the quantized "
            "one is not: there is no direction to compare with"
        )
    faint = [layer for layer in layers if layer.faint]
    if faint and generated:
        notes.append(
            f"{_layers(faint)} below the quantized tensor's step on the generated inputs (most values "
            "round to the zero point): random inputs often leave a model's values near zero, so give "
            "real inputs before trusting these layers' metrics"
        )
    return notes


def _layers(layers: list[LayerComparison]) -> str:
    first = layers[0]
    return (f"{len(layers)} layer{'s' if len(layers) != 1 else ''} (first #{first.index} {first.op_type} "
            f"{'+'.join(first.float_nodes)!r})")


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
