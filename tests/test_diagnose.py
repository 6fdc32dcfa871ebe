"""Why a layer breaks and which fix repairs it: faults whose cause is known by construction,
planted in the CNN as onnxruntime quantized it (QDQ, uint8 activations, int8 weights)."""

import json
from functools import lru_cache

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from layerbisect import LayerbisectError, diagnose, find_first_bad_layer
from layerbisect.cli import main

from models import corrupt_weights, make_cnn, output_cosines, quantize, random_inputs

THRESHOLD = 0.98


@lru_cache(maxsize=None)
def models():
    float_model = make_cnn()
    return float_model, quantize(float_model, "qdq", activation_type="uint8", weight_type="int8")


FEEDS = [random_inputs(make_cnn(), seed) for seed in range(3)]


def scaled(model: onnx.ModelProto, name: str, factor: float) -> onnx.ModelProto:
    """A copy with the scale initializer ``name`` (read by one QuantizeLinear/DequantizeLinear
    pair) multiplied by ``factor``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    init = next(i for i in copy.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(init) * factor).astype(np.float32), name))
    return copy


def coarse_weights(model: onnx.ModelProto, float_model: onnx.ModelProto, weight: str, factor: float):
    """A copy whose int8 weight ``weight`` is quantized again from the float weight with its scale
    ``factor`` times too large, as a quantizer with a far too wide weight range would."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    inits = {i.name: i for i in copy.graph.initializer}
    scale = numpy_helper.to_array(inits[f"{weight}_scale"]) * factor
    values = numpy_helper.to_array(next(i for i in float_model.graph.initializer if i.name == weight))
    inits[f"{weight}_scale"].CopyFrom(numpy_helper.from_array(scale.astype(np.float32), f"{weight}_scale"))
    stored = np.clip(np.rint(values / scale), -127, 127).astype(np.int8)
    inits[f"{weight}_quantized"].CopyFrom(numpy_helper.from_array(stored, f"{weight}_quantized"))
    return copy


def planted(fault: str) -> onnx.ModelProto:
    float_model, quant = models()
    if fault == "saturation":  # conv2's output range 20 times too narrow: most values clip
        return scaled(quant, "conv2_scale", 0.05)
    if fault == "resolution":  # 60 times too wide: the values fall on a few steps of the grid
        return scaled(quant, "conv2_scale", 60)
    if fault == "coarse weights":  # conv2 weight scale 40 times too large, weights rounded to it
        return coarse_weights(quant, float_model, "conv2.weight", 40)
    return corrupt_weights(quant, "conv2")  # integers replaced: the weights are not the float ones


@pytest.mark.parametrize("fault,cause,part", [
    ("saturation", "saturation", "output"), ("resolution", "resolution", "output"),
    ("coarse weights", "weights", "weights"), ("corrupt weights", "weights", "weights"),
])
def test_the_cause_planted_is_named_and_the_recommended_fix_repairs_the_model(fault, cause, part):
    float_model, _ = models()
    report = diagnose(float_model, planted(fault), FEEDS, THRESHOLD)
    assert report.first_bad.float_nodes == ("conv2",) and report.first_bad_cause == "introduced"
    culprit = report.diagnosis.culprit
    assert culprit.layer.float_nodes == ("conv2",) and culprit.cause == cause
    assert culprit.quantizer.part == part
    parts = {p.name: p.cosine for p in culprit.parts}
    assert parts[part] < THRESHOLD <= min(c for name, c in parts.items() if name != part)
    fix = culprit.recommended
    assert fix.verified and fix.repairs and fix.layer_before < THRESHOLD <= fix.layer_after
    assert all(before < THRESHOLD <= after for _, before, after in fix.outputs)
    assert min(output_cosines(float_model, fix.model, feeds)["y"] for feeds in FEEDS) >= THRESHOLD  # run again


def test_saturation_and_resolution_are_told_apart_by_the_quantizers_own_numbers():
    float_model, _ = models()
    saturated = diagnose(float_model, planted("saturation"), FEEDS).diagnosis.culprit.quantizer
    coarse = diagnose(float_model, planted("resolution"), FEEDS).diagnosis.culprit.quantizer
    assert saturated.tensor == coarse.tensor == "conv2" and saturated.dtype == "uint8"
    # too narrow: most values lie outside the range, and clipping makes nearly all the error
    assert saturated.clipped > 0.5 and saturated.clip_energy > 0.99
    assert saturated.range_max - saturated.range_min < (saturated.float_max - saturated.float_min) / 10
    # too wide: nothing clips, the float range spans a few steps
    assert coarse.clipped == 0 and coarse.clip_energy == 0
    assert (coarse.float_max - coarse.float_min) / coarse.scale < 4


