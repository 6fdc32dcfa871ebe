"""Random inputs for language models: token ids, attention masks, position ids and a KV cache.

A decoder's inputs are not independent: the attention mask covers the past and the current
tokens, the position ids count on from the past, and every ``past_key_values.*`` tensor holds
the same number of past positions. Standard-normal values and random small integers (what
``layerbisect.inputs`` gives any other input) make none of that hold. This module tells each
input's part from its name and the graph (the token ids are the indices of the embedding's
Gather, whose table gives the vocabulary size), and plans shapes and values that agree:

- token ids: uniform below the vocabulary size;
- an attention mask ``[batch, past + seq]``: ones;
- position ids ``[batch, seq]`` (or ``cache_position``, ``[seq]``): ``past .. past + seq - 1``;
- past keys and values (``past_key_values.<i>.key``, ``past_key``, ``past.<i>``, ...):
  standard-normal, of the declared heads and head size and ``past`` positions (0: empty);
- ``use_cache_branch`` (a merged decoder's switch): whether there is a past.

Sizes come from ``shapes`` where given (a dimension's name fixes it for every input that uses
the name), else from the past length, else from the defaults below for a KV-cache decoder
(an input named ``past...``). Pure numpy, except ``vocabularies``, which reads an ONNX graph.

>>> from layerbisect.inputs import InputSpec
>>> ids = InputSpec("input_ids", np.dtype("int64"), ("batch", "seq"))
>>> mask = InputSpec("attention_mask", np.dtype("int64"), ("batch", "total"))
>>> past = InputSpec("past_key_values.0.key", np.dtype("float32"), ("batch", 2, "past", 16))
>>> plan = plan_text_inputs([ids, mask, past], {"input_ids": 100}, {}, past_length=3)
>>> plan.shapes["attention_mask"], plan.shapes["past_key_values.0.key"], plan.fills["input_ids"]
((1, 11), (1, 2, 3, 16), Fill(kind='tokens', high=100, start=0))
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from layerbisect.errors import LayerbisectError
from layerbisect.wiring import producers

if TYPE_CHECKING:  # inputs.py plans with this module: no import at run time
    from layerbisect.inputs import InputSpec

# a KV-cache decoder's generated step when no shape says otherwise: one sequence of 8 tokens
# after 8 past positions (small enough for any model, long enough that every token attends
# to the past and to earlier tokens of its own step)
DEFAULT_BATCH, DEFAULT_TOKENS, DEFAULT_PAST = 1, 8, 8
# operators that pass token ids on unchanged to the embedding's Gather
_CARRIERS = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}
# the embedding table's position and the axis gathered along, by operator
_EMBEDDINGS = {"Gather": (1, 0, "axis"), "GatherBlockQuantized": (1, 0, "gather_axis"),
               "EmbedLayerNormalization": (0, 2, None)}  # op: (ids position, table position, axis attribute)


@dataclass(frozen=True)
class Fill:
    """How a generated input is filled: ``"tokens"`` (uniform in ``[0, high)``), ``"ones"``,
    ``"positions"`` (``start, start + 1, ...`` along the last axis) or ``"flag"`` (``high``
    as a boolean)."""

    kind: str
    high: int = 0
    start: int = 0

    def array(self, shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
        """Values of ``shape`` and ``dtype`` filled this way."""
        if self.kind == "tokens":
            return rng.integers(0, self.high, shape).astype(dtype)
        if self.kind == "ones":
            return np.ones(shape, dtype)
        if self.kind == "positions":
            count = shape[-1] if shape else 1
            return np.broadcast_to(np.arange(self.start, self.start + count), shape).astype(dtype)
        return np.full(shape, bool(self.high), dtype)


@dataclass(frozen=True)
class TextInputs:
    """The plan for a language model's generated inputs: the full ``shapes`` known (those
    given, and those that follow), how each special input is ``fills``-ed, the ``missing``
    inputs that cannot be sized (by name: why, and what to give) and ``notes`` saying what
    the generated inputs are."""

    shapes: Mapping[str, tuple[int, ...]]
    fills: Mapping[str, Fill]
    missing: Mapping[str, str]
    notes: tuple[str, ...]


def vocabularies(model: onnx.ModelProto) -> dict[str, int]:
    """The graph inputs of ``model`` read as token ids by an embedding (a Gather, a
    GatherBlockQuantized or an EmbedLayerNormalization of a constant table, through Casts and
    Reshapes), with the table's number of rows: the vocabulary size. Reads the tables' shapes
    only, never their data.

    >>> from onnx import TensorProto, helper, numpy_helper
    >>> table = numpy_helper.from_array(np.zeros((50, 4), np.float32), "table")
    >>> ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])
    >>> gather = helper.make_node("Gather", ["table", "ids"], ["h"])
    >>> vocabularies(helper.make_model(helper.make_graph([gather], "g", [ids], [], [table])))
    {'ids': 50}
    """
    graph = model.graph
    dims = {init.name: tuple(init.dims) for init in graph.initializer}
    made_by = producers(graph)
    for node in graph.node:  # a table read through its dequantization or a cast
        if node.op_type in ("DequantizeLinear", "Cast", "Identity") and node.input[0] in dims:
            dims.setdefault(node.output[0], dims[node.input[0]])
    inputs = {info.name for info in graph.input} - set(dims)
    found: dict[str, int] = {}
    for node in graph.node:
        if node.op_type not in _EMBEDDINGS:
            continue
        ids, table, attribute = _EMBEDDINGS[node.op_type]
        if len(node.input) <= max(ids, table) or node.input[table] not in dims:
            continue
        axis = next((a.i for a in node.attribute if a.name == attribute), 0)
        shape = dims[node.input[table]]
        source = node.input[ids]
        while source in made_by and made_by[source].op_type in _CARRIERS:
            source = made_by[source].input[0]
        if source in inputs and -len(shape) <= axis < len(shape):
            found.setdefault(source, int(shape[axis]))
    return found


@dataclass(frozen=True)
class _Parts:
    """The inputs playing each part, and the axes along which each holds a size: the batch,
    the current tokens, the past positions (``axes``, by part: (spec, axis) pairs)."""

    tokens: tuple
    masks: tuple
    positions: tuple
    pasts: tuple
    flags: tuple

    @classmethod
    def of(cls, specs: Sequence[InputSpec], vocabulary: Mapping[str, int]) -> _Parts:
        def integer(spec: InputSpec) -> bool:
            return spec.dtype.kind in "iu"

        return cls(
            tokens=tuple(s for s in specs if s.name in vocabulary or (s.name == "input_ids" and integer(s))),
            masks=tuple(s for s in specs if "attention_mask" in s.name.lower() and len(s.shape) == 2),
            positions=tuple(s for s in specs if re.search(r"position_ids|cache_position", s.name, re.I) and integer(s)),
            pasts=tuple(s for s in specs if _is_past(s)),
            flags=tuple(s for s in specs if s.name == "use_cache_branch" and s.dtype.kind == "b"),
        )

    def axes(self) -> dict[str, list[tuple[InputSpec, int]]]:
        sequences = [*self.tokens, *self.positions]
        return {
            "batch": [(s, 0) for s in [*sequences, *self.masks, *self.pasts] if len(s.shape) >= 2],
            "tokens": [(s, len(s.shape) - 1) for s in sequences],
            "past": [(s, axis) for s in self.pasts for axis in [_past_axis(s)] if axis is not None],
            "total": [(s, 1) for s in self.masks],
        }

    def roles(self) -> dict[str, tuple[str, ...]]:
        """What each axis of a token, position or mask input counts."""
        roles = {s.name: ("batch",) * (len(s.shape) - 1) + ("tokens",) for s in [*self.tokens, *self.positions]}
        roles.update({s.name: ("batch", "total") for s in self.masks})
        return roles


def plan_text_inputs(
    specs: Sequence[InputSpec], vocabulary: Mapping[str, int], shapes: Mapping[str, Sequence[int]],
    past_length: int | None = None,
) -> TextInputs:
    """Plan the generated values of the language-model inputs among ``specs`` (each name
    once): ``vocabulary`` gives the token-id inputs and their vocabulary sizes
    (``vocabularies``), ``shapes`` the shapes given, ``past_length`` the number of past
    positions (None: from ``shapes``, else ``DEFAULT_PAST`` for a KV-cache decoder).
    Models without such inputs get an empty plan."""
    parts = _Parts.of(specs, vocabulary)
    if past_length is not None and not parts.pasts:
        raise LayerbisectError(
            f"past_length={past_length} is given, but neither model declares a past key/value input "
            f"(past_key_values.*, past_key, past_value, ...; the inputs are {sorted(s.name for s in specs)}): "
            "leave it out"
        )
    if not (parts.tokens or parts.masks or parts.positions or parts.pasts):
        return TextInputs({}, {}, {}, ())
    by_name = {spec.name: spec for spec in specs}
    given = {name: tuple(int(d) for d in shape) for name, shape in shapes.items() if name in by_name}
    named: dict[str, int] = {}  # dimension name -> size: from the shapes given, then from the parts' sizes
    for name, shape in given.items():
        for dim, size in zip(by_name[name].shape, shape):
            if isinstance(dim, str):
                named.setdefault(dim, size)
    axes = parts.axes()
    sizes = _sizes(parts, axes, given, named, past_length)
    for role, entries in axes.items():
        role_size = sizes[role]
        for spec, axis in entries:  # other inputs using a name these axes declare get its size
            dim = spec.shape[axis]
            if isinstance(dim, str) and role_size is not None:
                named.setdefault(dim, role_size)
    past = sizes["past"]
    fills = {spec.name: Fill("tokens", vocabulary.get(spec.name) or 10) for spec in parts.tokens}
    fills.update({spec.name: Fill("ones") for spec in parts.masks})
    fills.update({spec.name: Fill("positions", start=past or 0) for spec in parts.positions})
    fills.update({spec.name: Fill("flag", int(bool(past))) for spec in parts.flags})
    out_shapes: dict[str, tuple[int, ...]] = dict(given)
    missing: dict[str, str] = {}
    roles, batch_dims = parts.roles(), {spec.shape[0] for spec, _ in axes["batch"]}
    for spec in specs:
        if spec.name in given:
            continue
        past_axis = _past_axis(spec) if spec in parts.pasts else None
        full = _shape(spec, roles.get(spec.name), past_axis, sizes, named, batch_dims)
        if full is not None:
            out_shapes[spec.name] = full
        elif spec in parts.pasts:
            missing[spec.name] = _past_message(spec, sizes["batch"] or 1, past or 0)
    notes = (_note(parts, sizes, vocabulary, out_shapes),) if parts.pasts else ()
    return TextInputs(out_shapes, fills, missing, notes)


def _sizes(parts: _Parts, axes, given, named, past_length: int | None) -> dict[str, int | None]:
    """The batch, the tokens, the past and the total (past + tokens) the generated inputs take:
    as given (by an input's shape or a dimension's name), else as declared, else (for a
    KV-cache decoder) the defaults. A mask's given length tells the past."""

    def size(role: str) -> int | None:
        for spec, axis in axes[role]:
            dim = spec.shape[axis]
            if spec.name in given:
                return given[spec.name][axis]
            if isinstance(dim, int):
                return dim
            if isinstance(dim, str) and dim in named:
                return named[dim]
        return None

    decoder = bool(parts.pasts)
    batch, count, declared_past = size("batch"), size("tokens"), size("past")
    batch = DEFAULT_BATCH if batch is None and decoder else batch
    count = DEFAULT_TOKENS if count is None and decoder and axes["tokens"] else count
    if past_length is not None and declared_past is not None and declared_past != past_length:
        raise LayerbisectError(
            f"past_length={past_length} but the past inputs hold {declared_past} positions (as given in shapes= "
            "or declared): give one of the two"
        )
    past = past_length if past_length is not None else declared_past
    total = size("total")
    if total is not None and count is not None:  # a mask's length tells the past, or must agree with it
        past = total - count if past is None and total >= count else past
        if past is not None and total != past + count:
            raise LayerbisectError(
                f"input {axes['total'][0][0].name!r} is given {total} positions, but the past ({past}) and the "
                f"tokens ({count}) make {past + count}: an attention mask covers the past and the current tokens"
            )
    past = DEFAULT_PAST if past is None and decoder else past
    return {"batch": batch, "tokens": count, "past": past,
            "total": None if past is None or count is None else past + count}


