"""Reports people look at: an HTML page with inline SVG charts, a rich table, a matplotlib figure
and a pandas DataFrame.

The HTML is self-contained (no scripts, fonts, styles or images fetched from anywhere; one
small inline script filters and sorts the layer table and links paired nodes), so a saved
report opens offline. rich, pandas and matplotlib are optional and imported where used.

>>> _ticks(0.2, 1.0)
[0.2, 0.4, 0.6, 0.8, 1.0]
"""

from __future__ import annotations

import importlib
import math
import sys
from dataclasses import asdict
from html import escape
from typing import IO, TYPE_CHECKING, Any

from layerbisect.text import number, shortened

if TYPE_CHECKING:
    from layerbisect.report import GraphNode, LayerComparison, Report

# Every rule starts with the block's two classes, so that a host page's table rules lose to it
# (Jupyter's, one class and two elements at most: right-aligned cells, striped and hovered
# rows, centred fixed-layout tables); failing rows are painted on their cells, over any row
# background.
STYLE = """<style>
.lb.lb-report{font-family:system-ui,sans-serif;font-size:14px;color:#222;max-width:1200px;text-align:left}
.lb.lb-report h2{font-size:17px;margin:8px 0}.lb.lb-report h3{font-size:15px;margin:20px 0 6px}
.lb.lb-report .pass{color:#1a7f37}.lb.lb-report .fail{color:#b42318}
.lb.lb-report table{border-collapse:collapse;border:none;font-size:13px;margin:0;table-layout:auto;color:inherit}
.lb.lb-report tbody tr:nth-child(n){background:transparent}
.lb.lb-report th,.lb.lb-report td{padding:2px 8px;border:none;border-bottom:1px solid #e3e3e3;text-align:left;
vertical-align:top;line-height:normal;white-space:normal;max-width:none}
.lb.lb-report td.n{text-align:right;font-variant-numeric:tabular-nums}
.lb.lb-report td.t{overflow-wrap:anywhere;min-width:8em}.lb.lb-report .cols table{width:100%}
.lb.lb-report tr.bad>td{background:#fde8e8}
.lb.lb-report tr.first>td,.lb.lb-report tr.centre>td{font-weight:bold}
.lb.lb-report .cols{display:flex;gap:24px;flex-wrap:wrap}.lb.lb-report .cols>div{flex:1;min-width:340px}
.lb.lb-report svg{max-width:100%;height:auto}.lb.lb-report svg text{font-family:system-ui,sans-serif}
.lb.lb-report summary{cursor:pointer;font-weight:bold;margin:20px 0 6px}.lb.lb-report th{cursor:default}
.lb.lb-report table.lb-table th{cursor:pointer}.lb.lb-report .lb-filters{margin:6px 0;display:flex;gap:12px}
.lb.lb-report g.lb-hl rect{stroke:#1f6feb;stroke-width:3}.lb.lb-report tr.lb-flash>td{outline:2px solid #d1242f}
</style>"""
# Filters and sorts the layer table, jumps to the first bad layer, and highlights a pair of
# nodes across the two neighbourhood drawings on hover; scoped to its own report block.
SCRIPT = """<script>(function () {
const root = document.currentScript.closest(".lb-report");
const table = root.querySelector("table.lb-table"), body = table.tBodies[0], rows = [...body.rows];
const badOnly = root.querySelector(".lb-bad-only"), op = root.querySelector(".lb-op");
const name = root.querySelector(".lb-name");
function filter() {
  const text = name.value.toLowerCase();
  for (const row of rows) {
    row.hidden = (badOnly.checked && !row.classList.contains("bad")) || (op.value !== "" && row.dataset.op !== op.value)
      || !row.dataset.names.includes(text);
  }
}
for (const control of [badOnly, op, name]) control.addEventListener("input", filter);
const number = text => ({"inf": Infinity, "-inf": -Infinity}[text]
  ?? (isNaN(parseFloat(text)) ? -Infinity : parseFloat(text)));
table.tHead.querySelectorAll("th").forEach((head, column) => head.addEventListener("click", () => {
  const up = head.dataset.order !== "up";
  head.dataset.order = up ? "up" : "down";
  const key = row => row.cells[column].classList.contains("n")
    ? number(row.cells[column].textContent) : row.cells[column].textContent;
  rows.sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0) * (up ? 1 : -1));
  body.append(...rows);
}));
const jump = root.querySelector(".lb-jump"), first = body.querySelector("tr.first");
if (jump && first) jump.addEventListener("click", () => {
  root.querySelector("details.lb-layers").open = true;
  first.hidden = false;
  first.classList.add("lb-flash");
  first.scrollIntoView({block: "center"});
});
root.querySelectorAll("g[data-layer]").forEach(box => {
  const pair = () => root.querySelectorAll(`g[data-layer="${box.dataset.layer}"]`);
  box.addEventListener("mouseenter", () => pair().forEach(other => other.classList.add("lb-hl")));
  box.addEventListener("mouseleave", () => pair().forEach(other => other.classList.remove("lb-hl")));
});
})();</script>"""

