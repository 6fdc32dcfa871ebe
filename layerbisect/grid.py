"""Quantization grids: integers that stand for ``(q - zero_point) * scale``, the one place
values go onto a grid and off it.

A grid's scale and zero point hold one value for the whole tensor, one per channel along
``axis`` (1-D parameters, as DequantizeLinear's per-axis form), or one per block of ``block``
elements along ``axis`` (parameters of the tensor's rank, as opset 21's blocked form and int4
weights have). ``dequantize`` computes in float32 by default, as onnxruntime's kernels do;
the diagnosis measures rounding error in float64.

>>> q = np.array([[0, 2], [4, 6]], np.int8)
>>> dequantize(q, np.array([0.5, 1.0]), np.array([2, 0], np.int8), axis=0).tolist()
[[-1.0, 0.0], [4.0, 6.0]]
>>> dequantize(np.array([[1, 2, 3, 4]], np.uint8), np.array([[1.0, 10.0]]), block=2).tolist()
[[1.0, 2.0, 30.0, 40.0]]
>>> quantize(np.array([-1.0, 0.26, 9.0]), np.array(0.5), np.array(0, np.int8)).tolist()
[-2, 1, 18]
"""

from __future__ import annotations

import numpy as np


def dequantize(stored: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None, axis: int = 1,
               block: int = 0, dtype: type = np.float32) -> np.ndarray:
    """``(stored - zero_point) * scale`` in ``dtype``, as a new array: the parameters per
    tensor, per channel along ``axis`` or, with ``block``, per block along ``axis``."""
    out: np.ndarray = np.array(stored, dtype=dtype)
    if zero_point is not None:
        out -= broadcastable(np.asarray(zero_point).astype(dtype), out.shape, axis, block)
    out *= broadcastable(np.asarray(scale).astype(dtype), out.shape, axis, block)
    return out


def quantize(values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int = 1) -> np.ndarray:
    """``values`` rounded onto the grid (half to even) and clipped to the range of
    ``zero_point``'s integer type, computed in float64; the parameters per tensor or per
    channel along ``axis``."""
    lo, hi = integer_range(zero_point.dtype)
    shape = np.shape(values)
    s = broadcastable(np.asarray(scale).astype(np.float64), shape, axis)
    zp = broadcastable(zero_point.astype(np.float64), shape, axis)
    return np.clip(np.rint(np.asarray(values, np.float64) / s) + zp, lo, hi).astype(zero_point.dtype)


def integer_range(dtype: np.dtype | type) -> tuple[int, int]:
    """The smallest and largest value of an integer type."""
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def unpack(data: np.ndarray, bits: int) -> np.ndarray:
    """Integers packed ``8 // bits`` to a byte, low bits first: one more axis, of each byte's."""
    return (data[..., None] >> (bits * np.arange(8 // bits))) & ((1 << bits) - 1)


def broadcastable(param: np.ndarray, shape: tuple[int, ...], axis: int, block: int = 0) -> np.ndarray:
    """A grid parameter (per tensor, per channel along ``axis``, or with ``block`` per block
    along ``axis``) shaped to broadcast over a tensor of ``shape``."""
    if block and param.ndim == len(shape) and param.ndim:
        axis %= len(shape)
        return np.repeat(param, block, axis=axis).take(np.arange(shape[axis]), axis=axis)
    if param.ndim == 1 and param.size > 1 and len(shape) > 1:
        expanded = [1] * len(shape)
        expanded[axis] = -1
        return param.reshape(expanded)
    return param
