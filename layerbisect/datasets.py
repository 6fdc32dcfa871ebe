"""The samples the ``layerbisect`` command reads, from its feeds flags.

- ``--inputs FILE.npz`` (one array per input name) and ``--input NAME=FILE.npy``: one sample;
- ``--inputs FOLDER``: one sample per ``.npz`` file in it, in the order of their names;
- ``--inputs FILE.npz --batched``: one sample per index of the arrays' leading axis;
- ``--data-loader-script FILE.py[:FUNC]``: the sample dicts ``FUNC()`` returns or yields
  (``load_data`` by default, as in Polygraphy).

``--max-samples N`` keeps the first N samples of a dataset; the arrays of ``--input`` go into
every sample. A dataset reads one sample at a time, when it is needed: a folder or a batched
file is a sequence, read again from its files for another pass (never held whole); a loader
is called again for each read.
"""

from __future__ import annotations

import argparse
import itertools
import math
import types
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import overload

import numpy as np

from layerbisect.errors import LayerbisectError, first_line

Sample = dict[str, np.ndarray]
_END = object()  # what a loader's iterator gives when it is done


def read_samples(args: argparse.Namespace) -> Sample | Dataset | None:
    """What the feeds flags of ``args`` stand for: one sample, a dataset, or None (random)."""
    overrides = {name: _single(name, path) for name, path in args.input}
    if args.data_loader_script is not None:
        script, function = args.data_loader_script
        return Loader(script, function, overrides, args.max_samples)
    if args.inputs is None:
        return overrides or None
    if Path(args.inputs).is_dir():
        if args.batched:
            raise LayerbisectError(f"--batched applies to one .npz file, but --inputs {args.inputs} is a folder")
        return NpzFolder(Path(args.inputs), overrides, args.max_samples)
    if args.batched:
        return BatchedNpz(Path(args.inputs), overrides, args.max_samples)
    return {**_archive(Path(args.inputs)), **overrides}


class Dataset(Iterable[Sample]):
    """Samples read one at a time, each with ``overrides`` (the ``--input`` arrays) on top."""

    def __init__(self, overrides: Sample, limit: int | None) -> None:
        self.overrides, self.limit = overrides, limit

    def describe(self, index: int) -> str:
        """Which sample ``index`` (from 0) is, for an error about it."""
        raise NotImplementedError


class NpzFolder(Dataset, Sequence[Sample]):
    """A folder of ``.npz`` files, one sample each, in the order of their names."""

    def __init__(self, folder: Path, overrides: Sample, limit: int | None) -> None:
        super().__init__(overrides, limit)
        files = sorted(path for path in folder.iterdir() if path.suffix == ".npz" and path.is_file())
        if not files:
            raise LayerbisectError(f"--inputs: folder {folder} holds no .npz file; save each sample "
                                   "(one array per input name) with numpy.savez")
        self.files = files[:limit]

    def __len__(self) -> int:
        return len(self.files)

    @overload
    def __getitem__(self, index: int) -> Sample: ...
    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...
    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        return {**_archive(self.files[index]), **self.overrides}

    def describe(self, index: int) -> str:
        return f"--inputs {self.files[index]} (sample {index})"


class BatchedNpz(Dataset, Sequence[Sample]):
    """One ``.npz`` file whose arrays all carry a leading sample axis of one length, streamed
    a sample at a time from the file."""

    def __init__(self, path: Path, overrides: Sample, limit: int | None) -> None:
        super().__init__(overrides, limit)
        self.path = path
        _archive(path, read=False)  # a readable archive, or an error saying what it is
        with zipfile.ZipFile(path) as archive:
            rows = {}
            for member in archive.namelist():
                stream, shape, _ = self._open(archive, member)
                stream.close()
                rows[member[:-4]] = shape[0]
        if len(set(rows.values())) > 1:
            raise LayerbisectError(
                f"--inputs {path} --batched: the arrays' leading (sample) axes differ: "
                f"{', '.join(f'{name} {count}' for name, count in rows.items())}; give each array one row per sample"
            )
        count = next(iter(rows.values()), 0)
        self.length = count if limit is None else min(count, limit)  # not ``count``: Sequence's method

    def __len__(self) -> int:
        return self.length

    @overload
    def __getitem__(self, index: int) -> Sample: ...
    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...
    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            positions = range(len(self))[index]
            wanted = set(positions)  # read in one pass over the file, up to the last one wanted
            read = {i: sample for i, sample in enumerate(itertools.islice(self, max(wanted, default=-1) + 1))
                    if i in wanted}
            return [read[i] for i in positions]
        return next(itertools.islice(self, range(len(self))[index], None))

    def __iter__(self) -> Iterator[Sample]:
        with zipfile.ZipFile(self.path) as archive:
            streams = {member[:-4]: self._open(archive, member) for member in archive.namelist()}
            for _ in range(self.length):
                sample = {}
                for name, (stream, shape, dtype) in streams.items():
                    row = bytearray(stream.read(math.prod(shape[1:]) * dtype.itemsize))
                    sample[name] = np.frombuffer(row, dtype).reshape(shape[1:])
                yield {**sample, **self.overrides}

    def describe(self, index: int) -> str:
        return f"--inputs {self.path} --batched, sample {index}"

    def _open(self, archive: zipfile.ZipFile, member: str):
        """A stream of the array ``member`` past its header, its shape and its dtype; or an
        error when it cannot be read a row at a time."""
        where = f"--inputs {self.path} --batched: {member}"
        if not member.endswith(".npy"):
            raise LayerbisectError(f"{where} is not an .npy array; save the file with numpy.savez")
        stream = archive.open(member)
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise LayerbisectError(f"{where} is in .npy format {version}, which cannot be read a sample at a "
                                   "time; save it with numpy.savez")
        shape, fortran_order, dtype = read_header(stream)
        if dtype.hasobject:
            raise LayerbisectError(f"{where} holds Python objects; save numeric arrays")
        if not shape:
            raise LayerbisectError(f"{where} is a scalar, with no sample axis; give it one row per sample")
        if fortran_order and len(shape) > 1:
            raise LayerbisectError(f"{where} is in Fortran order, where a sample's values are not together; "
                                   "save numpy.ascontiguousarray of it")
        return stream, shape, dtype