def test_weights_holding_more_than_rounding_error_are_said_to():
    float_model, _ = models()
    corrupt = diagnose(float_model, planted("corrupt weights"), FEEDS).diagnosis.culprit.quantizer
    coarse = diagnose(float_model, planted("coarse weights"), FEEDS).diagnosis.culprit.quantizer
    assert corrupt.tensor == coarse.tensor == "conv2.weight"
    assert corrupt.excess > 100  # the integers are not the float weights rounded
    assert coarse.excess < 2 and coarse.reason == "resolution"  # rounded, to a grid far too coarse
    healthy = diagnose(float_model, planted("saturation"), FEEDS).diagnosis.culprit
    weights = next(p for p in healthy.parts if p.name == "weights").quantizers[0]
    assert weights.excess <= 1.0 and weights.clipped == 0


def test_every_part_quantized_measures_the_reports_isolated_cosine():
    float_model, _ = models()
    report = diagnose(float_model, planted("saturation"), FEEDS)
    for diagnosis in report.diagnosis.layers:
        assert diagnosis.isolated_cosine == pytest.approx(diagnosis.layer.isolated_cosine, abs=1e-6)


def test_the_graph_input_quantizer_is_a_part_of_the_first_layer():
    float_model, quant = models()
    broken = scaled(quant, "x_scale", 0.05)  # the input x clips
    report = diagnose(float_model, broken, FEEDS)
    culprit = report.diagnosis.culprit
    assert culprit.layer.float_nodes == ("conv1",)
    assert (culprit.cause, culprit.quantizer.part, culprit.quantizer.tensor) == ("saturation", "inputs", "x")
    assert culprit.recommended.repairs and culprit.recommended.overrides == {
        "x": {"rmin": pytest.approx(culprit.recommended.overrides["x"]["rmin"]),
              "rmax": pytest.approx(culprit.recommended.overrides["x"]["rmax"])}}


def test_a_fix_that_does_not_verify_is_reported_failing_and_not_recommended():
    """At a threshold no 8-bit range reaches, the healthy model's first layer errs by rounding
    alone: the percentile range fails, 16-bit verifies and is recommended."""
    float_model, quant = models()
    report = diagnose(float_model, quant, FEEDS, 0.99995, top=1)
    assert report.diagnosis.culprit.layer.float_nodes == ("conv1",)
    assert report.diagnosis.culprit.cause == "resolution"
    fixes = {fix.kind: fix for fix in report.diagnosis.culprit.fixes}
    assert not fixes["percentile range"].verified and fixes["percentile range"].isolated_after < 0.99995
    assert fixes["16-bit"].verified and fixes["16-bit"].precision == "uint16"
    assert fixes["16-bit"].isolated_after >= 0.99995
    assert report.diagnosis.culprit.recommended.kind == "16-bit"
    assert "FAILS: uint8 range" in str(report)


def test_two_faults_each_fix_verifies_and_only_both_repair():
    float_model, _ = models()
    broken = corrupt_weights(planted("saturation"), "conv3")
    report = diagnose(float_model, broken, FEEDS)
    diagnosed = {d.layer.float_nodes: d for d in report.diagnosis.layers}
    assert set(diagnosed) == {("conv2",), ("conv3", "relu4")}
    assert diagnosed[("conv2",)].cause == "saturation" and diagnosed[("conv3", "relu4")].cause == "weights"
    for diagnosis in diagnosed.values():  # each verifies alone; no one repairs the outputs alone
        assert diagnosis.recommended.verified and not diagnosis.recommended.repairs
    assert report.diagnosis.vendor_config() == [
        {"float_nodes": list(d.layer.float_nodes), "tensor": d.recommended.tensor,
         "precision": d.recommended.precision, "cause": d.cause} for d in report.diagnosis.layers]


def test_the_json_holds_the_cause_the_parts_and_the_verified_fixes():
    float_model, _ = models()
    data = json.loads(diagnose(float_model, planted("resolution"), FEEDS).to_json())
    diagnosis = data["first_bad"]["diagnosis"]
    assert diagnosis["cause"] == "resolution" and diagnosis["layer"] == "conv2"
    assert {p["name"] for p in diagnosis["parts"]} == {"weights", "output"}
    assert diagnosis["parts"][1]["quantizers"][0]["reason"] == "resolution"
    fix = diagnosis["fixes"][0]
    assert fix["kind"] == "percentile range" and fix["verified"] and fix["layer_before"] < 0.98 <= fix["layer_after"]
    assert fix["outputs"][0][0] == "y" and fix["outputs"][0][1] < 0.98 <= fix["outputs"][0][2]
    assert diagnosis["recommended"] == "percentile range"
    assert data["diagnosis"]["tensor_quant_overrides"] == {"conv2": [fix["overrides"]["conv2"]]}


