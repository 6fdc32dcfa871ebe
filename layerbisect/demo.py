"""A small model pair to try layerbisect on: the bundled example's, and the documentation's.

A float CNN (conv1/bn1/relu1, conv2/bn2/relu2, conv3/relu3, a pool and a Gemm, input "x"
[1, 3, 32, 32]), quantized to int8 QDQ by onnxruntime's static quantizer (uint8
activations, int8 weights, calibrated on sixteen seeded random images), with the int8 weights
of "conv2" negated: a broken layer that layerbisect should name.

>>> from layerbisect import demo, find_first_bad_layer
>>> fp32, int8 = demo.files()
>>> report = find_first_bad_layer(fp32, int8, inputs=demo.image())
>>> report.first_bad.float_nodes, report.first_bad_cause
(('conv2',), 'introduced')
"""

from __future__ import annotations

import atexit
import functools
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from layerbisect.report import Report

BROKEN = "conv2"
SHAPE = (1, 3, 32, 32)


def image(seed: int = 0) -> dict[str, np.ndarray]:
    """One seeded random input for the demo models: ``{"x": float32 [1, 3, 32, 32]}``.

    >>> image()["x"].shape
    (1, 3, 32, 32)
    """
    return {"x": np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)}


def float_model() -> onnx.ModelProto:
    """The float CNN (a new copy each call)."""
    return onnx.ModelProto.FromString(_float_bytes())


def quantized_model(broken: str | None = BROKEN, quant_format: str = "QDQ") -> onnx.ModelProto:
    """The CNN quantized to int8 by onnxruntime, in ``quant_format`` ("QDQ", or "QOperator":
    QLinearConv ...), the int8 weights of the Conv ``broken`` negated (None: none); a new copy
    each call."""
    model = onnx.ModelProto.FromString(_quantized_bytes(quant_format))
    if broken is not None:
        names = (broken, f"{broken}_quant")  # the QOperator quantizer renames the Conv
        conv = next(node for node in model.graph.node if node.name in names)
        weight_name = conv.input[3] if conv.op_type == "QLinearConv" else next(
            node for node in model.graph.node if node.output[0] == conv.input[1]).input[0]
        weight = next(init for init in model.graph.initializer if init.name == weight_name)
        weight.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(weight), weight.name))
    return model


def save(folder: str | Path) -> tuple[Path, Path]:
    """Write the float CNN and its broken int8 copy into ``folder`` as ``cnn_fp32.onnx`` and
    ``cnn_int8.onnx``; return their paths."""
    float_path, int8_path = Path(folder, "cnn_fp32.onnx"), Path(folder, "cnn_int8.onnx")
    onnx.save(float_model(), float_path)
    onnx.save(quantized_model(), int8_path)
    return float_path, int8_path


def dump(folder: str | Path, sample: dict[str, np.ndarray] | None = None) -> Path:
    """Run the broken int8 model on ``sample`` (default ``image()``) as a vendor tool dumps
    its tensors: the output of each operation but its quantization ones, written to
    ``folder`` as ``<name>.npy``; return ``folder``.

    >>> sorted(p.name for p in dump(scratch()).iterdir())[:4]
    ['conv1.npy', 'conv2.npy', 'flat.npy', 'pool.npy']
    """
    from layerbisect.dumps import sanitise
    from layerbisect.expose import expose
    from layerbisect.run import Session

    model = quantized_model()
    wanted = [out for node in model.graph.node if node.op_type not in ("QuantizeLinear", "DequantizeLinear")
              for out in node.output]
    values = Session(expose(model, wanted), "demo model").run(sample or image(), wanted)
    folder = Path(folder)
    for name, value in values.items():
        np.save(folder / f"{sanitise(name)}.npy", value)
    return folder


@functools.lru_cache(maxsize=1)
def report() -> Report:
    """``find_first_bad_layer`` on the demo models and ``image()``, made once: the report the
    documentation's examples show.

    >>> report().first_bad.float_nodes
    ('conv2',)
    """
    from layerbisect.find import find_first_bad_layer

    return find_first_bad_layer(*files(), inputs=image(), quiet=True)


def scratch() -> Path:
    """A new empty folder, removed when Python exits: where the documentation's examples write.

    >>> list(scratch().iterdir())
    []
    """
    folder = Path(tempfile.mkdtemp(prefix="layerbisect-demo-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@functools.lru_cache(maxsize=1)
def files() -> tuple[str, str]:
    """The two models saved once in a temporary folder, removed when Python exits."""
    float_path, int8_path = save(scratch())
    return str(float_path), str(int8_path)


@functools.lru_cache(maxsize=1)
def _float_bytes() -> bytes:
    rng = np.random.default_rng(0)
    nodes, weights = [], []

    def param(name: str, shape: tuple[int, ...], scale: float = 1.0) -> str:
        weights.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def positive(name: str, size: int) -> str:
        weights.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, size).astype(np.float32), name))
        return name

    def block(index: int, x: str, cin: int, cout: int, batchnorm: bool = True) -> str:
        name = f"conv{index}"
        w = param(f"{name}.w", (cout, cin, 3, 3), np.sqrt(2.0 / (cin * 9)))
        nodes.append(helper.make_node("Conv", [x, w, param(f"{name}.b", (cout,), 0.1)], [name], name=name,
                                      pads=[1, 1, 1, 1]))
        x = name
        if batchnorm:
            bn = f"bn{index}"
            stats = [positive(f"{bn}.scale", cout), param(f"{bn}.bias", (cout,), 0.1),
                     param(f"{bn}.mean", (cout,), 0.1), positive(f"{bn}.var", cout)]
            nodes.append(helper.make_node("BatchNormalization", [x, *stats], [bn], name=bn))
            x = bn
        nodes.append(helper.make_node("Relu", [x], [f"relu{index}"], name=f"relu{index}"))
        return f"relu{index}"

    x = block(3, block(2, block(1, "x", 3, 16), 16, 16), 16, 32, batchnorm=False)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"))
    nodes.append(helper.make_node("Gemm", ["flat", param("fc.w", (10, 32), 0.3), param("fc.b", (10,), 0.1)],
                                  ["y"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "demo_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


@functools.lru_cache(maxsize=2)
def _quantized_bytes(quant_format: str) -> bytes:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.samples = iter([image(seed) for seed in range(100, 116)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.samples, None)

    quantizer_log = logging.getLogger()  # onnxruntime's quantizer suggests pre-processing
    level = quantizer_log.level
    quantizer_log.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="layerbisect-demo-") as folder:
            float_path, int8_path = Path(folder, "fp32.onnx"), Path(folder, "int8.onnx")
            float_path.write_bytes(_float_bytes())
            quantize_static(float_path, int8_path, Calibration(), quant_format=getattr(QuantFormat, quant_format),
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            return int8_path.read_bytes()
    finally:
        quantizer_log.setLevel(level)
