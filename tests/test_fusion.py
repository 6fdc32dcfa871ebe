"""Issue 20: with ort_optimized, the report says which layers onnxruntime's optimized graph
computes differently from the quantized model as given, or that none differ."""

import re

from layerbisect import find_first_bad_layer
from layerbisect.run import ort_optimized

from models import make_cnn, make_transformer, quantize, random_inputs


def fusion_note(report) -> str:
    return next(note for note in report.notes if note.startswith("onnxruntime's optimized graph"))


def listed(note: str) -> set[int]:
    return {int(index) for index in re.findall(r"#(\d+) ", note)}


def test_the_layers_listed_are_those_whose_values_the_optimized_graph_changes():
    """onnxruntime's optimizer turns the Softmax of a QDQ transformer into a QLinearSoftmax (a
    table lookup, not DequantizeLinear, Softmax, QuantizeLinear as written) and drops the
    activation Q/DQ pairs around its decomposed GELU (33 QuantizeLinear -> 19): the layers from
    the Softmax on compute other values. They, and only they, are listed (the first ten, and a
    count): every other layer's cosine against the float model is the one the model as given
    has, to the last bit (7-bit weights, which the fused integer kernels compute exactly on
    every CPU)."""
    float_model = make_transformer()
    quant = quantize(float_model, "qdq", reduce_range=True)
    feeds = random_inputs(float_model)
    optimized = find_first_bad_layer(float_model, quant, feeds, ort_optimized=True)
    given = find_first_bad_layer(float_model, quant, feeds)
    note = fusion_note(optimized)
    assert [layer.float_nodes for layer in given.layers] == [layer.float_nodes for layer in optimized.layers]
    differ = {a.index for a, b in zip(optimized.layers, given.layers) if a.cosine != b.cosine}
    assert differ == set(range(15, 33)) and listed(note) == set(range(15, 25))
    assert "#15 Softmax 'softmax' (cosine 0.99998" in note and "18 layer(s) differently" in note
    assert "; and 8 more; the other layers compute the same values" in note
    assert optimized.executions == given.executions + 2  # both quantized graphs, once


def test_a_cnn_whose_qdq_groups_fuse_into_qlinearconv_computes_the_same_values():
    float_model = make_cnn()
    quant = quantize(float_model, "qdq", reduce_range=True)
    feeds = random_inputs(float_model)
    assert "QLinearConv" in {node.op_type for node in ort_optimized(quant, "quantized model").graph.node}
    optimized = find_first_bad_layer(float_model, quant, feeds, ort_optimized=True)
    given = find_first_bad_layer(float_model, quant, feeds)
    assert [a.cosine for a in optimized.layers] == [b.cosine for b in given.layers]
    assert fusion_note(optimized) == (
        "onnxruntime's optimized graph computes each of the 10 layers it shares with the quantized model as "
        "given as that model does (the same values on the first sample)")
    assert not any(note.startswith("onnxruntime's optimized graph") for note in given.notes)
