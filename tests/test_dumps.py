"""Tensor sources: dump folders written here in each layout (from a float run with a planted
fault), and Python callables, as the quantized side."""

import json
from functools import lru_cache

import numpy as np
import onnx
import pytest

from layerbisect import LayerbisectError, find_first_bad_layer
from layerbisect.cli import main
from layerbisect.dumps import DumpFolder
from layerbisect.expose import expose
from layerbisect.run import Session
from layerbisect.source import TensorSource, sanitise

from models import make_cnn, random_inputs

FAULT = "conv2"
# What an int8 backend dumps: the result after its fused BatchNorm and Relu (no conv1, bn1...).
FUSED = ["relu1", "conv2", "relu2", "relu3", "pool1", "relu4", "gap", "flatten", "y"]


@lru_cache(maxsize=None)
def float_run() -> dict[str, np.ndarray]:
    model = make_cnn()
    names = [out for node in model.graph.node for out in node.output]
    return Session(expose(model, names), "float model").run(random_inputs(model), names)


def planted(name: str) -> np.ndarray:
    """The float value of ``name``, broken (sign flipped and shifted) for the faulty layer."""
    value = float_run()[name]
    return -value + value.std() if name == FAULT else value


def report_for(dump) -> object:
    return find_first_bad_layer(make_cnn(), dump, random_inputs(make_cnn()))


def exported_cnn() -> onnx.ModelProto:
    """The CNN with tensor names as exporters write them: '/block/conv1:0'."""
    model = make_cnn()
    renamed = {name: f"/block/{name}:0" for name in float_run()}
    for node in model.graph.node:
        node.input[:] = [renamed.get(x, x) for x in node.input]
        node.output[:] = [renamed.get(x, x) for x in node.output]
    for output in model.graph.output:
        output.name = renamed.get(output.name, output.name)
    return model


def test_npy_folder_named_by_tensor_with_sanitised_names(tmp_path):
    """A model whose tensor names hold '/' and ':' finds its dumps by sanitised name."""
    for name in float_run():
        np.save(tmp_path / f"{sanitise(f'/block/{name}:0')}.npy", planted(name))
    report = find_first_bad_layer(exported_cnn(), tmp_path, random_inputs(make_cnn()))
    assert report.first_bad.float_nodes == (FAULT,)
    assert report.first_bad.evidence == "name" and report.coverage == 1.0
    assert all(layer.passes(0.98) for layer in report.layers[: report.first_bad.index])


def test_raw_files_with_a_json_map_dequantized_and_nhwc(tmp_path):
    """int8 NHWC, uint8 per-channel, float16 and float32 files, named, unnamed and renamed."""
    entries = {}
    for index, name in enumerate(FUSED):
        value = planted(name)
        file = f"t{index:02d}.bin"
        if value.ndim == 4 and index % 2 == 0:  # int8, NHWC, one scale for the tensor
            scale = float(np.abs(value).max() / 127)
            stored = np.clip(np.rint(value / scale), -128, 127).astype(np.int8).transpose(0, 2, 3, 1)
            spec = {"layout": "NHWC", "dtype": "int8", "scale": scale, "zero_point": 0}
        elif value.ndim == 4:  # uint8, a scale and zero point per channel
            low, high = value.min(axis=(0, 2, 3)), value.max(axis=(0, 2, 3))
            scale = np.maximum(high - low, 1e-6) / 255
            zero_point = np.rint(-low / scale)
            stored = np.clip(np.rint(value / scale[None, :, None, None]) + zero_point[None, :, None, None], 0, 255)
            stored = stored.astype(np.uint8)
            spec = {"dtype": "uint8", "scale": scale.tolist(), "zero_point": zero_point.tolist()}
        else:
            stored = value.astype(np.float16 if name == "gap" else np.float32)
            spec = {"dtype": stored.dtype.name}
        stored.astype(stored.dtype.newbyteorder("<")).tofile(tmp_path / file)
        spec["shape"] = list(stored.shape)
        if name not in ("relu2", "pool1"):  # some entries carry no name
            spec["name"] = name
        entries[file] = spec
    (tmp_path / "tensors.json").write_text(json.dumps(entries))
    dumped = DumpFolder(tmp_path)({})
    assert dumped["relu1"].shape == (1, 8, 16, 16) and dumped["relu1"].dtype == np.float32
    assert "<t02.bin>" in dumped
    report = report_for(tmp_path)
    assert [layer.float_tensor for layer in report.layers] == FUSED
    assert report.layers[0].float_nodes == ("conv1", "bn1", "relu1")  # what the backend fused
    assert report.first_bad.float_tensor == FAULT and report.coverage == 1.0
    assert report.layers[0].cosine > 0.99 and report.layers[2].evidence == "order"
    assert report.layers[-1].cosine > 0.99


