"""Unusual models (issue 6): other float precisions, dynamic shapes, several inputs and
outputs, values that are not float tensors, control flow, external data, models over 2 GiB."""

import hashlib
from functools import lru_cache
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import layerbisect.graph
import layerbisect.load
import layerbisect.measure
import layerbisect.run
from layerbisect import LayerbisectError, find_first_bad_layer, keep_in_float
from layerbisect.graph import build_graph
from layerbisect.load import SMALL_EXTERNAL, external_folder, load_model, tensor_array
from layerbisect.run import Session

from models import corrupt_weights, make_cnn, quant_node_for, quantize, random_inputs

OPSET = [helper.make_opsetid("", 17)]


@lru_cache(maxsize=None)
def cnn() -> onnx.ModelProto:
    return make_cnn()


def negate_weight(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """A copy of ``model`` whose initializer ``name`` is negated: a fault at its consumer."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    init = next(i for i in copy.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), name))
    return copy


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` computed in float16 throughout: weights, inputs and outputs."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for init in copy.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for info in [*copy.graph.input, *copy.graph.output]:
        info.type.tensor_type.elem_type = TensorProto.FLOAT16
    del copy.graph.value_info[:]
    return copy


def test_float16_model_against_its_float32_original():
    report = find_first_bad_layer(cnn(), to_float16(cnn()), random_inputs(cnn()))
    assert report.first_bad is None and report.coverage == 1.0
    assert min(layer.cosine for layer in report.layers) > 0.999
    assert any("float32 in the float model and float16 in the quantized model" in n for n in report.notes)


def test_fault_in_a_float16_model_is_found():
    broken = negate_weight(to_float16(cnn()), "conv2.weight")
    report = find_first_bad_layer(cnn(), broken, random_inputs(cnn()))
    assert report.first_bad.float_nodes == ("conv2",)


def layout_net(dtype: int, gather: tuple[int, ...] = (0, 1, 2)) -> onnx.ModelProto:
    """x[2,3,4] -> Transpose -> Gather(rows) -> Reshape -> y, in one element type (onnxruntime
    runs these ops in bfloat16 on CPU)."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], name="transpose", perm=[2, 0, 1]),
        helper.make_node("Gather", ["t", "rows"], ["g"], name="gather", axis=2),
        helper.make_node("Reshape", ["g", "flat"], ["y"], name="reshape"),
    ]
    inits = [
        numpy_helper.from_array(np.array(gather, np.int64), "rows"),
        numpy_helper.from_array(np.array([4, 6], np.int64), "flat"),
    ]
    graph = helper.make_graph(
        nodes, "layout", [helper.make_tensor_value_info("x", dtype, [2, 3, 4])],
        [helper.make_tensor_value_info("y", dtype, [4, 6])], inits,
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=9)


def test_bfloat16_model_values_are_compared_as_float():
    float_model = layout_net(TensorProto.FLOAT)
    report = find_first_bad_layer(float_model, layout_net(TensorProto.BFLOAT16))
    assert report.first_bad is None and [layer.float_nodes for layer in report.layers] == [
        ("transpose",), ("gather",), ("reshape",)
    ]
    assert all(0.9999 < layer.cosine < 1.0 for layer in report.layers)  # bfloat16 rounding
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16)
    broken = find_first_bad_layer(float_model, layout_net(TensorProto.BFLOAT16, (2, 1, 0)), {"x": x})
    assert broken.first_bad.float_nodes == ("gather",)