BLUE, RED, ORANGE, GREY = "#1f6feb", "#d1242f", "#e36209", "#8c959f"
PALE_RED, PALE_GREEN = "#fde8e8", "#e6f4ea"


def html_document(report: Report) -> str:
    """The whole report as one self-contained HTML page."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>layerbisect: {escape(report.float_model)} vs {escape(report.quant_model)}</title>"
        f"</head><body>{html_fragment(report)}</body></html>\n"
    )


def html_fragment(report: Report) -> str:
    """The report as an HTML block (styles scoped to its ``lb lb-report`` block, ahead of a
    host page's own table styles), for notebooks and pages."""
    verdict_class = "pass" if report.first_bad is None else "fail"
    parts = [
        f'<div class="lb lb-report">{STYLE}<h2 class="{verdict_class}">{escape(report.verdict)}</h2>',
        f"<p>{escape(report.summary_line())}</p>",
        chart_svg(report),
        _diagnosis_section(report),
        _neighbourhood_section(report),
        _layer_table(report),
        _models_section(report),
        _settings_section(report),
        SCRIPT,
        "</div>",
    ]
    return "".join(parts)


def _layer_table(report: Report) -> str:
    """The layer table, folded away, with its filters (below the threshold only, an op type, a
    node name) and a button that opens it at the first bad layer; headers sort."""
    isolated = _has_isolated(report)
    heads = ["#", "op", "float node(s)", "quant node(s)", "cosine", "worst", "SQNR dB", "max abs"]
    heads += ["isolated"] if isolated else []
    failing = sum(not layer.passes(report.threshold) for layer in report.layers)
    ops = sorted({layer.op_type for layer in report.layers})
    jump = (f'<p><button class="lb-jump">Show the first bad layer, #{report.first_bad.index}, in the table</button></p>'
            if report.first_bad is not None else "")
    rows = [
        f'{jump}<details class="lb-layers"><summary>Layers ({len(report.layers)}, {failing} below the '
        f'threshold)</summary><div class="lb-filters"><label><input type="checkbox" class="lb-bad-only"> below '
        'the threshold only</label><select class="lb-op"><option value="">every op</option>'
        + "".join(f'<option value="{escape(op)}">{escape(op)}</option>' for op in ops)
        + '</select><input type="search" class="lb-name" placeholder="node name"></div>'
        '<table class="lb-table"><thead><tr>' + "".join(f"<th>{h}</th>" for h in heads + ["evidence"])
        + "</tr></thead><tbody>"
    ]
    for layer in report.layers:
        classes = [] if layer.passes(report.threshold) else ["bad"]
        classes += ["first"] if _same(layer, report.first_bad) else []
        numbers = [number(layer.cosine, 4), number(layer.cosine_worst, 4), number(layer.sqnr_db, 1),
                   number(layer.max_abs, 4)]
        numbers += [number(layer.isolated_cosine, 4)] if isolated else []
        names = " ".join(layer.float_nodes + layer.quant_nodes).lower()
        rows.append(
            f'<tr class="{" ".join(classes)}" data-op="{escape(layer.op_type)}" data-names="{escape(names)}">'
            f'<td class="n">{layer.index}</td><td>{escape(layer.op_type)}</td>'
            f"<td>{escape('+'.join(layer.float_nodes))}</td><td>{escape('+'.join(layer.quant_nodes))}</td>"
            + "".join(f'<td class="n">{n}</td>' for n in numbers)
            + f"<td>{escape(layer.evidence)}</td></tr>"
        )
    return "".join(rows) + "</tbody></table></details>"


def _diagnosis_section(report: Report) -> str:
    """Per diagnosed layer: a bar per part (its cosine alone), why, and the fixes tried."""
    if report.diagnosis is None or not report.diagnosis.layers:
        return ""
    blocks = ["<h3>Diagnosis</h3>"]
    for diagnosis in report.diagnosis.layers:
        layer, width = diagnosis.layer, 320
        bars = "".join(
            f'<text x="0" y="{18 * i + 13}" font-size="12">{escape(part.name)}</text>'
            f'<rect x="80" y="{18 * i + 3}" height="12" width="{width * (part.cosine if part.cosine > 0 else 0):.0f}"'
            f' fill="{RED if not part.cosine >= report.threshold else BLUE}"/>'
            f'<text x="{90 + width}" y="{18 * i + 13}" font-size="12">{number(part.cosine, 4)}</text>'
            for i, part in enumerate(diagnosis.parts)
        )
        height = 18 * len(diagnosis.parts) + 6
        chart = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{160 + width}" height="{height}"'
                 f' role="img" aria-label="cosine of each part alone">{bars}</svg>')
        why = "".join(f"<li>{escape(q.describe())}</li>" for part in diagnosis.parts for q in part.quantizers)
        fixes = "".join(f"<li>{escape(fix.describe())}</li>" for fix in diagnosis.fixes)
        best = diagnosis.recommended
        blocks.append(
            f"<p><b>#{layer.index} {escape(layer.op_type)} {escape('+'.join(layer.float_nodes))}</b>: own cosine "
            f"{number(diagnosis.isolated_cosine, 4)}, cause <b>{escape(diagnosis.cause)}</b>; only one part "
            f"quantized:</p>{chart}<ul>{why}</ul><p>Fixes, each run:</p><ul>{fixes}</ul>"
            f"<p>Recommended: {escape(best.description) if best else 'none verifies'}</p>"
        )
    if report.diagnosis.recommended():
        blocks.append(f"<pre>{escape(report.diagnosis.pasteable())}</pre>")
    return "".join(blocks)


