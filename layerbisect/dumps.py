"""Folders of dumped tensors, read as a ``TensorSource`` (the tensors of one run).

Layouts read:

- ``<tensor name>.npy`` files, '/' and ':' in names written as '_';
- raw little-endian ``.bin``/``.raw`` files (and ``.npy`` files) described by one JSON map in
  the folder: ``{file: {"name", "shape", "layout": "NCHW"|"NHWC", "dtype", "scale",
  "zero_point"}}``. ``shape`` (as stored) is needed for raw files; ``dtype`` defaults to
  float32, ``layout`` to NCHW; integer values are dequantized as (value - zero_point) * scale
  (scale and zero point: numbers, or one per channel); NHWC tensors are permuted to NCHW.
  Files with no ``name`` are paired by shape and order (the map's order);
- an RKNN Toolkit2 ``accuracy_analysis`` snapshot folder: ``map_name_to_file.txt`` beside
  ``simulator/`` (the quantized tensors, as .npy, in ``simulator/npy/`` where present). The
  map's lines are read loosely: on each line, the token naming a file of the simulator
  folder is the file, the first other token the layer name;
- a Qualcomm QNN ``qnn-net-run --debug`` output folder: ``--debug`` saves the output of every
  layer, ``--output_dir`` (default ``./output``) holds one ``Result_<N>/`` folder per line of
  the input list, and each tensor is one raw file named after it, ``<tensor name>.raw``:
  float32 unless ``--use_native_output_files`` was given (documented in the qnn-net-run help,
  QNN SDK "Tools" page). The converter writes tensor names as C identifiers (characters
  other than letters and digits as '_': ``sanitise``), and names match that way. The files
  hold no shape: each takes the shape of the float value its name stands for, in QNN's own
  channel-last layout (NHWC, the layout of native QNN operators), permuted to NCHW
  (``layout="NCHW"`` when a backend dumps channel-first). Give the folder that holds
  ``Result_<N>/`` (one of them) or a ``Result_<N>/`` folder itself;
- a TI TIDL trace folder: inference with ``debug_level`` 3 writes per-layer fixed-point traces
  ``tidl_trace<dataId:4>_<batch:5>_<channels:5>_<width:5>x<height:5>.y`` (newer releases put
  ``_subgraph_<id>_`` after ``tidl_trace``), ``debug_level`` 4 also the float traces of the
  same name ending in ``_float.bin`` (raw float32, what TI's layer_trace_inspector reads),
  and compilation writes ``*.layer_info.txt`` in the artifacts' ``tempDir``: one line per
  layer, "layerId dataId name-in-the-original-model", layerId the order of execution
  (edgeai-tidl-tools docs/tidl_osr_debug.md). Copy the ``layer_info.txt`` beside the traces:
  the float traces are read, shaped (batch, channels, height, width), named by their dataId's
  layer and ordered by layerId. Fixed-point traces alone are refused: they carry no scale.

>>> from layerbisect import demo, find_first_bad_layer
>>> folder = DumpFolder(demo.dump(demo.scratch()))  # the demo int8 model's tensors, as .npy
>>> report = find_first_bad_layer(demo.float_model(), folder, inputs=demo.image())
>>> report.first_bad.float_nodes[-1], report.first_bad.quant_tensor
('conv2', 'conv2')
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path

import numpy as np

from layerbisect.errors import LayerbisectError
from layerbisect.grid import dequantize
from layerbisect.layouts import permuted, to_channels_first, to_channels_last

RKNN_MAP = "map_name_to_file.txt"
LAYOUTS = ("NCHW", "NHWC")
QNN_RESULT = re.compile(r"Result_(\d+)")
TIDL_TRACE = re.compile(r"tidl_trace(?:_subgraph_(\w+?)_)?(\d{4})_(\d{5})_(\d{5})_(\d{5})x(\d{5})(_float)?\.(?:bin|y)")
TIDL_INFO = "layer_info.txt"


@dataclass(frozen=True)
class DumpedTensor:
    """One dumped tensor: where it is and how to read it. ``key`` is its name, or ``<file>``
    when the dump does not name it."""

    key: str
    path: Path
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    layout: str = "NCHW"
    scale: float | Sequence[float] | None = None
    zero_point: float | Sequence[float] | None = None
    flat: bool = False
    """The file holds no shape (QNN's raw files): without one, it is read as a vector."""

    def read(self) -> np.ndarray:
        """The tensor as float32 values in NCHW layout."""
        array = self._load()
        if self.layout == "NHWC" and array.ndim >= 3:
            array = np.transpose(array, to_channels_first(array.ndim))
        if self.scale is not None:
            array = self._dequantized(array)
        return np.ascontiguousarray(array)

    def _load(self) -> np.ndarray:
        if self.path.suffix == ".npy":
            try:
                return np.load(self.path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise LayerbisectError(f"cannot read dump file {self.path}: {exc}") from None
        if self.shape is None and not self.flat:
            raise LayerbisectError(f"dump file {self.path.name}: the map gives no shape, which a raw file needs")
        dtype = np.dtype(self.dtype or "float32").newbyteorder("<")
        data = np.fromfile(self.path, dtype=dtype)
        if self.shape is None:
            return data
        expected = int(np.prod(self.shape))
        if data.size != expected:
            if self.flat:
                raise LayerbisectError(
                    f"dump file {self.path.name} holds {data.size} {dtype.name} values, but the float value "
                    f"it is named after has {expected}: qnn-net-run writes float32 files unless "
                    "--use_native_output_files is given; dump float32 files"
                )
            raise LayerbisectError(
                f"dump file {self.path.name} holds {data.size} {dtype.name} values, but its shape "
                f"{list(self.shape)} needs {expected}: check its dtype and shape in the map"
            )
        return data.reshape(self.shape)

    def _dequantized(self, array: np.ndarray) -> np.ndarray:
        scale = np.asarray(self.scale, dtype=np.float64)
        zero_point = np.asarray(self.zero_point or 0, dtype=np.float64)
        # one value, or one per channel (axis 1, NCHW)
        return dequantize(array, scale, zero_point, axis=1, dtype=np.float64).astype(np.float32)


class DumpFolder:
    """The tensors dumped in a folder, for one run: a ``TensorSource`` that returns them
    whatever the feeds (they must be the feeds the dump was made from). See the module
    docstring for the layouts; ``map`` names the JSON map when the folder holds several.

        >>> from layerbisect import demo
    >>> DumpFolder(demo.dump(demo.scratch()))({})["conv1"].shape
    (1, 16, 32, 32)
    """

    single_run = True

    def __init__(self, path: str | PathLike, map: str | PathLike | None = None, layout: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise LayerbisectError(f"dump folder not found: {self.path}")
        if layout is not None and layout.upper() not in LAYOUTS:
            raise LayerbisectError(f"layout must be NCHW or NHWC, got {layout!r}")
        self.label = f"dump folder {self.path}"
        if (self.path / RKNN_MAP).is_file():
            self.tensors = _rknn(self.path)
        elif any(TIDL_TRACE.fullmatch(file.name) for file in self.path.iterdir()):
            self.tensors = _tidl(self.path, map)
        elif _qnn_results(self.path):
            self.tensors = _qnn(self.path, (layout or "NHWC").upper())
        else:
            self.tensors = _folder(self.path, map)
        if not self.tensors:
            raise LayerbisectError(
                f"{self.label} holds no .npy file and no JSON map of .bin/.raw files; see "
                "docs/sources.md for the layouts read"
            )
        self._expected: Mapping[str, tuple[int, ...]] = {}

    def expect(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Learn the shape of the float value each tensor name stands for (exact names and
        sanitised ones), for files that hold none (QNN's raw files) or another view of it
        (TIDL's four dimensions for a vector): such a tensor, of as many values, takes it."""
        self._expected = dict(shapes)

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every dumped tensor, by name (``<file>`` where unnamed), in the dump's order."""
        return {tensor.key: _shaped(tensor, self._expected).read() for tensor in self.tensors}


def sanitise(name: str) -> str:
    """A tensor name as dump files and vendor converters write it: every character other than
    a letter, a digit or '_' replaced by '_' ('/' and ':' cannot be in file names; QNN's
    converter also replaces '.' and '-').

    >>> sanitise("/layer1/conv.0:0")
    '_layer1_conv_0_0'
    """
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def _shaped(tensor: DumpedTensor, expected: Mapping[str, tuple[int, ...]]) -> DumpedTensor:
    """``tensor`` with the shape its name stands for, where the file holds none (stored in its
    layout) or holds those values in another view (only unit dimensions differ)."""
    shape = expected.get(tensor.key) or expected.get(sanitise(tensor.key))
    if shape is None:
        return tensor
    stored = permuted(shape, to_channels_last(len(shape))) if tensor.layout == "NHWC" and len(shape) >= 3 \
        else tuple(shape)
    if tensor.shape is None:
        return replace(tensor, shape=stored)
    squeezed = tuple(d for d in tensor.shape if d != 1)
    if tensor.shape != stored and squeezed == tuple(d for d in stored if d != 1):
        return replace(tensor, shape=stored)
    return tensor


def _folder(path: Path, map_path: str | PathLike | None) -> list[DumpedTensor]:
    """The tensors of a folder of .npy files and/or files described by a JSON map."""
    entries = _json_map(path, map_path)
    mapped = [_entry(path, file, spec) for file, spec in entries.items()]
    listed = {tensor.path.name for tensor in mapped}
    loose = [
        DumpedTensor(file.name[: -len(".npy")], file)
        for file in sorted(path.glob("*.npy"), key=lambda f: _natural(f.name)) if file.name not in listed
    ]
    return mapped + loose


def _json_map(path: Path, map_path: str | PathLike | None) -> dict[str, dict]:
    """The folder's JSON map: the one given, or the only .json file holding {file: {...}}."""
    candidates = [Path(map_path)] if map_path is not None else sorted(path.glob("*.json"))
    maps = {}
    for candidate in candidates:
        try:
            content = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LayerbisectError(f"cannot read the dump map {candidate}: {exc}") from None
        if isinstance(content, dict) and all(isinstance(v, dict) for v in content.values()):
            maps[candidate] = content
        elif map_path is not None:
            raise LayerbisectError(f"{candidate} is not a dump map: expected {{file: {{\"name\", \"shape\", ...}}}}")
    if len(maps) > 1:
        raise LayerbisectError(
            f"{path} holds several JSON maps ({', '.join(p.name for p in maps)}): name the one to use "
            "(DumpFolder(path, map=...))"
        )
    return next(iter(maps.values()), {})


def _entry(folder: Path, file: str, spec: dict) -> DumpedTensor:
    """One entry of a JSON map, checked."""
    path = folder / file
    if not path.is_file():
        raise LayerbisectError(f"the dump map lists {file!r}, which is not in {folder}")
    layout = str(spec.get("layout", "NCHW")).upper()
    if layout not in LAYOUTS:
        raise LayerbisectError(f"dump map entry {file!r}: layout must be NCHW or NHWC, got {layout!r}")
    shape = spec.get("shape")
    dtype = spec.get("dtype")
    try:
        np.dtype(dtype or "float32")
    except TypeError:
        raise LayerbisectError(f"dump map entry {file!r}: unknown dtype {dtype!r}") from None
    if shape is not None:
        try:
            shape = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise LayerbisectError(
                f"dump map entry {file!r}: shape must be a list of integers, got {spec['shape']!r}"
            ) from None
        if any(d < 0 for d in shape):
            raise LayerbisectError(f"dump map entry {file!r}: shape {list(shape)} has a negative dimension")
    name = spec.get("name")
    return DumpedTensor(
        key=str(name) if name else f"<{file}>", path=path, shape=shape, dtype=dtype, layout=layout,
        scale=spec.get("scale"), zero_point=spec.get("zero_point"),
    )


def _rknn(path: Path) -> list[DumpedTensor]:
    """The simulator tensors of an RKNN accuracy-analysis snapshot, named by its map."""
    simulator = path / "simulator"
    folder = simulator / "npy" if (simulator / "npy").is_dir() else simulator
    if not folder.is_dir():
        raise LayerbisectError(f"{path} has {RKNN_MAP} but no simulator/ folder of quantized tensors")
    files = {file.name: file for file in folder.glob("*.npy")}
    named: dict[str, DumpedTensor] = {}
    for line in (path / RKNN_MAP).read_text(encoding="utf-8", errors="replace").splitlines():
        tokens = line.split()
        found = [t for t in tokens if t in files]
        others = [t for t in tokens if t not in files]
        if found and others and found[0] not in named:
            named[found[0]] = DumpedTensor(others[0], files[found[0]])
    unnamed = [DumpedTensor(f"<{name}>", files[name]) for name in sorted(files, key=_natural) if name not in named]
    return [*named.values(), *unnamed]  # the map's order, then the files it does not name


def _natural(name: str) -> list:
    """Sort key putting '2.npy' before '10.npy'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _qnn_results(path: Path) -> list[Path]:
    """The ``Result_<N>`` folders of a qnn-net-run output folder, or the folder itself if it
    is one; none for another folder (one with a JSON map is read by its map)."""
    if any(path.glob("*.json")):
        return []
    if QNN_RESULT.fullmatch(path.name) and any(path.rglob("*.raw")):
        return [path]
    numbered = {}  # result folder -> its N
    for p in path.iterdir():
        match = QNN_RESULT.fullmatch(p.name)
        if match and p.is_dir():
            numbered[p] = int(match.group(1))
    return sorted(numbered, key=numbered.__getitem__)


def _qnn(path: Path, layout: str) -> list[DumpedTensor]:
    """The raw float32 files of one qnn-net-run ``--debug`` result, named by file (a name
    holding '/' may have been written into subfolders), shaped when their names are known."""
    results = _qnn_results(path)
    if len(results) > 1:
        raise LayerbisectError(
            f"{path} holds {len(results)} qnn-net-run results ({', '.join(r.name for r in results[:3])}"
            f"{', ...' if len(results) > 3 else ''}), one per input: give the folder of the run whose "
            "inputs you give (for example " + str(results[0]) + ")"
        )
    (result,) = results
    files = sorted(result.rglob("*.raw"), key=lambda f: _natural(str(f.relative_to(result))))
    return [DumpedTensor("_".join(f.relative_to(result).with_suffix("").parts), f, dtype="float32", layout=layout,
                         flat=True) for f in files]


def _tidl(path: Path, info_path: str | PathLike | None) -> list[DumpedTensor]:
    """The float traces of a TIDL trace folder, named and ordered by its layer_info table."""
    named = [(TIDL_TRACE.fullmatch(f.name), f) for f in path.iterdir()]
    traces = [(m, f) for m, f in named if m is not None]
    floats = [(m, f) for m, f in traces if m.group(7)]
    if not floats:
        raise LayerbisectError(
            f"{path} holds TIDL fixed-point traces (.y) only, which carry no scale: run the inference "
            "with debug_level=4, which also writes the float traces (tidl_trace..._float.bin)"
        )
    subgraphs = {m.group(1) for m, _ in floats}
    if len(subgraphs) > 1:
        raise LayerbisectError(
            f"{path} holds the traces of {len(subgraphs)} TIDL subgraphs ({', '.join(sorted(map(str, subgraphs)))}), "
            "whose data ids overlap: give a folder with one subgraph's traces and its layer_info.txt"
        )
    infos = [Path(info_path)] if info_path is not None else sorted(path.glob(f"*{TIDL_INFO}"))
    if len(infos) != 1:
        raise LayerbisectError(
            f"{path} holds TIDL traces and {len(infos) or 'no'} *{TIDL_INFO} files: copy the one the "
            "compilation wrote (in the artifacts' tempDir) beside the traces, or name it "
            "(DumpFolder(path, map=...))"
        )
    layers: dict[int, tuple[int, str]] = {}  # data id -> (layer id, name)
    for line in infos[0].read_text(encoding="utf-8", errors="replace").splitlines():
        tokens = line.split()
        if len(tokens) >= 3 and tokens[0].isdigit() and tokens[1].isdigit():
            layers.setdefault(int(tokens[1]), (int(tokens[0]), tokens[-1]))
    tensors = []
    for match, file in floats:
        data_id, batch, channels, width, height = (int(match.group(i)) for i in range(2, 7))
        layer, name = layers.get(data_id, (None, None))
        tensors.append((layer if layer is not None else 1 << 30, data_id, DumpedTensor(
            name or f"<{file.name}>", file, shape=(batch, channels, height, width), dtype="float32")))
    return [tensor for *_, tensor in sorted(tensors, key=lambda t: t[:2])]
