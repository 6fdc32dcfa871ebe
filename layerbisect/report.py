"""What a comparison found: a record per aligned layer and the report that holds them.

Plain frozen dataclasses. ``print(report)`` gives the verdict then a table; in a notebook the
report renders as an HTML table; ``to_dict``/``to_json`` give the same content to scripts.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LayerComparison:
    """One aligned layer: a float value, the quantized value that stands for it, and metrics.

    ``float_nodes`` lists the float operations the layer spans (the last one produces
    ``float_tensor``); ``quant_nodes`` the quantized operations that compute ``quant_tensor``.
    ``cosine``, ``sqnr_db`` and ``mse`` are means over samples, ``max_abs`` the largest over
    samples; ``cosine_worst`` is the lowest cosine, seen on sample ``worst_sample``;
    ``nonfinite`` counts, over all samples, NaN/Inf values that differ between the two.
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

    def passes(self, threshold: float) -> bool:
        """Whether the (mean) cosine reaches ``threshold``; NaN never does."""
        return self.cosine >= threshold

    def describe(self) -> str:
        """One line: index, op, where, and how close."""
        return (
            f"#{self.index} {self.op_type} {'+'.join(self.float_nodes)!r} "
            f"(cosine {_num(self.cosine, 4)}, SQNR {_num(self.sqnr_db, 1)} dB)"
        )


@dataclass(frozen=True)
class Report:
    """The result of ``find_first_bad_layer``.

    ``layers`` holds every aligned layer in the float model's topological order; ``first_bad``
    is the first whose cosine is below ``threshold``, or None. ``bool(report)`` is True when no
    layer is below the threshold. ``unaligned`` lists float operations with no counterpart
    in the quantized model; ``coverage`` is the share of float operations that found one.
    ``outputs`` pairs each output the float model declares with the tensor behind it (they
    differ when an Identity carries it). ``notes`` says how inputs were fed and what was left out.
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

    def __bool__(self) -> bool:
        return self.first_bad is None

    @property
    def verdict(self) -> str:
        """One line saying whether a layer fails, which, and how the outputs fare."""
        by_tensor = {layer.float_tensor: layer for layer in self.layers}
        outputs = "; ".join(
            f"output {name!r} cosine {_num(by_tensor[tensor].cosine, 4)}"
            for name, tensor in self.outputs if tensor in by_tensor
        )
        if self.first_bad is None:
            head = f"PASS: all {len(self.layers)} aligned layers reach cosine {self.threshold}"
        else:
            head = f"FAIL: first layer below cosine {self.threshold} is {self.first_bad.describe()}"
        return f"{head}; {outputs}" if outputs else head

    def __str__(self) -> str:
        lines = [self.verdict, self._summary(), ""]
        rows = [("", "#", "op", "float node(s)", "quant node(s)", "cosine", "SQNR dB")]
        for layer in self.layers:
            rows.append((
                "!" if not layer.passes(self.threshold) else "",
                str(layer.index), layer.op_type, _short("+".join(layer.float_nodes)),
                _short("+".join(layer.quant_nodes)), _num(layer.cosine, 4), _num(layer.sqnr_db, 1),
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        right = {1, 5, 6}
        for row in rows:
            cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells).rstrip())
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

    def _summary(self) -> str:
        parts = [f"{len(self.layers)} aligned layers", f"coverage {self.coverage:.0%} of float ops"]
        if self.unaligned:
            parts.append(f"{len(self.unaligned)} float ops without counterpart")
        parts.append(f"{self.samples} sample{'s' if self.samples != 1 else ''}")
        return ", ".join(parts)

    def _repr_html_(self) -> str:
        head = (
            "<tr><th>#</th><th>op</th><th>float node(s)</th><th>quant node(s)</th>"
            "<th>cosine</th><th>worst</th><th>SQNR dB</th><th>max abs</th></tr>"
        )
        body = []
        for layer in self.layers:
            style = ' style="background:#fdd"' if not layer.passes(self.threshold) else ""
            cells = (
                layer.index, layer.op_type, "+".join(layer.float_nodes), "+".join(layer.quant_nodes),
                _num(layer.cosine, 4), _num(layer.cosine_worst, 4), _num(layer.sqnr_db, 1),
                _num(layer.max_abs, 4),
            )
            body.append(f"<tr{style}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
        return (
            f"<div><p><b>{html.escape(self.verdict)}</b><br>{html.escape(self._summary())}</p>"
            f"<table>{head}{''.join(body)}</table>"
            + "".join(f"<p>note: {html.escape(n)}</p>" for n in self.notes)
            + "</div>"
        )

    def to_dict(self) -> dict:
        """Everything in the report as plain Python values (floats may be inf or nan)."""
        data = asdict(self)
        data["passed"] = self.first_bad is None
        data["verdict"] = self.verdict
        return data

    def to_json(self) -> str:
        """The report as strict JSON: non-finite numbers become "inf", "-inf" or "nan"."""
        return json.dumps(_json_safe(self.to_dict()), indent=2)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _num(value: float, digits: int) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
