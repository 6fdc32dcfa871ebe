"""Feeds for the two models: checked against what each model declares, or generated.

Pure numpy: the input declarations come in as ``InputSpec`` values (``layerbisect.load``
reads them from the ONNX graph). The rules, for models that may declare different inputs:

- each model gets the inputs it declares, taken by name from the feeds; inputs that the two
  models name differently are paired by position (same shape, float types or equal types)
  and share values;
- a key that neither model declares is an error; a key only one model declares goes to it alone;
- a declared input missing from the feeds is an error that names the model and the input;
- a shared name whose shapes differ by exactly an NCHW/NHWC permutation is permuted for the
  model that needs it, and one whose float types differ (float32, float16, bfloat16) is cast
  for it; any other difference is an error;
- with no feeds, seeded random values cover both models' inputs, equal for shared names.

>>> spec = InputSpec("x", np.dtype("float32"), (1, "N"))
>>> plan = plan_inputs([spec], [spec], shapes={"x": (1, 4)})
>>> float_feeds, quant_feeds = plan.feeds(None, seed=0)
>>> float_feeds["x"].shape, bool((float_feeds["x"] == quant_feeds["x"]).all())
((1, 4), True)
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from layerbisect.decoder import Fill, plan_text_inputs
from layerbisect.errors import LayerbisectError
from layerbisect.layouts import to_channels_first, to_channels_last

Feeds = dict[str, np.ndarray]
Sample = Mapping[str, np.ndarray]
Dim = int | str | None
TO_NHWC, TO_NCHW = to_channels_last(4), to_channels_first(4)


@dataclass(frozen=True)
class InputSpec:
    """A model input as declared: dims are ints, or names/None where dynamic."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        # paddle2onnx writes -1 for a dynamic dimension, and onnxruntime reads it so
        dims = tuple(None if isinstance(d, int) and d < 0 else d for d in self.shape)
        object.__setattr__(self, "shape", dims)

    def describe(self) -> str:
        dims = ",".join(str(d) if d is not None else "?" for d in self.shape)
        return f"{self.dtype}[{dims}]"

    def accepts(self, array: np.ndarray) -> bool:
        return (
            array.dtype == self.dtype
            and array.ndim == len(self.shape)
            and all(not isinstance(d, int) or d == n for d, n in zip(self.shape, array.shape))
        )


