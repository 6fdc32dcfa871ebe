"""The report on the models' graphs, in Google's Model Explorer (``ai-edge-model-explorer``).

``write_overlays`` writes, for each model that is an .onnx file, node-data overlays (the JSON
that Model Explorer's "node data" feature loads: ``model_explorer.node_data_builder``'s
``ModelNodeData``, keyed by graph id, then by node id): cosine, isolated cosine and SQNR per
node, and the first bad layer and the culprit marked; and ``sync_mapping.json``, which pairs
each float node with the quantized nodes that stand for it, in the format of the split view's
"Sync navigation: Upload mapping from computer" (``mappingEntries`` of ``leftNodeIds`` and
``rightNodeIds``: the float model goes in the left pane). None of this needs Model Explorer.

Node ids are those of Model Explorer's ONNX adapter (``model-explorer-onnx``): the node's name,
made unique as ``onnx_ir``'s ``NameFixPass`` does (an unnamed node is ``node``, then
``node_1``, ...; a repeated name gets ``_1``, ``_2``, ...), while layerbisect names an unnamed
node ``<OpType>_<index>``: ``explorer_ids`` translates. ``explore`` starts Model Explorer's
local server with both models and the overlays (needs ``pip install 'layerbisect[explorer]'``).
"""

from __future__ import annotations

import collections
import json
import math
import tempfile
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from layerbisect.errors import LayerbisectError
from layerbisect.files import write_text
from layerbisect.load import graph_only, name_nodes

if TYPE_CHECKING:
    from layerbisect.report import LayerComparison, Report

SIDES = ("float", "quant")
METRICS = ("cosine", "isolated_cosine", "sqnr_db", "marks")
TITLES = {"cosine": "cosine", "isolated_cosine": "isolated cosine", "sqnr_db": "SQNR dB"}
MAPPING = "sync_mapping.json"
# every file write_overlays may write in its folder, for the CLI's checks before any work
FILES = tuple(f"{side}_{metric}.json" for side in SIDES for metric in METRICS) + (MAPPING,)
BAD, GOOD, FIRST_BAD, CULPRIT = "#f4a6a6", "#b7e4c0", "#d1242f", "#e36209"


def explorer_ids(model: onnx.ModelProto) -> dict[str, str]:
    """Model Explorer's node id of each node of ``model``'s main graph, by the name layerbisect
    gives it (``load.name_nodes``).

    >>> nodes = [onnx.helper.make_node("Relu", ["x"], ["a"]), onnx.helper.make_node("Neg", ["a"], ["b"], name="n"),
    ...          onnx.helper.make_node("Relu", ["b"], ["c"]), onnx.helper.make_node("Neg", ["c"], ["d"], name="n")]
    >>> explorer_ids(onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [], [])))
    {'Relu_0': 'node', 'n': 'n', 'Relu_2': 'node_1', 'n_1': 'n_1'}
    """
    graph = onnx.GraphProto()
    graph.node.extend(model.graph.node)
    used: set[str] = set()
    counter: collections.Counter[str] = collections.Counter()
    ids = []
    for node in graph.node:
        wanted = name = node.name or "node"
        while name in used:
            counter[wanted] += 1
            name = f"{wanted}_{counter[wanted]}"
        used.add(name)
        ids.append(name)
    name_nodes(graph)
    return {node.name: node_id for node, node_id in zip(graph.node, ids)}


def overlays(
    report: Report, float_model: onnx.ModelProto | None, quant_model: onnx.ModelProto | None
) -> dict[str, Any]:
    """The files ``write_overlays`` writes, by name, as JSON values: the overlays of each model
    given (None: a model with no graph to show, or not at hand) and, with both, the mapping."""
    contents: dict[str, Any] = {}
    ids: dict[str, dict[str, str]] = {}
    for side, model in zip(SIDES, (float_model, quant_model)):
        if model is None:
            continue
        ids[side] = explorer_ids(model)
        graph_id = model.graph.name or "<main>"  # the adapter's id of the main graph
        for metric in METRICS:
            data = _node_data(report, side, metric, ids[side])
            if data is not None:
                contents[f"{side}_{metric}.json"] = {graph_id: data}
    if len(ids) == 2:
        contents[MAPPING] = {"mappingEntries": [
            {"leftNodeIds": [ids["float"].get(n, n) for n in layer.float_nodes],
             "rightNodeIds": [ids["quant"].get(n, n) for n in layer.quant_nodes]}
            for layer in report.layers if layer.quant_nodes
        ]}
    return contents


