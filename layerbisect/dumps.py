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
  folder is the file, the first other token the layer name.

>>> folder = DumpFolder("dump/")  # doctest: +SKIP
>>> report = find_first_bad_layer("float.onnx", folder, inputs=sample)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from layerbisect.errors import LayerbisectError

RKNN_MAP = "map_name_to_file.txt"
LAYOUTS = ("NCHW", "NHWC")


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

    def read(self) -> np.ndarray:
        """The tensor as float32 values in NCHW layout."""
        array = self._load()
        if self.layout == "NHWC" and array.ndim >= 3:
            array = np.transpose(array, (0, array.ndim - 1, *range(1, array.ndim - 1)))
        if self.scale is not None:
            array = self._dequantized(array)
        return np.ascontiguousarray(array)

    def _load(self) -> np.ndarray:
        if self.path.suffix == ".npy":
            try:
                return np.load(self.path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise LayerbisectError(f"cannot read dump file {self.path}: {exc}") from None
        if self.shape is None:
            raise LayerbisectError(f"dump file {self.path.name}: the map gives no shape, which a raw file needs")
        dtype = np.dtype(self.dtype or "float32").newbyteorder("<")
        data = np.fromfile(self.path, dtype=dtype)
        expected = int(np.prod(self.shape))
        if data.size != expected:
            raise LayerbisectError(
                f"dump file {self.path.name} holds {data.size} {dtype.name} values, but its shape "
                f"{list(self.shape)} needs {expected}: check its dtype and shape in the map"
            )
        return data.reshape(self.shape)

    def _dequantized(self, array: np.ndarray) -> np.ndarray:
        scale = np.asarray(self.scale, dtype=np.float64)
        zero_point = np.asarray(self.zero_point or 0, dtype=np.float64)
        if array.ndim >= 2:  # one value per channel (axis 1, NCHW)
            shape = [1] * array.ndim
            shape[1] = -1
            scale = scale.reshape(shape) if scale.size > 1 else scale
            zero_point = zero_point.reshape(shape) if zero_point.size > 1 else zero_point
        return ((array.astype(np.float64) - zero_point) * scale).astype(np.float32)


class DumpFolder:
    """The tensors dumped in a folder, for one run: a ``TensorSource`` that returns them
    whatever the feeds (they must be the feeds the dump was made from). See the module
    docstring for the layouts; ``map`` names the JSON map when the folder holds several.

    >>> DumpFolder("dump/")({})["conv1"].shape  # doctest: +SKIP
    (1, 8, 16, 16)
    """

    single_run = True

    def __init__(self, path: str | PathLike, map: str | PathLike | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise LayerbisectError(f"dump folder not found: {self.path}")
        self.label = f"dump folder {self.path}"
        self.tensors = _rknn(self.path) if (self.path / RKNN_MAP).is_file() else _folder(self.path, map)
        if not self.tensors:
            raise LayerbisectError(
                f"{self.label} holds no .npy file and no JSON map of .bin/.raw files; see "
                "docs/sources.md for the layouts read"
            )

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every dumped tensor, by name (``<file>`` where unnamed), in the dump's order."""
        return {tensor.key: tensor.read() for tensor in self.tensors}


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
