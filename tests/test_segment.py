"""Segments: a model run piece by piece from saved values gives the values of a full run, and
a search resumes each pass where the last one left off."""

import numpy as np
import onnx
import pytest

import layerbisect.footprint as footprint
import layerbisect.passes as passes_module
from layerbisect import find_first_bad_layer
from layerbisect.compare import compare
from layerbisect.expose import expose
from layerbisect.run import Session
from layerbisect.segment import Segments

from models import corrupt_weights, make_cnn, quant_node_for, quantize, random_inputs


def produced(model: onnx.ModelProto) -> list[str]:
    return [out for node in model.graph.node for out in node.output]


@pytest.mark.parametrize("fmt", [None, "qdq", "qoperator"])
def test_resuming_from_a_boundary_gives_the_values_of_a_full_run(fmt):
    model = make_cnn() if fmt is None else quantize(make_cnn(), fmt)
    original = model.SerializeToString()
    feeds = random_inputs(make_cnn())
    names = produced(model)
    full = Session(expose(model), "model").run(feeds, names)
    segments = Segments(model)
    middle = len(names) // 2
    saved = segments.boundary(names[: middle + 1], names[middle + 1:])
    assert 0 < len(saved) < middle
    first = segments.extract(list(saved), {})
    values = Session(first, "first").run(feeds, list(saved))
    rest = [n for n in names[middle + 1:] if n not in saved]
    second = segments.extract(rest, {n: v.dtype for n, v in values.items()})
    assert len(first.graph.node) + len(second.graph.node) == len(model.graph.node)
    declared = {i.name for i in second.graph.input}
    assert declared <= set(saved) | {"x"} and "x" not in declared  # nothing before the boundary runs again
    resumed = Session(second, "second").run({n: values[n] for n in declared}, rest)
    for name in rest:  # equal but for onnxruntime fusing differently (and int8 rounding then)
        if fmt is None:
            np.testing.assert_allclose(resumed[name], full[name], rtol=1e-4, atol=1e-5, err_msg=name)
        elif resumed[name].dtype.kind == "f" and resumed[name].size > 1:
            assert compare(full[name], resumed[name]).cosine > 0.9999, name
    assert model.SerializeToString() == original


def test_the_boundary_inside_a_residual_block_keeps_the_skip_connection():
    model = make_cnn()
    segments = Segments(model)
    names = produced(model)
    body, skip = next(node for node in model.graph.node if node.op_type == "Add").input
    inside = names.index(body) - 1  # the block's input feeds its first layer and the Add
    assert segments.boundary(names[: inside + 1]) == (skip, names[inside])


def test_a_segment_keeps_only_the_initializers_and_inputs_it_reads():
    model = make_cnn()
    segments = Segments(model)
    first_conv = model.graph.node[0]
    piece = segments.extract([first_conv.output[0]], {})
    assert [n.name for n in piece.graph.node] == [first_conv.name]
    assert {i.name for i in piece.graph.initializer} == {n for n in first_conv.input[1:] if n}
    assert [o.name for o in piece.graph.output] == [first_conv.output[0]]


def test_bisection_resumes_each_pass_and_finds_the_same_layer_as_a_scan(monkeypatch):
    float_model = make_cnn()
    quant = quantize(float_model, "qdq")
    quant = corrupt_weights(quant, quant_node_for(quant, "conv3", float_model))
    samples = [random_inputs(float_model, seed) for seed in range(3)]
    scan = find_first_bad_layer(float_model, quant, samples, strategy="scan")
    passes = []
    prepare = passes_module.prepare

    def spy(*args, **kwargs):
        measurement = prepare(*args, **kwargs)
        passes.append((kwargs["start"] is not None, measurement))
        return measurement

    monkeypatch.setattr(passes_module, "prepare", spy)
    monkeypatch.setattr(footprint, "LAST_PASS_LAYERS", 1)  # a pass per probe, down to one layer
    # without isolated error: the probes alone (with it, the layers up to the first bad one follow)
    bisect = find_first_bad_layer(float_model, quant, samples, strategy="bisect", memory_budget=1 << 20,
                                  isolated=False)
    assert bisect.first_bad.float_nodes == scan.first_bad.float_nodes == ("conv3", "relu4")
    assert bisect.first_bad.cosine == pytest.approx(scan.first_bad.cosine, abs=1e-4)
    assert bisect.peak_bytes <= 1 << 20
    assert any(resumed for resumed, _ in passes)
    # each model's nodes run about once over the search, not once per pass
    float_nodes = sum(len(m.float_model.graph.node) for _, m in passes if m.float_model)
    assert len(passes) >= 4 and float_nodes < 2 * len(float_model.graph.node)


def test_a_segment_resumed_after_a_value_that_a_subgraph_reads_runs(monkeypatch):
    """The If's branches read ``r`` from the enclosing graph: resumed after ``r``, the If's
    segment takes it as an input, which the branches see."""
    from test_unusual_models import control_flow

    x = {"x": np.array([0.5, -1.0, 2.0], np.float32)}
    broken = control_flow(1.0, inner_gain=-2.0)  # the If's then-branch is wrong
    scan = find_first_bad_layer(control_flow(1.0), broken, x, strategy="scan")
    starts = []
    prepare = passes_module.prepare

    def spy(*args, **kwargs):
        starts.append(set(kwargs["start"].dtypes(0)) if kwargs["start"] else set())
        return prepare(*args, **kwargs)

    monkeypatch.setattr(passes_module, "prepare", spy)
    # 128 bytes: after the probes, the layers up to the first bad one in two pieces
    bisect = find_first_bad_layer(control_flow(1.0), broken, x, strategy="bisect", memory_budget=128)
    assert bisect.first_bad.float_nodes == scan.first_bad.float_nodes == ("choose",)
    assert bisect.first_bad.cosine == pytest.approx(scan.first_bad.cosine)
    assert {"r", "total"} in starts  # the If's piece starts after ReduceSum, with the If's outer read
