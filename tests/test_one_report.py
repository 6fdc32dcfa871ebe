"""Every quantized side reports through one builder: the same model given as a model, as a
dump of every tensor it computes (with and without its graph), and the simulator given as a
format or as a user's callable, compared field by field.

What legitimately differs, and nothing else:
- isolated error (``isolated_cosine``/``isolated_sqnr_db``) and what follows from it
  (``culprit``, ``first_bad_cause``, ``contributors``, the verdict's "introduced there"): a
  dump or a callable cannot be fed the float model's values;
- what the run cost (``executions``, ``peak_bytes``), the quantized side's label and files
  (``quant_model``, ``sources``) and the note saying a tensor source was compared;
- without the graph, what the pairing knows of the quantized side: its tensor and node names
  (the dump's names), the evidence (names, data, order), weights and its summary.
"""

import math
from dataclasses import fields

import numpy as np
import onnx
import pytest

from layerbisect import find_first_bad_layer, simulated
from layerbisect.expose import expose
from layerbisect.run import Session
from layerbisect.source import sanitise

from models import corrupt_weights, make_cnn, quant_node_for, quantize, random_inputs

FAULT = "conv2"
COST = {"executions", "peak_bytes", "quant_model", "sources", "notes"}
CAUSE = {"culprit", "first_bad_cause", "contributors"}
ISOLATED = {"isolated_cosine", "isolated_sqnr_db"}
QUANT_SIDE = {"quant_nodes", "quant_tensor", "evidence"}


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def differences(model, other, skip_report: set[str], skip_layer: set[str]) -> list[str]:
    """The fields, report and layers (the first bad one included), in which two reports differ."""
    found = []
    for field in fields(model):
        if field.name in skip_report | {"layers", "first_bad"}:
            continue
        if not same(getattr(model, field.name), getattr(other, field.name)):
            found.append(field.name)
    pairs = [*zip(model.layers, other.layers), (model.first_bad, other.first_bad)]
    if len(model.layers) != len(other.layers):
        found.append("layers")
    for mine, theirs in pairs:
        for field in fields(mine):
            if field.name not in skip_layer and not same(getattr(mine, field.name), getattr(theirs, field.name)):
                found.append(f"layer {mine.index} {field.name}")
    return found


def dump_everything(model: onnx.ModelProto, folder, feeds) -> None:
    """Every tensor ``model`` computes, integers too, one .npy per tensor named after it."""
    names = [out for node in model.graph.node for out in node.output if out]
    for name, value in Session(expose(model, names), "dumped model").run(feeds, names).items():
        np.save(folder / f"{sanitise(name)}.npy", value)


@pytest.fixture(scope="module")
def faulty() -> onnx.ModelProto:
    quant = quantize(make_cnn(), "qdq")
    return corrupt_weights(quant, quant_node_for(quant, FAULT))


def test_a_dump_with_its_graph_reports_as_the_model_does(faulty, tmp_path):
    """onnxruntime runs the faulty QDQ model, every tensor dumped: given with the graph, the
    dump's report is the model's, pairs and metrics bit for bit, less isolated error."""
    feeds = random_inputs(make_cnn())
    dump_everything(faulty, tmp_path, feeds)
    model = find_first_bad_layer(make_cnn(), faulty, feeds)
    dump = find_first_bad_layer(make_cnn(), tmp_path, feeds, quant_graph=faulty)  # the same ModelProto
    assert model.first_bad.float_nodes == (FAULT,) and model.first_bad_cause == "introduced"
    assert differences(model, dump, COST | CAUSE, ISOLATED) == []
    assert dump.first_bad_cause is None and all(math.isnan(layer.isolated_cosine) for layer in dump.layers)
    assert dump.verdict.startswith(model.verdict.split(", error introduced there")[0])
    assert dump.quant_summary == model.quant_summary and dump.quant_neighbourhood  # the graph's
    assert model.weighted_paired == dump.weighted_paired == 4


def test_a_dump_without_its_graph_names_the_same_layer_with_close_numbers(faulty, tmp_path):
    """Paired by name and data instead, the dump names the same first bad layer, reports the
    same run, and each float value both reports compare passes or fails in both. Their
    numbers agree where the dump's tensor is the one the model path reads (a DequantizeLinear
    output); the dump's tensor named after an operation is its output before the
    QuantizeLinear after it, where the model path reads it after that rounding."""
    feeds = random_inputs(make_cnn())
    dump_everything(faulty, tmp_path, feeds)
    model = find_first_bad_layer(make_cnn(), faulty, feeds)
    dump = find_first_bad_layer(make_cnn(), tmp_path, feeds)
    for field in ("threshold", "samples", "outputs", "float_summary", "providers", "seed", "strategy"):
        assert same(getattr(model, field), getattr(dump, field)), field
    for field in ("float_nodes", "float_tensor", "op_type", "shape"):
        assert getattr(dump.first_bad, field) == getattr(model.first_bad, field), field
    by_tensor = {layer.float_tensor: layer for layer in model.layers}
    common = [layer for layer in dump.layers if layer.float_tensor in by_tensor]
    assert len(common) == len(model.layers)  # every value the model path pairs, the dump pairs too
    read_alike = 0
    for layer in common:
        theirs = by_tensor[layer.float_tensor]
        assert layer.passes(0.98) == theirs.passes(0.98), layer.float_tensor
        if layer.quant_tensor == theirs.quant_tensor.replace("_QuantizeLinear_", "_DequantizeLinear_"):
            read_alike += 1  # the integers the model path reads, dequantized by the backend
            assert layer.cosine == pytest.approx(theirs.cosine, abs=1e-6), layer.float_tensor
    assert read_alike == 4  # relu1 to relu4

def test_a_users_simulator_reports_as_the_simulated_format_does():
    """The simulator given as a format, and the same simulation wrapped in a function that
    returns its tensors under the float model's names, as a vendor simulator is wrapped."""
    feeds = random_inputs(make_cnn())
    fmt = simulated("ap_fixed<6,3>")
    simulation = fmt.build(make_cnn(), [feeds])
    names = list(simulation.names.values())
    session = Session(expose(simulation.model, names), "simulation")

    def vendor_simulator(given):
        values = session.run(given, names)
        return {tensor: values[name] for tensor, name in simulation.names.items()}

    model = find_first_bad_layer(make_cnn(), fmt, feeds)
    source = find_first_bad_layer(make_cnn(), vendor_simulator, feeds)
    assert model.first_bad is not None and source.first_bad.float_nodes == model.first_bad.float_nodes
    skip = COST | CAUSE | {"weighted", "weighted_paired", "weight_agreement", "quant_summary", "quant_neighbourhood"}
    assert differences(model, source, skip, ISOLATED | QUANT_SIDE) == []
    assert {layer.evidence for layer in source.layers} == {"name"}


@pytest.mark.parametrize("module,absent", [("layerbisect.render", "layerbisect.report"),
                                           ("layerbisect.report", "layerbisect.render")])
def test_the_records_and_their_renderings_do_not_import_each_other(module, absent):
    """``report`` (the records) and ``render`` (pages, tables, charts) share only ``text``: render
    reads the records it is given, report loads render when asked to draw (a fresh interpreter)."""
    import subprocess
    import sys

    code = f"import sys, {module}; assert {absent!r} not in sys.modules, 'loaded'"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