def _models_section(report: Report) -> str:
    summaries = [(title, s) for title, s in (("Float model", report.float_summary),
                                             ("Quantized model", report.quant_summary)) if s is not None]
    if not summaries:
        return ""
    return "<h3>Models</h3><div class=\"cols\">" + "".join(
        f"<div><b>{title}</b>: <code>{escape(s.path)}</code>, {s.nodes} nodes<br>"
        + ", ".join(f"{escape(op)}&nbsp;{count}" for op, count in s.op_types) + "</div>"
        for title, s in summaries
    ) + "</div>"


def _settings_section(report: Report) -> str:
    settings = [
        ("threshold", f"cosine {report.threshold}"),
        ("samples", str(report.samples)),
        ("providers", ", ".join(report.providers) or "-"),
        ("seed", "-" if report.seed is None else str(report.seed)),
        ("onnxruntime-optimized quantized graph", "yes" if report.ort_optimized else "no"),
        ("coverage", f"{report.coverage:.0%} of float ops"),
    ]
    settings += [("float ops without counterpart", ", ".join(report.unaligned))] if report.unaligned else []
    settings += [("note", note) for note in report.notes]
    return "<h3>Run settings</h3><table>" + "".join(
        f"<tr><th>{escape(key)}</th><td>{escape(value)}</td></tr>" for key, value in settings
    ) + "</table>"


