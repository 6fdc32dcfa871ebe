"""Load a model from a path or a ModelProto and give every node a stable, readable name.

The caller's file and ModelProto are never modified: a path is only read, and a ModelProto is
copied before names are filled in.

Weights kept in external data files stay there: a loaded model refers to them by their folder
(an absolute ``basepath`` entry beside each ``location``), onnxruntime maps them into memory
when it builds a session (``layerbisect.run``), and ``tensor_array`` reads one when its values
are needed. Only small external tensors (shapes, axes, conditions) are read in at load.
"""

from __future__ import annotations

import math
from os import PathLike
from pathlib import Path
from typing import Union

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_tensor, uses_external_data

from layerbisect.errors import LayerbisectError, first_line
from layerbisect.inputs import InputSpec

ModelLike = Union[str, PathLike, onnx.ModelProto]
# External tensors smaller than this are read in at load: shape inference reads such constants.
SMALL_EXTERNAL = 1024
BASEPATH = "basepath"  # an external data key onnx accepts; onnxruntime does not (see run.py)


def load_model(model: ModelLike, *, role: str = "model") -> onnx.ModelProto:
    """Return a private copy of ``model`` with every node named, and each If whose condition
    is a constant replaced by the branch it takes (see ``inline_constant_ifs``).

    ``role`` ("float model", "quantized model") is used in error messages.

    >>> node = onnx.helper.make_node("Relu", ["x"], ["y"])  # no name
    >>> m = load_model(onnx.helper.make_model(onnx.helper.make_graph([node], "g", [], [])))
    >>> m.graph.node[0].name, node.name
    ('Relu_0', '')
    """
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        unlocated = [t.name for t in all_tensors(copy.graph) if uses_external_data(t) and not external_folder(t)]
        if unlocated:
            raise LayerbisectError(
                f"{role}: tensor {unlocated[0]!r} is kept in an external data file that was not "
                "loaded; pass the path of the .onnx file instead, or onnx.load it with its data"
            )
        _locate_external_data(copy.graph, None, role)
    elif isinstance(model, (str, PathLike)):
        copy = _read(Path(model), role)
    else:
        raise LayerbisectError(
            f"{role}: expected a path to an .onnx file or an onnx.ModelProto, "
            f"got {type(model).__name__}"
        )
    if not copy.graph.node:
        raise LayerbisectError(f"{role} has no nodes: is it the right file?")
    inline_constant_ifs(copy.graph)
    name_nodes(copy.graph)  # after inlining, so inlined names are made unique too
    return copy


def inline_constant_ifs(graph: onnx.GraphProto) -> None:
    """Replace, in place, each If whose condition is a constant (an initializer that is not a
    graph input, or a Constant) by the nodes of the branch it takes, so that they are compared.

    Branch nodes are named ``<If name>/<node name>``; values that only live inside the branch
    get the same prefix; the branch's outputs take the names of the If's outputs.

    >>> branch = lambda op: helper.make_graph([helper.make_node(op, ["x"], ["o"], name="f")], op, [], [
    ...     helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT, None)])
    >>> flag = onnx.numpy_helper.from_array(np.array(True), "flag")
    >>> node = helper.make_node("If", ["flag"], ["y"], name="pick", then_branch=branch("Relu"),
    ...                         else_branch=branch("Neg"))
    >>> graph = helper.make_graph([node], "g", [], [], [flag])
    >>> inline_constant_ifs(graph)
    >>> [(n.name, n.op_type, list(n.input), list(n.output)) for n in graph.node]
    [('pick/f', 'Relu', ['x'], ['y'])]
    """
    constants = {init.name: init for init in graph.initializer}
    constants.update(
        (node.output[0], node.attribute[0].t) for node in graph.node
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"
    )
    declared = {info.name for info in graph.input}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        branch = _taken_branch(node, constants, declared)
        if branch is None:
            nodes.append(node)
            continue
        local = {out for inner in branch.node for out in inner.output} | {i.name for i in branch.initializer}
        names = {name: f"{node.name}/{name}" for name in local}
        names.update((out.name, outer) for out, outer in zip(branch.output, node.output) if out.name in local)
        for index, inner in enumerate(branch.node):
            inlined = onnx.NodeProto()
            inlined.CopyFrom(inner)
            inlined.name = f"{node.name}/{inner.name or f'{inner.op_type}_{index}'}"
            inlined.input[:] = [names.get(name, name) for name in inner.input]
            inlined.output[:] = [names[name] for name in inner.output]
            nodes.append(inlined)
        for init in branch.initializer:
            moved = graph.initializer.add()
            moved.CopyFrom(init)
            moved.name = names[init.name]
        nodes += [  # the branch passes an outer value through
            helper.make_node("Identity", [out.name], [outer], name=f"{node.name}/{out.name}")
            for out, outer in zip(branch.output, node.output) if out.name not in local
        ]
    del graph.node[:]
    graph.node.extend(nodes)


