"""Pair the weighted operations of two graphs by their weights, shapes and order: anchors.

Two exports of one network may differ in every unweighted detail (how shapes are computed, a
mask, a LayerNorm decomposed, a Gemm on a 2-D view), but each keeps the weighted operations
(Conv, ConvTranspose, MatMul, Gemm with a constant weight), in the same order along the
network, each with its effective weight (``graph.build_graph`` dequantizes and folds it, and
gives a Gemm's transposed weight in MatMul orientation). ``anchor_pairs`` pairs them by an
order-preserving assignment: of the two topological sequences of weighted operations, the
common subsequence of operations of one kind and one weight shape whose weights agree most
(``weights.channel_agreement``), each pair counting one plus its agreement, so that order
and shape pair a weight that was changed (a fault) and the weights decide among alike ones.

>>> import numpy as np
>>> from layerbisect.graph import Op, OpGraph
>>> def op(order, shape, seed):
...     w = np.random.default_rng(seed).standard_normal(shape)
...     return {"op": Op("op", f"m{order}", "MatMul", "MatMul", order, (), (), (), (), (),
...                      fingerprint=w.ravel(), weight_shape=shape)}
>>> a, b = OpGraph(), OpGraph()
>>> a.add_nodes_from([("a1", op(0, (8, 8), 1)), ("a2", op(1, (8, 16), 2)), ("a3", op(2, (16, 8), 3))])
>>> b.add_nodes_from([("b1", op(0, (8, 16), 2)), ("b2", op(1, (16, 8), 9))])
>>> sorted(anchor_pairs(a, b).items())
[('a2', ('b1', 1.0)), ('a3', ('b2', ...))]
"""

from __future__ import annotations

import numpy as np

from layerbisect.graph import Op, OpGraph
from layerbisect.weights import UNRELATED_WEIGHTS, agreement, standardized

# How far from the diagonal of the two sequences a weighted operation's counterpart may sit,
# beyond the difference of their lengths: an export that fuses or splits a few weighted ops
# (Q, K and V in one) shifts the rest by that few. Outside the band the assignment cost
# grew with the square of the model (16 s to align 5,400 nodes; 0.2 s without anchors).
BAND = 32
# Weighted operations that read one value (an attention's Q, K and V) may come in any order in
# either graph (onnxruntime's optimizer writes K before Q): pairs this close in the sequence
# swap counterparts where the weights say so.
SIBLINGS = 3
# Roles whose weights may stand for one another: a Gemm computes a MatMul.
KINDS = {"Conv": "Conv", "ConvTranspose": "ConvTranspose", "MatMul": "MatMul", "Gemm": "MatMul"}


def weighted_sequence(graph: OpGraph) -> list[str]:
    """The weighted operations of ``graph`` in topological order (ties in model order)."""
    return [n for n in graph.in_order() if _kind(graph.op(n)) is not None]


