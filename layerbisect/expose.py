"""Expose intermediate tensors of a model as graph outputs, with onnx-graphsurgeon.

This module is the only one that imports onnx_graphsurgeon.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx

from layerbisect.errors import LayerbisectError


def expose(
    model: onnx.ModelProto, tensors: Iterable[str] | None = None, *, prune: bool = False
) -> onnx.ModelProto:
    """Return a copy of ``model`` whose graph outputs also list ``tensors``.

    With ``prune=True`` the outputs are ``tensors`` alone and the nodes they do not need are
    dropped: the model becomes the prefix that computes them, and runs no further.

    ``tensors=None`` exposes every tensor a node produces. The model's own outputs come first,
    in their order; each tensor is listed once; shapes and dtypes are kept where known (the
    runtime infers the others). What the model computes is unchanged, and ``model`` itself is
    not modified.

    >>> from onnx import helper, TensorProto
    >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    >>> g = helper.make_graph([helper.make_node("Relu", ["x"], ["a"]),
    ...                        helper.make_node("Neg", ["a"], ["y"])], "g", [x], [y])
    >>> [o.name for o in expose(helper.make_model(g)).graph.output]
    ['y', 'a']
    """
    import onnx_graphsurgeon as gs  # here: a scan never exposes, and gs is 20 ms of import

    graph = gs.import_onnx(model)
    variables = {
        name: tensor
        for name, tensor in graph.tensors().items()
        if isinstance(tensor, gs.Variable)
    }
    produced = [out.name for node in graph.nodes for out in node.outputs]
    wanted = produced if tensors is None else list(tensors)
    missing = [name for name in wanted if name not in variables]
    if missing:
        raise LayerbisectError(f"cannot expose {missing[:3]}: no such tensor in the model")
    if prune:
        graph.outputs = []
    listed = {tensor.name for tensor in graph.outputs}
    for name in dict.fromkeys(wanted):
        if name and name not in listed:
            graph.outputs.append(variables[name])
            listed.add(name)
    if prune:
        graph.cleanup()
    exposed = gs.export_onnx(graph, do_type_check=False)
    _keep_metadata(model, exposed)
    return exposed


def _keep_metadata(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    """Keep what graphsurgeon does not carry over (IR version, opsets, producer)."""
    target.ir_version = source.ir_version
    del target.opset_import[:]
    target.opset_import.extend(source.opset_import)
    target.producer_name = source.producer_name
