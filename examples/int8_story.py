"""The int8 story: quantize_dynamic shrinks a model, its output drifts, the report says where.

A small MLP classifier has one layer ("fc2") whose weights hold a few large outliers, as
trained layers sometimes do (here on inputs that never fire, so in float they do no harm).
onnxruntime's dynamic quantization stores each weight matrix as int8 with one scale per
tensor, so the outliers set the scale and the ordinary weights of fc2 are rounded to a
handful of levels. The model gets four times smaller; its output drifts; the
report names fc2.

    python examples/int8_story.py
"""

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from layerbisect import find_first_bad_layer

logging.getLogger().setLevel(logging.ERROR)
rng = np.random.default_rng(0)
WIDTHS = [64, 256, 256, 256, 10]
OUTLIER = 10.0


def build_mlp() -> onnx.ModelProto:
    """x[8,64] -> (MatMul + Add + Relu) x 3 -> MatMul + Add -> y[8,10]."""
    nodes, weights, x = [], [], "x"
    for index, (fan_in, fan_out) in enumerate(zip(WIDTHS, WIDTHS[1:]), start=1):
        w = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = np.zeros(fan_out, np.float32)
        if index == 1:
            b[:4] = -100.0  # four units of fc1 that never fire
        if index == 2:
            w[:4, :4] = OUTLIER  # large weights on those dead units: they only set the int8 scale
        weights += [numpy_helper.from_array(w, f"fc{index}.w"), numpy_helper.from_array(b, f"fc{index}.b")]
        nodes += [helper.make_node("MatMul", [x, f"fc{index}.w"], [f"fc{index}.mm"], name=f"fc{index}"),
                  helper.make_node("Add", [f"fc{index}.mm", f"fc{index}.b"], [f"fc{index}.out"],
                                   name=f"fc{index}_bias")]
        x = f"fc{index}.out"
        if index < len(WIDTHS) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"act{index}"], name=f"act{index}"))
            x = f"act{index}"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 10])], weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


with tempfile.TemporaryDirectory() as folder:
    float_path, int8_path = Path(folder, "mlp_fp32.onnx"), Path(folder, "mlp_int8.onnx")
    onnx.save(build_mlp(), float_path)
    quantize_dynamic(float_path, int8_path, weight_type=QuantType.QInt8)
    sizes = [path.stat().st_size / 1024 for path in (float_path, int8_path)]
    print(f"float model {sizes[0]:.0f} KiB -> int8 model {sizes[1]:.0f} KiB")

    batch = {"x": rng.standard_normal((8, 64)).astype(np.float32)}
    report = find_first_bad_layer(float_path, int8_path, inputs=batch, threshold=0.98)
    print(report)
