"""Run both models over samples and measure aligned values, cumulative and isolated.

A ``Measurement`` is everything one pass needs, in memory and picklable, so that samples can
be measured here or in the workers of any ``concurrent.futures.Executor``: the float model and
the quantized model, each cut down to the segment that computes the values wanted (from the
inputs, or from values an earlier pass saved), and, for isolated error, the quantized segment
cut at its boundaries (``layerbisect.isolate``). Per-sample metrics are small; activations are
dropped as soon as a sample is compared, except the few a later pass resumes from.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from layerbisect.align import Pair
from layerbisect.compare import Aggregate, Metrics, Quantized, compare, token_cosines
from layerbisect.errors import LayerbisectError, SampleError
from layerbisect.graph import Readout
from layerbisect.inputs import InputPlan
from layerbisect.isolate import Cut, cut
from layerbisect.run import Session, weight_bytes
from layerbisect.segment import Segments

SAMPLES_PER_TASK = 4
# Models of a pass holding this many bytes of weights in all run one at a time
# (``one_at_a_time``), each over a chunk of samples whose float values fill at most
# CHUNK_BYTES (and CHUNK_SAMPLES samples): a chunk loads each model once.
ONE_AT_A_TIME = 256 << 20
CHUNK_BYTES = 256 << 20
CHUNK_SAMPLES = 64
# tasks submitted to an executor and not yet collected: enough to keep every worker of a pool
# busy, few enough that a dataset is never all read into memory
TASKS_IN_FLIGHT = max(16, 2 * (os.cpu_count() or 1))


@dataclass(frozen=True)
class Measurement:
    """One pass over the samples: which pairs, and the three models that measure them.

    Each model is a segment (``layerbisect.segment``): it computes only the values wanted,
    starting from the values saved by an earlier pass where there are some (``*_starts``),
    and saves the values a later pass resumes from (``*_saves``).
    """

    pairs: tuple[Pair, ...]
    float_model: onnx.ModelProto | None  # None: nothing left to compute
    quant_model: onnx.ModelProto | None
    isolated_model: onnx.ModelProto | None
    cuts: tuple[Cut, ...]
    float_names: tuple[str, ...]
    quant_names: tuple[str, ...]
    float_saves: tuple[str, ...]
    quant_saves: tuple[str, ...]
    inputs: InputPlan
    seed: int
    providers: tuple[str, ...]
    originals: tuple[onnx.ModelProto, onnx.ModelProto] | None  # to word a load failure
    buffers: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]] = ({}, {})
    """The data of the large weights of the float and the quantized models, out of the
    segments (``segment.DETACHED``); the cut model reads the quantized model's."""
    by_token: frozenset[str] = frozenset()  # the float model's outputs, compared by token too (``compare_pairs``)
    key: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class Saved:
    """Values saved at a boundary: for each sample, a dict per model (float, quantized)."""

    values: tuple[tuple[dict[str, np.ndarray], dict[str, np.ndarray]], ...]

    def dtypes(self, model: int) -> dict[str, np.dtype]:
        """Name and dtype of each value saved from the float (0) or quantized (1) model."""
        return {name: array.dtype for name, array in self.values[0][model].items()} if self.values else {}

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(f) + _nbytes(q) for f, q in self.values)


@dataclass(frozen=True)
class SampleResult:
    """Metrics of one sample: one entry per pair, None where the values cannot be compared."""

    cumulative: tuple[Metrics | None, ...]
    isolated: tuple[Metrics | None, ...]
    problems: tuple[tuple[int, str], ...]
    shapes: tuple[tuple[int, ...], ...]
    held_bytes: int
    executions: int
    saved: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


@dataclass
class Totals:
    """Aggregated metrics of a pass, and what it cost."""

    cumulative: list[Aggregate]
    isolated: list[Aggregate]
    problems: dict[int, str]
    shapes: dict[int, tuple[int, ...]]
    samples: int = 0
    executions: int = 0
    peak_bytes: int = 0


