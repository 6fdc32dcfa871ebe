"""find_first_bad_layer end to end on models built in code and quantized by onnxruntime."""

from functools import lru_cache

import numpy as np
import onnx
import pytest

from layerbisect import find_first_bad_layer

from models import corrupt_weights, make_cnn, make_transformer, quant_node_for, quantize, random_inputs

BUILDERS = {"cnn": make_cnn, "transformer": make_transformer}
FAULTY = {"cnn": "conv2", "transformer": "ffn1_proj"}


@lru_cache(maxsize=None)
def float_model(name: str) -> onnx.ModelProto:
    return BUILDERS[name]()


@lru_cache(maxsize=None)
def quant_model(name: str, fmt: str, activation_type: str = "int8") -> onnx.ModelProto:
    return quantize(float_model(name), fmt, activation_type=activation_type)


def faulted(name: str, fmt: str, float_node: str) -> onnx.ModelProto:
    quant = quant_model(name, fmt)
    return corrupt_weights(quant, quant_node_for(quant, float_node, float_model(name)))


CASES = [(name, fmt) for name in BUILDERS for fmt in ("qdq", "qoperator", "dynamic")]


@pytest.mark.parametrize("name,fmt", CASES)
def test_healthy_int8_model_has_no_bad_layer_and_everything_aligns(name, fmt):
    report = find_first_bad_layer(float_model(name), quant_model(name, fmt), random_inputs(float_model(name)))
    assert report.first_bad is None and bool(report)
    assert report.coverage == 1.0 and report.unaligned == ()
    assert min(layer.cosine for layer in report.layers) > 0.99
    assert report.layers[-1].float_tensor == "y"


@pytest.mark.parametrize("name,fmt", CASES)
def test_corrupted_weights_are_named_as_first_bad_layer(name, fmt):
    report = find_first_bad_layer(
        float_model(name), faulted(name, fmt, FAULTY[name]), random_inputs(float_model(name)), threshold=0.98
    )
    assert report.first_bad is not None and not report
    assert report.first_bad.float_nodes == (FAULTY[name],)
    assert report.first_bad.cosine < 0.5
    before = report.layers[: report.first_bad.index]
    assert before and all(layer.cosine > 0.99 for layer in before)


@pytest.mark.parametrize("fmt", ["qdq", "qoperator", "dynamic"])
def test_fault_in_the_classifier_head_is_found(fmt):
    """The float Gemm becomes QGemm, or MatMulInteger + Cast + Mul + Add with dynamic quantization."""
    report = find_first_bad_layer(float_model("cnn"), faulted("cnn", fmt, "fc"), random_inputs(float_model("cnn")))
    assert report.first_bad.float_nodes == ("fc",) and report.first_bad.float_tensor == "y"
    assert report.first_bad.index == len(report.layers) - 1


@pytest.mark.parametrize("name", BUILDERS)
def test_16_bit_qdq_copy_reports_no_bad_layer(name):
    quant = quant_model(name, "qdq", "int16")
    assert any(i.data_type == onnx.TensorProto.INT16 for i in quant.graph.initializer) or any(
        n.op_type == "QuantizeLinear" for n in quant.graph.node
    )
    report = find_first_bad_layer(float_model(name), quant, random_inputs(float_model(name)))
    assert report.first_bad is None and report.coverage == 1.0
    assert min(layer.cosine for layer in report.layers) > 0.9999


def test_uint8_activations_are_aligned_and_dequantized():
    report = find_first_bad_layer(
        float_model("cnn"), quant_model("cnn", "qdq", "uint8"), random_inputs(float_model("cnn"))
    )
    assert report.first_bad is None and report.coverage == 1.0


def test_removed_relu_is_compared_as_a_span_not_by_its_misleading_name():
    """onnxruntime's QDQ quantizer drops relu1 and names bn1's output 'relu1' (pre-Relu values
    before quantization). The pair must compare float relu1 with the dequantized value after bn1."""
    quant = quant_model("cnn", "qdq")
    producer = {out: node.name for node in quant.graph.node for out in node.output}
    assert producer["relu1"] == "bn1"  # the trap: same name, different value
    report = find_first_bad_layer(float_model("cnn"), quant, random_inputs(float_model("cnn")))
    layer = next(layer for layer in report.layers if layer.float_tensor == "relu1")
    assert layer.float_nodes == ("bn1", "relu1") and layer.quant_nodes == ("bn1",)
    assert layer.quant_tensor != "relu1" and layer.cosine > 0.999
    assert layer.evidence == "fused"


def test_qoperator_integer_outputs_are_dequantized_with_their_own_scale():
    report = find_first_bad_layer(float_model("cnn"), quant_model("cnn", "qoperator"), random_inputs(float_model("cnn")))
    conv3 = next(layer for layer in report.layers if layer.float_tensor == "relu4")
    assert conv3.float_nodes == ("conv3", "relu4") and conv3.quant_nodes == ("conv3_quant",)
    assert conv3.quant_tensor == "conv3_quantized"  # uint8, read before any DequantizeLinear
    assert conv3.cosine > 0.999 and conv3.sqnr_db > 25


