"""Fixed-point what-if: a format simulated on the float model, first failing layer known by construction."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import layerbisect
from layerbisect import LayerbisectError, find_first_bad_layer, simulated
from layerbisect.cli import main
from layerbisect.expose import expose
from layerbisect.run import Session
from layerbisect.simulate import parse_format

from models import make_cnn, random_inputs


def scaled_model(factor: float) -> onnx.ModelProto:
    """x[4,16] -> MatMul -> Relu -> Mul by ``factor`` ('scaled') -> Mul by 1/factor ('back')
    -> MatMul -> y: only 'scaled' leaves the range of values near 1."""
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((16, 16)) * 0.25).astype(np.float32) for _ in range(2)]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["mm1"], name="mm1"),
        helper.make_node("Relu", ["mm1"], ["relu1"], name="relu1"),
        helper.make_node("Mul", ["relu1", "k"], ["scaled"], name="scaled"),
        helper.make_node("Mul", ["scaled", "k_inv"], ["back"], name="back"),
        helper.make_node("MatMul", ["back", "w2"], ["y"], name="mm2"),
    ]
    constants = [
        numpy_helper.from_array(weights[0], "w1"), numpy_helper.from_array(weights[1], "w2"),
        numpy_helper.from_array(np.array(factor, np.float32), "k"),
        numpy_helper.from_array(np.array(1 / factor, np.float32), "k_inv"),
    ]
    graph = helper.make_graph(
        nodes, "scaled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def samples(count: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.uniform(-1, 1, (4, 16)).astype(np.float32)} for _ in range(count)]


def diagnosis(report) -> str:
    (note,) = [n for n in report.notes if " at #" in n]
    return note


def test_values_beyond_the_integer_range_fail_for_saturation():
    report = find_first_bad_layer(scaled_model(100.0), simulated("ap_fixed<8,4>"), inputs=samples())
    assert report.first_bad.float_nodes == ("scaled",)
    assert report.first_bad_cause == "introduced"
    assert all(layer.passes(0.98) for layer in report.layers[: report.first_bad.index])
    note = diagnosis(report)
    assert note.startswith("ap_fixed<8,4> at #2 Mul 'scaled': saturation: ")
    assert "% of values clipped to [-8, 7.9375]" in note
    assert report.quant_model == "simulated ap_fixed<8,4>"


def test_values_below_the_step_fail_for_resolution():
    report = find_first_bad_layer(scaled_model(1e-4), simulated("ap_fixed<8,4>"), inputs=samples())
    assert report.first_bad.float_nodes == ("scaled",)
    assert "resolution: 100.0% of non-zero values rounded to zero (step 0.0625)" in diagnosis(report)


def test_a_format_scaled_per_tensor_has_no_fixed_step():
    assert parse_format("ap_fixed<8,4>").step == 0.0625
    with pytest.raises(LayerbisectError, match=r"int8 has no fixed step.*ask a fixed-point format"):
        parse_format("int8").step


def test_a_healthy_model_passes_at_ap_fixed_16_8():
    report = find_first_bad_layer(scaled_model(1.0), simulated("ap_fixed<16,8>"), inputs=samples())
    assert report.first_bad is None and report.coverage == 1.0
    assert [layer.float_tensor for layer in report.layers] == ["mm1", "relu1", "scaled", "back", "y"]
    assert report.layers[-1].cosine < 1.0  # quantized, not the float model compared with itself
    assert any(note.startswith("quantized side: the float model with its 6 float32 activations in ap_fixed<16,8>")
               for note in report.notes)


@pytest.mark.parametrize("fmt", ["int8", "uint8", "int16"])
def test_integer_formats_take_their_scales_from_the_samples(fmt):
    """A scale per tensor from the observed range: a factor of 100 costs nothing."""
    report = find_first_bad_layer(scaled_model(100.0), simulated(fmt), inputs=samples())
    assert report.first_bad is None
    simulation = simulated(fmt).build(scaled_model(100.0), samples())
    assert simulation.grids["scaled"].scale == pytest.approx(100 * simulation.grids["relu1"].scale, rel=1e-5)
    assert all(effect.clipped == 0 for effect in simulation.effects.values())


def test_the_first_bad_layer_and_the_culprit_get_a_cause():
    report = find_first_bad_layer(make_cnn(), simulated("ap_fixed<6,3>"), inputs=random_inputs(make_cnn()))
    assert report.first_bad is not None
    notes = [n for n in report.notes if " at #" in n]
    described = {report.first_bad.index, report.culprit.index}
    assert len(notes) == len(described)
    assert all(n.split(": ")[1] in ("saturation", "resolution") for n in notes)


def test_the_simulated_model_computes_what_its_grids_say():
    """Each simulated tensor is its grid applied to the value its producer computes in the
    simulated model (the numpy mirror that measures effects is the ONNX chain)."""
    model, sample = make_cnn(), random_inputs(make_cnn())
    for fmt in ("uint8", "ap_fixed<8,3>", "ap_fixed<6,2,AP_TRN,AP_WRAP>", "ap_ufixed<10,4,AP_RND_CONV>"):
        simulation = simulated(fmt).build(model, [sample])
        assert [o.name for o in simulation.model.graph.output] == ["y"]  # outputs keep their names
        produced = {t: t if n != t else t + "__layerbisect_sim_raw" for t, n in simulation.names.items()}
        wanted = [*simulation.names.values(), *produced.values()]
        wanted = [name for name in dict.fromkeys(wanted) if name != "x"]
        values = {"x": sample["x"], **Session(expose(simulation.model, wanted), "simulated").run(sample, wanted)}
        for tensor, name in simulation.names.items():
            expected = simulation.grids[tensor].apply(values[produced[tensor]])[0]
            assert np.array_equal(values[name], expected), (fmt, tensor)


def test_grid_mirror_matches_rounding_and_overflow_modes():
    x = np.array([-9.0, -0.03125, 0.03125, 0.09375, 7.99, 9.0], np.float32)
    rnd = layerbisect.simulate.fixed_grid(parse_format("ap_fixed<8,4>"))
    conv = layerbisect.simulate.fixed_grid(parse_format("ap_fixed<8,4,AP_RND_CONV,AP_SAT>"))
    wrap = layerbisect.simulate.fixed_grid(parse_format("ap_fixed<8,4,AP_TRN,AP_WRAP>"))
    assert rnd.apply(x)[0].tolist() == [-8.0, 0.0, 0.0625, 0.125, 7.9375, 7.9375]
    assert conv.apply(x)[0].tolist() == [-8.0, 0.0, 0.0, 0.125, 7.9375, 7.9375]
    assert wrap.apply(x)[0].tolist() == [7.0, -0.0625, 0.0, 0.0625, 7.9375, -7.0]
    effect = rnd.apply(x)[1]
    assert (effect.values, effect.clipped, effect.zeroed, effect.cause) == (6, 3, 1, "saturation")


@pytest.mark.parametrize("text", ["ap_fixed<8>", "float8", "ap_fixed<40,8>", "ap_fixed<8,4,AP_SAT>",
                                  "ap_fixed<8,4,AP_RND_INF,AP_SAT>", "int32"])
def test_unknown_formats_are_refused_with_what_is_accepted(text):
    with pytest.raises(LayerbisectError):
        simulated(text)


def test_ort_optimized_does_not_apply_to_a_simulation():
    with pytest.raises(LayerbisectError, match="simulated format"):
        find_first_bad_layer(scaled_model(1.0), simulated("int8"), inputs=samples(), ort_optimized=True)


def test_cli_simulates_without_a_quantized_model(tmp_path, capsys):
    path = tmp_path / "float.onnx"
    onnx.save(scaled_model(100.0), path)
    np.savez(tmp_path / "x.npz", **samples(1)[0])
    out = tmp_path / "report.json"
    status = main([str(path), "--simulate", "ap_fixed<8,4>", "--inputs", str(tmp_path / "x.npz"),
                   "--json", str(out), "--quiet"])
    assert status == 1
    report = json.loads(out.read_text())
    assert report["first_bad"]["float_nodes"] == ["scaled"]
    assert any("saturation:" in note for note in report["notes"])
    assert main([str(path), "--simulate", "ap_fixed<16,8>", "--quiet"]) == 0
    capsys.readouterr()
    for argv in ([str(path)], [str(path), str(path), "--simulate", "int8"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "either a quantized model or --simulate" in capsys.readouterr().err
    assert main([str(path), "--simulate", "ap_fixed<8>"]) == 2
    assert main([str(path), "--simulate", "int8", "--keep-float", str(tmp_path / "k.json")]) == 2
