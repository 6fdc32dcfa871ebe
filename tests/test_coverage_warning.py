"""The command warns on stderr when too little of the float model could be aligned."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from layerbisect.cli import main


def chain(ops: list[str]) -> onnx.ModelProto:
    """x[1,4,8,8] -> Conv -> one unary operation after another -> y."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4, 1, 1)).astype(np.float32), "w")
    nodes, x = [helper.make_node("Conv", ["x", "w"], ["conv"], name="conv")], "conv"
    for index, op in enumerate(ops):
        nodes.append(helper.make_node(op, [x], [f"{op.lower()}{index}"], name=f"{op.lower()}{index}"))
        x = nodes[-1].output[0]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4, 8, 8])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def run(tmp_path, float_ops: list[str], other_ops: list[str], capsys) -> str:
    onnx.save(chain(float_ops), tmp_path / "float.onnx")
    onnx.save(chain(other_ops), tmp_path / "other.onnx")
    main([str(tmp_path / "float.onnx"), str(tmp_path / "other.onnx")])
    return capsys.readouterr().err


def test_low_coverage_warns_with_count_and_names(tmp_path, capsys):
    # 2 of 9 float operations have a counterpart
    err = run(tmp_path, ["Relu", "Sin", "Cos", "Exp", "Neg", "Abs", "Sign", "Tanh"], ["Relu"], capsys)
    assert "warning: only 22% of the float model's operations were aligned; 7 have no counterpart" in err
    assert "sin1, cos2, exp3, neg4, abs5, ..." in err


def test_coverage_of_80_percent_or_more_is_quiet(tmp_path, capsys):
    err = run(tmp_path, ["Relu", "Tanh", "Sigmoid", "Neg"], ["Relu", "Tanh", "Sigmoid"], capsys)
    assert "warning" not in err  # 4 of 5 aligned