def test_dynamic_conv_span_includes_its_bias_add():
    report = find_first_bad_layer(float_model("cnn"), quant_model("cnn", "dynamic"), random_inputs(float_model("cnn")))
    conv1 = next(layer for layer in report.layers if layer.float_nodes == ("conv1",))
    assert conv1.quant_nodes == ("conv1_quant", "conv1_bias_add") and conv1.cosine > 0.999


def test_several_samples_give_mean_and_worst():
    samples = [random_inputs(float_model("cnn"), seed) for seed in range(3)]
    report = find_first_bad_layer(float_model("cnn"), faulted("cnn", "qdq", "conv2"), samples)
    assert report.samples == 3
    for layer in report.layers:
        assert layer.cosine_worst <= layer.cosine + 1e-12 and 0 <= layer.worst_sample < 3
    single = [find_first_bad_layer(float_model("cnn"), faulted("cnn", "qdq", "conv2"), s).first_bad for s in samples]
    assert report.first_bad.cosine == pytest.approx(np.mean([s.cosine for s in single]))
    assert report.first_bad.cosine_worst == pytest.approx(min(s.cosine for s in single))
    assert report.first_bad.cosine_p10 == pytest.approx(np.percentile([s.cosine for s in single], 10))


def test_random_inputs_are_seeded_and_reports_repeat():
    first = find_first_bad_layer(float_model("cnn"), faulted("cnn", "qdq", "conv2"), seed=5)
    again = find_first_bad_layer(float_model("cnn"), faulted("cnn", "qdq", "conv2"), seed=5)
    assert first.to_dict() == again.to_dict()
    assert first.first_bad.float_nodes == ("conv2",)


def test_unnamed_nodes_get_stable_readable_names():
    anonymous = onnx.ModelProto()
    anonymous.CopyFrom(float_model("cnn"))
    for node in anonymous.graph.node:
        node.name = ""
    report = find_first_bad_layer(anonymous, quant_model("cnn", "qdq"), random_inputs(anonymous))
    names = [name for layer in report.layers for name in layer.float_nodes]
    assert all(names) and names[0] == "Conv_0"
    assert all(node.name == "" for node in anonymous.graph.node)  # the caller's model is untouched


def test_report_prints_verdict_then_table_and_renders_html():
    report = find_first_bad_layer(float_model("cnn"), faulted("cnn", "qdq", "conv2"), random_inputs(float_model("cnn")))
    lines = str(report).splitlines()
    assert lines[0].startswith("FAIL: first layer below cosine 0.98 is #2 Conv 'conv2'")
    assert any(line.startswith("!") and "conv2" in line for line in lines)
    assert "cosine" in lines[3] and "SQNR" in lines[3]
    html = report._repr_html_()
    assert "<table>" in html and 'class="bad first"' in html
    data = report.to_dict()
    assert data["first_bad"]["float_nodes"] == ("conv2",) and len(data["layers"]) == len(report.layers)
    for field in ("float_nodes", "float_tensor", "quant_nodes", "quant_tensor", "op_type", "cosine", "sqnr_db", "mse", "max_abs"):
        assert field in data["first_bad"]


def test_model_files_are_never_written(tmp_path):
    float_path, quant_path = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(float_model("cnn"), float_path)
    onnx.save(faulted("cnn", "qdq", "conv2"), quant_path)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (float_path, quant_path)}
    report = find_first_bad_layer(str(float_path), quant_path, random_inputs(float_model("cnn")))
    assert report.first_bad.float_nodes == ("conv2",)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (float_path, quant_path)} == before
    assert sorted(tmp_path.iterdir()) == [float_path, quant_path]


def test_providers_are_an_order_of_preference_and_a_plain_string_is_one():
    model = float_model("cnn")
    plain = find_first_bad_layer(model, quant_model("cnn", "qdq"), providers="CPUExecutionProvider")
    assert plain.providers == ("CPUExecutionProvider",) and plain.notes == ()
    preferred = find_first_bad_layer(model, quant_model("cnn", "qdq"),
                                     providers=["NoSuchExecutionProvider", "CPUExecutionProvider"])
    assert preferred.providers == ("CPUExecutionProvider",) and preferred.layers == plain.layers
    assert preferred.notes == ("execution provider 'NoSuchExecutionProvider' is not available in this onnxruntime: "
                               "skipped, CPUExecutionProvider used instead",)
    with pytest.raises(ValueError, match="execution provider 'NoSuchExecutionProvider' is not available"):
        find_first_bad_layer(model, quant_model("cnn", "qdq"), providers="NoSuchExecutionProvider")
