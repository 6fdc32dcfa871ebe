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
>>> def op(order, shape, seed):
...     w = np.random.default_rng(seed).standard_normal(shape)
...     return dict(kind="op", role="MatMul", order=order, fingerprint=w.ravel(), weight_shape=shape, sources=())
>>> import networkx as nx
>>> a, b = nx.DiGraph(), nx.DiGraph()
>>> a.add_nodes_from([("a1", op(0, (8, 8), 1)), ("a2", op(1, (8, 16), 2)), ("a3", op(2, (16, 8), 3))])
>>> b.add_nodes_from([("b1", op(0, (8, 16), 2)), ("b2", op(1, (16, 8), 9))])
>>> sorted(anchor_pairs(a, b).items())
[('a2', ('b1', 1.0)), ('a3', ('b2', ...))]
"""

from __future__ import annotations

import networkx as nx

from layerbisect.weights import channel_agreement

# Roles whose weights may stand for one another: a Gemm computes a MatMul.
KINDS = {"Conv": "Conv", "ConvTranspose": "ConvTranspose", "MatMul": "MatMul", "Gemm": "MatMul"}


def weighted_sequence(graph: nx.DiGraph) -> list[str]:
    """The weighted operations of ``graph`` in topological order (ties in model order)."""
    order = nx.lexicographical_topological_sort(graph, key=lambda n: graph.nodes[n]["order"])
    return [n for n in order if _kind(graph.nodes[n]) is not None]


def anchor_pairs(float_graph: nx.DiGraph, quant_graph: nx.DiGraph) -> dict[str, tuple[str, float]]:
    """Each weighted float operation paired by an order-preserving assignment, with its
    quantized counterpart and their ``channel_agreement`` (0.0 where it cannot be computed).

    Among assignments that keep the order of both sequences and pair only operations of one
    kind and one weight shape, the one of the largest total of one plus agreement per pair:
    the most pairs, then the most agreeing ones. Quadratic in the number of weighted
    operations (a dynamic programme over the two sequences).
    """
    fs, qs = weighted_sequence(float_graph), weighted_sequence(quant_graph)
    fa, qa = float_graph.nodes, quant_graph.nodes
    score = [[_score(fa[f], qa[q]) for q in qs] for f in fs]
    # best[i][j]: the best total over fs[i:] and qs[j:]
    best = [[0.0] * (len(qs) + 1) for _ in range(len(fs) + 1)]
    for i in reversed(range(len(fs))):
        for j in reversed(range(len(qs))):
            take = 1.0 + score[i][j] + best[i + 1][j + 1] if score[i][j] is not None else -1.0
            best[i][j] = max(take, best[i + 1][j], best[i][j + 1])
    pairs, i, j = {}, 0, 0
    while i < len(fs) and j < len(qs):
        if score[i][j] is not None and best[i][j] == 1.0 + score[i][j] + best[i + 1][j + 1]:
            pairs[fs[i]] = (qs[j], score[i][j])
            i, j = i + 1, j + 1
        elif best[i][j] == best[i + 1][j]:
            i += 1
        else:
            j += 1
    return pairs


def _kind(attrs: dict) -> str | None:
    """The kind of a weighted operation (a Gemm's is MatMul's); None for any other node."""
    if attrs["kind"] != "op" or attrs["fingerprint"] is None:
        return None
    return KINDS.get(attrs["role"])


def _score(a: dict, b: dict) -> float | None:
    """How well two weighted operations pair: their agreement, 0.0 where it cannot be told;
    None when they cannot be one operation (another kind, another weight shape)."""
    if _kind(a) != _kind(b) or a["weight_shape"] != b["weight_shape"]:
        return None
    agreement = channel_agreement(a, b)
    return 0.0 if agreement is None else agreement
