"""Why a layer breaks, for QOperator and dynamic models: faults whose cause is known by
construction, planted in models onnxruntime quantized with QuantFormat.QOperator (QLinearConv,
QGemm ...) and with quantize_dynamic (DynamicQuantizeLinear + ConvInteger/MatMulInteger, and
DynamicQuantizeMatMul after onnxruntime's fusion); each is diagnosed in its QDQ form."""

import json
import os
import tempfile
from functools import lru_cache

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from layerbisect import diagnose, find_first_bad_layer
from layerbisect.qdqform import qdq_form

from models import corrupt_weights, make_cnn, make_transformer, output_cosines, quantize, random_inputs

THRESHOLD = 0.98
FEEDS = [random_inputs(make_cnn(), seed) for seed in range(3)]


@lru_cache(maxsize=None)
def qoperator() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    float_model = make_cnn()
    return float_model, quantize(float_model, "qoperator", activation_type="uint8", weight_type="int8")


@lru_cache(maxsize=None)
def dynamic_cnn() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    float_model = make_cnn()
    return float_model, quantize(float_model, "dynamic")


def scaled(model: onnx.ModelProto, name: str, factor: float) -> onnx.ModelProto:
    """A copy with the scale initializer ``name`` multiplied by ``factor``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    init = next(i for i in copy.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(init) * factor).astype(np.float32), name))
    return copy


def planted(fault: str) -> onnx.ModelProto:
    _, quant = qoperator()
    if fault == "saturation":  # QLinearConv conv2's y_scale 20 times too small: most values clip
        return scaled(quant, "conv2_scale", 0.05)
    if fault == "resolution":  # 60 times too large: the values fall on a few steps
        return scaled(quant, "conv2_scale", 60)
    # conv2's w_scale 40 times too large: its weights (and its int32 bias, whose scale is
    # x_scale * w_scale) dequantize 40 times too large, and its output clips
    return scaled(quant, "conv2.weight_scale", 40)


def make_mlp(outlier: float = 1000.0, seed: int = 0) -> onnx.ModelProto:
    """x [4,32] -> fc1 (MatMul) + fc1_add -> relu1 -> fc2 + fc2_add -> relu2 -> fc3 -> y [4,10]:
    relu1's channel 5 is ``outlier`` on every input (its bias), and fc2 reads it with a weight
    row ``outlier`` times smaller: it hardly changes fc2's result, but sets the range a
    per-tensor activation quantizer of relu1 must cover (LLM.int8's outlier features)."""
    rng = np.random.default_rng(seed)
    inits = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    w1, b1 = rng.standard_normal((32, 64)) / np.sqrt(32), rng.standard_normal(64) * 0.1
    w2 = rng.standard_normal((64, 32)) / np.sqrt(64)
    b1[5], w2[5] = outlier, w2[5] / outlier
    nodes = [
        helper.make_node("MatMul", ["x", const("fc1.weight", w1)], ["fc1"], name="fc1"),
        helper.make_node("Add", ["fc1", const("fc1.bias", b1)], ["fc1_add"], name="fc1_add"),
        helper.make_node("Relu", ["fc1_add"], ["relu1"], name="relu1"),
        helper.make_node("MatMul", ["relu1", const("fc2.weight", w2)], ["fc2"], name="fc2"),
        helper.make_node("Add", ["fc2", const("fc2.bias", rng.standard_normal(32) * 0.1)], ["fc2_add"], name="fc2_add"),
        helper.make_node("Relu", ["fc2_add"], ["relu2"], name="relu2"),
        helper.make_node("MatMul", ["relu2", const("fc3.weight", rng.standard_normal((32, 10)) / np.sqrt(32))], ["y"],
                         name="fc3"),
    ]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def ort_fused(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as onnxruntime's extended optimizations leave it (saved by onnxruntime)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(folder, "fused.onnx")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def assert_repairs(float_model, fix, feeds) -> None:
    """The fix verifies and repairs: the layer and every output below the threshold before,
    above it after, and the fixed model run again reaches it."""
    assert fix.verified and fix.repairs and fix.layer_before < THRESHOLD <= fix.layer_after
    assert all(before < THRESHOLD <= after for _, before, after in fix.outputs)
    assert min(output_cosines(float_model, fix.model, sample)["y"] for sample in feeds) >= THRESHOLD


@pytest.mark.parametrize("fault,cause,part,kind", [
    ("saturation", "saturation", "output", "percentile range"),
    ("resolution", "resolution", "output", "percentile range"),
    ("weight scale", "weights", "weights", "per-channel weights"),
])
def test_a_qoperator_fault_planted_is_named_and_the_recommended_fix_repairs_the_model(fault, cause, part, kind):
    float_model, _ = qoperator()
    report = diagnose(float_model, planted(fault), FEEDS, THRESHOLD)
    assert report.first_bad.float_nodes == ("conv2",) and report.first_bad_cause == "introduced"
    culprit = report.diagnosis.culprit
    assert (culprit.cause, culprit.quantizer.part, culprit.recommended.kind) == (cause, part, kind)
    assert report.diagnosis.form == "qoperator" and "diagnosed in its QDQ form" in report.diagnosis.notes[0]
    assert_repairs(float_model, culprit.recommended, FEEDS)
    assert "paste into quantize_static (quant_format=QuantFormat.QOperator):" in str(report)


def test_qoperator_saturation_and_resolution_are_told_apart_by_the_qlinearconvs_own_scale():
    float_model, _ = qoperator()
    saturated = diagnose(float_model, planted("saturation"), FEEDS).diagnosis.culprit
    coarse = diagnose(float_model, planted("resolution"), FEEDS).diagnosis.culprit
    for diagnosis in (saturated, coarse):  # the output part alone breaks the layer; the weights do not
        parts = {p.name: p.cosine for p in diagnosis.parts}
        assert parts["output"] < THRESHOLD <= parts["weights"]
    out = saturated.quantizer
    assert out.tensor == "conv2" and out.dtype == "uint8" and out.clipped > 0.5 and out.clip_energy > 0.99
    assert coarse.quantizer.clipped == 0 and (coarse.quantizer.float_max - coarse.quantizer.float_min) / \
        coarse.quantizer.scale < 4
    # QOperator operations take 8-bit integers: no 16-bit candidate
    assert {fix.kind for fix in saturated.fixes} == {"percentile range", "keep in float"}


def test_a_qoperator_weight_scale_off_by_a_factor_is_found_in_the_weights_though_each_part_alone_passes():
    """The weights alone, 40 times too large, scale the result (a cosine does not see it); the
    output alone is fine; together the output's range clips. The stored weights, dequantized,
    are not the float weights rounded: the cause is the weights."""
    float_model, _ = qoperator()
    culprit = diagnose(float_model, planted("weight scale"), FEEDS).diagnosis.culprit
    assert all(part.cosine >= THRESHOLD for part in culprit.parts) and culprit.isolated_cosine < THRESHOLD
    assert culprit.quantizer.tensor == "conv2.weight" and culprit.quantizer.excess > 1000
    fix = culprit.recommended
    assert fix.arguments == {"per_channel": True} and fix.overrides == {}


def test_qoperator_corrupt_weights_are_named_and_per_channel_weights_repair():
    float_model, quant = qoperator()
    report = diagnose(float_model, corrupt_weights(quant, "conv2_quant"), FEEDS)
    culprit = report.diagnosis.culprit
    assert culprit.cause == "weights" and culprit.quantizer.excess > 100
    assert_repairs(float_model, culprit.recommended, FEEDS)
    assert report.diagnosis.arguments() == {"per_channel": True}
    # the float model once and each fix once, per sample: the QDQ form costs no run of its own
    assert report.diagnosis.model_runs == len(FEEDS) * (1 + report.diagnosis.fixes_tried)
    assert "nodes_to_exclude=[],\nper_channel=True,\nextra_options={" in report.diagnosis.pasteable()


def test_a_qoperator_transformers_corrupt_qlinearmatmul_weights_are_named():
    float_model = make_transformer()
    quant = quantize(float_model, "qoperator", activation_type="uint8")
    feeds = [random_inputs(float_model, seed) for seed in range(3)]
    culprit = diagnose(float_model, corrupt_weights(quant, "o_proj_quant"), feeds).diagnosis.culprit
    assert culprit.layer.float_nodes == ("o_proj",) and culprit.cause == "weights"
    assert culprit.quantizer.tensor == "o.weight" and culprit.recommended.repairs


def test_the_pasted_settings_are_what_quantize_static_in_qoperator_format_applies():
    """The range override and the keep-in-float names, pasted into quantize_static with
    QuantFormat.QOperator: conv2's output gets that range; conv2 stays a float Conv."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    float_model, _ = qoperator()
    diagnosis = diagnose(float_model, planted("saturation"), FEEDS).diagnosis
    fixes = {fix.kind: fix for fix in diagnosis.culprit.fixes}
    entry = diagnosis.extra_options()["TensorQuantOverrides"]["conv2"][0]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.samples = iter(FEEDS)

        def get_next(self):
            return next(self.samples, None)

    with tempfile.TemporaryDirectory() as folder:
        onnx.save(float_model, f"{folder}/fp32.onnx")
        quantize_static(f"{folder}/fp32.onnx", f"{folder}/ranged.onnx", Reader(), quant_format=QuantFormat.QOperator,
                        activation_type=QuantType.QUInt8, extra_options=diagnosis.extra_options())
        quantize_static(f"{folder}/fp32.onnx", f"{folder}/excluded.onnx", Reader(), quant_format=QuantFormat.QOperator,
                        activation_type=QuantType.QUInt8, nodes_to_exclude=list(fixes["keep in float"].nodes_to_exclude))
        ranged, excluded = onnx.load(f"{folder}/ranged.onnx"), onnx.load(f"{folder}/excluded.onnx")
    scale = numpy_helper.to_array(next(i for i in ranged.graph.initializer if i.name == "conv2_scale"))
    assert scale == pytest.approx((entry["rmax"] - entry["rmin"]) / 255, rel=1e-3)
    assert fixes["keep in float"].nodes_to_exclude == ("conv2",)
    assert {node.op_type for node in excluded.graph.node if node.name.startswith("conv2")} == {"Conv"}


def test_the_qdq_form_computes_what_the_qoperator_and_dynamic_models_compute():
    """7-bit weights: kernels that compute the integer products exactly on every CPU."""
    for make in (make_cnn, make_transformer):
        float_model = make()
        feeds = [random_inputs(float_model, seed) for seed in range(2)]
        for fmt in ("qoperator", "dynamic"):
            quant = quantize(float_model, fmt, activation_type="uint8", reduce_range=True)
            form, rewritten = qdq_form(quant)
            onnx.checker.check_model(form)
            assert rewritten and not {n.op_type for n in form.graph.node} & {
                "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "ConvInteger", "MatMulInteger"}
            given, written = (find_first_bad_layer(float_model, m, feeds, quiet=True) for m in (quant, form))
            assert [layer.float_nodes for layer in given.layers] == [layer.float_nodes for layer in written.layers]
            for a, b in zip(given.layers, written.layers):
                assert a.cosine == pytest.approx(b.cosine, abs=1e-4)
                assert a.isolated_cosine == pytest.approx(b.isolated_cosine, abs=5e-4)


def test_a_dynamic_models_corrupt_int8_weights_are_named_and_per_channel_weights_repair():
    float_model, quant = dynamic_cnn()
    report = diagnose(float_model, corrupt_weights(quant, "conv2_quant"), FEEDS)
    culprit = report.diagnosis.culprit
    assert report.first_bad.float_nodes == ("conv2",) and report.diagnosis.form == "dynamic"
    assert culprit.cause == "weights" and culprit.quantizer.tensor == "conv2.weight"
    inputs = next(part for part in culprit.parts if part.name == "inputs")
    assert inputs.cosine >= THRESHOLD and inputs.quantizers[0].dynamic  # the run-time quantizer is healthy
    assert culprit.recommended.kind == "per-channel weights"
    assert_repairs(float_model, culprit.recommended, FEEDS)
    text = str(report)
    assert "paste into quantize_dynamic:\nnodes_to_exclude=[],\nper_channel=True," in text


def test_a_dynamic_gemms_weight_is_compared_with_the_float_gemms_transposed():
    """quantize_dynamic writes the Gemm fc as a MatMul of its weight transposed."""
    float_model, quant = dynamic_cnn()
    culprit = diagnose(float_model, corrupt_weights(quant, "fc_MatMul_quant"), FEEDS).diagnosis.culprit
    assert culprit.layer.float_nodes == ("fc",) and culprit.quantizer.tensor == "fc.weight"
    assert all(not np.isnan(part.cosine) for part in culprit.parts)
    assert culprit.recommended.kind == "per-channel weights" and culprit.recommended.repairs


@pytest.mark.parametrize("fused", [False, True])
def test_an_outlier_activation_breaks_a_dynamic_layer_by_resolution_and_only_float_repairs_it(fused):
    """relu1's outlier channel sets the range DynamicQuantizeLinear computes for fc2's input:
    the other values fall within a step of zero. Nothing sets a dynamic quantizer's range: the
    report says so, and keeping fc2 in float is the fix, verified, and verified again by
    quantize_dynamic with the pasted nodes_to_exclude."""
    float_model = make_mlp()
    quant = quantize(float_model, "dynamic")
    given = ort_fused(quant) if fused else quant
    if fused:
        assert {n.op_type for n in given.graph.node} >= {"DynamicQuantizeMatMul"}
    feeds = [random_inputs(float_model, seed) for seed in range(3)]
    report = diagnose(float_model, given, feeds)
    culprit = report.diagnosis.culprit
    assert "fc2" in culprit.layer.float_nodes and report.first_bad_cause == "introduced"
    assert (culprit.cause, culprit.quantizer.part, culprit.quantizer.tensor) == ("resolution", "inputs", "relu1")
    assert culprit.quantizer.dynamic and culprit.quantizer.clipped == 0 and culprit.quantizer.bulk_steps < 1
    parts = {p.name: p.cosine for p in culprit.parts}
    assert parts["inputs"] < THRESHOLD <= parts["weights"]
    assert [fix.kind for fix in culprit.fixes] == ["keep in float"]
    assert "no range or type can be set for a dynamic quantizer" in culprit.note and culprit.note in str(report)
    assert_repairs(float_model, culprit.recommended, feeds)
    assert report.diagnosis.nodes_to_exclude() == list(culprit.layer.float_nodes)
    # the pasted nodes_to_exclude, given to quantize_dynamic, repair the model
    from onnxruntime.quantization import quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        onnx.save(float_model, f"{folder}/fp32.onnx")
        quantize_dynamic(f"{folder}/fp32.onnx", f"{folder}/int8.onnx",
                         nodes_to_exclude=report.diagnosis.nodes_to_exclude(), **report.diagnosis.arguments())
        again = onnx.load(f"{folder}/int8.onnx")
    assert find_first_bad_layer(float_model, again, feeds, quiet=True)


def test_a_dynamic_diagnosis_renders_everywhere_and_its_json_holds_its_format_cause_and_arguments():
    float_model, quant = dynamic_cnn()
    report = diagnose(float_model, corrupt_weights(quant, "conv2_quant"), FEEDS)
    assert "<h3>Diagnosis</h3>" in report.to_html() and "per_channel=True" in report.to_html()
    frame = report.to_dataframe()
    assert frame.loc[3, "cause"] == "weights" and frame.loc[3, "fix"] == "per-channel weights"
    data = json.loads(report.to_json())
    assert data["diagnosis"]["format"] == "dynamic" and data["diagnosis"]["arguments"] == {"per_channel": True}
    first = data["first_bad"]["diagnosis"]
    assert first["cause"] == "weights" and {p["name"] for p in first["parts"]} == {"weights", "inputs"}
    assert next(p for p in first["parts"] if p["name"] == "inputs")["quantizers"][0]["dynamic"] is True
    assert first["fixes"][0]["arguments"] == {"per_channel": True} and first["fixes"][0]["repairs"]
