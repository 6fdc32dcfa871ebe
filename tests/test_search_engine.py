"""Scan and bisection, memory budget, isolated vs cumulative error, executors."""

import multiprocessing
import weakref
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from layerbisect import LayerbisectError, find_first_bad_layer
from layerbisect.compare import compare
from layerbisect.measure import SAMPLES_PER_TASK, TASKS_IN_FLIGHT

from models import corrupt_weights, make_cnn, make_transformer, quant_node_for, quantize, random_inputs

BUILDERS = {"cnn": make_cnn, "transformer": make_transformer}
FAULTY = {"cnn": "conv2", "transformer": "ffn1_proj"}


@lru_cache(maxsize=None)
def faulted(name: str, fmt: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    float_model = BUILDERS[name]()
    quant = quantize(float_model, fmt)
    return float_model, corrupt_weights(quant, quant_node_for(quant, FAULTY[name], float_model))


@pytest.mark.parametrize("name", BUILDERS)
@pytest.mark.parametrize("fmt", ["qdq", "qoperator", "dynamic"])
def test_bisect_and_scan_agree_and_the_fault_is_introduced_there(name, fmt):
    float_model, quant = faulted(name, fmt)
    feeds = random_inputs(float_model)
    scan = find_first_bad_layer(float_model, quant, feeds, strategy="scan")
    bisect = find_first_bad_layer(float_model, quant, feeds, strategy="bisect", memory_budget=1)
    assert scan.strategy == "scan" and bisect.strategy == "bisect"
    assert scan.first_bad.float_nodes == bisect.first_bad.float_nodes == (FAULTY[name],)
    assert scan.first_bad.cosine == pytest.approx(bisect.first_bad.cosine, abs=1e-4)  # pruned graphs differ slightly
    assert scan.first_bad_cause == bisect.first_bad_cause == "introduced"
    assert scan.culprit.index == scan.first_bad.index
    n = len(scan.layers)
    assert len(bisect.layers) < n and bisect.aligned == scan.aligned == n
    assert f"{len(bisect.layers)} of {n} aligned layers measured" in str(bisect)
    # 2 models per probe, one probe at a time, then 3 runs a piece (a layer each, at this budget)
    # for every layer up to the first bad one: the culprit rule needs their isolated error
    assert bisect.executions <= 2 * int(np.ceil(np.log2(n))) + 3 * (bisect.first_bad.index + 1)
    assert scan.executions == 3  # float, quantized, quantized cut at every layer
    healthy = [layer for layer in scan.layers if layer.index != scan.first_bad.index]
    assert all(layer.isolated_cosine > 0.999 for layer in healthy)


def test_memory_budget_is_respected_by_every_strategy():
    float_model, quant = faulted("cnn", "qdq")
    feeds = random_inputs(float_model)
    everything = find_first_bad_layer(float_model, quant, feeds, strategy="scan")
    budget = everything.peak_bytes // 2  # still above one layer with its inputs, the least a pass holds
    auto = find_first_bad_layer(float_model, quant, feeds, memory_budget=budget)
    assert auto.strategy == "prefix" and auto.peak_bytes <= budget
    assert auto.first_bad.float_nodes == ("conv2",) and auto.culprit.index == everything.culprit.index
    assert len(auto.layers) < len(everything.layers)  # the layers up to the first bad one's piece
    assert [layer.cosine for layer in auto.layers] == pytest.approx([layer.cosine for layer in everything.layers[: len(auto.layers)]])
    bisected = find_first_bad_layer(float_model, quant, feeds, strategy="bisect", memory_budget=budget)
    assert bisected.peak_bytes <= budget and bisected.first_bad.float_nodes == ("conv2",)
    chunked = find_first_bad_layer(float_model, quant, feeds, strategy="scan", memory_budget=budget)
    assert chunked.peak_bytes <= budget and chunked.executions > everything.executions
    assert [layer.cosine for layer in chunked.layers] == pytest.approx([layer.cosine for layer in everything.layers])
    assert [layer.isolated_cosine for layer in chunked.layers] == pytest.approx([layer.isolated_cosine for layer in everything.layers])


@pytest.mark.parametrize("name", BUILDERS)
def test_a_budget_a_quarter_above_what_a_scan_holds_is_one_pass(name):
    """Integer values are counted at their width (int8: a quarter of float32), not as float:
    the estimate stays above what is held, but not by much."""
    float_model, quant = faulted(name, "qdq")
    feeds = random_inputs(float_model)
    everything = find_first_bad_layer(float_model, quant, feeds, strategy="scan")
    budget = int(everything.peak_bytes * 1.25)
    report = find_first_bad_layer(float_model, quant, feeds, strategy="scan", memory_budget=budget)
    assert report.executions == 3 and report.peak_bytes <= budget


def chain(noise: list[float], seed: int = 0) -> onnx.ModelProto:
    """x[16,32] -> MatMul(W_i) -> Tanh, repeated; W_i perturbed by ``noise[i]`` (relative)."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i, level in enumerate(noise):
        w = np.random.default_rng(100 + i).standard_normal((32, 32)).astype(np.float32) / np.sqrt(32)
        w = (w + level * rng.standard_normal(w.shape) / np.sqrt(32)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"mm{i}"),
                  helper.make_node("Tanh", [f"mm{i}"], [f"act{i}"], name=f"act{i}")]
        x = f"act{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 32])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_error_that_accumulates_through_healthy_layers_is_said_to_accumulate_with_no_culprit():
    noise = [0.05, 0.16, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05]
    float_model, other = chain([0.0] * len(noise)), chain(noise)
    x = np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32)
    # the reference, computed here: float activations, and each perturbed layer fed them
    weights = [[numpy_helper.to_array(i) for i in m.graph.initializer] for m in (float_model, other)]
    reference, actual, cumulative, isolated = x, x, [], []
    for w_float, w_other in zip(*weights):
        isolated.append(compare(reference @ w_float, reference @ w_other).cosine)
        reference, actual = reference @ w_float, actual @ w_other
        cumulative.append(compare(reference, actual).cosine)
        isolated.append(compare(np.tanh(reference), np.tanh(reference)).cosine)
        reference, actual = np.tanh(reference), np.tanh(actual)
        cumulative.append(compare(reference, actual).cosine)
    expected_first_bad = next(i for i, c in enumerate(cumulative) if c < 0.98)
    assert expected_first_bad > 3 and min(isolated) >= 0.98  # no layer bad on its own, by construction

    report = find_first_bad_layer(float_model, other, {"x": x})
    assert [layer.cosine for layer in report.layers] == pytest.approx(cumulative, abs=1e-5)
    assert [layer.isolated_cosine for layer in report.layers] == pytest.approx(isolated, abs=1e-5)
    assert report.first_bad.index == expected_first_bad
    assert report.first_bad_cause == "accumulated" and report.culprit is None
    assert report.contributors[0].float_nodes == ("mm1",)  # the layer adding the most error, upstream
    assert ("error accumulated: no layer up to it is below 0.98 on its own; the largest own errors: #2 MatMul 'mm1'"
            in report.verdict)


def test_isolated_error_can_be_switched_off():
    float_model, quant = faulted("cnn", "qdq")
    report = find_first_bad_layer(float_model, quant, random_inputs(float_model), isolated=False)
    assert report.executions == 2 and report.first_bad_cause is None and report.culprit is None


def test_bad_strategy_and_budget():
    float_model, quant = faulted("cnn", "qdq")
    with pytest.raises(LayerbisectError, match="strategy must be one of auto, scan, prefix, bisect"):
        find_first_bad_layer(float_model, quant, strategy="fast")
    with pytest.raises(LayerbisectError, match="memory_budget must be a positive, finite size"):
        find_first_bad_layer(float_model, quant, memory_budget=0)


def samples(model, n=6):
    return [random_inputs(model, seed) for seed in range(n)]


@pytest.mark.parametrize("options", [{}, {"strategy": "bisect", "memory_budget": 1 << 20}])
def test_process_pool_gives_the_serial_report(options):
    """Scan, and bisection whose passes resume from values the workers saved and sent back."""
    float_model, quant = faulted("transformer" if options else "cnn", "dynamic")  # its first probe passes
    serial = find_first_bad_layer(float_model, quant, samples(float_model), **options)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        parallel = find_first_bad_layer(float_model, quant, samples(float_model), executor=pool, **options)
    assert parallel.to_dict() == serial.to_dict()
    assert serial.samples == 6 and serial.strategy == options.get("strategy", "scan")


def test_dask_cluster_gives_the_serial_report():
    distributed = pytest.importorskip("distributed")
    float_model, quant = faulted("transformer", "qdq")
    serial = find_first_bad_layer(float_model, quant, iter(samples(float_model)))
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        parallel = find_first_bad_layer(float_model, quant, iter(samples(float_model)), executor=client.get_executor())
    assert parallel.to_dict() == serial.to_dict()


class Made:
    """Samples of a model made when asked, counting how many are alive (not yet freed) at most."""

    def __init__(self, model) -> None:
        self.model, self.alive, self.most = model, 0, 0

    def sample(self, seed: int) -> dict:
        sample = random_inputs(self.model, seed)
        self.alive += 1
        self.most = max(self.most, self.alive)
        weakref.finalize(next(iter(sample.values())), self._freed)
        return sample

    def _freed(self) -> None:
        self.alive -= 1


class OnDemand(Sequence):
    """A sequence that makes each sample when it is read, as the CLI's folders do."""

    def __init__(self, made: Made, count: int) -> None:
        self.made, self.count = made, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        return self.made.sample(range(self.count)[index])


def test_a_generator_streams_through_a_scan_serial_or_spread():
    float_model, quant = faulted("cnn", "qdq")
    made = Made(float_model)
    report = find_first_bad_layer(float_model, quant, (made.sample(seed) for seed in range(40)))
    assert report.samples == 40 and made.most <= 3  # the one measured, the next read, one the loop let go late
    made = Made(float_model)
    count = SAMPLES_PER_TASK * TASKS_IN_FLIGHT * 2
    with ThreadPoolExecutor(2) as pool:
        spread = find_first_bad_layer(float_model, quant, (made.sample(seed) for seed in range(count)), executor=pool)
    assert spread.samples == count and made.most <= SAMPLES_PER_TASK * (TASKS_IN_FLIGHT + 1) + 2


def test_a_sequence_is_read_again_for_each_pass_not_held():
    float_model, quant = faulted("cnn", "qdq")
    made = Made(float_model)
    options = {"strategy": "bisect", "memory_budget": 1}
    report = find_first_bad_layer(float_model, quant, OnDemand(made, 12), **options)
    assert made.most <= 3  # as a generator: the one measured, the next read, one the loop let go late
    assert report.to_dict() == find_first_bad_layer(float_model, quant, samples(float_model, 12), **options).to_dict()


@pytest.mark.parametrize("options", [{}, {"strategy": "bisect", "memory_budget": 1 << 20}])
def test_models_with_large_weights_run_one_at_a_time_and_give_the_same_report(monkeypatch, options):
    """Past ``ONE_AT_A_TIME`` bytes of weights, a pass holds one session at a time (float,
    quantized, cut), each over a chunk of samples; the report is the one sample by sample
    gives, but for the memory held (a chunk's float values)."""
    import layerbisect.measure as measure_module

    float_model, quant = faulted("transformer" if options else "cnn", "dynamic")
    serial = find_first_bad_layer(float_model, quant, samples(float_model), **options)
    live, most, created = weakref.WeakSet(), [0], [0]
    real = measure_module.Session

    def counted(*args, **kwargs):
        session = real(*args, **kwargs)
        live.add(session)
        created[0] += 1
        most[0] = max(most[0], len(live))
        return session

    monkeypatch.setattr(measure_module, "Session", counted)
    monkeypatch.setattr(measure_module, "ONE_AT_A_TIME", 0)
    chunked = find_first_bad_layer(float_model, quant, samples(float_model), **options)
    assert most[0] == 1 and created[0] > 0  # never two sessions alive at once
    assert {**chunked.to_dict(), "peak_bytes": 0} == {**serial.to_dict(), "peak_bytes": 0}
    assert chunked.samples == 6
