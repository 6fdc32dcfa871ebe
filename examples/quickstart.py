"""Quick start: a float CNN, its int8 copy with one broken layer, and the report that names it.

Builds a small CNN with onnx.helper, quantizes it to QDQ int8 with onnxruntime's static
quantizer, corrupts the int8 weights of one convolution ("conv2"), then asks layerbisect
where the quantized model stops agreeing with the float one, whether the error starts there,
and which layers to keep in float to repair it.

    python examples/quickstart.py
"""

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from layerbisect import find_first_bad_layer, keep_in_float

rng = np.random.default_rng(0)
logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantizer suggests pre-processing


def build_float_model() -> onnx.ModelProto:
    """x[1,3,32,32] -> conv1/bn1/relu1 -> conv2/bn2/relu2 -> conv3/relu3 -> pool -> fc -> y[1,10]."""
    nodes, weights = [], []

    def param(name, shape, scale=1.0):
        weights.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def positive(name, size):
        weights.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, size).astype(np.float32), name))
        return name

    def conv_block(index, x, cin, cout, batchnorm=True):
        name = f"conv{index}"
        w = param(f"{name}.w", (cout, cin, 3, 3), np.sqrt(2.0 / (cin * 9)))
        bias = param(f"{name}.b", (cout,), 0.1)
        nodes.append(helper.make_node("Conv", [x, w, bias], [name], name=name, pads=[1, 1, 1, 1]))
        x = name
        if batchnorm:
            bn = f"bn{index}"
            stats = [positive(f"{bn}.scale", cout), param(f"{bn}.bias", (cout,), 0.1),
                     param(f"{bn}.mean", (cout,), 0.1), positive(f"{bn}.var", cout)]
            nodes.append(helper.make_node("BatchNormalization", [x, *stats], [bn], name=bn))
            x = bn
        nodes.append(helper.make_node("Relu", [x], [f"relu{index}"], name=f"relu{index}"))
        return f"relu{index}"

    x = conv_block(1, "x", 3, 16)
    x = conv_block(2, x, 16, 16)
    x = conv_block(3, x, 16, 32, batchnorm=False)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"))
    fc = [param("fc.w", (10, 32), 0.3), param("fc.b", (10,), 0.1)]
    nodes.append(helper.make_node("Gemm", ["flat", *fc], ["y"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "quickstart_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


class Calibration(CalibrationDataReader):
    """Sixteen random images for onnxruntime's calibrator."""

    def __init__(self):
        self.samples = iter([{"x": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(16)])

    def get_next(self):
        return next(self.samples, None)


def break_layer(model: onnx.ModelProto, node_name: str) -> None:
    """Flip the sign of the int8 weights of one Conv of a QDQ model, in place."""
    conv = next(node for node in model.graph.node if node.name == node_name)
    dequantize = next(node for node in model.graph.node if node.output[0] == conv.input[1])
    weight = next(init for init in model.graph.initializer if init.name == dequantize.input[0])
    weight.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(weight), weight.name))


def save_models(folder) -> tuple[Path, Path]:
    """Write the float CNN and its int8 copy with a broken conv2 into ``folder``; return their paths."""
    float_path, int8_path = Path(folder, "cnn_fp32.onnx"), Path(folder, "cnn_int8.onnx")
    onnx.save(build_float_model(), float_path)
    quantize_static(float_path, int8_path, Calibration(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    int8 = onnx.load(int8_path)
    break_layer(int8, "conv2")
    onnx.save(int8, int8_path)
    return float_path, int8_path


def main() -> None:
    """Save the models in a temporary folder and print the report and the repair."""
    with tempfile.TemporaryDirectory() as folder:
        float_path, int8_path = save_models(folder)
        image = {"x": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)}
        report = find_first_bad_layer(float_path, int8_path, inputs=image, threshold=0.98)
        print(report)
        print()
        print("first bad layer:", report.first_bad.float_nodes if report.first_bad else None)
        print()
        print(keep_in_float(float_path, int8_path, inputs=image, threshold=0.98))


if __name__ == "__main__":
    main()