def prepare(
    float_model: Segments,
    quant_model: Segments,
    pairs: Sequence[Pair],
    boundaries: Sequence[Pair] | None,
    inputs: InputPlan,
    *,
    seed: int,
    providers: Sequence[str],
    start: Saved | None = None,
    saves: tuple[Sequence[str], Sequence[str]] = ((), ()),
    unfed: Mapping[str, frozenset[str]] | None = None,
) -> Measurement:
    """Build the models of a pass measuring ``pairs``, resumed from the values of ``start``
    and saving the values named in ``saves`` (float, quantized) for a later pass. Isolated
    error is measured unless ``boundaries`` (the pairs whose values feed them, cut and fed
    float values) is None; ``unfed`` names, by boundary float tensor, the quantized nodes
    that its cut must not feed (see ``isolate.cut``)."""
    float_starts = start.dtypes(0) if start else {}
    quant_starts = start.dtypes(1) if start else {}
    quant_names = tuple(dict.fromkeys(p.quant_tensor for p in pairs))
    quant_run = [n for n in dict.fromkeys([*quant_names, *saves[1]]) if n not in quant_starts]
    isolated_model: onnx.ModelProto | None = None
    cuts: tuple[Cut, ...] = ()
    isolated_run = [n for n in quant_names if n not in quant_starts]
    if boundaries is not None and isolated_run:
        cut_model, cuts = cut(quant_model.extract(isolated_run, quant_starts, detached=True), boundaries,
                              quant_model.types, unfed)
        fed = {**quant_starts, **{c.name: c.dtype for c in cuts}}
        isolated_model = Segments(cut_model).extract(isolated_run, fed)
    float_names = tuple(dict.fromkeys([*(p.float_tensor for p in [*pairs, *(boundaries or ())]),
                                       *(c.float_readout.tensor for c in cuts)]))
    float_run = [n for n in dict.fromkeys([*float_names, *saves[0]]) if n not in float_starts]
    return Measurement(
        pairs=tuple(pairs),
        float_model=float_model.extract(float_run, float_starts, detached=True) if float_run else None,
        quant_model=quant_model.extract(quant_run, quant_starts, detached=True) if quant_run else None,
        isolated_model=isolated_model,
        cuts=cuts,
        float_names=float_names,
        quant_names=quant_names,
        float_saves=tuple(saves[0]),
        quant_saves=tuple(saves[1]),
        inputs=inputs,
        seed=seed,
        providers=tuple(providers),
        originals=(float_model.model, quant_model.model),
        buffers=(float_model.buffers, quant_model.buffers),
        by_token=frozenset(output.name for output in float_model.model.graph.output),
    )


def measure(
    measurement: Measurement,
    samples: Iterable,
    executor: Executor | None = None,
    start: Saved | None = None,
    save_limit: float = math.inf,
) -> tuple[Totals, Saved | None]:
    """Measure every sample (a dict, or None for seeded random inputs) and aggregate in order;
    return the totals and the values the pass saved.

    ``start`` holds the values the pass resumes from, one entry per sample, in order. The
    values the pass saves are returned when they total at most ``save_limit`` bytes (else
    None: a later pass then starts from the inputs). With an ``executor``, samples go to its
    workers a few at a time; the result is the same.
    """
    n = len(measurement.pairs)
    totals = Totals([Aggregate() for _ in range(n)], [Aggregate() for _ in range(n)], {}, {})
    starts = start.values if start is not None else itertools.repeat(({}, {}))
    saved: list | None = []
    saved_bytes = 0
    for result in _results(measurement, zip(samples, starts), executor):
        totals.samples += 1
        totals.executions += result.executions
        totals.peak_bytes = max(totals.peak_bytes, result.held_bytes)
        totals.problems.update(result.problems)
        totals.shapes.update(enumerate(result.shapes))
        for index, (cumulative, isolated) in enumerate(zip(result.cumulative, result.isolated)):
            if cumulative is not None and index not in totals.problems:
                totals.cumulative[index].add(cumulative)
            if isolated is not None and index not in totals.problems:
                totals.isolated[index].add(isolated)
        if saved is not None and (measurement.float_saves or measurement.quant_saves):
            saved_bytes += _nbytes(result.saved[0]) + _nbytes(result.saved[1])
            saved = None if saved_bytes > save_limit else saved
            if saved is not None:
                saved.append(result.saved)
    kept = Saved(tuple(saved)) if saved else None
    totals.peak_bytes += (start.nbytes if start is not None else 0) + (kept.nbytes if kept else 0)
    return totals, kept