@dataclass(frozen=True)
class InputPlan:
    """Which model takes which input, and how feeds are turned into each model's feeds."""

    float_specs: tuple[InputSpec, ...]
    quant_specs: tuple[InputSpec, ...]
    shapes: Mapping[str, Sequence[int]]
    notes: tuple[str, ...]
    aliases: Mapping[str, str]  # quantized model's input name -> float model's input name
    # a language model's generated inputs (``layerbisect.decoder``): how token ids, masks and
    # positions are filled, the inputs that cannot be sized (why), and what generated inputs are
    fills: Mapping[str, Fill] = field(default_factory=dict)
    missing: Mapping[str, str] = field(default_factory=dict)
    generated_notes: tuple[str, ...] = ()

    def feeds(self, sample: object, seed: int) -> tuple[Feeds, Feeds]:
        """Return (float feeds, quantized feeds) for one sample (a mapping of input name ->
        array, as the caller gave it: anything else is an error), or random ones if None."""
        if sample is None:
            sample = self._random(seed)
        elif not isinstance(sample, Mapping):
            raise LayerbisectError(
                f"a sample must be a dict of input name -> array, got {type(sample).__name__}"
            )
        known = {s.name for s in self.float_specs} | {s.name for s in self.quant_specs}
        unknown = sorted(set(sample) - known)
        if unknown:
            raise LayerbisectError(
                f"input {unknown[0]!r} is not an input of either model; "
                f"the models take {sorted(known)}{_did_you_mean(unknown[0], known)}"
            )
        arrays = {name: np.asarray(value) for name, value in sample.items()}
        if arrays and all(array.size == 0 for array in arrays.values()):
            name, array = next(iter(arrays.items()))
            raise LayerbisectError(
                f"every input is empty (input {name!r} has shape {list(array.shape)}): no value "
                "would hold anything to compare; give inputs with at least one element"
            )
        for name, array in arrays.items():
            _check_finite(name, array)
        return (
            self._model_feeds(arrays, self.float_specs, self.quant_specs, "float model"),
            self._model_feeds(arrays, self.quant_specs, self.float_specs, "quantized model", self.aliases),
        )

    def _model_feeds(self, arrays: Feeds, specs, other_specs, role: str, aliases=None) -> Feeds:
        others = {spec.name: spec for spec in other_specs}
        feeds = {}
        for spec in specs:
            alias = (aliases or {}).get(spec.name)
            if spec.name not in arrays and alias in arrays:
                arrays = {**arrays, spec.name: arrays[alias]}
            if spec.name not in arrays:
                raise LayerbisectError(
                    f"the {role} needs input {spec.name!r} ({spec.describe()}) but the feeds "
                    f"do not have it; pass it in inputs= or with --input {spec.name}=FILE.npy"
                )
            array = arrays[spec.name]
            if not spec.accepts(array):
                adapted = _adapt(array, spec, others.get(spec.name) or others.get(alias))
                if adapted is None:
                    raise LayerbisectError(
                        f"input {spec.name!r} of the {role} expects {spec.describe()}, "
                        f"got {array.dtype}[{','.join(map(str, array.shape))}]{_fix(array, spec)}"
                    )
                array = adapted
            feeds[spec.name] = array
        return feeds

    def _random(self, seed: int) -> Feeds:
        rng = np.random.default_rng(seed)
        feeds: Feeds = {}
        for spec in self.float_specs + self.quant_specs:
            if spec.name in self.aliases:
                feeds[spec.name] = feeds[self.aliases[spec.name]]
            elif spec.name not in feeds:
                if spec.name in self.missing and spec.name not in self.shapes:
                    raise LayerbisectError(self.missing[spec.name])
                feeds[spec.name] = _random_array(spec, self.shapes.get(spec.name), rng, self.fills.get(spec.name))
        return feeds