def _note(parts: _Parts, sizes, vocabulary: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]]) -> str:
    """What a KV-cache decoder's generated inputs are."""
    batch, count, past = sizes["batch"], sizes["tokens"], sizes["past"]
    tokens_of = "" if count is None else f" of {count} token{'s' if count != 1 else ''}"
    head = (f"inputs generated for a KV-cache decoder: {batch} sequence{'s' if batch != 1 else ''}{tokens_of} "
            f"after {past} past position{'s' if past != 1 else ''}")
    said = [f"{spec.name} below its vocabulary of {vocabulary[spec.name]}" if spec.name in vocabulary else
            f"{spec.name} below 10 (no embedding table tells the vocabulary)" for spec in parts.tokens]
    said += [f"{spec.name} all ones" for spec in parts.masks]
    said += [f"{spec.name} {past}..{past + count - 1}" for spec in parts.positions if count is not None]
    shaped = [spec for spec in parts.pasts if spec.name in shapes]
    if shaped:
        said.append(f"{len(shaped)} past key/value input{'s' if len(shaped) != 1 else ''} of shape "
                    f"{list(shapes[shaped[0].name])}")
    return f"{head} ({'; '.join(said)}); past_length= (--past-length) and shapes= (--shape) choose others"


def _is_past(spec: InputSpec) -> bool:
    """A past key or value input of a decoder's own attention (not an encoder's cache)."""
    name = spec.name.lower()
    return ("past" in name and "encoder" not in name and len(spec.shape) >= 3
            and (spec.dtype.kind == "f" or spec.dtype.name == "bfloat16"))


