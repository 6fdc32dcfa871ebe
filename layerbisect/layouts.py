"""Axis permutations between layouts: channels first (NCHW) and channels last (NHWC).

A permutation is what ``numpy.transpose`` takes, None standing for no permutation (the layout
unchanged). Quantized graphs, vendor dumps and inputs move channels between the first axis
after the batch and the last; these are the permutations that do it, for any rank.

>>> to_channels_first(4), to_channels_last(4)
((0, 3, 1, 2), (0, 2, 3, 1))
>>> compose(to_channels_last(4), to_channels_first(4)) is None
True
>>> permuted((1, 8, 6, 10), to_channels_last(4))
(1, 6, 10, 8)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, TypeVar

Perm = Optional[tuple[int, ...]]
"""An axis permutation as ``numpy.transpose`` takes it; None where the layout is unchanged."""

T = TypeVar("T")


def to_channels_first(rank: int) -> tuple[int, ...]:
    """The permutation taking a channels-last tensor of ``rank`` axes to channels first."""
    return (0, rank - 1, *range(1, rank - 1))


def to_channels_last(rank: int) -> tuple[int, ...]:
    """The permutation taking a channels-first tensor of ``rank`` axes to channels last."""
    return (0, *range(2, rank), 1)


def channel_moves(rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Both permutations that move channels between first and last, for ``rank`` axes."""
    return to_channels_first(rank), to_channels_last(rank)


def compose(first: Perm, then: Perm) -> Perm:
    """The permutation of transposing by ``first`` then by ``then`` (None for identity)."""
    if first is None or then is None:
        result = then if first is None else first
    else:
        result = tuple(first[axis] for axis in then)
    return None if result is None or result == tuple(range(len(result))) else result


def inverse(perm: Perm) -> Perm:
    """The permutation that undoes ``perm``."""
    return None if perm is None else tuple(sorted(range(len(perm)), key=perm.__getitem__))


def permuted(shape: Sequence[T], perm: Perm) -> tuple[T, ...]:
    """``shape`` as a tensor of that shape has it after transposing by ``perm``."""
    return tuple(shape) if perm is None else tuple(shape[axis] for axis in perm)
