"""Run a model with onnxruntime. This module is the only one that imports onnxruntime."""

from __future__ import annotations

import functools
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

from layerbisect.errors import LayerbisectError, first_line
from layerbisect.inputs import Feeds
from layerbisect.load import BASEPATH, external_folder, tensor_nbytes
from layerbisect.options import DEFAULT_PROVIDERS

try:
    import onnxruntime as ort
except ImportError:  # layerbisect requires no distribution of it: the user picks one
    raise LayerbisectError(
        "layerbisect runs models with onnxruntime, and none is installed: pip install 'layerbisect[cpu]' "
        "(or onnxruntime, onnxruntime-gpu, onnxruntime-directml or onnxruntime-openvino)"
    ) from None

# A serialized protobuf must stay under 2 GiB: past this size, initializers go to onnxruntime
# as separate buffers instead of inside the model, all but the small ones (shapes, scales),
# which onnxruntime's shape inference reads from the model.
PROTO_LIMIT = (2 << 30) - (64 << 20)
BUFFER = "layerbisect-buffer"  # the location of a placeholder: its data is a buffer handed over
DETACHABLE = 1 << 10
AS_FLOAT = "__layerbisect_as_float"
# Where onnxruntime finds the external data of a model given as bytes.
EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"


def usable_providers(providers: str | Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The providers asked for that this onnxruntime has, in the order given, and those it lacks.

    ``providers`` is an order of preference (a plain string is one provider): the missing ones
    are skipped, and only when none is left is it an error.

    >>> usable_providers("CPUExecutionProvider")
    (('CPUExecutionProvider',), ())
    >>> usable_providers(["NoSuchExecutionProvider", "CPUExecutionProvider"])
    (('CPUExecutionProvider',), ('NoSuchExecutionProvider',))
    """
    asked = (providers,) if isinstance(providers, str) else tuple(providers)
    available = ort.get_available_providers()
    kept = tuple(p for p in asked if p in available)
    if not kept:
        which = (f"execution provider {asked[0]!r} is not" if len(asked) == 1 else
                 f"none of the execution providers {', '.join(map(repr, asked)) or '(none given)'} is")
        raise LayerbisectError(
            f"{which} available in this onnxruntime; available: {', '.join(available)} (another "
            "onnxruntime build brings others, e.g. onnxruntime-gpu: see the README)"
        )
    return kept, tuple(p for p in asked if p not in available)


@functools.cache
def max_ir_version() -> int | None:
    """The newest model IR version this onnxruntime loads, as it says when refusing a newer one;
    None when it does not say.

    >>> max_ir_version() >= 9
    True
    """
    probe = helper.make_model(helper.make_graph([], "probe", [], []), ir_version=1 << 20)
    try:
        ort.InferenceSession(probe.SerializeToString(), providers=list(DEFAULT_PROVIDERS))
    except Exception as exc:
        found = re.search(r"max supported IR version: (\d+)", str(exc))
        return int(found.group(1)) if found else None
    return None


@functools.cache
def int8_products_saturate() -> bool:
    """Whether onnxruntime's CPU kernels for 8-bit integer products (MatMulInteger, QLinearConv,
    fused Q/DQ groups, ...) saturate on this machine: on x86 CPUs without VNNI they add each two
    neighbouring uint8 x int8 products into an int16 first, which clips past 32767 (255 x 127
    x 2 = 64770). Measured, not guessed from the CPU's name: one product that overflows int16.

    >>> isinstance(int8_products_saturate(), bool)
    True
    """
    a = helper.make_tensor_value_info("a", onnx.TensorProto.UINT8, [1, 2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [1, 1])
    w = helper.make_tensor("w", onnx.TensorProto.INT8, [2, 1], [127, 127])
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "probe", [a], [y], [w])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    session = ort.InferenceSession(probe.SerializeToString(), _options(), providers=["CPUExecutionProvider"])
    (product,) = session.run(None, {"a": np.array([[255, 255]], np.uint8)})
    return int(product[0, 0]) != 255 * 127 * 2


def lower_ir_version(model: onnx.ModelProto, role: str) -> list[str]:
    """Lower, in place, the IR version of ``model`` (a private copy) when it is newer than this
    onnxruntime loads (the model was saved by a newer onnx); return the note saying so, if any.
    Its operator sets are left as they are: onnxruntime still refuses those it does not know."""
    supported = max_ir_version()
    if supported is None or model.ir_version <= supported:
        return []
    note = (f"the {role} has IR version {model.ir_version} (saved by a newer onnx), newer than this "
            f"onnxruntime loads: compared as IR version {supported}")
    model.ir_version = supported
    return [note]


def skipped_providers_note(kept: Sequence[str], missing: Sequence[str]) -> str:
    """What is said of the providers skipped: a report's note, the CLI's warning (before the run).

    >>> skipped_providers_note(["CPUExecutionProvider"], ["A", "B"])
    "execution providers 'A', 'B' are not available in this onnxruntime: skipped, CPUExecutionProvider used instead"
    """
    several = len(missing) > 1
    return (f"execution provider{'s' if several else ''} {', '.join(map(repr, missing))} "
            f"{'are' if several else 'is'} not available in this onnxruntime: skipped, {', '.join(kept)} used instead")


class Session:
    """An onnxruntime session over an in-memory model, with errors that name the model.

    Models of any size are accepted: initializers kept in external files are read from there
    by onnxruntime, and past ``PROTO_LIMIT`` bytes, large in-memory initializers are handed
    to onnxruntime as buffers, never written to disk. ``run`` returns numpy arrays:
    bfloat16 values as float32, and values that are not tensors (sequences, maps, absent
    optionals) as 0-d object arrays, which no comparison takes for float values.

    >>> from onnx import helper, TensorProto
    >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    >>> g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    >>> m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    >>> s = Session(m, "model")
    >>> s.run({"x": np.array([-1.0, 2.0], np.float32)}, ["y"])["y"]
    array([0., 2.], dtype=float32)
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        role: str,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        original: onnx.ModelProto | None = None,
        buffers: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """``original`` is the model before exposing: on failure, it tells whose fault it is.
        ``buffers`` hold the data of the model's placeholders (``placeholder``), by name."""
        self.role = role
        unknown = [p for p in providers if p not in ort.get_available_providers()]
        if unknown:
            raise LayerbisectError(
                f"execution provider {unknown[0]!r} is not available in this onnxruntime; "
                f"available: {', '.join(ort.get_available_providers())}"
            )
        try:
            self.session, self._buffers = _create(model, _options(), providers, buffers=buffers)
            # onnxruntime cannot hand bfloat16 to numpy: such outputs are read through a Cast.
            self.renamed = {
                out.name: out.name + AS_FLOAT
                for out in self.session.get_outputs() if out.type == "tensor(bfloat16)"
            }
            if self.renamed:
                self.session, self._buffers = _create(model, _options(), providers, self.renamed, buffers)
        except Exception as failed:
            exc = failed
            if original is not None:
                try:
                    _create(original, _options(), providers)
                except Exception as plain:
                    exc = plain
                else:
                    raise LayerbisectError(
                        f"onnxruntime loads the {role} but not with its intermediate tensors "
                        f"exposed ({_first_line(exc)}); please report this model"
                    ) from None
            raise LayerbisectError(
                f"onnxruntime cannot load the {role}: {_first_line(exc)}"
            ) from None

    def run(self, feeds: Feeds, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run once and return the named outputs."""
        feeds = {name: _ort_value(array) if _is_bfloat16(array) else array for name, array in feeds.items()}
        try:
            values = self.session.run([self.renamed.get(name, name) for name in outputs], feeds)
        except Exception as exc:
            raise LayerbisectError(f"onnxruntime failed to run the {self.role}: {_first_line(exc)}") from None
        return {name: _as_array(value) for name, value in zip(outputs, values)}


def ort_optimized(model: onnx.ModelProto, role: str, providers: Sequence[str] = DEFAULT_PROVIDERS) -> onnx.ModelProto:
    """The graph onnxruntime actually runs: ``model`` after its extended-level optimizations
    (QDQ groups fused into QLinear ops, Conv+activation into FusedConv, ...).

    onnxruntime writes it into a temporary folder, removed on return, on error and on Ctrl-C.
    """
    options = _options(fuse_qdq=True)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with tempfile.TemporaryDirectory(prefix="layerbisect-") as folder:
        path = Path(folder) / "optimized.onnx"
        options.optimized_model_filepath = str(path)
        # Weights go to a file beside it, so that a model over 2 GiB can be written too.
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            _create(model, options, providers)
        except Exception as exc:
            raise LayerbisectError(f"onnxruntime cannot load the {role}: {_first_line(exc)}") from None
        return onnx.load(str(path))


def _options(fuse_qdq: bool = False) -> ort.SessionOptions:
    """Options of every session. Unless ``fuse_qdq`` (``ort_optimized``), a model's Q/DQ groups
    run as written (DequantizeLinear, the float op, QuantizeLinear), not fused into integer
    kernels: onnxruntime fuses only groups whose inner tensors are not graph outputs, so which
    fused depended on what a pass exposed, and on x86 CPUs without VNNI the fused kernels
    saturate int8 products (``int8_products_saturate``), so values depended on the pass too."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not fuse_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    # Idle worker threads would otherwise spin and take the cores the comparison needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Without onnxruntime's arena, the memory of the values a pass reads out goes back to the
    # process when the pass ends, for the next pass to reuse (an arena's lives and dies with
    # its session): a scan in pieces peaks 45% lower, and runs no slower.
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def _create(
    model: onnx.ModelProto,
    options: ort.SessionOptions,
    providers: Sequence[str],
    as_float: dict[str, str] | None = None,
    buffers: Mapping[str, np.ndarray] | None = None,
):
    """A session, and the buffers it reads its large initializers from (to keep alive).

    ``as_float`` maps outputs to new outputs that hold them cast to float32; ``buffers`` hold
    the data of the model's placeholders.
    """
    model, folder, detached = _for_onnxruntime(model)
    held = {init.name for init in model.graph.initializer if _is_placeholder(init)}
    buffers = {**{name: array for name, array in (buffers or {}).items() if name in held}, **detached}
    if folder:
        options.add_session_config_entry(EXTERNAL_FOLDER, folder)
    if buffers:
        options.add_external_initializers(list(buffers), [_ort_value(array) for array in buffers.values()])
    data = model.SerializeToString()
    if as_float:  # parsing concatenated messages merges them: these nodes and outputs are added
        data += _float_outputs(as_float).SerializeToString()
    session = ort.InferenceSession(data, options, providers=list(providers))
    return session, list(buffers.values())


def _for_onnxruntime(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str, dict[str, np.ndarray]]:
    """``model`` as onnxruntime takes it from bytes, the folder of its external data, and the
    initializers to hand over as buffers (by name).

    Initializers kept in external files (see ``layerbisect.load``) stay there: onnxruntime reads
    them from the folder of the first one, mapping them into memory; one in another folder is
    read in. Past ``PROTO_LIMIT``, in-memory initializers of ``DETACHABLE`` bytes or more become
    buffers. Otherwise ``model`` itself is returned: nothing is copied.
    """
    graph = model.graph
    on_disk = [init for init in graph.initializer if uses_external_data(init) and not _is_placeholder(init)]
    large = _size(model) >= PROTO_LIMIT
    if not on_disk and not large:
        return model, "", {}
    folder = external_folder(on_disk[0]) if on_disk else ""
    buffers: dict[str, np.ndarray] = {}
    initializers = []
    for init in graph.initializer:
        if _is_placeholder(init):
            pass
        elif uses_external_data(init):
            init = _relative_to(init, folder)
        elif large and tensor_nbytes(init) >= DETACHABLE:
            buffers[init.name] = numpy_helper.to_array(init)
            init = placeholder(init)
        initializers.append(init)
    light_graph = onnx.GraphProto(
        name=graph.name, node=graph.node, input=graph.input, output=graph.output,
        value_info=graph.value_info, initializer=initializers,
        sparse_initializer=graph.sparse_initializer,
    )
    light = onnx.ModelProto(
        ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions,
        producer_name=model.producer_name, graph=light_graph,
    )
    return light, folder, buffers


def _relative_to(init: onnx.TensorProto, folder: str) -> onnx.TensorProto:
    """A copy of the external ``init`` as onnxruntime reads it from ``folder``: without its
    ``basepath`` (which onnxruntime rejects), or with its data read in when it lies elsewhere."""
    copy = onnx.TensorProto()
    copy.CopyFrom(init)
    if external_folder(init) != folder:
        load_external_data_for_tensor(copy, external_folder(init))
        return copy
    entries = [(e.key, e.value) for e in init.external_data if e.key != BASEPATH]
    del copy.external_data[:]
    for key, value in entries:
        copy.external_data.add(key=key, value=value)
    return copy


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the data of ``model``'s initializers, those kept in external files included."""
    return sum(tensor_nbytes(init) for init in model.graph.initializer)


def _size(model: onnx.ModelProto) -> int:
    """About the serialized size of ``model``: that of its initializers and nodes (protobuf
    cannot measure a model over 2 GiB as a whole)."""
    graph = model.graph
    return weight_bytes(model) + sum(n.ByteSize() for n in graph.node)


def _is_placeholder(init: onnx.TensorProto) -> bool:
    return init.data_location == onnx.TensorProto.EXTERNAL and any(
        entry.key == "location" and entry.value == BUFFER for entry in init.external_data)


def placeholder(init: onnx.TensorProto) -> onnx.TensorProto:
    """An initializer without data, which onnxruntime fills from a buffer of that name."""
    tensor = onnx.TensorProto(
        name=init.name, data_type=init.data_type, dims=init.dims,
        data_location=onnx.TensorProto.EXTERNAL,
    )
    tensor.external_data.add(key="location", value=BUFFER)
    return tensor


def _float_outputs(as_float: dict[str, str]) -> onnx.ModelProto:
    """A model fragment: a Cast to float32 of each tensor of ``as_float``, as a graph output."""
    nodes = [
        onnx.helper.make_node("Cast", [name], [new], name=new, to=onnx.TensorProto.FLOAT)
        for name, new in as_float.items()
    ]
    outputs = [onnx.helper.make_value_info(new, onnx.TypeProto()) for new in as_float.values()]
    return onnx.ModelProto(graph=onnx.GraphProto(node=nodes, output=outputs))


def _is_bfloat16(array: np.ndarray) -> bool:
    return isinstance(array, np.ndarray) and array.dtype.name == "bfloat16"


def _ort_value(array: np.ndarray) -> ort.OrtValue:
    """An OrtValue over ``array`` (bfloat16 included, which onnxruntime takes only this way)."""
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    if _is_bfloat16(array):
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), onnx.TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(array)


def _as_array(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    opaque = np.empty((), dtype=object)
    opaque[()] = value
    return opaque


def _first_line(exc: BaseException) -> str:
    """onnxruntime's message without its error code and C++ source location."""
    text = first_line(exc, limit=2000)
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    located = re.match(r"^\S+\.(?:cc|h|cpp):\d+ .*?\) ", text)
    if located:
        text = text[located.end():]
    if "Unsupported model IR version" in text:
        text += " (upgrade onnxruntime, or save the model with a lower ir_version)"
    return text[:400]