def test_the_pasteable_settings_name_onnxruntime_types_and_the_nodes_to_exclude():
    float_model, quant = models()
    report = diagnose(float_model, quant, FEEDS, 0.99995, top=1)
    text = report.diagnosis.pasteable()
    assert "'conv1': [{'quant_type': QuantType.QUInt16, 'rmin': np.float32(" in text
    assert text.startswith("nodes_to_exclude=[]")
    from onnxruntime.quantization import QuantType

    code = text.split("# per-layer")[0]  # the keyword arguments, as pasted into a call
    pasted = eval(f"dict({code})", {"QuantType": QuantType, "np": np})
    assert pasted["nodes_to_exclude"] == [] and "conv1" in pasted["extra_options"]["TensorQuantOverrides"]
    overrides = report.diagnosis.tensor_quant_overrides()
    assert overrides["conv1"][0]["quant_type"] == "QUInt16" and overrides["conv1"][0]["rmin"] < 0
    entry = report.diagnosis.extra_options()["TensorQuantOverrides"]["conv1"][0]
    assert entry["quant_type"] is QuantType.QUInt16 and entry["rmin"].dtype == np.float32
    assert json.loads(text.split("# per-layer precision for vendor tools:\n")[1])[0] == {
        "float_nodes": ["conv1"], "tensor": "conv1", "precision": "uint16", "cause": "resolution"}


def test_the_diagnosis_costs_at_most_two_model_runs_per_candidate_fix():
    float_model, _ = models()
    report = diagnose(float_model, planted("saturation"), FEEDS)
    diagnosis = report.diagnosis
    # the float model once and each fix once, per sample; the quantized model's cosines are the report's
    assert diagnosis.model_runs == len(FEEDS) * (1 + diagnosis.fixes_tried)
    assert diagnosis.model_runs <= 2 * diagnosis.fixes_tried * len(FEEDS)
    fix = diagnosis.culprit.fixes[0]  # the before cosines, measured by the report
    assert fix.layer_before == report.first_bad.cosine and fix.outputs[0][1] == report.layers[-1].cosine


def test_the_report_renders_the_diagnosis_everywhere():
    float_model, _ = models()
    report = diagnose(float_model, planted("saturation"), FEEDS)
    text = str(report)
    assert "cause: saturation (output 'conv2')" in text and "recommended: uint8 range" in text
    html = report.to_html()
    assert "<h3>Diagnosis</h3>" in html and 'aria-label="cosine of each part alone"' in html
    frame = report.to_dataframe()
    assert frame.loc[2, "cause"] == "saturation" and frame.loc[2, "fix"] == "percentile range"
    assert frame["cause"].isna().sum() == len(frame) - 1


def test_a_given_report_is_diagnosed_without_being_made_again():
    float_model, _ = models()
    broken = planted("resolution")
    report = find_first_bad_layer(float_model, broken, FEEDS)
    diagnosed = diagnose(float_model, broken, FEEDS, report=report)
    assert diagnosed.layers == report.layers and diagnosed.diagnosis.culprit.cause == "resolution"


def test_a_healthy_model_has_nothing_to_diagnose():
    float_model, quant = models()
    report = diagnose(float_model, quant, FEEDS)
    assert report and report.diagnosis.layers == () and "nothing to diagnose" in str(report)


def test_models_with_no_quantizer_are_refused_with_what_to_do():
    float_model, _ = models()
    with pytest.raises(LayerbisectError, match="needs a quantized model.*this one has none"):
        diagnose(float_model, float_model, FEEDS)
    with pytest.raises(LayerbisectError, match="has no isolated error"):
        diagnose(float_model, planted("saturation"), FEEDS,
                 report=find_first_bad_layer(float_model, planted("saturation"), FEEDS, isolated=False))