def _check_finite(name: str, array: np.ndarray) -> None:
    """Refuse NaN and Inf in a float input: the float model carries them on while quantization
    turns them into finite numbers, so every layer after them would look bad."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    nan = int(np.count_nonzero(np.isnan(array)))
    raise LayerbisectError(
        f"input {name!r} holds {nan} NaN and {array.size - int(finite.sum()) - nan} infinite values "
        f"(of {array.size}): the float model carries them on while quantization makes them finite, "
        "so every layer would look bad; replace them (numpy.nan_to_num) or leave that sample out"
    )


def plan_inputs(
    float_specs: Sequence[InputSpec],
    quant_specs: Sequence[InputSpec],
    shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    past_length: int | None = None,
    vocabulary: Mapping[str, int] | None = None,
) -> InputPlan:
    """Check that the two models' inputs can be fed together and say how.

    ``shapes`` gives the full shape of inputs with dynamic dimensions (used for random feeds).
    A language model's token ids, attention mask, position ids and past keys and values are
    generated to agree (``layerbisect.decoder``): ``vocabulary`` gives the token-id inputs'
    vocabulary sizes, ``past_length`` the past positions of a KV-cache decoder.
    """
    shapes = dict(shapes or {})
    float_names = {s.name for s in float_specs}
    quant_names = {s.name for s in quant_specs}
    unknown = sorted(set(shapes) - float_names - quant_names)
    if unknown:
        raise LayerbisectError(
            f"a shape is given for {unknown[0]!r}, which is not an input of either model; "
            f"the models take {sorted(float_names | quant_names)}"
            f"{_did_you_mean(unknown[0], float_names | quant_names)}"
        )
    float_only = [s for s in float_specs if s.name not in quant_names]
    quant_only = [s for s in quant_specs if s.name not in float_names]
    aliases = {
        q.name: f.name for f, q in zip(float_only, quant_only)
        if _castable(f.dtype, q.dtype) and _compatible(f.shape, q.shape)
    }
    notes = [
        f"input {q!r} of the quantized model takes the values of input {f!r} of the float "
        "model (paired by position)"
        for q, f in aliases.items()
    ]
    for name in sorted((float_names ^ quant_names) - set(aliases) - set(aliases.values())):
        only = "float" if name in float_names else "quantized"
        notes.append(f"input {name!r} is declared by the {only} model only and goes to it alone")
    quant_by_name = {s.name: s for s in quant_specs}
    for spec in float_specs:
        other = quant_by_name.get(spec.name)
        if other is not None and other.dtype != spec.dtype and _castable(spec.dtype, other.dtype):
            notes.append(
                f"input {spec.name!r} is {spec.dtype} in the float model and {other.dtype} in the "
                "quantized model: each model gets the values cast to its own type"
            )
        if other is None or _compatible(spec.shape, other.shape):
            continue
        if _permutes(spec.shape, other.shape) is None:
            raise LayerbisectError(
                f"input {spec.name!r} is {spec.describe()} in the float model but "
                f"{other.describe()} in the quantized model; only an NCHW/NHWC difference "
                "can be bridged"
            )
        notes.append(
            f"input {spec.name!r} is permuted between NCHW ({spec.describe()}, float model) "
            f"and NHWC ({other.describe()}, quantized model)"
            if _permutes(spec.shape, other.shape) == TO_NHWC else
            f"input {spec.name!r} is permuted between NHWC ({spec.describe()}, float model) "
            f"and NCHW ({other.describe()}, quantized model)"
        )
    distinct = [*float_specs, *(spec for spec in quant_specs if spec.name not in float_names)]
    text = plan_text_inputs(distinct, vocabulary or {}, shapes, past_length)
    return InputPlan(tuple(float_specs), tuple(quant_specs), {**text.shapes, **shapes}, tuple(notes), aliases,
                     text.fills, text.missing, text.notes)


def _compatible(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> bool:
    return len(a) == len(b) and all(
        not isinstance(x, int) or not isinstance(y, int) or x == y for x, y in zip(a, b)
    )


def _permutes(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> tuple[int, ...] | None:
    """The permutation taking shape ``a`` to shape ``b``, if it is NCHW<->NHWC."""
    if len(a) != 4 or len(b) != 4:
        return None
    for perm in (TO_NHWC, TO_NCHW):
        if _compatible(tuple(a[i] for i in perm), b):
            return perm
    return None


def _is_float(dtype: np.dtype) -> bool:
    """Whether ``dtype`` holds floating-point numbers (bfloat16, from ml_dtypes, included)."""
    return dtype.kind == "f" or dtype.name == "bfloat16"


def _castable(a: np.dtype, b: np.dtype) -> bool:
    """Whether values of type ``a`` may be given to an input of type ``b``."""
    return a == b or (_is_float(a) and _is_float(b))


def _adapt(array: np.ndarray, spec: InputSpec, other: InputSpec | None) -> np.ndarray | None:
    """``array``, which fits ``other``, cast and permuted so that ``spec`` accepts it, if it can be."""
    if other is None or not other.accepts(array) or not _castable(array.dtype, spec.dtype):
        return None
    array = array.astype(spec.dtype, copy=False)
    if spec.accepts(array):
        return array
    perm = _permutes(other.shape, spec.shape)
    if perm is None or not spec.accepts(array.transpose(perm)):
        return None
    return np.ascontiguousarray(array.transpose(perm))


def _random_array(spec: InputSpec, given: Sequence[int] | None, rng: np.random.Generator,
                  fill: Fill | None = None) -> np.ndarray:
    if given is None:
        static = [d for d in spec.shape if isinstance(d, int)]
        if len(static) < len(spec.shape):
            raise LayerbisectError(_dynamic_message(spec))
        given = static
    shape = tuple(int(d) for d in given)
    if any(d < 0 for d in shape) or not _compatible(spec.shape, shape):
        raise LayerbisectError(
            f"shape {list(shape)} given for input {spec.name!r} does not fit {spec.describe()}"
        )
    if fill is not None:
        return fill.array(shape, spec.dtype, rng)
    if _is_float(spec.dtype):
        return rng.standard_normal(shape).astype(spec.dtype)
    if spec.dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if spec.dtype.kind in "iu":
        return rng.integers(0, 10, shape).astype(spec.dtype)
    raise LayerbisectError(
        f"cannot make random values for input {spec.name!r} of type {spec.dtype}; pass real inputs"
    )


def _dynamic_message(spec: InputSpec) -> str:
    """Why random values for ``spec`` need a shape, and the ``shapes=`` and ``--shape`` to give:
    1 for a dynamic first axis (the batch), the fixed dimensions as declared, the other dynamic
    ones by the model's own names (``D2`` for an unnamed third axis), to be replaced by sizes."""
    dynamic, example, placeholders = [], [], []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            example.append(str(dim))
            continue
        dynamic.append(f"axis {axis}" if dim is None else str(dim))
        placeholder = "1" if axis == 0 else f"D{axis}" if dim is None else str(dim)
        example.append(placeholder)
        placeholders += [] if axis == 0 else [placeholder]
    several = len(dynamic) > 1
    replaced = (f" with {', '.join(placeholders)} replaced by {'sizes' if len(placeholders) > 1 else 'a size'}"
               if placeholders else "")
    return (
        f"input {spec.name!r} ({spec.describe()}) has {'' if several else 'a '}dynamic "
        f"dimension{'s' if several else ''} ({', '.join(dynamic)}): random inputs need its full shape, "
        f"e.g. shapes={{{spec.name!r}: ({', '.join(example)}{',' if len(example) == 1 else ''})}} or "
        f"--shape {spec.name}={','.join(example)}{replaced}; or pass real inputs"
    )