class Loader(Dataset):
    """The samples a function of a Python file returns or yields; called again for each read."""

    def __init__(self, script: str, function: str, overrides: Sample, limit: int | None) -> None:
        super().__init__(overrides, limit)
        self.label = f"--data-loader-script {script}:{function}"
        self.load = _function(script, function)

    def __iter__(self) -> Iterator[Sample]:
        samples = self._call(lambda: iter(self.load()), "calling it")
        for index in itertools.count() if self.limit is None else range(self.limit):
            sample = self._call(lambda: next(samples, _END), f"reading sample {index}")
            if sample is _END:
                return
            yield {**sample, **self.overrides} if isinstance(sample, Mapping) else sample

    def __length_hint__(self) -> int:
        """At most ``--max-samples`` (0: not known), for the progress bar."""
        return self.limit or 0

    def describe(self, index: int) -> str:
        return f"sample {index} of {self.label}"

    def _call(self, step, doing: str):
        """``step()``, an error in the loader's code turned into one line naming it."""
        try:
            return step()
        except Exception as exc:  # the user's code: whatever it raises
            raise LayerbisectError(f"{self.label}: {doing} raised {type(exc).__name__}: {first_line(exc)}") from None


def _function(script: str, name: str):
    """The function ``name`` of the Python file ``script``, which is run here (as a module
    of its own, with no bytecode cache written beside it)."""
    path = Path(script)
    if not path.is_file():
        raise LayerbisectError(f"--data-loader-script: file not found: {script}")
    if path.suffix != ".py":
        raise LayerbisectError(f"--data-loader-script {script} is not a Python (.py) file")
    module = types.ModuleType(f"layerbisect_data_loader_{path.stem}")
    module.__file__ = str(path)
    try:
        exec(compile(path.read_bytes(), str(path), "exec"), module.__dict__)
    except Exception as exc:  # the user's code: whatever it raises
        raise LayerbisectError(
            f"--data-loader-script {script}: running it raised {type(exc).__name__}: {first_line(exc)}"
        ) from None
    function = getattr(module, name, None)
    if not callable(function):
        raise LayerbisectError(f"--data-loader-script {script} has no function {name!r}; define it (returning "
                               f"or yielding dicts of input name -> array) or name another: {script}:FUNC")
    return function


def _single(name: str, path: str) -> np.ndarray:
    array = _load(Path(path), f"--input {name}", "an .npy array")
    if not isinstance(array, np.ndarray):
        raise LayerbisectError(f"--input {name}={path} is an .npz archive, not one .npy array")
    return array


def _archive(path: Path, read: bool = True) -> Sample:
    """The arrays of the .npz archive at ``path`` (none unless ``read``: then it is only checked)."""
    archive = _load(path, "--inputs", "an .npz archive", read)
    if isinstance(archive, np.ndarray):
        raise LayerbisectError(f"--inputs {path} holds a single array, not an .npz archive; use --input NAME={path}")
    return archive


def _load(path: Path, flag: str, kind: str, read: bool = True) -> np.ndarray | Sample:
    """The array, or the arrays of an archive (none unless ``read``), in a feeds file; or an
    error naming the flag and what is wrong."""
    if path.is_dir():
        raise LayerbisectError(f"{flag}: {path} is a folder, not {kind}")
    if not path.is_file():
        raise LayerbisectError(f"{flag}: file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:  # an archive's arrays are read when asked for: read them here
            return {key: loaded[key] for key in loaded.files} if read else {}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        # numpy takes any file it does not know for a pickle and advises allowing pickles
        text = str(exc)
        reason = ("it holds Python objects" if "Object arrays" in text else
                  "it is neither an .npy nor an .npz file" if "pickle" in text else first_line(exc))
        raise LayerbisectError(
            f"{flag}: {path} is not {kind} (numpy could not read it: {reason}); save it with "
            f"{'numpy.savez' if kind.endswith('archive') else 'numpy.save'}"
        ) from None
