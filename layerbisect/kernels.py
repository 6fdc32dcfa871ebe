"""Where onnxruntime's integer kernels on this CPU compute other values than the model says.

On x86 CPUs without VNNI, onnxruntime adds each two neighbouring uint8 x int8 products into an
int16 before widening (``run.int8_products_saturate`` measures it), so a weight of magnitude 65
or more, times a large activation, can clip. Quantizers avoid it with 7-bit weights
(onnxruntime's ``reduce_range=True``) or uint8 weights. A layer that breaks only on such a CPU
breaks in the kernel, not in the quantization: the report says so, and which operations are at
risk.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from layerbisect.load import tensor_array
from layerbisect.run import int8_products_saturate

# The weight input of integer-product operations, by (domain, op_type).
WEIGHTS = {
    ("", "QLinearConv"): 3, ("", "QLinearMatMul"): 3, ("", "MatMulInteger"): 1, ("", "ConvInteger"): 1,
    ("com.microsoft", "DynamicQuantizeMatMul"): 1, ("com.microsoft", "MatMulIntegerToFloat"): 1,
    ("com.microsoft", "QGemm"): 3, ("com.microsoft", "QAttention"): 1,
}
SAFE = 64  # 255 x 64 x 2 = 32640 fits an int16
CHUNK = 1 << 20  # weights are read this many at a time, up to the first one past SAFE


def saturation_note(model: onnx.ModelProto, providers: Sequence[str], suspects: Sequence[str] = ()) -> str | None:
    """A note naming the integer operations of ``model`` (QLinearConv, MatMulInteger, ...)
    whose int8 weights reach past 64 in magnitude, when onnxruntime's CPU kernels saturate
    here; None when nothing is at risk. The note says which of ``suspects`` (the operations
    of the first bad layer) are among them. Q/DQ groups run as written (``run`` keeps them
    unfused): only with ``ort_optimized=True`` are they integer operations, and named.
    """
    if "CPUExecutionProvider" not in providers:
        return None
    initializers = {init.name: init for init in model.graph.initializer}
    integer = [node for node in model.graph.node if _weight(node) in initializers]
    if not integer or not int8_products_saturate():
        return None
    risky = [node for node in integer if _at_risk(initializers[_weight(node)])]
    if not risky:
        return None
    named = [node.name for node in risky if node.name in suspects]
    first_bad = f", the first bad layer's {', '.join(map(repr, named))} among them" if named else ""
    return ("onnxruntime's int8 kernels on this CPU (x86 without VNNI) add uint8 x int8 products in pairs into "
            f"int16, which clips past 32767: {_some(risky)} run such kernels with int8 weights beyond ±{SAFE}"
            f"{first_bad}, so a layer they compute can lose accuracy here that it keeps on a VNNI CPU or an NPU; "
            "to tell the "
            "kernel's error from the quantization's, quantize with reduce_range=True (7-bit weights) or uint8 "
            "weights, or compare on a CPU with VNNI")


def _weight(node: onnx.NodeProto) -> str:
    """The name of ``node``'s weight input; "" (no tensor's name) when it has none."""
    index = WEIGHTS.get((node.domain or "", node.op_type))
    return node.input[index] if index is not None and len(node.input) > index else ""


def _at_risk(weights: onnx.TensorProto) -> bool:
    if weights.data_type != onnx.TensorProto.INT8:
        return False
    try:
        values = tensor_array(weights, mapped=True)
    except (OSError, ValueError):  # data handed over as a buffer, or unreadable: nothing said
        return False
    flat = values.reshape(-1)
    return any(int(np.abs(flat[start:start + CHUNK].astype(np.int16)).max()) > SAFE
               for start in range(0, flat.size, CHUNK))


def _some(nodes: list[onnx.NodeProto]) -> str:
    names = [node.name or node.output[0] for node in nodes]
    shown = ", ".join(repr(name) for name in names[:3])
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"{len(names)} operation{'s' if len(names) != 1 else ''} ({shown}{more})"