def declared_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a model declares, initializers excluded, as ``InputSpec``.

    Dynamic dimensions are given by name (``"batch"``) or None.
    """
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for info in model.graph.input:
        if info.name in initializers:
            continue
        if not info.type.HasField("tensor_type"):
            raise LayerbisectError(f"input {info.name!r} is not a tensor; only tensor inputs are supported")
        tensor = info.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
        )
        specs.append(InputSpec(info.name, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)), dims))
    return specs


def graph_only(path: str | PathLike) -> onnx.ModelProto | None:
    """The model in the file ``path`` without its external data (its graph, and the weights
    kept inside the file), or None when the file is not a readable ONNX model."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception:  # not a model (a feeds file, a truncated file): no graph
        return None


def _read(path: Path, role: str) -> onnx.ModelProto:
    if path.is_dir():
        raise LayerbisectError(f"{role} {path} is a folder, not an .onnx file; give the model file inside it")
    if not path.is_file():
        raise LayerbisectError(f"{role} file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise LayerbisectError(
            f"{role} {path} is not a readable ONNX file ({first_line(exc)}); "
            "check that it is a complete .onnx file, not truncated or in another format"
        ) from None
    if not model.HasField("graph"):
        raise LayerbisectError(f"{role} {path} is not an ONNX model: it holds no graph")
    _locate_external_data(model.graph, path.parent.absolute(), f"{role} {path}")
    return model


def _locate_external_data(graph: onnx.GraphProto, folder: Path | None, role: str) -> None:
    """Check, in place, that the external data of ``graph``'s tensors is all there (found in
    ``folder``, or in each tensor's own ``basepath`` when ``folder`` is None), without reading
    it; read in the small tensors and those that are not initializers of ``graph`` itself,
    and give the others ``folder`` as their ``basepath``."""
    initializers = len(graph.initializer)
    for index, tensor in enumerate(all_tensors(graph)):  # the initializers come first
        if not uses_external_data(tensor):
            continue
        base = folder or Path(external_folder(tensor))
        try:
            length = _external_length(tensor, base)
            if index >= initializers or length < SMALL_EXTERNAL:
                load_external_data_for_tensor(tensor, str(base))
            elif folder is not None:
                _set_folder(tensor, folder)
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise LayerbisectError(
                f"{role}: cannot read its external data ({first_line(exc)}); the data files "
                "must be complete and beside the .onnx file, where they were saved"
            ) from None


def _external_length(tensor: onnx.TensorProto, folder: Path) -> int:
    """The bytes of ``tensor``'s data, checked to lie in a file of ``folder``; none is read."""
    info = ExternalDataInfo(tensor)
    location = Path(info.location)
    if location.is_absolute() or ".." in location.parts:
        raise ValueError(f"location {info.location!r} of tensor {tensor.name!r} is not inside the model's folder")
    available = (folder / location).stat().st_size - (info.offset or 0)
    length = available if info.length is None else info.length
    if not 0 <= length <= available:
        raise ValueError(
            f"External data length ({length}) exceeds available data ({available} bytes from "
            f"offset {info.offset or 0}) for tensor {tensor.name!r}"
        )
    return length


def _set_folder(tensor: onnx.TensorProto, folder: Path) -> None:
    entries = [(e.key, e.value) for e in tensor.external_data if e.key != BASEPATH]
    del tensor.external_data[:]
    for key, value in [*entries, (BASEPATH, str(folder))]:
        tensor.external_data.add(key=key, value=value)


def external_folder(tensor: onnx.TensorProto) -> str:
    """The absolute folder that ``tensor``'s external data location is relative to, as
    ``load_model`` records it; "" when it is not recorded."""
    folder = next((e.value for e in tensor.external_data if e.key == BASEPATH), "")
    return folder if Path(folder).is_absolute() else ""


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """The bytes of ``tensor``'s data, in memory or in its external file, from its shape and
    type (``ByteSize`` walks the message: 0.2 s a run for MiniLM's initializers); strings and
    types numpy lacks by their serialized size."""
    if tensor.data_type != onnx.TensorProto.STRING:
        try:
            return math.prod(tensor.dims) * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            pass
    return tensor.ByteSize()


