"""Whether two weighted operations hold the same weights, whatever quantizers and optimizers
did to them.

Rewrites that keep a network change its weights in known ways: BatchNorm folding scales each
output channel (by a negative factor where the BatchNorm's scale is negative), per-channel
quantization rounds each output channel on its own grid, integer operators keep raw integers
(scale left out, a per-channel zero point left in), fp16 and int4 round, a Gemm with transB
stores the transposed matrix. ``channel_agreement`` is blind to all of them: it compares each
output channel on its own, by absolute correlation (a scale, a sign and an offset per channel
change nothing), over the weight's fingerprint (its first values, ``graph.FINGERPRINT_SIZE``).
Two trainings of one architecture share no weights: their channels correlate by chance only.
"""

from __future__ import annotations

import math

import numpy as np

from layerbisect.graph import Op

# Fewer values per channel say nothing: the absolute correlation of k random values is about
# sqrt(2 / (pi (k - 1))), 0.27 at 10 values; at 2 it is always 1.
MIN_CHANNEL_VALUES = 8
# Below this median agreement over a model's weighted layers, its weights are not the float
# model's. Measured: the same weights quantized (QDQ, QOperator, dynamic, per tensor or per
# channel), BatchNorm-folded or in fp16 agree 0.9998 to 1.0 on the test CNN and transformer,
# MiniLM and PP-OCR, int4 per channel 0.994, silero-vad dynamic int8 0.988; another seed of the
# test CNN 0.12, of the transformer 0.14. A median: one corrupted layer (0.12 by itself) leaves
# it at 1.0.
UNRELATED_WEIGHTS = 0.5


def output_channels(fingerprint: np.ndarray | None, shape: tuple | None, role: str) -> np.ndarray | None:
    """The ``fingerprint`` of a weighted operation (``graph.Op``: its weight's ``shape`` and its
    ``role``) as one row per output channel, each holding that channel's weights within the
    fingerprint; None without a weight, or with fewer than ``MIN_CHANNEL_VALUES`` of them per
    channel.

    Conv weights are [out, in, kH, kW] (channels are rows), ConvTranspose [in, out, kH, kW],
    MatMul and Gemm [in, out] in the fingerprint's orientation (channels are columns). The
    fingerprint holds whole leading rows of the weight; a row it cuts short is left out.
    """
    if fingerprint is None or shape is None or len(shape) < 2 or 0 in shape:
        return None
    row = math.prod(shape[1:])
    rows = min(shape[0], fingerprint.size // row)
    head = fingerprint[: rows * row].reshape(rows, *shape[1:])
    if role == "Conv":
        channels = head.reshape(rows, -1)
    elif role == "ConvTranspose":
        channels = np.moveaxis(head, 1, 0).reshape(shape[1], -1)
    else:  # MatMul orientation: x @ W, the last axis holds the output channels
        channels = head.reshape(-1, shape[-1]).T
    return channels if channels.shape[1] >= MIN_CHANNEL_VALUES else None


def channel_agreement(a: Op, b: Op) -> float | None:
    """How much two weighted operations (``graph.Op``) hold the same weights:
    the mean, over the output channels both fingerprints hold, of the absolute correlation of
    a channel's weights in one with the same channel's in the other. 1.0 for one weight
    rescaled, rounded or stored in another orientation; 0.09 to 0.15 for unrelated weights of the
    test models' sizes. None when the weights cannot be compared (shapes differ, too few
    values per channel). Channels constant in both (pruned) are left out; one constant in only
    one agrees 0."""
    return agreement(standardized(a), standardized(b))


def standardized(op: Op) -> np.ndarray | None:
    """``op``'s ``output_channels`` with each channel centred and scaled to norm 1 (a constant
    channel left at zeros): what ``agreement`` compares, computed once for a node compared often."""
    return standardized_channels(output_channels(op.fingerprint, op.weight_shape, op.role))


def standardized_channels(channels: np.ndarray | None) -> np.ndarray | None:
    """``channels`` (``output_channels``), each centred and scaled to norm 1."""
    if channels is None:
        return None
    centred = channels - channels.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return np.divide(centred, norms, out=np.zeros_like(centred), where=norms > 0)


def agreement(x: np.ndarray | None, y: np.ndarray | None) -> float | None:
    """``channel_agreement`` of two ``standardized`` weights."""
    if x is None or y is None or x.shape != y.shape:
        return None
    either = x.any(axis=1) | y.any(axis=1)
    if not either.any():
        return None
    return float(np.abs(np.einsum("ij,ij->i", x, y))[either].mean())
