"""layerbisect: find the layer where a quantized or optimized ONNX model stops agreeing with
its float original.

>>> from layerbisect import demo, find_first_bad_layer
>>> report = find_first_bad_layer(*demo.files(), inputs=demo.image())
>>> print(report.verdict)  # doctest: +ELLIPSIS
FAIL: first layer below cosine 0.98 is #2 Conv 'conv2' (cosine -0.99..., SQNR -6.0 dB), error introduced there; ...

The modules, in the order a comparison goes through them:

- load: ``load`` (models), ``inputs`` and ``datasets`` (samples), ``graph`` (the graph view),
  ``vocabulary``, and the ONNX facts written once: ``wiring`` (producers and consumers),
  ``layouts`` (NCHW/NHWC permutations), ``kernels`` (integer kernels that clip);
- the quantized side: a model, onnxruntime's fused graph (``run.ort_optimized``), the
  simulator (``simulate``), or a tensor source (``source``; dump folders in ``dumps``);
- align: ``align``, ``anchors``, ``weights``;
- measure: ``expose``, ``segment``, ``isolate``, ``run`` (the only onnxruntime importer),
  ``measure``, ``compare`` (the metrics);
- search: ``footprint`` (the memory plan: what a pass holds, the pieces that fit), ``cost``
  (each strategy's estimate), ``passes`` (scan and bisection, a pass at a time), ``search``
  (plain predicates);
- ``pipeline`` (load, plan inputs, align: the static part every entry point starts from) and
  ``find`` (the public function, which strings it all together);
- report: ``assemble`` (the one place a ``Report`` is built, for every side), ``report``
  (the records), ``summary``, ``text``, ``render``, ``explorer``;
- around them: ``fallback`` (keep in float), ``diagnosis`` (why a layer breaks, which fix
  repairs it), ``cli``/``command``, ``errors``, ``files``,
  ``options``, ``progress``.

The public names are imported when first used (PEP 562): ``import layerbisect`` does not load
onnx, onnxruntime or networkx, and ``from layerbisect import find_first_bad_layer`` does not
load ``keep_in_float``'s module.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from layerbisect.errors import LayerbisectError

# The progress log shows when asked for (``logging.getLogger("layerbisect").setLevel(logging.INFO)``,
# the CLI's -v), not because a library configured the root logger at INFO: onnxruntime's int4
# quantizer calls logging.basicConfig(level=INFO) when imported.
logging.getLogger("layerbisect").setLevel(logging.WARNING)

if TYPE_CHECKING:
    from layerbisect.diagnosis import Diagnoses, diagnose
    from layerbisect.fallback import FloatFallback, keep_in_float
    from layerbisect.find import find_first_bad_layer
    from layerbisect.report import LayerComparison, Report
    from layerbisect.simulate import simulated

_MODULES = {
    "Diagnoses": "layerbisect.diagnosis", "diagnose": "layerbisect.diagnosis",
    "FloatFallback": "layerbisect.fallback", "keep_in_float": "layerbisect.fallback",
    "find_first_bad_layer": "layerbisect.find", "LayerComparison": "layerbisect.report",
    "Report": "layerbisect.report", "simulated": "layerbisect.simulate",
}

__all__ = [
    "Diagnoses", "FloatFallback", "LayerComparison", "LayerbisectError", "Report", "diagnose",
    "find_first_bad_layer", "keep_in_float", "simulated",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module 'layerbisect' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULES[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