def two_headed(weight: np.ndarray) -> onnx.ModelProto:
    """a[N,4], b[N,4] -> h = Relu(a @ W + b) -> y1 = Sigmoid(h), y2 = h * b (N dynamic)."""
    nodes = [
        helper.make_node("MatMul", ["a", "w"], ["p"], name="proj"),
        helper.make_node("Add", ["p", "b"], ["s"], name="sum"),
        helper.make_node("Relu", ["s"], ["h"], name="relu"),
        helper.make_node("Sigmoid", ["h"], ["y1"], name="head1"),
        helper.make_node("Mul", ["h", "b"], ["y2"], name="head2"),
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in ("a", "b", "y1", "y2")]
    graph = helper.make_graph(nodes, "two", io[:2], io[2:], [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=OPSET, ir_version=9)


WEIGHT = np.random.default_rng(3).standard_normal((4, 4)).astype(np.float32)


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch_several_inputs_and_outputs(batch):
    rng = np.random.default_rng(batch)
    samples = [{n: rng.standard_normal((batch, 4)).astype(np.float32) for n in "ab"} for _ in range(3)]
    healthy = find_first_bad_layer(two_headed(WEIGHT), two_headed(WEIGHT), samples)
    assert healthy.first_bad is None and healthy.samples == 3
    assert {name for name, _ in healthy.outputs} == {"y1", "y2"}
    assert all(layer.shape == (batch, 4) for layer in healthy.layers)
    broken = find_first_bad_layer(two_headed(WEIGHT), two_headed(-WEIGHT), samples)
    assert broken.first_bad.float_nodes == ("proj",)
    random = find_first_bad_layer(two_headed(WEIGHT), two_headed(-WEIGHT), shapes={"a": (batch, 4), "b": (batch, 4)})
    assert random.first_bad.float_nodes == ("proj",) and random.layers[0].shape == (batch, 4)


def sequences_strings_and_shapes(gain: float) -> onnx.ModelProto:
    """Sequences (SplitToSequence, SequenceAt, ConcatFromSequence), int64 shape arithmetic
    (Shape -> ReduceProd -> Reshape) and a string output around float operations."""
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["xs"], name="scale"),
        helper.make_node("SplitToSequence", ["xs"], ["seq"], name="split", axis=1),
        helper.make_node("SequenceAt", ["seq", "zero"], ["a"], name="first"),
        helper.make_node("SequenceAt", ["seq", "one"], ["b"], name="second"),
        helper.make_node("Add", ["a", "b"], ["ab"], name="add"),
        helper.make_node("Shape", ["ab"], ["shape"], name="shape"),
        helper.make_node("ReduceProd", ["shape"], ["numel"], name="numel", keepdims=1),
        helper.make_node("Reshape", ["ab", "numel"], ["y"], name="flatten"),
        helper.make_node("Cast", ["y"], ["text"], name="to_text", to=TensorProto.STRING),
        helper.make_node("ConcatFromSequence", ["seq"], ["cat"], name="concat", axis=0),
        helper.make_node("Sigmoid", ["cat"], ["z"], name="sigmoid"),
    ]
    inits = [
        numpy_helper.from_array(np.array(gain, np.float32), "k"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
    ]
    outputs = [helper.make_tensor_value_info(n, t, None) for n, t in
               (("y", TensorProto.FLOAT), ("text", TensorProto.STRING), ("z", TensorProto.FLOAT))]
    graph = helper.make_graph(
        nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])], outputs, inits
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=9)


def test_sequences_strings_and_shape_arithmetic_are_left_out():
    report = find_first_bad_layer(sequences_strings_and_shapes(1.0), sequences_strings_and_shapes(-1.0))
    compared = {layer.float_tensor for layer in report.layers}
    assert {"xs", "a", "ab", "y", "cat", "z"} <= compared
    assert not compared & {"seq", "shape", "numel", "text"}
    assert report.first_bad.float_nodes == ("scale",)


