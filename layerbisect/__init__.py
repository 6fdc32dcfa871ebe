"""layerbisect: find the layer where a quantized or optimized ONNX model stops agreeing with
its float original.

>>> from layerbisect import find_first_bad_layer
>>> report = find_first_bad_layer("model_fp32.onnx", "model_int8.onnx")  # doctest: +SKIP
>>> print(report)  # doctest: +SKIP
"""

from layerbisect.errors import LayerbisectError
from layerbisect.fallback import FloatFallback, keep_in_float
from layerbisect.find import find_first_bad_layer
from layerbisect.report import LayerComparison, Report
from layerbisect.simulate import simulated

__all__ = [
    "FloatFallback", "LayerComparison", "LayerbisectError", "Report", "find_first_bad_layer",
    "keep_in_float", "simulated",
]
__version__ = "0.1.0"