def _neighbourhood_section(report: Report) -> str:
    bad = report.first_bad
    if bad is None or not (report.float_neighbourhood or report.quant_neighbourhood):
        return ""
    sides = (("float", report.float_neighbourhood, bad.float_nodes, _layers_of(report, "float_nodes")),
             ("quantized", report.quant_neighbourhood, bad.quant_nodes, _layers_of(report, "quant_nodes")))
    return (
        f"<h3>Around the first bad layer, #{bad.index} {escape('+'.join(bad.float_nodes))}</h3>"
        "<p>Nodes within two operations of it (quantize/dequantize nodes do not count), its own "
        "outlined in red; each measured node shows its layer and cosine, red below the threshold, "
        "green at it or above. A layer's nodes carry the same number on both sides: hover one to "
        "highlight its counterparts.</p><div class=\"cols\">"
        + "".join(
            f"<div><b>{side} model</b><br>{neighbourhood_svg(nodes, set(centre), layers, report.threshold)}"
            f"{_node_table(nodes, set(centre))}</div>"
            for side, nodes, centre, layers in sides if nodes  # a dump or a simulator has no graph to show
        )
        + "</div>"
    )


def _layers_of(report: Report, field: str) -> dict[str, LayerComparison]:
    """The layer each node is part of (its first, when several), by node name; ``field`` is
    ``float_nodes`` or ``quant_nodes``."""
    layers: dict[str, LayerComparison] = {}
    for layer in report.layers:
        for name in getattr(layer, field):
            layers.setdefault(name, layer)
    return layers


def _node_table(nodes: tuple[GraphNode, ...], centre: set[str]) -> str:
    rows = ["<table><tr><th>hops</th><th>op</th><th>node</th><th>inputs</th><th>outputs</th></tr>"]
    for node in nodes:
        rows.append(
            f'<tr class="{"centre" if node.name in centre else ""}"><td class="n">{node.distance}</td>'
            f"<td>{escape(node.op_type)}</td><td class=\"t\">{escape(node.name)}</td>"
            f"<td class=\"t\">{escape(', '.join(node.inputs))}</td>"
            f"<td class=\"t\">{escape(', '.join(node.outputs))}</td></tr>"
        )
    return "".join(rows) + "</table>"


def neighbourhood_svg(nodes: tuple[GraphNode, ...], centre: set[str],
                      layers: dict[str, LayerComparison] | None = None, threshold: float = 0.98) -> str:
    """A small layered drawing of ``nodes`` (in topological order): one box per node, one arrow
    per tensor between them, the ``centre`` nodes outlined in red. A node of ``layers`` (by
    name) shows that layer's number and cosine, filled red below ``threshold`` and green at it
    or above, and carries the layer's number (``data-layer``) for the page's hover highlight."""
    layers = layers or {}
    box_w, box_h, gap_x, gap_y = 150, 50, 14, 22
    level: dict[str, int] = {}
    producer: dict[str, str] = {}
    edges: list[tuple[str, str, str]] = []
    for node in nodes:
        sources = [(producer[t], t) for t in node.inputs if t in producer]
        level[node.name] = 1 + max((level[p] for p, _ in sources), default=-1)
        edges += [(p, node.name, t) for p, t in sources]
        producer.update({t: node.name for t in node.outputs})
    rows: dict[int, list[str]] = {}
    for node in nodes:
        rows.setdefault(level[node.name], []).append(node.name)
    width = max(len(r) for r in rows.values()) * (box_w + gap_x) + gap_x
    where = {}
    for depth, names in rows.items():
        offset = (width - len(names) * (box_w + gap_x) + gap_x) / 2
        for column, name in enumerate(names):
            where[name] = (offset + column * (box_w + gap_x), gap_y / 2 + depth * (box_h + gap_y))
    height = len(rows) * (box_h + gap_y)
    out = [
        f'<svg class="lb-graph" viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}">'
        f'<defs><marker id="lb-arrow" viewBox="0 0 6 6" refX="6" refY="3" markerWidth="6" markerHeight="6" '
        f'orient="auto"><path d="M0,0L6,3L0,6z" fill="{GREY}"/></marker></defs>'
    ]
    for source, target, tensor in edges:
        (x1, y1), (x2, y2) = where[source], where[target]
        out.append(
            f'<line x1="{x1 + box_w / 2:.1f}" y1="{y1 + box_h:.1f}" x2="{x2 + box_w / 2:.1f}" y2="{y2:.1f}" '
            f'stroke="{GREY}" marker-end="url(#lb-arrow)"><title>{escape(tensor)}</title></line>'
        )
    for node in nodes:
        x, y = where[node.name]
        stroke, weight = (RED, 2.5) if node.name in centre else (GREY, 1)
        layer = layers.get(node.name)
        fill, tag, measured = "#fff", "", ""
        if layer is not None:
            fill = PALE_GREEN if layer.passes(threshold) else PALE_RED
            tag = f' data-layer="{layer.index}"'
            measured = (f'<text x="{x + box_w / 2:.1f}" y="{y + 43:.1f}" text-anchor="middle" font-size="11">'
                        f"#{layer.index} cos {number(layer.cosine, 4)}</text>")
        out.append(
            f'<g{tag}><title>{escape(node.name)}: {escape(", ".join(node.inputs))} -&gt; '
            f'{escape(", ".join(node.outputs))}</title>'
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{box_w}" height="{box_h}" rx="4" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="{weight}"/>'
            f'<text x="{x + box_w / 2:.1f}" y="{y + 15:.1f}" text-anchor="middle" font-size="12" '
            f'font-weight="bold">{escape(shortened(node.op_type, 22))}</text>'
            f'<text x="{x + box_w / 2:.1f}" y="{y + 29:.1f}" text-anchor="middle" font-size="11" '
            f'fill="#555">{escape(shortened(node.name, 24))}</text>{measured}</g>'
        )
    return "".join(out) + "</svg>"


