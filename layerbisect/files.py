"""The files layerbisect writes: never one it reads, and never half of one.

An output is refused when it is the same file as anything a run reads: a model, the external
data files its weights live in, a feeds file, or a file in a folder of dumped tensors. "The
same file" is told by device and inode as well as by resolved path, so hard links and
symlinks are caught. A path that does not exist yet cannot be any of them; only outputs that
exist already make the models' external data be looked up: each model's graph is read (without
its weights) once for as long as the file is unchanged, however many files are written, and a
file named among the reads but not as a model (a feeds file) is never parsed as one.

Outputs are written to a temporary file in the target folder, then renamed into place: a
crash or Ctrl-C leaves the old file or the new one, never half of one.

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> write_text(folder / "report.json", "{}")
>>> (folder / "report.json").read_text()
'{}'
>>> check_outputs({"--json": folder / "report.json"}, [folder / "report.json"])
Traceback (most recent call last):
...
layerbisect.errors.LayerbisectError: --json ... would overwrite an input file; write it elsewhere
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from os import PathLike
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from layerbisect.errors import LayerbisectError
from layerbisect.load import all_tensors, external_folder, graph_only

PathLikeStr = str | PathLike


def check_outputs(outputs: Mapping[str, PathLikeStr | None], reads: Iterable[PathLikeStr | None] = (), *,
                  models: Iterable[PathLikeStr | None] = ()) -> None:
    """Refuse, before any work, an output that cannot be written or would overwrite what the
    run reads. ``outputs`` maps a label (a CLI flag, "path") to a path or None (not asked);
    ``reads`` are the files and folders the run reads (feeds, a script), taken as they are;
    ``models`` the model files (their external data files too: what a result's ``sources``
    lists) and dump folders.

    Checked: the output is not a folder, its folder exists and is writable, no two outputs
    are one file, and no output is a file the run reads (see the module docstring)."""
    asked = {label: Path(path) for label, path in outputs.items() if path is not None}
    seen: dict[Path, str] = {}
    for label, path in asked.items():
        if path.is_dir():
            raise LayerbisectError(f"cannot write {label} {path}: it is a folder; give a file path inside it")
        folder = path.absolute().parent
        if not folder.is_dir():
            raise LayerbisectError(f"cannot write {label} {path}: folder {folder} does not exist; create it first")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise LayerbisectError(f"cannot write {label} {path}: folder {folder} is not writable; write it elsewhere")
        key = path.resolve()
        if key in seen:
            raise LayerbisectError(f"{label} and {seen[key]} are the same file {path}; give each its own")
        seen[key] = label
    existing = {label: path for label, path in asked.items() if path.exists()}
    if not existing:
        return
    read = list(_read_files(reads, models))
    for label, path in existing.items():
        for source in read:
            if path.resolve() == source.resolve():
                raise LayerbisectError(f"{label} {path} would overwrite an input file; write it elsewhere")
            if _same_file(path, source):
                raise LayerbisectError(
                    f"{label} {path} would overwrite an input file: it is the same file as {source} "
                    "(a hard link); write it elsewhere"
                )


def write_text(path: PathLikeStr, text: str, *, reads: Iterable[PathLikeStr] = ()) -> None:
    """Write ``text`` to ``path`` whole (see the module docstring), refusing a file of ``reads``
    (a result's ``sources``: models, their external data, dump folders)."""
    write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"), reads=reads)


def write(path: PathLikeStr, fill: Callable[[Path], object], *, reads: Iterable[PathLikeStr] = ()) -> None:
    """Write a file with ``fill(temporary_path)``, then rename it to ``path``; a file of
    ``reads`` (models, their external data, feeds) is refused, an OSError said in one line."""
    check_outputs({"output": path}, models=reads)
    target = Path(os.path.realpath(path))  # through a symlink: the link keeps pointing at it
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        fill(temporary)
        os.chmod(temporary, _mode_for(target))
        os.replace(temporary, target)
    except OSError as exc:
        raise LayerbisectError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        temporary.unlink(missing_ok=True)


def _mode_for(target: Path) -> int:
    """The permissions a new file gets here (the umask's), or those of the file replaced."""
    if target.exists():
        return target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _read_files(reads: Iterable[PathLikeStr | None], models: Iterable[PathLikeStr | None]) -> Iterable[Path]:
    """Every file behind ``reads`` and ``models``: each path, every file inside a folder, and
    the external data files of each model (a file already found as one is not read as a model)."""
    data: set[Path] = set()
    for given, model in [*((given, False) for given in reads), *((given, True) for given in models)]:
        if given is None:
            continue
        path = Path(given)
        if path.is_dir():
            yield from (inner for inner in path.rglob("*") if inner.is_file())
        elif path.is_file():
            yield path
            if model and path.resolve() not in data:
                found = _external_data_files(path)
                data.update(file.resolve() for file in found)
                yield from found


def _external_data_files(path: Path) -> list[Path]:
    """The files an ONNX model keeps weights in (none if it is not a readable model)."""
    stat = path.stat()
    return [path.parent / location for location in
            _external_locations(path.resolve(), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)]


@functools.lru_cache(maxsize=32)
def _external_locations(path: Path, *version: int) -> tuple[str, ...]:
    """The external data locations of the model in ``path`` as it is in this ``version`` of
    the file (device, inode, size, modification time): read once, whatever is written next."""
    model = graph_only(path)
    if model is None:  # not a readable model: it has no external data
        return ()
    return tuple(sorted({ExternalDataInfo(t).location for t in all_tensors(model.graph) if uses_external_data(t)}
                        - {""}))


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file by device and inode (hard links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def sources(*models: object) -> tuple[str, ...]:
    """What a result was made from, to refuse writing over: each model (or dump folder) given
    as a path, and the external data files that a loaded ``onnx.ModelProto`` refers to by
    folder; anything else (None, a callable) is skipped."""
    found: dict[str, None] = {}
    for model in models:
        if isinstance(model, (str, PathLike)):
            found[str(Path(model))] = None
        elif isinstance(model, onnx.ModelProto):
            for tensor in all_tensors(model.graph):
                if uses_external_data(tensor) and external_folder(tensor):
                    found[str(Path(external_folder(tensor)) / ExternalDataInfo(tensor).location)] = None
    return tuple(found)
