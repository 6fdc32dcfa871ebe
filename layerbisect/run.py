"""Run a model with onnxruntime. This module is the only one that imports onnxruntime."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from layerbisect.errors import LayerbisectError, first_line
from layerbisect.inputs import Feeds

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)



class Session:
    """An onnxruntime session over an in-memory model, with errors that name the model.

    >>> from onnx import helper, TensorProto
    >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    >>> g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    >>> m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    >>> s = Session(m, "model")
    >>> s.run({"x": np.array([-1.0, 2.0], np.float32)}, ["y"])["y"]
    array([0., 2.], dtype=float32)
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        role: str,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        original: onnx.ModelProto | None = None,
    ) -> None:
        """``original`` is the model before exposing: on failure, it tells whose fault it is."""
        self.role = role
        unknown = [p for p in providers if p not in ort.get_available_providers()]
        if unknown:
            raise LayerbisectError(
                f"execution provider {unknown[0]!r} is not available in this onnxruntime; "
                f"available: {', '.join(ort.get_available_providers())}"
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Idle worker threads would otherwise spin and take the cores the comparison needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = _create(model, options, providers)
        except Exception as exc:
            if original is not None:
                try:
                    _create(original, options, providers)
                except Exception as plain:
                    exc = plain
                else:
                    raise LayerbisectError(
                        f"onnxruntime loads the {role} but not with its intermediate tensors "
                        f"exposed ({_first_line(exc)}); please report this model"
                    ) from None
            raise LayerbisectError(
                f"onnxruntime cannot load the {role}: {_first_line(exc)}"
            ) from None

    def run(self, feeds: Feeds, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run once and return the named outputs."""
        try:
            values = self.session.run(list(outputs), feeds)
        except Exception as exc:
            raise LayerbisectError(f"onnxruntime failed to run the {self.role}: {_first_line(exc)}") from None
        return dict(zip(outputs, values))


def ort_optimized(model: onnx.ModelProto, role: str, providers: Sequence[str] = DEFAULT_PROVIDERS) -> onnx.ModelProto:
    """The graph onnxruntime actually runs: ``model`` after its extended-level optimizations
    (QDQ groups fused into QLinear ops, Conv+activation into FusedConv, ...)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with tempfile.TemporaryDirectory(prefix="layerbisect-") as folder:
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        try:
            _create(model, options, providers)
        except Exception as exc:
            raise LayerbisectError(f"onnxruntime cannot load the {role}: {_first_line(exc)}") from None
        return onnx.load(options.optimized_model_filepath)


def _create(model: onnx.ModelProto, options: ort.SessionOptions, providers: Sequence[str]):
    return ort.InferenceSession(model.SerializeToString(), options, providers=list(providers))


def _first_line(exc: BaseException) -> str:
    """onnxruntime's message without its error code and C++ source location."""
    text = first_line(exc, limit=2000)
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    located = re.match(r"^\S+\.(?:cc|h|cpp):\d+ .*?\) ", text)
    if located:
        text = text[located.end():]
    if "Unsupported model IR version" in text:
        text += " (upgrade onnxruntime, or save the model with a lower ir_version)"
    return text[:400]
