"""Run both models over samples and measure aligned values, cumulative and isolated.

A ``Measurement`` is everything one pass needs, in memory and picklable, so that samples can
be measured here or in the workers of any ``concurrent.futures.Executor``: the float model and
the quantized model, each pruned to the prefix that computes the values wanted, and, for
isolated error, the quantized model cut at its boundaries (``layerbisect.isolate``).
Per-sample metrics are small; activations are dropped as soon as a sample is compared.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from layerbisect.align import Pair
from layerbisect.compare import Aggregate, Metrics, compare
from layerbisect.expose import expose
from layerbisect.inputs import InputPlan
from layerbisect.isolate import Cut, cut
from layerbisect.run import Session

SAMPLES_PER_TASK = 4


@dataclass(frozen=True)
class Measurement:
    """One pass over the samples: which pairs, and the three models that measure them."""

    pairs: tuple[Pair, ...]
    float_model: onnx.ModelProto
    quant_model: onnx.ModelProto
    isolated_model: onnx.ModelProto | None
    cuts: tuple[Cut, ...]
    float_names: tuple[str, ...]
    quant_names: tuple[str, ...]
    inputs: InputPlan
    seed: int
    providers: tuple[str, ...]
    originals: tuple[onnx.ModelProto, onnx.ModelProto] | None  # to word a load failure
    key: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class SampleResult:
    """Metrics of one sample: one entry per pair, None where the values cannot be compared."""

    cumulative: tuple[Metrics | None, ...]
    isolated: tuple[Metrics | None, ...]
    problems: tuple[tuple[int, str], ...]
    shapes: tuple[tuple[int, ...], ...]
    held_bytes: int
    executions: int


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
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    pairs: Sequence[Pair],
    boundaries: Sequence[Pair] | None,
    inputs: InputPlan,
    *,
    seed: int,
    providers: Sequence[str],
    prune: bool = False,
) -> Measurement:
    """Build the models of a pass measuring ``pairs``; isolated error is measured unless
    ``boundaries`` (the pairs whose values feed them, cut and fed float values) is None. ``prune=True`` cuts the
    models after the last value wanted (a pass over part of the layers)."""
    float_names = tuple(dict.fromkeys(p.float_tensor for p in [*pairs, *(boundaries or ())]))
    quant_names = tuple(dict.fromkeys(p.quant_tensor for p in pairs))
    isolated_model, cuts = None, ()
    if boundaries is not None:
        cut_model, cuts = cut(quant_model, boundaries)
        isolated_model = expose(cut_model, quant_names, prune=prune)
    return Measurement(
        pairs=tuple(pairs),
        float_model=expose(float_model, float_names, prune=prune),
        quant_model=expose(quant_model, quant_names, prune=prune),
        isolated_model=isolated_model,
        cuts=cuts,
        float_names=float_names,
        quant_names=quant_names,
        inputs=inputs,
        seed=seed,
        providers=tuple(providers),
        originals=(float_model, quant_model),
    )


def measure(
    measurement: Measurement, samples: Iterable, executor: Executor | None = None
) -> Totals:
    """Measure every sample (a dict, or None for seeded random inputs) and aggregate in order.

    With an ``executor``, samples go to its workers a few at a time; the result is the same.
    """
    n = len(measurement.pairs)
    totals = Totals([Aggregate() for _ in range(n)], [Aggregate() for _ in range(n)], {}, {})
    for result in _results(measurement, samples, executor):
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
    return totals


def _results(measurement: Measurement, samples: Iterable, executor: Executor | None):
    if executor is None:
        try:
            for sample in samples:
                yield measure_sample(measurement, sample)
        finally:
            _SESSIONS.pop(measurement.key, None)  # sessions live as long as their pass
        return
    measurement = replace(measurement, originals=None)  # workers need not receive them
    futures, chunk = [], []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == SAMPLES_PER_TASK:
            futures.append(executor.submit(measure_samples, measurement, chunk))
            chunk = []
    if chunk:
        futures.append(executor.submit(measure_samples, measurement, chunk))
    for future in futures:
        yield from future.result()


def measure_samples(measurement: Measurement, samples: list) -> list[SampleResult]:
    """Measure a few samples (the task a worker runs)."""
    return [measure_sample(measurement, sample) for sample in samples]


_SESSIONS: dict[str, tuple] = {}


def _sessions(measurement: Measurement) -> tuple:
    """Sessions of a measurement, made once per process and kept for its last measurement."""
    if measurement.key not in _SESSIONS:
        _SESSIONS.clear()
        float_original, quant_original = measurement.originals or (None, None)
        providers = measurement.providers
        _SESSIONS[measurement.key] = (
            Session(measurement.float_model, "float model", providers, float_original),
            Session(measurement.quant_model, "quantized model", providers, quant_original),
            None if measurement.isolated_model is None else
            Session(measurement.isolated_model, "quantized model cut for isolated error", providers, quant_original),
        )
    return _SESSIONS[measurement.key]


def measure_sample(measurement: Measurement, sample) -> SampleResult:
    """Run the models of ``measurement`` on one sample and compare every pair."""
    float_session, quant_session, isolated_session = _sessions(measurement)
    float_feeds, quant_feeds = measurement.inputs.feeds(sample, measurement.seed)
    float_values = float_session.run(float_feeds, measurement.float_names)
    quant_values = quant_session.run(quant_feeds, measurement.quant_names)
    held = _nbytes(float_values) + _nbytes(quant_values)
    executions = 2
    problems: dict[int, str] = {}
    cumulative = _compare_all(measurement.pairs, float_values, quant_values, problems)
    del quant_values
    isolated: tuple[Metrics | None, ...] = (None,) * len(measurement.pairs)
    if isolated_session is not None:
        cut_feeds = {c.name: c.feed(float_values[c.float_tensor]) for c in measurement.cuts}
        isolated_values = isolated_session.run({**quant_feeds, **cut_feeds}, measurement.quant_names)
        held += _nbytes(isolated_values) + _nbytes(cut_feeds)
        executions += 1
        isolated = _compare_all(measurement.pairs, float_values, isolated_values, {})
    shapes = tuple(tuple(float_values[p.float_tensor].shape) for p in measurement.pairs)
    return SampleResult(cumulative, isolated, tuple(problems.items()), shapes, held, executions)


def _compare_all(pairs, float_values, quant_values, problems: dict) -> tuple[Metrics | None, ...]:
    results = []
    for index, pair in enumerate(pairs):
        reference = pair.float_readout.dequantize(float_values[pair.float_tensor])
        actual = pair.quant_readout.dequantize(quant_values[pair.quant_tensor])
        if reference.dtype.kind != "f":
            problems[index] = "not a float tensor"
        elif reference.shape != actual.shape:
            problems[index] = f"shapes differ: {reference.shape} vs {actual.shape}"
        results.append(None if index in problems else compare(reference, actual))
    return tuple(results)


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
