"""onnxruntime's int8 kernels on x86 CPUs without VNNI add uint8 x int8 products in pairs into
int16 and clip: the report says which integer operations are at risk, and the Q/DQ groups of a
model run as written, so that their values do not depend on what a pass exposes."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import layerbisect.kernels as kernels
from layerbisect import find_first_bad_layer
from layerbisect.compare import compare
from layerbisect.kernels import saturation_note
from layerbisect.run import Session, int8_products_saturate, ort_optimized

from models import corrupt_weights, make_cnn, quant_node_for, quantize, random_inputs

SATURATES = int8_products_saturate()
CPU = ("CPUExecutionProvider",)


def kernel_note(report) -> str | None:
    return next((note for note in report.notes if "without VNNI" in note), None)


@pytest.fixture
def saturating(monkeypatch):
    monkeypatch.setattr(kernels, "int8_products_saturate", lambda: True)


def test_the_integer_operations_with_full_range_weights_are_named_and_the_first_bad_layers_among_them(saturating):
    float_model = make_cnn()
    quant = quantize(float_model, "qoperator")
    broken = quant_node_for(quant, "conv2", float_model)
    report = find_first_bad_layer(float_model, corrupt_weights(quant, broken), random_inputs(float_model))
    assert report.first_bad.float_nodes == ("conv2",)
    assert kernel_note(report) == (
        "onnxruntime's int8 kernels on this CPU (x86 without VNNI) add uint8 x int8 products in pairs into int16, "
        "which clips past 32767: 4 operations ('conv1_quant', 'conv2_quant', 'conv3_quant' and 1 more) run such "
        "kernels with int8 weights beyond ±64, the first bad layer's 'conv2_quant' among them, so a layer they "
        "compute can lose accuracy here that it keeps on a VNNI CPU or an NPU; to tell the kernel's error from the "
        "quantization's, quantize with reduce_range=True (7-bit weights) or uint8 weights, or compare on a CPU "
        "with VNNI")


@pytest.mark.parametrize("fmt", ["qoperator", "dynamic"])
def test_seven_bit_weights_are_not_at_risk(saturating, fmt):
    float_model = make_cnn()
    quant = quantize(float_model, fmt, reduce_range=True)
    weights = [numpy_helper.to_array(init) for init in quant.graph.initializer
               if init.data_type == onnx.TensorProto.INT8 and len(init.dims) > 1]  # not the zero points
    assert weights and max(int(np.abs(w.astype(np.int16)).max()) for w in weights) <= 64
    assert saturation_note(quant, CPU) is None
    assert saturation_note(quantize(float_model, fmt), CPU) is not None


def test_q_dq_groups_are_named_only_when_onnxruntime_fuses_them(saturating):
    float_model = make_cnn()
    quant = quantize(float_model, "qdq")
    feeds = random_inputs(float_model)
    assert kernel_note(find_first_bad_layer(float_model, quant, feeds)) is None  # run as written
    note = kernel_note(find_first_bad_layer(float_model, quant, feeds, ort_optimized=True))
    assert note is not None and "operations ('conv1', 'conv3', 'fc') run such kernels" in note


def test_nothing_is_said_where_the_kernels_are_exact_or_the_cpu_provider_does_not_run(monkeypatch):
    quant = quantize(make_cnn(), "qoperator")
    assert saturation_note(quant, ("CUDAExecutionProvider",)) is None
    monkeypatch.setattr(kernels, "int8_products_saturate", lambda: False)
    assert saturation_note(quant, CPU) is None


@pytest.mark.skipif(not SATURATES, reason="this CPU's int8 kernels compute exactly (VNNI, or not x86)")
def test_on_this_cpu_full_range_weights_clip_and_seven_bit_ones_do_not():
    """The fused QLinearConv graph of a QDQ model computes what the model says only where the
    products fit int16."""
    float_model = make_cnn()
    feeds = random_inputs(float_model)
    for reduce_range, exact in [(False, False), (True, True)]:
        quant = quantize(float_model, "qdq", reduce_range=reduce_range)
        written = Session(quant, "quantized model").run(feeds, ["y"])["y"]
        fused = Session(ort_optimized(quant, "quantized model"), "optimized model").run(feeds, ["y"])["y"]
        assert (compare(written, fused).cosine > 0.99999) == exact


def test_a_q_dq_models_values_do_not_depend_on_what_is_exposed():
    """Exposing a group's inner tensor kept onnxruntime from fusing that group alone: values of a
    layer depended on the pass. Run as written, the model's output is the same either way."""
    float_model = make_cnn()
    quant = quantize(float_model, "qdq")
    feeds = random_inputs(float_model)
    inner = [node.output[0] for node in quant.graph.node if node.op_type == "DequantizeLinear"]
    alone = Session(quant, "quantized model").run(feeds, ["y"])["y"]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(quant)
    exposed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in inner)
    np.testing.assert_array_equal(Session(exposed, "quantized model").run(feeds, ["y"])["y"], alone)


def test_the_7_bit_fix_halves_a_layers_integers_at_twice_the_scale_as_reduce_range_does():
    from layerbisect.diagnosis import _seven_bit
    from layerbisect.pipeline import setup
    from layerbisect.qdqform import qdq_form

    float_model = make_cnn()
    form, _ = qdq_form(quantize(float_model, "qoperator"))
    alignment = setup(float_model, form).alignment
    pair = next(p for p in alignment.pairs if p.float_nodes == ("conv2",))
    fixed = _seven_bit(form, pair)

    def weights(model):
        constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
        dq = next(node for node in model.graph.node if node.op_type == "DequantizeLinear"
                  and constants.get(node.input[0], np.zeros(0)).ndim == 4 and "conv2" in node.name)
        stored, scale = constants[dq.input[0]], constants[dq.input[1]]
        return stored, scale, stored.astype(np.float64) * scale

    stored, scale, before = weights(form)
    seven, doubled, after = weights(fixed)
    assert np.abs(stored).max() > 64 >= np.abs(seven).max()
    np.testing.assert_array_equal(doubled, 2 * scale)
    assert np.abs(after - before).max() <= scale.max() * 1.0001  # half a 7-bit step
