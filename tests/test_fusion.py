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
    """onnxruntime's optimizer drops the activation Q/DQ pairs around the decomposed GELU of a
    QDQ transformer (33 QuantizeLinear -> 19; MatMul and Softmax become QLinearMatMul and
    QLinearSoftmax, which compute the same values): the layers from the GELU's Add on compute
    other values. They, and only they, are listed: every other layer's cosine against the float
    model is the one the model as given has, to the last bit."""
    float_model = make_transformer()
    quant = quantize(float_model, "qdq")
    feeds = random_inputs(float_model)
    optimized = find_first_bad_layer(float_model, quant, feeds, ort_optimized=True)
    given = find_first_bad_layer(float_model, quant, feeds)
    note = fusion_note(optimized)
    assert [layer.float_nodes for layer in given.layers] == [layer.float_nodes for layer in optimized.layers]
    differ = {a.index for a, b in zip(optimized.layers, given.layers) if a.cosine != b.cosine}
    assert listed(note) == differ == set(range(27, 33))
    assert "#27 Add 'gelu_add' (cosine 0.99999" in note and "6 layer(s) differently" in note
    assert optimized.executions == given.executions + 2  # both quantized graphs, once


def test_a_cnn_whose_qdq_groups_fuse_into_qlinearconv_computes_the_same_values():
    float_model = make_cnn()
    quant = quantize(float_model, "qdq")
    feeds = random_inputs(float_model)
    assert "QLinearConv" in {node.op_type for node in ort_optimized(quant, "quantized model").graph.node}
    optimized = find_first_bad_layer(float_model, quant, feeds, ort_optimized=True)
    given = find_first_bad_layer(float_model, quant, feeds)
    assert [a.cosine for a in optimized.layers] == [b.cosine for b in given.layers]
    assert fusion_note(optimized) == (
        "onnxruntime's optimized graph computes each of the 10 layers it shares with the quantized model as "
        "given as that model does (the same values on the first sample)")
    assert not any(note.startswith("onnxruntime's optimized graph") for note in given.notes)