def test_unnamed_dumps_are_paired_by_shape_and_order(tmp_path):
    for index, name in enumerate(FUSED):
        np.save(tmp_path / f"{index}.npy", planted(name))  # 0.npy ... 8.npy: no names
    report = report_for(tmp_path)
    assert [layer.float_tensor for layer in report.layers] == [
        "relu1", "bn2", "relu2", "relu3", "pool1", "relu4", "gap", "flatten", "y"]
    assert {layer.evidence for layer in report.layers} == {"order"}
    # the broken tensor sits between relu1 and relu2: it stands for conv2+bn2 together
    assert report.first_bad.float_nodes == ("conv2", "bn2") and report.first_bad.index == 1
    assert any("paired by shape and order" in note for note in report.notes)


def test_rknn_snapshot_folder(tmp_path):
    """map_name_to_file.txt beside simulator/npy/ (RKNN Toolkit2 accuracy_analysis output)."""
    simulator = tmp_path / "simulator" / "npy"
    simulator.mkdir(parents=True)
    (tmp_path / "golden" / "npy").mkdir(parents=True)
    lines = ["layer_name                      file_name", "-" * 40]
    for index, name in enumerate(FUSED):
        np.save(simulator / f"{index + 500}.npy", planted(name))
        np.save(tmp_path / "golden" / "npy" / f"{index + 500}.npy", float_run()[name])
        lines.append(f"{name + '_rs' if name == 'pool1' else name}    {index + 500}.npy")
    (tmp_path / "map_name_to_file.txt").write_text("\n".join(lines) + "\n")
    folder = DumpFolder(tmp_path)
    assert [t.key for t in folder.tensors][:3] == ["relu1", "conv2", "relu2"]
    report = report_for(tmp_path)
    assert report.first_bad.float_nodes == (FAULT,)
    assert next(layer for layer in report.layers if layer.float_tensor == "pool1").evidence == "order"


def test_a_python_callable_is_a_tensor_source():
    calls = []

    def simulator(feeds):
        calls.append(sorted(feeds))
        tensors = {name: planted(name) for name in reversed(FUSED)}
        tensors["relu1"] = tensors["relu1"].transpose(0, 2, 3, 1)  # NHWC: permuted back
        return tensors | {"x": feeds["x"]}

    assert isinstance(simulator, TensorSource)
    report = report_for(simulator)
    assert calls == [["x"]]
    assert report.first_bad.float_nodes == (FAULT,) and report.quant_model == "simulator"
    assert "x" not in {layer.quant_tensor for layer in report.layers}  # inputs are fed, not compared
    assert report.layers[0].float_tensor == "relu1" and report.layers[0].cosine > 0.9999
    assert np.isnan(report.first_bad.isolated_cosine) and report.first_bad_cause is None
    assert "conv2" in report.to_html() and report.to_json()
    assert {node.name for node in report.float_neighbourhood} >= {"bn1", "relu1", "conv2", "bn2"}
    assert "Around the first bad layer" in report.to_html()  # the float side alone


def test_cli_compares_a_dump_folder(tmp_path, capsys):
    dump = tmp_path / "dump"
    dump.mkdir()
    for name in float_run():
        np.save(dump / f"{name}.npy", planted(name))
    onnx.save(make_cnn(), tmp_path / "float.onnx")
    np.savez(tmp_path / "x.npz", **random_inputs(make_cnn()))
    out = tmp_path / "report.json"
    status = main([str(tmp_path / "float.onnx"), str(dump), "--inputs", str(tmp_path / "x.npz"),
                   "--json", str(out), "--quiet"])
    assert status == 1
    assert json.loads(out.read_text())["first_bad"]["float_nodes"] == [FAULT]
    assert main([str(tmp_path / "float.onnx"), str(dump), "--quiet"]) == 2
    assert "holds the tensors of one run" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    ({"a.bin": {"name": "conv1"}}, "no shape"),
    ({"a.bin": {"shape": [1, 8, 16, 17]}}, "needs 2176"),
    ({"a.bin": {"shape": [2], "layout": "CHWN"}}, "layout must be"),
    ({"missing.bin": {"shape": [2]}}, "not in"),
    ({"a.bin": {"shape": ["two", 4]}}, "shape must be a list of integers"),
    ({"a.bin": {"shape": 7}}, "shape must be a list of integers"),
    ({"a.bin": {"shape": [-1, 4]}}, "negative dimension"),
])
def test_bad_maps_say_what_is_wrong(tmp_path, content, message):
    float_run()["conv1"].tofile(tmp_path / "a.bin")
    (tmp_path / "map.json").write_text(json.dumps(content))
    with pytest.raises(LayerbisectError, match=message):
        DumpFolder(tmp_path)({})