def test_the_command_diagnoses_and_writes_the_diagnosis_into_the_json(tmp_path, capsys):
    float_model, _ = models()
    onnx.save(float_model, tmp_path / "fp32.onnx")
    onnx.save(planted("saturation"), tmp_path / "int8.onnx")
    np.savez(tmp_path / "feeds.npz", **FEEDS[0])
    out = tmp_path / "report.json"
    status = main([str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx"), "--inputs", str(tmp_path / "feeds.npz"),
                   "--diagnose", "--json", str(out)])
    assert status == 1
    text = capsys.readouterr().out
    assert "cause: saturation (output 'conv2')" in text and "paste into quantize_static:" in text
    diagnosis = json.loads(out.read_text())["first_bad"]["diagnosis"]
    assert diagnosis["cause"] == "saturation" and diagnosis["fixes"][0]["repairs"]


def test_the_command_refuses_to_diagnose_without_isolated_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx"), "--diagnose", "--no-isolated"])
    assert exit_info.value.code == 2 and "--diagnose needs the isolated error" in capsys.readouterr().err


def test_a_real_model_that_uint8_breaks_is_diagnosed_and_the_culprits_fix_verifies():
    """silero-vad, quantized to QDQ uint8 by onnxruntime with no fault planted: its LSTM state
    collapses. The culprit's per-tensor weight scale is set by one channel; per-channel
    weights verify. (The integration extra; skipped without it.)"""
    real_models = pytest.importorskip("real_models")
    try:
        path = real_models.silero_path("ifless")
    except real_models.ModelUnavailable as exc:
        pytest.skip(str(exc))
    model = real_models.inline_taken_branch(real_models.drop_value_info(real_models.fold_sample_rate(onnx.load(path))))
    quant = quantize(model, "qdq", activation_type="uint8",
                     calibration_inputs=[real_models.audio_sample(100 + seed) for seed in range(8)])
    report = diagnose(model, quant, [real_models.audio_sample(seed) for seed in range(3)])
    culprit = report.diagnosis.culprit
    assert culprit.layer.float_nodes == ("node_conv1d_1", "node_relu") and culprit.cause == "weights"
    assert "sets the per-tensor scale" in culprit.quantizer.outlier
    assert culprit.recommended.kind == "per-channel weights" and culprit.recommended.isolated_after > 0.999
    worst = report.diagnosis.layers[0]  # its weights and its output range both break it
    assert worst.layer.float_nodes == ("node_conv1d_4", "node_relu_3") and worst.recommended.kind == "combined"
    state = next(after for name, before, after in worst.recommended.outputs if name == "stateN")
    assert state > 0.8


def test_weights_folded_from_a_batchnorm_are_compared_with_the_float_ones_folded():
    """onnxruntime's pre-processing folds each BatchNorm into its Conv: the float twin of the
    quantized weight is the float Conv's weight and BatchNorm folded, not the float Conv's."""
    import tempfile

    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_model, _ = models()
    with tempfile.TemporaryDirectory() as folder:
        onnx.save(float_model, f"{folder}/fp32.onnx")
        quant_pre_process(f"{folder}/fp32.onnx", f"{folder}/pre.onnx", skip_symbolic_shape=True)
        folded = quantize(onnx.load(f"{folder}/pre.onnx"), "qdq", activation_type="uint8")
    assert "BatchNormalization" not in {node.op_type for node in folded.graph.node}
    healthy = diagnose(float_model, folded, FEEDS, 0.99995, top=1).diagnosis.culprit
    weights = next(part for part in healthy.parts if part.name == "weights")
    assert weights.cosine > 0.9999 and weights.quantizers[0].excess < 2  # the folded float weights, rounded
    culprit = diagnose(float_model, corrupt_weights(folded, "conv2"), FEEDS).diagnosis.culprit
    assert culprit.layer.float_nodes == ("conv2", "bn2", "relu2") and culprit.cause == "weights"
    assert culprit.recommended.kind == "per-channel weights" and culprit.recommended.repairs


def test_a_bisected_report_is_diagnosed_running_the_quantized_model_for_what_it_did_not_measure():
    float_model, _ = models()
    broken = planted("saturation")
    report = find_first_bad_layer(float_model, broken, FEEDS, strategy="bisect")
    assert len(report.layers) < report.aligned and "y" not in {layer.float_tensor for layer in report.layers}
    diagnosis = diagnose(float_model, broken, FEEDS, report=report).diagnosis
    assert diagnosis.culprit.cause == "saturation" and diagnosis.culprit.recommended.repairs
    assert diagnosis.model_runs == len(FEEDS) * (2 + diagnosis.fixes_tried)  # the quantized model once more
    assert diagnosis.culprit.recommended.outputs[0][1] < THRESHOLD