def control_flow(gain: float, inner_gain: float = 2.0, constant_condition: bool = False) -> onnx.ModelProto:
    """x[3] -> Relu -> If(sum > 0: Mul by inner_gain, else Neg) -> Loop(3 times: add 1,
    Sigmoid) -> Mul(gain) -> y: the If and Loop outputs are visible, their insides are not.
    With ``constant_condition`` the If takes its then-branch whatever the input."""
    then_branch = helper.make_graph(
        [helper.make_node("Mul", ["r", "two"], ["t_out"], name="double")], "then", [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(np.array(inner_gain, np.float32), "two")],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["r"], ["e_out"], name="negate")], "else", [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [3])],
    )
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
            helper.make_node("Add", ["acc", "one"], ["plus"], name="add_one"),
            helper.make_node("Sigmoid", ["plus"], ["acc_out"], name="squash"),
        ],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("ReduceSum", ["r"], ["total"], name="total", keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"], name="positive"),
        helper.make_node("If", ["always" if constant_condition else "positive"], ["branch"], name="choose",
                         then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Loop", ["trips", "true", "branch"], ["looped"], name="repeat", body=body),
        helper.make_node("Mul", ["looped", "gain"], ["y"], name="gain"),
    ]
    inits = [
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(3, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "true"),
        numpy_helper.from_array(np.array(gain, np.float32), "gain"),
        numpy_helper.from_array(np.array(True), "always"),
    ]
    graph = helper.make_graph(
        nodes, "control", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], inits,
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=9)


def test_control_flow_compares_the_top_level_and_says_what_is_hidden():
    x = {"x": np.array([0.5, -1.0, 2.0], np.float32)}
    report = find_first_bad_layer(control_flow(1.0), control_flow(-1.0), x)
    assert {"r", "branch", "looped", "y"} <= {layer.float_tensor for layer in report.layers}
    assert report.first_bad.float_nodes == ("gain",)
    notes = "\n".join(report.notes)
    assert ("node 'choose' (If) of the float model runs subgraphs (else_branch: 1 op, "
            "then_branch: 1 op) that are not compared") in notes
    assert "node 'repeat' (Loop) of the quantized model runs a subgraph (body: 3 ops) that is not compared" in notes


def test_if_with_a_constant_condition_is_inlined_and_its_insides_compared():
    x = {"x": np.array([0.5, -1.0, 2.0], np.float32)}
    report = find_first_bad_layer(
        control_flow(1.0, constant_condition=True), control_flow(1.0, -2.0, constant_condition=True), x
    )
    assert report.first_bad.float_nodes == ("choose/double",) and report.first_bad.float_tensor == "branch"
    assert not any("'choose' (If)" in note for note in report.notes)
    assert any("'repeat' (Loop)" in note for note in report.notes)