def test_an_empty_folder_and_several_samples_are_refused(tmp_path):
    with pytest.raises(LayerbisectError, match="holds no .npy file"):
        DumpFolder(tmp_path)
    np.save(tmp_path / "conv1.npy", float_run()["conv1"])
    sample = random_inputs(make_cnn())
    with pytest.raises(LayerbisectError, match="2 samples"):
        find_first_bad_layer(make_cnn(), tmp_path, [sample, sample])


@pytest.mark.parametrize("option", [{"strategy": "bisect"}, {"memory_budget": 1 << 20}, {"isolated": False}])
def test_search_options_that_cannot_apply_to_a_tensor_source_are_refused(tmp_path, option):
    with pytest.raises(LayerbisectError, match=f"{next(iter(option))} cannot apply to a tensor source"):
        find_first_bad_layer(make_cnn(), lambda feeds: {}, random_inputs(make_cnn()), **option)


def dumped(model: onnx.ModelProto, folder, feeds) -> None:
    """Every float tensor ``model`` computes, one .npy per tensor named after it (sanitised),
    as a user dumps a backend's intermediate values."""
    types = {info.name: info.type.tensor_type.elem_type
             for info in onnx.shape_inference.infer_shapes(model).graph.value_info}
    names = [out for node in model.graph.node for out in node.output
             if types.get(out) == onnx.TensorProto.FLOAT or out in {o.name for o in model.graph.output}]
    for name, value in Session(expose(model, names), "dumped model").run(feeds, names).items():
        np.save(folder / f"{sanitise(name)}.npy", value)


def pairs_of(report) -> dict[str, str]:
    return {layer.float_tensor: layer.quant_tensor for layer in report.layers}


def test_a_dump_of_onnxruntimes_qdq_model_is_paired_by_what_its_tensors_hold(tmp_path):
    """onnxruntime's QDQ quantizer drops each Relu after a BatchNormalization or an Add and
    gives its name to their output: the dump's 'relu1' holds bn1's value, its
    'relu1_DequantizeLinear_Output' the clamped one. Paired by name alone, every pair after a
    Relu was wrong (an early Add was named in one such dump)."""
    from models import corrupt_weights, quant_node_for, quantize

    quant = quantize(make_cnn(), "qdq")
    dumped(corrupt_weights(quant, quant_node_for(quant, FAULT)), tmp_path, random_inputs(make_cnn()))
    report = find_first_bad_layer(make_cnn(), tmp_path, random_inputs(make_cnn()))
    assert report.first_bad.float_nodes == (FAULT,)
    clamped = {f"relu{i}": f"relu{i}_DequantizeLinear_Output" for i in (1, 2, 3, 4)}
    assert pairs_of(report) == {
        "conv1": "conv1", "bn1": "relu1", "conv2": "conv2", "bn2": "relu2", "add1": "relu3", "pool1": "pool1",
        "conv3": "relu4", "gap": "gap", "flatten": "flatten", "y": "y", **clamped,
    }
    moved = {layer.float_tensor for layer in report.layers if layer.evidence == "data"}
    assert moved == {"bn1", "bn2", "add1", "conv3"}  # bn2 and after: how the healthy ones were named