def _fix(array: np.ndarray, spec: InputSpec) -> str:
    """The numpy expression that turns ``array`` into what ``spec`` accepts, when a batch axis,
    an NCHW/NHWC transpose or a cast does; else nothing."""
    expression = spec.name if spec.name.isidentifier() else "array"
    shape = tuple(array.shape)
    if len(shape) + 1 == len(spec.shape) and _compatible((1, *shape), spec.shape):
        expression, shape = expression + "[None]", (1, *shape)
    elif not _compatible(shape, spec.shape):
        perm = _permutes(shape, spec.shape)
        if perm is None:
            return ""
        expression, shape = f"{expression}.transpose{perm}", tuple(shape[i] for i in perm)
    if array.dtype != spec.dtype:
        module = "ml_dtypes" if spec.dtype.name == "bfloat16" else "np"
        expression += f".astype({module}.{spec.dtype.name})"
    return f": pass {expression}"


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the known name closest to ``name``, if one is close."""
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(name.lower(), by_lower, n=1, cutoff=0.6)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""


def samples_of(inputs: Sample | Iterable[Sample] | None) -> Iterable[Sample | None]:
    """The samples ``inputs`` stands for: one dict, an iterable of dicts, or None for one
    sample of seeded random values."""
    if inputs is None:
        return [None]
    if isinstance(inputs, Mapping):
        return [inputs]
    if isinstance(inputs, (str, bytes, np.ndarray)):
        raise LayerbisectError("inputs must be a dict of input name -> array, or a list of such dicts")
    return inputs


def reusable(samples: Iterable[Sample | None]) -> Sequence[Sample | None]:
    """``samples`` for several passes: a sequence is read again in each (a list, or one that
    loads each sample when asked, as the CLI's datasets do); any other iterable is read into
    a list first."""
    return samples if isinstance(samples, Sequence) else list(samples)