def digest(folder: Path) -> dict[str, tuple[str, int]]:
    """Content hash and modification time of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """The CNN and its faulty int8 version saved, in two folders, with their weights in
    external data files (every tensor, however small)."""
    folder = tmp_path_factory.mktemp("external")
    (folder / "quantized").mkdir()
    quant = quantize(cnn(), "qdq")
    broken = corrupt_weights(quant, quant_node_for(quant, "conv2"))
    for path, model in ((folder / "float.onnx", cnn()), (folder / "quantized" / "broken.onnx", broken)):
        model = onnx.ModelProto.FromString(model.SerializeToString())  # saving moves the data out
        onnx.save(model, path, save_as_external_data=True,
                  all_tensors_to_one_file=True, location=f"{path.stem}.data", size_threshold=0)
    return folder, broken


def test_loading_leaves_the_weights_in_their_files(external, monkeypatch):
    folder, broken = external
    monkeypatch.chdir(folder.parent)
    originals = {t.name: numpy_helper.to_array(t) for t in broken.graph.initializer}
    loaded = load_model(folder / "quantized" / "broken.onnx")
    in_memory = [t.name for t in loaded.graph.initializer if t.data_location != TensorProto.EXTERNAL]
    assert in_memory == [name for name, array in originals.items() if array.nbytes < SMALL_EXTERNAL]
    monkeypatch.setattr(layerbisect.load, "SMALL_EXTERNAL", 0)
    loaded = load_model(folder / "quantized" / "broken.onnx")
    on_disk = [t for t in loaded.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    saved_out = onnx.load(folder / "quantized" / "broken.onnx", load_external_data=False)
    assert len(on_disk) == sum(t.data_location == TensorProto.EXTERNAL for t in saved_out.graph.initializer) > 10
    assert not any(t.HasField("raw_data") for t in on_disk)
    assert {external_folder(t) for t in on_disk} == {str(folder / "quantized")}
    for tensor in loaded.graph.initializer:
        np.testing.assert_array_equal(tensor_array(tensor), originals[tensor.name])
        np.testing.assert_array_equal(tensor_array(tensor, mapped=True), originals[tensor.name])
    assert load_model(loaded) == loaded  # a loaded model loads as it is


@pytest.mark.parametrize("quantized", ["qdq", "qoperator"])
def test_weights_read_from_files_fingerprint_as_in_memory(external, tmp_path, monkeypatch, quantized):
    """Fingerprints read a few rows of a mapped file: per-channel weights, Gemm with transB."""
    folder, _ = external
    monkeypatch.setattr(layerbisect.load, "SMALL_EXTERNAL", 0)
    monkeypatch.setattr(layerbisect.graph, "FINGERPRINT_SIZE", 50)  # fewer values than a weight holds
    quant = quantize(cnn(), quantized, per_channel=True)
    onnx.save(onnx.ModelProto.FromString(quant.SerializeToString()), tmp_path / "quant.onnx",
              save_as_external_data=True, location="quant.data", size_threshold=0)
    for model, path in ((cnn(), folder / "float.onnx"), (quant, tmp_path / "quant.onnx")):
        in_memory, from_file = build_graph(load_model(model)), build_graph(load_model(path))
        prints = [(n, op.fingerprint) for n, op in in_memory.ops() if op.fingerprint is not None]
        assert len(prints) >= 4  # three Conv and the Gemm at least
        for node, fingerprint in prints:
            np.testing.assert_array_equal(from_file.op(node).fingerprint, fingerprint)


@pytest.mark.parametrize("small", [SMALL_EXTERNAL, 0])
def test_models_with_external_data_load_from_their_folder_and_stay_untouched(external, monkeypatch, small):
    """The same report as in memory, with the small tensors read in or not."""
    folder, broken = external
    monkeypatch.setattr(layerbisect.load, "SMALL_EXTERNAL", small)
    before = digest(folder)
    monkeypatch.chdir(folder.parent)  # external data is found relative to the model, not here
    paths = folder / "float.onnx", folder / "quantized" / "broken.onnx"
    from_files = find_first_bad_layer(*paths, random_inputs(cnn()))
    in_memory = find_first_bad_layer(cnn(), broken, random_inputs(cnn()))
    assert from_files.first_bad.float_nodes == ("conv2",)
    assert from_files.layers == in_memory.layers
    optimized = find_first_bad_layer(*paths, random_inputs(cnn()), ort_optimized=True)
    assert optimized.first_bad.float_nodes == ("conv2",)
    monkeypatch.setattr(layerbisect.measure, "ONE_AT_A_TIME", 0)  # as models of large weights run
    one_at_a_time = find_first_bad_layer(*paths, random_inputs(cnn()))
    assert one_at_a_time.layers == in_memory.layers
    assert digest(folder) == before


def test_float_fallback_on_files_in_two_folders(external, tmp_path, monkeypatch):
    """Float weights from one folder join a quantized model from another; the repaired model
    is saved with its data."""
    folder, broken = external
    monkeypatch.setattr(layerbisect.load, "SMALL_EXTERNAL", 0)
    before = digest(folder)
    fix = keep_in_float(folder / "float.onnx", folder / "quantized" / "broken.onnx", random_inputs(cnn()))
    assert fix == keep_in_float(cnn(), broken, random_inputs(cnn()))
    assert fix.float_nodes == ("conv2",)
    fix.save_model(tmp_path / "repaired.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["repaired.onnx"]
    repaired = onnx.load(tmp_path / "repaired.onnx")
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in repaired.graph.initializer)
    assert digest(folder) == before


def test_a_session_reads_initializers_from_two_folders(tmp_path):
    """onnxruntime is given one folder; an initializer kept in another is read in."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 300])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 300])
    a, b = np.eye(300, dtype=np.float32) * 2, np.arange(300, dtype=np.float32)
    loaded = []
    for name, value, op in (("a", a, "MatMul"), ("b", b, "Add")):
        (tmp_path / name).mkdir()
        node = helper.make_node(op, ["x", name], ["y"])
        graph = helper.make_graph([node], name, [x], [y], [numpy_helper.from_array(value, name)])
        onnx.save(helper.make_model(graph, opset_imports=OPSET, ir_version=9), tmp_path / name / "m.onnx",
                  save_as_external_data=True, location="m.data", size_threshold=0)
        loaded.append(load_model(tmp_path / name / "m.onnx"))
    model = loaded[0]
    model.graph.node.append(helper.make_node("Add", ["y0", "b"], ["y"]))
    model.graph.node[0].output[0] = "y0"
    model.graph.initializer.extend(loaded[1].graph.initializer)
    assert {external_folder(t) for t in model.graph.initializer} == {str(tmp_path / "a"), str(tmp_path / "b")}
    feeds = {"x": np.ones((2, 300), np.float32)}
    np.testing.assert_array_equal(Session(model, "model").run(feeds, ["y"])["y"], feeds["x"] @ a + b)