def test_a_dump_of_a_batchnorm_folding_optimizer_pairs_the_conv_name_with_the_batchnorm(tmp_path):
    """The folded Conv keeps its name and holds its BatchNormalization's value."""
    from test_rewrites import fold_batchnorm

    folded = fold_batchnorm(make_cnn())
    for node in folded.graph.node:  # the folded Conv's output renamed after the Conv
        renamed = {"bn1": "conv1", "bn2": "conv2"}
        node.input[:] = [renamed.get(x, x) for x in node.input]
        node.output[:] = [renamed.get(x, x) for x in node.output]
    weight = next(i for i in folded.graph.initializer if i.name == next(
        n for n in folded.graph.node if n.output[0] == FAULT).input[1])
    value = onnx.numpy_helper.to_array(weight)
    weight.CopyFrom(onnx.numpy_helper.from_array(np.random.default_rng(0).permutation(value.ravel()).reshape(value.shape),
                                                 weight.name))
    dumped(folded, tmp_path, random_inputs(make_cnn()))
    report = find_first_bad_layer(make_cnn(), tmp_path, random_inputs(make_cnn()))
    assert report.first_bad.float_nodes == ("conv2", "bn2")
    kept = ["relu1", "relu2", "add1", "relu3", "pool1", "conv3", "relu4", "gap", "flatten", "y"]
    assert pairs_of(report) == {"bn1": "conv1", "bn2": "conv2", **{name: name for name in kept}}  # every pair


def test_a_dump_with_its_quantized_graph_pairs_by_structure_numbered_files_and_integers(tmp_path, capsys):
    """A vendor dump of numbered raw files with a JSON map, the tensors int8 as the backend
    holds them: given the graph it came from, each pairs with the float value its graph's value
    stands for, dequantized with that graph's scale, and the planted fault is named."""
    from models import corrupt_weights, quant_node_for, quantize

    quant = quantize(make_cnn(), "qdq")
    faulty = corrupt_weights(quant, quant_node_for(quant, FAULT))
    onnx.save(faulty, tmp_path / "compiled.onnx")
    names = [node.output[0] for node in faulty.graph.node if node.op_type == "QuantizeLinear"]
    values = Session(expose(faulty, names), "dumped model").run(random_inputs(make_cnn()), names)
    dump = tmp_path / "dump"
    dump.mkdir()
    listing = {}
    for index, name in enumerate(names):
        values[name].tofile(dump / f"{index:04d}.bin")
        listing[f"{index:04d}.bin"] = {"name": name, "dtype": str(values[name].dtype), "shape": list(values[name].shape)}
    (dump / "layers.json").write_text(json.dumps(listing))
    np.savez(tmp_path / "x.npz", **random_inputs(make_cnn()))
    report = find_first_bad_layer(make_cnn(), DumpFolder(dump), random_inputs(make_cnn()),
                                  quant_graph=tmp_path / "compiled.onnx")
    assert report.first_bad.float_nodes == (FAULT,)
    model = find_first_bad_layer(make_cnn(), faulty, random_inputs(make_cnn()))  # the same pairs, as evidenced
    assert [(layer.float_tensor, layer.quant_tensor, layer.evidence) for layer in report.layers] == [
        (layer.float_tensor, layer.quant_tensor, layer.evidence) for layer in model.layers]  # no pair wrong
    by_float = {layer.float_tensor: layer.quant_tensor for layer in report.layers}
    assert by_float["relu1"] == "relu1_QuantizeLinear_Output" and by_float["relu3"] == "relu3_QuantizeLinear_Output"
    assert all(layer.cosine > 0.99 for layer in report.layers if layer.index < report.first_bad.index)
    onnx.save(make_cnn(), tmp_path / "fp32.onnx")
    assert main([str(tmp_path / "fp32.onnx"), str(dump), "--inputs", str(tmp_path / "x.npz"), "--quant-graph",
                 str(tmp_path / "compiled.onnx"), "--quiet"]) == 1
    assert capsys.readouterr().out.startswith(f"FAIL: first layer below cosine 0.98 is #{report.first_bad.index} Conv 'conv2'")
    with pytest.raises(LayerbisectError, match="quant_graph names the graph a tensor source's tensors come from"):
        find_first_bad_layer(make_cnn(), faulty, quant_graph=tmp_path / "compiled.onnx")