def chart_svg(report: Report, width: int = 960) -> str:
    """Cosine (top) and SQNR (bottom) per layer along the float model's topological order, with
    the threshold line, failing layers in red, and the first bad layer (and the culprit, when it
    is another layer) marked by vertical lines."""
    layers = report.layers
    count = 1 + max((layer.index for layer in layers), default=0)  # bisection leaves gaps
    left, right, panel, gap, top = 64, 16, 190, 46, 34
    step = (width - left - right) / count
    height = top + 2 * panel + gap + 40

    def x_of(index: int) -> float:
        return left + (index + 0.5) * step

    isolated = _has_isolated(report)
    cosines = [v for layer in layers for v in (layer.cosine, layer.isolated_cosine if isolated else 1.0)]
    cos_ticks = _ticks(min([report.threshold, *filter(math.isfinite, cosines)]), 1.0)
    sqnrs = [v for layer in layers for v in (layer.sqnr_db, layer.isolated_sqnr_db if isolated else math.nan)]
    finite = [v for v in sqnrs if math.isfinite(v)] or [0.0, 60.0]
    sqnr_ticks = _ticks(min(finite), max(finite))
    out = [f'<svg class="lb-chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" font-size="12">']
    panels = (("cosine", top, cos_ticks, "cosine", "isolated_cosine", 4),
              ("SQNR dB", top + panel + gap, sqnr_ticks, "sqnr_db", "isolated_sqnr_db", 1))
    for label, y0, ticks, field, isolated_field, digits in panels:
        lo, hi = ticks[0], ticks[-1]

        def y_of(value: float, y0: float = y0, lo: float = lo, hi: float = hi) -> float:
            return y0 + panel - (min(max(value, lo), hi) - lo) / (hi - lo) * panel

        out.append(_axes(label, y0, panel, left, width - right, ticks, y_of, count, x_of))
        if field == "cosine":
            y = y_of(report.threshold)
            out.append(
                f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="{RED}" '
                f'stroke-dasharray="6 4"/><text x="{width - right - 4}" y="{y - 4:.1f}" text-anchor="end" '
                f'fill="{RED}">threshold {report.threshold}</text>'
            )
        if isolated:
            out.append(_line([(layer.index, getattr(layer, isolated_field)) for layer in layers], x_of, y_of, GREY,
                             "4 3"))
        values = [getattr(layer, field) for layer in layers]
        out.append(_line([(layer.index, v) for layer, v in zip(layers, values)], x_of, y_of, BLUE))
        for layer, value in zip(layers, values):
            if math.isnan(value):
                continue
            colour = BLUE if layer.passes(report.threshold) else RED
            fill = "#fff" if math.isinf(value) else colour  # off the scale: hollow, at the edge
            out.append(
                f'<circle cx="{x_of(layer.index):.1f}" cy="{y_of(value):.1f}" r="3.5" fill="{fill}" '
                f'stroke="{colour}"><title>#{layer.index} {escape(layer.op_type)} '
                f'{escape("+".join(layer.float_nodes))}: {label} {number(value, digits)}</title></circle>'
            )
    for row, (name, layer, colour) in enumerate(_marks(report)):
        x = x_of(layer.index)
        anchor = "end" if x > width * 0.7 else "start"
        out.append(
            f'<line class="lb-mark" x1="{x:.1f}" x2="{x:.1f}" y1="{top - 4}" y2="{top + 2 * panel + gap}" '
            f'stroke="{colour}" stroke-width="1.5"/><text x="{x + (-4 if anchor == "end" else 4):.1f}" '
            f'y="{12 + row * 14}" text-anchor="{anchor}" fill="{colour}" font-weight="bold">{name}: '
            f'#{layer.index} {escape(shortened("+".join(layer.float_nodes), 40))}</text>'
        )
    legend = f'<tspan fill="{BLUE}">● cumulative</tspan>'
    legend += f' <tspan fill="{GREY}">- - isolated</tspan>' if isolated else ""
    out.append(
        f'<text x="{left}" y="{height - 8}" fill="#555">layer, in the float model\'s topological order'
        f"   {legend}</text></svg>"
    )
    return "".join(out)