def _node_data(report: Report, side: str, metric: str, ids: dict[str, str]) -> dict | None:
    """One overlay (a ``GraphNodeData``) of one model, or None when it would be empty. A node in
    several layers shows the lowest value; NaN and infinite values are left out (JSON has none)."""
    if metric == "marks":
        marks = [(1, report.first_bad, FIRST_BAD)]
        culprit, first_bad = report.culprit, report.first_bad
        if culprit is not None and first_bad is not None and culprit.index != first_bad.index:
            marks.append((2, report.culprit, CULPRIT))
        values = {node: (value, colour) for value, layer, colour in reversed(marks) if layer is not None
                  for node in _nodes(layer, side)}
        if not values:
            return None
        return {"name": "layerbisect: first bad layer (1), culprit (2)",
                "results": {ids.get(n, n): {"value": v, "bgColor": c} for n, (v, c) in values.items()}}
    lowest: dict[str, float] = {}
    for layer in report.layers:
        value = getattr(layer, metric)
        if math.isfinite(value):
            for node in _nodes(layer, side):
                lowest[node] = min(value, lowest.get(node, math.inf))
    if not lowest:
        return None
    data: dict[str, Any] = {"name": f"layerbisect: {TITLES[metric]}",
                            "results": {ids.get(n, n): {"value": v} for n, v in lowest.items()}}
    if metric == "sqnr_db":  # no threshold: low red to high green
        data["gradient"] = [{"stop": 0, "bgColor": BAD}, {"stop": 1, "bgColor": GOOD}]
    else:  # below the threshold red, at it or above green (values up to 1, and rounding)
        data["thresholds"] = [{"value": math.nextafter(report.threshold, -math.inf), "bgColor": BAD},
                              {"value": 2, "bgColor": GOOD}]
    return data


def _nodes(layer: LayerComparison, side: str) -> tuple[str, ...]:
    return layer.float_nodes if side == "float" else layer.quant_nodes


def write_overlays(
    report: Report, folder: str | PathLike, float_model: Any = None, quant_model: Any = None
) -> list[Path]:
    """Write ``overlays`` into ``folder`` (it must exist) and return their paths. The models
    default to the report's own, when they are .onnx files; give a model (a path or an
    ``onnx.ModelProto``) that the report was made from in memory."""
    models = [_graph_of(given if given is not None else default)
              for given, default in ((float_model, report.float_model), (quant_model, report.quant_model))]
    paths = []
    for name, content in overlays(report, *models).items():
        path = Path(folder) / name
        write_text(path, json.dumps(content, indent=1) + "\n", reads=report.sources)
        paths.append(path)
    return paths


def _graph_of(model: Any) -> onnx.ModelProto | None:
    """The graph of a model given as a ModelProto or an .onnx file; None for anything else (a
    dump folder, a simulated format, a graph name)."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, PathLike)) and Path(model).is_file():
        return graph_only(model)  # None when it is not a model: no graph to show
    return None


def explorer_config(report: Report, folder: str | PathLike) -> Any:
    """Write the overlays into ``folder`` and return a ``model_explorer`` config holding both
    models (the float model first) and each overlay, applied to its model by file name."""
    from layerbisect.render import optional

    model_explorer = optional("model_explorer", "Report.explore()", "ai-edge-model-explorer", "explorer")
    models = dict(zip(SIDES, (Path(report.float_model), Path(report.quant_model))))
    missing = [str(path) for path in models.values() if path.suffix != ".onnx" or not path.is_file()]
    if missing:
        raise LayerbisectError(f"Report.explore() shows .onnx files, and {missing[0]} is not one; write the "
                               "overlays with report.to_model_explorer(folder, float_model, quant_model) instead")
    config = model_explorer.config()
    for path in models.values():
        config.add_model_from_path(str(path))
    for overlay in write_overlays(report, folder):
        side = overlay.name.partition("_")[0]
        if side in models:
            config.add_node_data_from_path(str(overlay), model_name=models[side].name)
    return config


def explore(report: Report, folder: str | PathLike | None = None, port: int = 8080) -> None:
    """Start Model Explorer's local server on ``port`` with both models and the overlays
    (written into ``folder``, else a new temporary folder); in a notebook it shows there."""
    from layerbisect.render import optional

    model_explorer = optional("model_explorer", "Report.explore()", "ai-edge-model-explorer", "explorer")
    optional("model_explorer_onnx", "Report.explore()", "model-explorer-onnx", "explorer")
    config = explorer_config(report, folder if folder is not None else tempfile.mkdtemp(prefix="layerbisect-"))
    model_explorer.visualize_from_config(config, port=port, extensions=["model_explorer_onnx"])