def anchor_pairs(float_graph: OpGraph, quant_graph: OpGraph) -> dict[str, tuple[str, float]]:
    """Each weighted float operation paired by an order-preserving assignment, with its
    quantized counterpart and their ``channel_agreement`` (0.0 where it cannot be computed).

    Among assignments that keep the order of both sequences and pair only operations of one
    kind and one weight shape, the one of the largest total of one plus agreement per pair:
    the most pairs, then the most agreeing ones. A dynamic programme over the two sequences,
    within ``BAND`` positions of their diagonal: linear in the number of weighted operations.
    Then pairs a few positions apart swap counterparts where the weights say that siblings
    (Q, K and V) come in another order.
    """
    fs, qs = weighted_sequence(float_graph), weighted_sequence(quant_graph)
    fa, qa = dict(float_graph.ops()), dict(quant_graph.ops())
    if len(fs) == len(qs) and all(_kind(fa[f]) == _kind(qa[q]) and fa[f].weight_shape == qa[q].weight_shape
                                  for f, q in zip(fs, qs)):
        # one for one, in order (what quantizers and optimizers leave): the only assignment
        # that keeps both orders and pairs every operation, siblings aside
        return _untangled(list(zip(fs, qs)), fa, qa, {})
    band = BAND + abs(len(fs) - len(qs))
    columns = [_columns(i, len(fs), len(qs), band) for i in range(len(fs) + 1)]
    weights = {node: standardized(fa[node]) for node in fs} | {node: standardized(qa[node]) for node in qs}
    score = {(i, j): _score(fa[fs[i]], qa[qs[j]], weights[fs[i]], weights[qs[j]])
             for i in range(len(fs)) for j in columns[i]}
    best: dict[tuple[int, int], float] = {}  # the best total over fs[i:] and qs[j:]

    def total(i: int, j: int) -> float:
        return best.get((i, j), 0.0) if i < len(fs) and j < len(qs) else 0.0

    for i in reversed(range(len(fs))):
        for j in reversed(columns[i]):
            gain = score[i, j]
            take = 1.0 + gain + total(i + 1, j + 1) if gain is not None else -1.0
            best[i, j] = max(take, total(i + 1, j), total(i, j + 1))
    pairs, i, j = [], 0, columns[0][0] if columns[0] else 0
    while i < len(fs) and j < len(qs) and (i, j) in best:
        gain = score[i, j]
        if gain is not None and best[i, j] == 1.0 + gain + total(i + 1, j + 1):
            pairs.append((fs[i], qs[j]))
            i, j = i + 1, j + 1
        elif best[i, j] == total(i + 1, j) and (i + 1, j) in best or i + 1 == len(fs):
            i += 1
        else:
            j += 1
    return _untangled(pairs, fa, qa, weights)


def _untangled(pairs: list[tuple[str, str]], fa, qa, weights: dict) -> dict[str, tuple[str, float]]:
    """``pairs`` (in order) as ``anchor_pairs`` returns them, after swapping the counterparts
    of two pairs less than ``SIBLINGS`` apart wherever that makes at least one unrelated pair
    agree (a gain above ``UNRELATED_WEIGHTS``): siblings listed in another order. ``weights``
    holds the ``standardized`` weights computed so far, and takes those computed here."""

    def score(f: str, q: str) -> float | None:
        for node, attrs in ((f, fa), (q, qa)):
            if node not in weights:
                weights[node] = standardized(attrs[node])
        return _score(fa[f], qa[q], weights[f], weights[q])

    scored: list[tuple[str, str, float]] = []
    for f, q in pairs:
        found = score(f, q)
        assert found is not None, "anchor pairs are of one kind and one weight shape"
        scored.append((f, q, found))
    for i in range(len(scored)):
        for j in range(i + 1, min(i + SIBLINGS, len(scored))):
            (f, q, a), (g, r, b) = scored[i], scored[j]
            c, d = score(f, r), score(g, q)
            if c is not None and d is not None and c + d > a + b + UNRELATED_WEIGHTS:
                scored[i], scored[j] = (f, r, c), (g, q, d)
    return {f: (q, agreement) for f, q, agreement in scored}


def _columns(i: int, rows: int, columns: int, band: int) -> range:
    """The positions of the second sequence within ``band`` of row ``i``'s place on the
    diagonal from (0, 0) to (rows, columns)."""
    centre = round(i * columns / rows) if rows else 0
    return range(max(0, centre - band), min(columns, centre + band + 1))


def _kind(attrs: Op) -> str | None:
    """The kind of a weighted operation (a Gemm's is MatMul's); None for any other node."""
    if attrs.kind != "op" or attrs.fingerprint is None:
        return None
    return KINDS.get(attrs.role)


def _score(a: Op, b: Op, x: np.ndarray | None, y: np.ndarray | None) -> float | None:
    """How well two weighted operations pair, given their ``standardized`` weights: their
    agreement, 0.0 where it cannot be told; None when they cannot be one operation (another
    kind, another weight shape)."""
    if _kind(a) != _kind(b) or a.weight_shape != b.weight_shape:
        return None
    found = agreement(x, y)
    return 0.0 if found is None else found