def _marks(report: Report) -> list[tuple[str, LayerComparison, str]]:
    """The layers to mark: the first bad one, and the culprit when it is another layer."""
    marks = [] if report.first_bad is None else [("first bad", report.first_bad, RED)]
    if report.culprit is not None and not _same(report.culprit, report.first_bad):
        marks.append(("culprit", report.culprit, ORANGE))
    return marks


def _axes(label, y0, panel, x0, x1, ticks, y_of, count, x_of) -> str:
    out = [f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{panel}" fill="#fafbfc" stroke="#d0d7de"/>']
    for tick in ticks:
        y = y_of(tick)
        out.append(
            f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eaeef2"/>'
            f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{tick:g}</text>'
        )
    for index in range(0, count, max(1, math.ceil(count / 20))):
        out.append(f'<text x="{x_of(index):.1f}" y="{y0 + panel + 15}" text-anchor="middle" fill="#555">{index}</text>')
    out.append(
        f'<text transform="translate(14 {y0 + panel / 2}) rotate(-90)" text-anchor="middle" '
        f'font-weight="bold">{label}</text>'
    )
    return "".join(out)


def _line(points: list[tuple[int, float]], x_of, y_of, colour: str, dash: str = "") -> str:
    """Polylines through (layer index, value) points, broken where a value is NaN."""
    runs: list[list[str]] = [[]]
    for index, value in points:
        if math.isnan(value):
            runs.append([])
        else:
            runs[-1].append(f"{x_of(index):.1f},{y_of(value):.1f}")
    dashing = f' stroke-dasharray="{dash}"' if dash else ""
    return "".join(
        f'<polyline points="{" ".join(run)}" fill="none" stroke="{colour}" stroke-width="1.5"{dashing}/>'
        for run in runs if len(run) > 1
    )


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi]."""
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def _same(layer: LayerComparison, other: LayerComparison | None) -> bool:
    return other is not None and layer.index == other.index


def _has_isolated(report: Report) -> bool:
    return any(not math.isnan(layer.isolated_cosine) for layer in report.layers)


def rich_table(report: Report) -> Any:
    """The report as a rich Table: the verdict and summary as its title, notes as its caption."""
    from rich.table import Table
    from rich.text import Text

    title = Text(report.verdict, style="bold green" if report.first_bad is None else "bold red")
    title.append("\n" + report.summary_line(), style="default")
    table = Table(
        title=title, title_justify="left", caption="\n".join(f"note: {n}" for n in report.notes) or None,
        caption_justify="left",
    )
    isolated = _has_isolated(report)
    for head in ["#", "op", "float node(s)", "quant node(s)", "cosine", "SQNR dB"] + (["isolated"] if isolated else []):
        table.add_column(head, justify="right" if head in ("#", "cosine", "SQNR dB", "isolated") else "left")
    for layer in report.layers:
        cells = [str(layer.index), layer.op_type, "+".join(layer.float_nodes), "+".join(layer.quant_nodes),
                 number(layer.cosine, 4), number(layer.sqnr_db, 1)]
        cells += [number(layer.isolated_cosine, 4)] if isolated else []
        style = None if layer.passes(report.threshold) else ("bold red" if _same(layer, report.first_bad) else "red")
        table.add_row(*cells, style=style)
    return table


def echo(report: Report, stream: IO[str] | None = None, quiet: bool = False) -> None:
    """Print the report to ``stream`` (stdout): only the verdict when ``quiet``; a rich table
    when rich is installed and the stream is a terminal; plain text otherwise."""
    stream = stream or sys.stdout
    if quiet:
        print(report.verdict, file=stream)
        return
    if stream.isatty():
        try:
            from rich.console import Console
        except ImportError:
            pass
        else:
            Console(file=stream).print(report)
            if report.diagnosis is not None:
                print(f"\n{report.diagnosis}", file=stream)
            return
    print(report, file=stream)


def dataframe(report: Report) -> Any:
    """One row per layer, indexed by layer index; node lists joined with '+'; a ``passes`` column."""
    pandas = optional("pandas", "Report.to_dataframe()")
    rows = [
        {**asdict(layer), "float_nodes": "+".join(layer.float_nodes), "quant_nodes": "+".join(layer.quant_nodes),
         "passes": layer.passes(report.threshold)}
        for layer in report.layers
    ]
    if report.diagnosis is not None:  # the cause and the recommended fix of each diagnosed layer
        diagnosed = {d.layer.index: d for d in report.diagnosis.layers}
        for row in rows:
            found = diagnosed.get(row["index"])
            fix = None if found is None else found.recommended
            row["cause"] = None if found is None else found.cause
            row["fix"] = None if fix is None else fix.kind
    return pandas.DataFrame(rows).set_index("index")


def figure(report: Report) -> Any:
    """A matplotlib Figure: cosine and SQNR per layer, threshold, first bad layer and culprit."""
    pyplot = optional("matplotlib.pyplot", "Report.plot()", "matplotlib")
    fig, (top, bottom) = pyplot.subplots(2, 1, sharex=True, figsize=(10, 6))
    index = [layer.index for layer in report.layers]
    panels = ((top, "cosine", "isolated_cosine"), (bottom, "sqnr_db", "isolated_sqnr_db"))
    for axes, field, isolated_field in panels:
        values = [_finite_or_nan(getattr(layer, field)) for layer in report.layers]
        axes.plot(index, values, marker="o", color=BLUE, label="cumulative")
        if _has_isolated(report):
            isolated = [_finite_or_nan(getattr(layer, isolated_field)) for layer in report.layers]
            axes.plot(index, isolated, linestyle="--", color=GREY, label="isolated")
        for name, layer, colour in _marks(report):
                axes.axvline(layer.index, color=colour, label=f"{name} #{layer.index}")
        axes.grid(alpha=0.3)
    top.axhline(report.threshold, color=RED, linestyle=":", label=f"threshold {report.threshold}")
    top.set_ylabel("cosine")
    bottom.set_ylabel("SQNR dB")
    bottom.set_xlabel("layer, in the float model's topological order")
    top.legend(loc="lower left", fontsize="small")
    top.set_title(shortened(report.verdict, 110), fontsize="medium")
    fig.tight_layout()
    return fig


def _finite_or_nan(value: float) -> float:
    return value if math.isfinite(value) else math.nan


def optional(module: str, feature: str, package: str | None = None, extra: str = "report") -> Any:
    """Import an optional dependency, or raise ImportError saying how to install it (alone, or
    with layerbisect's optional ``extra``)."""
    package = package or module
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{feature} needs {package}, which is not installed: "
            f"pip install {package}  (or pip install 'layerbisect[{extra}]')"
        ) from None