def tensor_array(tensor: onnx.TensorProto, *, mapped: bool = False) -> np.ndarray:
    """The value of ``tensor``, read from its external data file when it has one.

    ``mapped=True`` returns a read-only memory map of that file instead (for numeric types of
    a byte or more an element), for a caller that reads a small part of a large tensor.
    """
    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    folder = external_folder(tensor)
    if mapped:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        info, shape = ExternalDataInfo(tensor), tuple(tensor.dims)
        if dtype.kind in "biuf" and info.length == int(np.prod(shape)) * dtype.itemsize > 0:
            return np.memmap(
                Path(folder) / info.location, dtype=dtype.newbyteorder("<"), mode="r",
                offset=info.offset or 0, shape=shape,
            )
    return numpy_helper.to_array(tensor, base_dir=folder)


def with_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a loaded ``model`` holding the data of its external tensors: a model to give
    back to the user, which ``onnx.save`` can write anywhere and onnxruntime load."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in all_tensors(copy.graph):
        if uses_external_data(tensor) and external_folder(tensor):
            load_external_data_for_tensor(tensor, external_folder(tensor))
    return copy


def _taken_branch(node: onnx.NodeProto, constants: dict, declared: set[str]) -> onnx.GraphProto | None:
    """The branch an If takes when its condition is a known constant; None otherwise, or when
    the branch holds subgraphs of its own (they may read the branch's values by name)."""
    if node.op_type != "If" or node.input[0] not in constants or node.input[0] in declared:
        return None
    taken = "then_branch" if tensor_array(constants[node.input[0]]).any() else "else_branch"
    branch = next(attr.g for attr in node.attribute if attr.name == taken)
    nested = any(_subgraphs(attr) for inner in branch.node for attr in inner.attribute)
    return None if nested else branch


def all_tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """The initializers and Constant values of ``graph`` and of its subgraphs."""
    tensors = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensors.append(attr.t)
            for sub in _subgraphs(attr):
                tensors += all_tensors(sub)
    return tensors


def _subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    return list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []


def subgraph_notes(model: onnx.ModelProto, role: str) -> list[str]:
    """What control flow hides: a note for each node of ``model``'s graph that runs subgraphs
    (If, Loop, Scan). Only values visible in the top-level graph are compared.

    >>> body = helper.make_graph([helper.make_node("Relu", ["a"], ["b"])], "body", [], [])
    >>> node = helper.make_node("If", ["c"], ["y"], name="cond", then_branch=body, else_branch=body)
    >>> subgraph_notes(helper.make_model(helper.make_graph([node], "g", [], [])), "float model")
    ["node 'cond' (If) of the float model runs subgraphs (else_branch: 1 op, then_branch: 1 op) that are not compared"]
    """
    notes = []
    for node in model.graph.node:
        graphs = [(attr.name, sub) for attr in node.attribute for sub in _subgraphs(attr)]
        if not graphs:
            continue
        sizes = ", ".join(
            f"{name}: {count} op{'s' if count != 1 else ''}" for name, count in
            ((name, _count_ops(sub)) for name, sub in graphs)
        )
        several = len(graphs) > 1
        notes.append(
            f"node {node.name!r} ({node.op_type}) of the {role} runs "
            f"{'subgraphs' if several else 'a subgraph'} ({sizes}) that "
            f"{'are' if several else 'is'} not compared"
        )
    return notes


def _count_ops(graph: onnx.GraphProto) -> int:
    """Operations in ``graph``, those of nested subgraphs included."""
    return sum(
        1 + sum(_count_ops(sub) for attr in node.attribute for sub in _subgraphs(attr))
        for node in graph.node
    )


def name_nodes(graph: onnx.GraphProto) -> None:
    """Name unnamed nodes ``<OpType>_<index>`` and make duplicate names unique, in place.

    Indexes count nodes of the graph in file order, so the same file always gets the same names.
    """
    seen: set[str] = {node.name for node in graph.node if node.name}
    used: set[str] = set()
    for index, node in enumerate(graph.node):
        name = node.name
        if not name or name in used:
            base = node.name or f"{node.op_type}_{index}"
            name, suffix = base, 1
            while name in used or (name != node.name and name in seen):
                name = f"{base}_{suffix}"
                suffix += 1
            node.name = name
        used.add(name)