def test_missing_or_truncated_external_data_is_a_clear_error(external, tmp_path):
    folder, _ = external
    (tmp_path / "float.onnx").write_bytes((folder / "float.onnx").read_bytes())
    with pytest.raises(LayerbisectError, match="float.onnx: cannot read its external data .*must be complete and beside"):
        find_first_bad_layer(tmp_path / "float.onnx", cnn())
    data = (folder / "float.data").read_bytes()
    (tmp_path / "float.data").write_bytes(data[: len(data) // 2])
    with pytest.raises(LayerbisectError, match="cannot read its external data .*exceeds available data"):
        find_first_bad_layer(tmp_path / "float.onnx", cnn())
    unloaded = onnx.load(folder / "float.onnx", load_external_data=False)
    with pytest.raises(LayerbisectError, match="kept in an external data file that was not loaded; pass the path"):
        find_first_bad_layer(unloaded, cnn())


@pytest.mark.parametrize("ort_optimized", [False, True])
def test_models_too_large_for_one_protobuf_give_the_same_report(external, monkeypatch, ort_optimized):
    """Past the protobuf limit, large initializers in memory reach onnxruntime as buffers;
    those in external files stay there."""
    folder, broken = external
    usual = find_first_bad_layer(cnn(), broken, random_inputs(cnn()), ort_optimized=ort_optimized)
    monkeypatch.setattr(layerbisect.run, "PROTO_LIMIT", 0)
    large = find_first_bad_layer(cnn(), broken, random_inputs(cnn()), ort_optimized=ort_optimized)
    assert large.to_dict() == usual.to_dict()
    mixed = find_first_bad_layer(folder / "float.onnx", broken, random_inputs(cnn()), ort_optimized=ort_optimized)
    assert mixed.layers == usual.layers


def test_models_saved_by_a_newer_onnx_than_onnxruntime_reads_are_compared_with_a_note(tmp_path):
    newer = max(onnx.IR_VERSION, layerbisect.run.max_ir_version() + 1)  # onnx's newest, or past onnxruntime's
    float_model, quant = cnn(), corrupt_weights(quantize(cnn(), "qdq"), "conv2")
    paths = tmp_path / "f.onnx", tmp_path / "q.onnx"
    for model, path in zip((float_model, quant), paths):
        saved = onnx.ModelProto()
        saved.CopyFrom(model)
        saved.ir_version = newer
        onnx.save(saved, path)
    with pytest.raises(Exception, match="Unsupported model IR version"):  # what onnxruntime does with them
        onnxruntime.InferenceSession(str(paths[0]), providers=["CPUExecutionProvider"])
    report = find_first_bad_layer(str(paths[0]), str(paths[1]), random_inputs(float_model), quiet=True)
    assert report.first_bad.float_nodes == ("conv2",)
    assert f"the float model has IR version {newer} (saved by a newer onnx)" in report.notes[0]
    assert "the quantized model has IR version" in report.notes[1]
    assert keep_in_float(str(paths[0]), str(paths[1]), random_inputs(float_model)).nodes_to_exclude == ("conv2",)
    assert onnx.load(str(paths[0])).ir_version == newer  # the file is left as it was
