"""Model Explorer overlays: node ids as its ONNX adapter gives them, the node-data format its
builder writes, the sync-navigation mapping, the CLI flag, and the config ``explore`` starts."""

import json
from dataclasses import replace

import onnx
import pytest

from layerbisect import find_first_bad_layer
from layerbisect.cli import main
from layerbisect.explorer import FILES, explorer_config

from fuzz_graphs import fold_batchnorms, rename
from models import corrupt_weights, make_cnn, quantize, random_inputs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A CNN with a corrupted conv2, saved with some nodes unnamed and one name repeated (the
    cases where Model Explorer's ids differ from layerbisect's names), and its report."""
    folder = tmp_path_factory.mktemp("explorer")
    float_model = make_cnn()
    quant = corrupt_weights(quantize(float_model, "qdq"), "conv2")
    for model in (float_model, quant):
        nodes = {node.name: node for node in model.graph.node}
        nodes["conv1"].name = ""
        nodes["fc"].name = "flatten"
    paths = folder / "cnn_fp32.onnx", folder / "cnn_int8.onnx"
    onnx.save(float_model, paths[0])
    onnx.save(quant, paths[1])
    report = find_first_bad_layer(str(paths[0]), str(paths[1]), random_inputs(float_model), quiet=True)
    return paths, report


def written(report, folder, *models) -> dict:
    return {path.name: json.loads(path.read_text()) for path in report.to_model_explorer(folder, *models)}


def test_overlays_colour_each_node_against_the_threshold_and_mark_the_first_bad_layer(models, tmp_path):
    (float_path, _), report = models
    files = written(report, tmp_path)
    assert set(files) == set(FILES)
    cosine = files["float_cosine.json"]["cnn"]
    assert cosine["results"]["conv2"]["value"] == pytest.approx(report.first_bad.cosine)
    assert cosine["results"]["node"]["value"] == pytest.approx(report.layers[0].cosine)  # unnamed conv1
    assert cosine["results"]["flatten_1"]["value"] == pytest.approx(report.layers[-1].cosine)  # fc
    below, above = cosine["thresholds"]
    assert below["value"] < 0.98 <= above["value"] and below["bgColor"] != above["bgColor"]
    assert files["float_marks.json"]["cnn"]["results"] == {"conv2": {"value": 1, "bgColor": "#d1242f"}}
    assert "gradient" in files["quant_sqnr_db.json"]["cnn"]
    entry = next(e for e in files["sync_mapping.json"]["mappingEntries"] if e["leftNodeIds"] == ["conv2"])
    assert entry["rightNodeIds"] == ["conv2"]
    culprit = replace(report, culprit=report.layers[0])  # another layer: marked 2
    marks = written(culprit, tmp_path)["float_marks.json"]["cnn"]["results"]
    assert marks["node"]["value"] == 2 and marks["conv2"]["value"] == 1


def test_a_report_of_models_in_memory_needs_them_given(models, tmp_path):
    (float_path, quant_path), report = models
    in_memory = replace(report, float_model="cnn", quant_model="cnn")
    assert written(in_memory, tmp_path) == {}
    given = written(in_memory, tmp_path, onnx.load(str(float_path)), str(quant_path))
    assert given == written(report, tmp_path)


def test_node_ids_are_those_of_model_explorers_onnx_adapter(models, tmp_path):
    adapter = pytest.importorskip("model_explorer_onnx.main")
    paths, report = models
    files = written(report, tmp_path)
    for side, path in zip(("float", "quant"), paths):
        (graph,) = adapter.ONNXAdapter().convert(str(path), {})["graphs"]
        ids = {node.id for node in graph.nodes}
        for metric in ("cosine", "isolated_cosine", "sqnr_db", "marks"):
            assert set(files[f"{side}_{metric}.json"][graph.id]["results"]) <= ids
        mapped = {n for e in files["sync_mapping.json"]["mappingEntries"] for n in e[f"{'left' if side == 'float' else 'right'}NodeIds"]}
        assert mapped <= ids and {"node", "flatten_1"} <= mapped  # conv1 unnamed, fc a second "flatten"


def test_overlays_are_what_model_explorers_node_data_builder_writes(models, tmp_path):
    builder = pytest.importorskip("model_explorer.node_data_builder")
    _, report = models
    for name, content in written(report, tmp_path).items():
        if name == "sync_mapping.json":
            continue
        rebuilt = builder.ModelNodeData(graphsData={
            graph_id: builder.GraphNodeData(
                name=data["name"],
                results={key: builder.NodeDataResult(**result) for key, result in data["results"].items()},
                thresholds=[builder.ThresholdItem(**item) for item in data.get("thresholds", [])],
                gradient=[builder.GradientItem(**item) for item in data.get("gradient", [])],
            ) for graph_id, data in content.items()})
        built = json.loads(rebuilt.to_json_string())
        assert {g: {k: v for k, v in data.items() if k in content[g]} for g, data in built.items()} == content


def test_explore_config_holds_both_models_and_each_overlay_on_its_model(models, tmp_path):
    pytest.importorskip("model_explorer")
    paths, report = models
    config = explorer_config(report, tmp_path)
    assert [source["url"] for source in config.model_sources] == [str(p.absolute()) for p in paths]
    targets = dict(zip(config.node_data_sources, config.node_data_target_models))
    assert targets[str(tmp_path / "float_cosine.json")] == "cnn_fp32.onnx"
    assert targets[str(tmp_path / "quant_marks.json")] == "cnn_int8.onnx"
    assert len(targets) == len(FILES) - 1  # every overlay; the mapping is uploaded in the split view


def test_cli_writes_the_overlays_and_names_them(models, tmp_path, capsys):
    (float_path, quant_path), _ = models
    assert main([str(float_path), str(quant_path), "--model-explorer", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"layerbisect: wrote {tmp_path / 'float_cosine.json'}" in err and (tmp_path / "sync_mapping.json").is_file()
    assert main([str(float_path), str(quant_path), "--model-explorer", str(tmp_path / "absent")]) == 2
    assert "is not a folder; create it first" in capsys.readouterr().err


def test_overlays_of_a_renamed_bn_folded_qdq_model_name_its_own_nodes(tmp_path):
    """The quantized model has its BatchNormalizations folded into the Convs and every node
    renamed before quantizing: each overlay's ids are nodes of its own graph, the folded Conv
    carries its layer's cosine, and the mapping pairs exactly the report's layers."""
    adapter = pytest.importorskip("model_explorer_onnx.main")
    float_model = make_cnn()
    quant = quantize(rename(fold_batchnorms(float_model)), "qdq")
    paths = tmp_path / "cnn_fp32.onnx", tmp_path / "cnn_folded_int8.onnx"
    onnx.save(float_model, paths[0])
    onnx.save(quant, paths[1])
    report = find_first_bad_layer(str(paths[0]), str(paths[1]), random_inputs(float_model), quiet=True)
    files = written(report, tmp_path)
    for side, path in zip(("float", "quant"), paths):
        (graph,) = adapter.ONNXAdapter().convert(str(path), {})["graphs"]
        ids = {node.id for node in graph.nodes}
        for metric in ("cosine", "isolated_cosine", "sqnr_db"):
            assert set(files[f"{side}_{metric}.json"][graph.id]["results"]) <= ids
    folded = next(layer for layer in report.layers if "bn1" in layer.float_nodes)
    (conv,) = (n for n in folded.quant_nodes if n.startswith("op"))  # conv1, renamed, with bn1 folded in
    quant_cosine = next(iter(files["quant_cosine.json"].values()))["results"]
    assert quant_cosine[conv]["value"] == pytest.approx(folded.cosine)
    pairs = [(e["leftNodeIds"], e["rightNodeIds"]) for e in files["sync_mapping.json"]["mappingEntries"]]
    assert pairs == [(list(layer.float_nodes), list(layer.quant_nodes)) for layer in report.layers if layer.quant_nodes]