def _past_axis(spec: InputSpec) -> int | None:
    """The axis of a past input that counts past positions: the one whose name says "past",
    else the only dynamic axis after the first (the batch)."""
    dims = spec.shape
    named = [axis for axis, dim in enumerate(dims) if isinstance(dim, str) and "past" in dim.lower()]
    if len(named) == 1:
        return named[0]
    dynamic = [axis for axis, dim in enumerate(dims) if axis > 0 and not isinstance(dim, int)]
    return dynamic[0] if len(dynamic) == 1 else None


def _shape(spec, roles, past_axis, sizes, named, batch_dims) -> tuple[int, ...] | None:
    """The full shape of ``spec``: fixed dimensions as declared, a named one by the size its
    name was given, the others by the part each axis plays (``roles``, or for a past input the
    batch and ``past_axis``); None when one stays unknown."""
    shape = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            size = dim
        elif isinstance(dim, str) and dim in named:
            size = named[dim]
        elif roles is not None and axis < len(roles):
            size = sizes[roles[axis]]
        elif past_axis is not None and axis == past_axis:
            size = sizes["past"]
        elif past_axis is not None and (axis == 0 or dim in batch_dims):
            size = sizes["batch"]
        else:
            size = None
        if size is None:
            return None
        shape.append(size)
    return tuple(shape)


def _past_message(spec: InputSpec, batch: int, past: int) -> str:
    """Why a past input cannot be sized, and the shape to give."""
    axis = _past_axis(spec)
    example = [str(d) if isinstance(d, int) else str(batch) if i == 0 else str(past) if i == axis
               else "HEADS" if i == 1 else "HEAD_SIZE" if i == len(spec.shape) - 1 else f"D{i}"
               for i, d in enumerate(spec.shape)]
    dims = ",".join(str(d) if d is not None else "?" for d in spec.shape)
    what = ("does not say which axis counts past positions" if axis is None
            else "does not declare all its sizes (the heads and head size, fixed in an export)")
    return (f"input {spec.name!r} ({spec.dtype}[{dims}]) {what}: random inputs need its full shape, "
            f"e.g. shapes={{{spec.name!r}: ({', '.join(example)})}} or --shape {spec.name}={','.join(example)} "
            "with the model's sizes; or pass real inputs")