def test_qnn_net_run_debug_output(tmp_path, capsys):
    """qnn-net-run --debug --output_dir out/: one Result_<N>/ per input, each tensor one raw
    float32 file named after it as the converter sanitised it ('/' ':' '.' as '_'), no shape,
    channel-last; tensors QNN adds (its NHWC input, a layout conversion) match nothing."""
    model = exported_cnn()
    output = tmp_path / "out"
    for run in ("Result_0", "Result_1"):
        (output / run).mkdir(parents=True)
        for name in FUSED:
            value = planted(name)
            stored = value.transpose(0, 2, 3, 1) if value.ndim == 4 else value  # QNN's own layout
            stored.astype("<f4").tofile(output / run / f"{sanitise(f'/block/{name}:0')}.raw")
        random_inputs(make_cnn())["x"].transpose(0, 2, 3, 1).astype("<f4").tofile(output / run / "x.raw")
        np.arange(40, dtype="<f4").tofile(output / run / "_block_relu1_0_nchw_to_nhwc.raw")
    with pytest.raises(LayerbisectError, match="holds 2 qnn-net-run results.*Result_0"):
        DumpFolder(output)
    report = find_first_bad_layer(model, output / "Result_0", random_inputs(make_cnn()))
    assert report.first_bad.float_nodes == (FAULT,) and report.coverage == 1.0
    assert pairs_of(report) == {f"/block/{name}:0": sanitise(f"/block/{name}:0") for name in FUSED}
    assert all(layer.cosine > 0.9999 for layer in report.layers if layer.float_tensor != f"/block/{FAULT}:0")
    assert DumpFolder(output / "Result_0")({})["_block_relu1_0"].shape == (16 * 16 * 8,)  # unshaped until paired


def tidl_traces(folder, fixed_only: bool = False) -> None:
    """A TIDL debug_level=4 trace folder: per layer, tidl_trace_subgraph_0_<dataId>_<batch>_
    <channels>_<width>x<height>.y (fixed point) and the same name ending _float.bin (float32),
    with the compilation's layer_info.txt ("layerId dataId name"). Data ids are not layer ids
    (the table maps them), and the input data layer is traced too."""
    lines, rng = ["0 0 x"], np.random.default_rng(0)
    layers = [("x", random_inputs(make_cnn())["x"])] + [(name, planted(name)) for name in FUSED]
    for layer_id, (name, value) in enumerate(layers):
        data_id = 0 if layer_id == 0 else 100 - 7 * layer_id  # later layers, smaller data ids
        lines.append(f"{layer_id} {data_id} {name}") if layer_id else None
        batch, channels, height, width = value.shape if value.ndim == 4 else (1, 1, 1, value.size)
        stem = f"tidl_trace_subgraph_0_{data_id:04d}_{batch:05d}_{channels:05d}_{width:05d}x{height:05d}"
        rng.integers(-128, 127, value.size, dtype=np.int8).tofile(folder / f"{stem}.y")
        if not fixed_only:
            value.astype("<f4").tofile(folder / f"{stem}_float.bin")
    (folder / "subgraph_0_tidl_io_1.layer_info.txt").write_text("\n".join(lines) + "\n")


def test_tidl_trace_folder(tmp_path):
    tidl_traces(tmp_path)
    assert [t.key for t in DumpFolder(tmp_path).tensors][:3] == ["x", "relu1", "conv2"]  # layer order
    report = report_for(tmp_path)
    assert report.first_bad.float_nodes == (FAULT,) and report.coverage == 1.0
    assert pairs_of(report) == {name: name for name in FUSED}
    assert report.layers[-1].shape == (1, 10) and report.layers[-1].cosine > 0.9999  # traced as 1x1x1x10


def test_tidl_fixed_point_traces_alone_and_a_missing_layer_table_are_refused(tmp_path):
    tidl_traces(tmp_path, fixed_only=True)
    with pytest.raises(LayerbisectError, match="debug_level=4"):
        DumpFolder(tmp_path)
    for file in tmp_path.glob("*.y"):
        file.rename(file.with_name(file.name[:-2] + "_float.bin"))
    (tmp_path / "subgraph_0_tidl_io_1.layer_info.txt").unlink()
    with pytest.raises(LayerbisectError, match="no \\*layer_info.txt"):
        DumpFolder(tmp_path)


def test_a_dump_that_names_nothing_of_its_graph_says_so(tmp_path):
    np.save(tmp_path / "unrelated.npy", np.zeros(7, np.float32))
    with pytest.raises(LayerbisectError, match="named after a value of the quantized graph"):
        find_first_bad_layer(make_cnn(), tmp_path, random_inputs(make_cnn()), quant_graph=make_cnn())
    with pytest.raises(LayerbisectError, match="give the graph they were dumped from"):
        find_first_bad_layer(make_cnn(), tmp_path, random_inputs(make_cnn()))