def _results(measurement: Measurement, samples: Iterable, executor: Executor | None):
    """Each sample's result, in order. An executor gets a few samples a task and at most
    ``TASKS_IN_FLIGHT`` tasks at once: samples are read as workers free up, not all at first.
    Here, the models of a pass whose weights are large run one at a time (``one_at_a_time``)."""
    items = enumerate(samples)
    if executor is None:
        if one_at_a_time(measurement):
            _SESSIONS.clear()
            size = 1  # then as many as CHUNK_BYTES of float values hold
            while chunk := list(itertools.islice(items, size)):
                results, float_bytes = _measure_chunk(measurement, chunk, lambda role: _session(measurement, role))
                yield from results
                size = max(1, min(CHUNK_SAMPLES, CHUNK_BYTES * len(chunk) // max(1, float_bytes)))
            return
        try:
            for index, (sample, start) in items:
                yield measure_sample(measurement, sample, start, index)
        finally:
            _SESSIONS.pop(measurement.key, None)  # sessions live as long as their pass
        return
    measurement = replace(measurement, originals=None)  # workers need not receive them
    futures: collections.deque = collections.deque()
    while chunk := list(itertools.islice(items, SAMPLES_PER_TASK)):
        futures.append(executor.submit(measure_samples, measurement, chunk))
        if len(futures) == TASKS_IN_FLIGHT:
            yield from futures.popleft().result()
    while futures:
        yield from futures.popleft().result()


def one_at_a_time(measurement: Measurement) -> bool:
    """Whether the models of a pass hold so much weight (``ONE_AT_A_TIME`` bytes or more in
    all) that only one of them is loaded at a time: each runs over a chunk of samples (see
    ``CHUNK_BYTES``) and is released before the next is loaded, the float values of the chunk
    held meanwhile. Onnxruntime maps weights kept in external files and copies the others; a
    session of each model at once held every weight three times over (float, quantized, and
    the quantized model cut for isolated error), where running the models themselves one
    after the other holds the largest once."""
    models = (measurement.float_model, measurement.quant_model, measurement.isolated_model)
    return sum(weight_bytes(model) for model in models if model is not None) >= ONE_AT_A_TIME


def measure_samples(measurement: Measurement, items: list) -> list[SampleResult]:
    """Measure a few (index, (sample, start values)) items (the task a worker runs)."""
    return [measure_sample(measurement, sample, start, index) for index, (sample, start) in items]


_SESSIONS: dict[str, tuple] = {}
ROLES = ("float model", "quantized model", "quantized model cut for isolated error")


def _session(measurement: Measurement, role: int) -> Session | None:
    """A new session of one of the models of ``measurement`` (0 float, 1 quantized, 2 cut)."""
    model = (measurement.float_model, measurement.quant_model, measurement.isolated_model)[role]
    originals = measurement.originals or (None, None)
    original = originals[0] if role == 0 else originals[1]
    buffers = measurement.buffers[0] if role == 0 else measurement.buffers[1]
    return None if model is None else Session(model, ROLES[role], measurement.providers, original, buffers)


def _sessions(measurement: Measurement) -> tuple:
    """Sessions of a measurement, made once per process and kept for its last measurement."""
    if measurement.key not in _SESSIONS:
        _SESSIONS.clear()
        _SESSIONS[measurement.key] = tuple(_session(measurement, role) for role in range(3))
    return _SESSIONS[measurement.key]


def measure_sample(measurement: Measurement, sample, start=({}, {}), index: int = 0) -> SampleResult:
    """Run the models of ``measurement`` on one sample and compare every pair; ``start``
    holds the values this sample's pass resumes from (float, quantized). Bad feeds raise
    ``SampleError`` naming ``index``, the sample's position."""
    sessions = _sessions(measurement)
    (result,), _ = _measure_chunk(measurement, [(index, (sample, start))], sessions.__getitem__)
    return result


def _measure_chunk(measurement: Measurement, items: list, session_of) -> tuple[list[SampleResult], int]:
    """Measure a chunk of (index, (sample, start values)) items, one model at a time over
    all of them: the float model, then the quantized one (cumulative error), then the cut
    one (isolated error); return their results and the bytes of the float values held
    meanwhile. ``session_of(role)`` gives each model's session; this holds one at a time.
    Bad feeds raise ``SampleError`` naming the sample's index."""
    feeds, starts = [], []
    for index, (sample, start) in items:
        try:
            feeds.append(measurement.inputs.feeds(sample, measurement.seed))
        except LayerbisectError as exc:
            raise SampleError(index, str(exc)) from None
        starts.append(start)
    session = session_of(0)
    float_values = [_run(session, measurement.float_model, f, start[0], [*measurement.float_names,
                                                                          *measurement.float_saves])
                    for (f, _), start in zip(feeds, starts)]
    float_saved = [_kept(values, measurement.float_saves, session) for values in float_values]
    runs = int(session is not None)
    float_bytes = sum(_fresh_bytes(v, start[0], saved) for v, start, saved in zip(float_values, starts, float_saved))
    del session
    session = session_of(1)
    cumulative: list[tuple[Metrics | None, ...]] = []
    problems: list[dict[int, str]] = []
    quant_saved: list[dict[str, np.ndarray]] = []
    quant_bytes = 0
    for values, (_, q), start in zip(float_values, feeds, starts):
        quant_values = _run(session, measurement.quant_model, q, start[1],
                            [*measurement.quant_names, *measurement.quant_saves])
        quant_saved.append(_kept(quant_values, measurement.quant_saves, session))
        quant_bytes = max(quant_bytes, _fresh_bytes(quant_values, start[1], quant_saved[-1]))
        problems.append({})
        cumulative.append(compare_pairs(measurement.pairs, values, quant_values, problems[-1], measurement.by_token))
        del quant_values
    runs += session is not None
    del session
    isolated: list = [(None,) * len(measurement.pairs)] * len(items)
    isolated_bytes = 0
    session = session_of(2)
    if session is not None:
        for position, (values, (_, q), start) in enumerate(zip(float_values, feeds, starts)):
            cut_feeds = {c.name: c.feed(values[c.float_readout.tensor]) for c in measurement.cuts}
            isolated_values = _run(session, measurement.isolated_model, {**q, **cut_feeds}, start[1],
                                   measurement.quant_names)
            # a float value fed as it is (a cut after DequantizeLinear) is not held twice
            float_arrays = {id(value) for value in values.values()}
            isolated_bytes = max(isolated_bytes, _nbytes(isolated_values) + sum(
                feed.nbytes for feed in cut_feeds.values() if id(feed) not in float_arrays))
            isolated[position] = compare_pairs(measurement.pairs, values, isolated_values, {})
        runs += 1
    del session
    # values read from ``start`` or saved for later are counted with those (see ``measure``)
    held = float_bytes + quant_bytes + isolated_bytes
    results = [
        SampleResult(c, i, tuple(p.items()), tuple(tuple(v[pair.float_tensor].shape) for pair in measurement.pairs),
                     held, runs, (fs, qs))
        for c, i, p, v, fs, qs in zip(cumulative, isolated, problems, float_values, float_saved, quant_saved)
    ]
    return results, float_bytes


def _run(session: Session | None, model, feeds: dict, start: dict, names: Sequence[str]) -> dict:
    """The values ``names`` of one run of a segment: those it starts from, and the others
    it computes from the feeds and start values its model declares."""
    values = {name: start[name] for name in names if name in start}
    wanted = [name for name in dict.fromkeys(names) if name not in values]
    if session is not None and wanted:
        declared = {i.name for i in model.graph.input}
        feeds = {name: array for name, array in {**feeds, **start}.items() if name in declared}
        values.update(session.run(feeds, wanted))
    return values


def _kept(values: dict, names: Sequence[str], session: Session | None) -> dict[str, np.ndarray]:
    """The values to save: numeric tensors as the model holds them (not those read through a
    cast, nor sequences and the like: a later pass recomputes those)."""
    cast = session.renamed if session is not None else {}
    return {
        name: values[name] for name in names
        if name in values and name not in cast
        and isinstance(values[name], np.ndarray) and values[name].dtype.kind in "biuf"
    }


def compare_pairs(
    pairs, float_values, quant_values, problems: dict, by_token: frozenset[str] = frozenset()
) -> tuple[Metrics | None, ...]:
    """Metrics of every pair, None where it cannot be compared (the reason goes to
    ``problems``, by position): the one way a pair's values are compared, whatever the
    quantized side computed them (a model's pass, a tensor source). Pairs of the float
    tensors ``by_token`` (the model's outputs) of shape ``[batch, seq, features]`` also get
    their worst token's cosine (``compare.token_cosines``), a few dot products per token. On this thread: once
    compare summed with BLAS dots, spreading pairs over threads made it slower on a 2-core
    machine (by 15% with 2 threads, 40% with 4)."""
    outcomes = []
    for index, pair in enumerate(pairs):
        reference = _float_values(pair.float_readout, float_values[pair.float_tensor])
        actual = _float_values(pair.quant_readout, quant_values[pair.quant_tensor])
        if reference.dtype.kind != "f":
            problems[index] = "not a float tensor"
        elif reference.shape != actual.shape and not _rows_merged(reference.shape, actual.shape):
            problems[index] = f"shapes differ: {reference.shape} vs {actual.shape}"
        metrics = None if index in problems else compare(reference, actual, _resolution(pair.quant_readout))
        if metrics is not None and pair.float_tensor in by_token and len(reference.shape) == 3:
            cosines = token_cosines(reference, actual)
            if not np.isnan(cosines).all():
                worst = int(np.nanargmin(cosines))
                metrics = replace(metrics, token_cosine=float(cosines[worst]), worst_token=worst)
        outcomes.append(metrics)
    return tuple(outcomes)


def _resolution(readout: Readout) -> float:
    """The step of a quantized value (the median of per-channel steps), 0 for a float one."""
    if readout.scale is None:
        return 0.0
    return float(readout.scale.item()) if readout.scale.size == 1 else float(np.median(readout.scale))


def _rows_merged(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether two shapes hold the same elements in the same rows, the leading dimensions of
    one merged in the other (a MatMul's [1, 8, 32] and a Gemm's [8, 32])."""
    return math.prod(a) == math.prod(b) and a[-1:] == b[-1:]


def _float_values(readout: Readout, array: np.ndarray) -> np.ndarray | Quantized:
    """``readout.dequantize(array)``, left to ``compare`` where one scale covers the whole
    tensor: it dequantizes a chunk at a time, with no float copy of the whole tensor."""
    scale, zero_point = readout.scale, readout.zero_point
    if (scale is None or scale.size != 1 or not isinstance(array, np.ndarray) or array.dtype.kind not in "iu"
            or (readout.perm is not None and array.ndim == len(readout.perm))):
        return readout.dequantize(array)
    return Quantized(array, float(scale.item()), 0.0 if zero_point is None else float(zero_point.item()))


def _fresh_bytes(values: dict, start: dict, saved: dict) -> int:
    return sum(np.asarray(v).nbytes for name, v in values.items() if name not in start and name not in saved)


def _nbytes(values: dict) -> int:
    return sum(np.asarray(v).nbytes for v in values.values())


def available_memory() -> int:
    """Bytes of memory available now (Linux), or 4 GiB where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30
