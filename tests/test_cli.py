"""The layerbisect command: exit statuses, feeds from files, JSON report."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from layerbisect.cli import main
from models import corrupt_weights, make_cnn, quantize, random_inputs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    float_model = make_cnn()
    quant = quantize(float_model, "qdq")
    paths = {"float": folder / "cnn_fp32.onnx", "int8": folder / "cnn_int8.onnx", "broken": folder / "cnn_broken.onnx"}
    onnx.save(float_model, paths["float"])
    onnx.save(quant, paths["int8"])
    onnx.save(corrupt_weights(quant, "conv2"), paths["broken"])
    np.savez(folder / "feeds.npz", **random_inputs(float_model))
    np.save(folder / "x.npy", random_inputs(float_model)["x"])
    paths["npz"], paths["npy"] = folder / "feeds.npz", folder / "x.npy"
    return paths


def test_exit_0_when_no_layer_is_below_threshold(models, capsys):
    assert main([str(models["float"]), str(models["int8"]), "--inputs", str(models["npz"])]) == 0
    assert capsys.readouterr().out.startswith("PASS")


def test_exit_1_and_json_report_when_a_layer_fails(models, tmp_path, capsys):
    out = tmp_path / "report.json"
    status = main([
        str(models["float"]), str(models["broken"]), "--input", f"x={models['npy']}",
        "--threshold", "0.98", "--json", str(out),
    ])
    assert status == 1
    assert "first layer below cosine 0.98 is #2 Conv 'conv2'" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["first_bad"]["float_nodes"] == ["conv2"] and data["threshold"] == 0.98
    assert {"float_nodes", "float_tensor", "quant_nodes", "quant_tensor", "op_type", "cosine",
            "sqnr_db", "mse", "max_abs"} <= set(data["layers"][0])
    assert len(data["layers"]) == 10


def test_random_inputs_when_no_feeds_are_given(models, capsys):
    assert main([str(models["float"]), str(models["broken"]), "--seed", "3"]) == 1


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["only_one.onnx"])
    assert exit_info.value.code == 2


def test_console_script_runs(models):
    result = subprocess.run(
        [sys.executable, "-m", "layerbisect.cli", str(models["float"]), str(models["broken"])],
        capture_output=True, text=True,
    )
    assert result.returncode == 1 and "conv2" in result.stdout.splitlines()[0]


def test_bisect_with_a_memory_budget_and_workers(models, capsys):
    status = main([str(models["float"]), str(models["broken"]), "--inputs", str(models["npz"]),
                   "--strategy", "bisect", "--memory-budget", "1K", "--workers", "2"])
    out = capsys.readouterr().out
    assert status == 1 and "#2 Conv 'conv2'" in out and "error introduced there" in out and "bisect:" in out


def test_keep_float_and_repaired_model(models, tmp_path, capsys):
    keep, repaired = tmp_path / "keep.json", tmp_path / "repaired.onnx"
    status = main([str(models["float"]), str(models["broken"]), "--keep-float", str(keep),
                   "--repaired-model", str(repaired)])
    assert status == 1
    assert json.loads(keep.read_text())["nodes_to_exclude"] == ["conv2"]
    assert main([str(models["float"]), str(repaired)]) == 0
    assert "keeping 1 node(s) in float repairs the model" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,message", [
    ("--memory-budget", "lots", "must be a size such as 2G"),
    ("--strategy", "fast", "invalid choice: 'fast'"),
])
def test_bad_search_flags(models, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(models["float"]), str(models["int8"]), flag, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_keep_float_refused_after_the_report_is_printed(models, tmp_path, capsys):
    dynamic = tmp_path / "dynamic.onnx"
    onnx.save(quantize(make_cnn(), "dynamic"), dynamic)
    assert main([str(models["float"]), str(dynamic), "--keep-float", str(tmp_path / "keep.json")]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("PASS") and "needs a QDQ model" in captured.err


def test_infinite_memory_budget_is_bad_usage(models, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(models["float"]), str(models["int8"]), "--memory-budget", "inf"])
    assert exit_info.value.code == 2 and "positive, finite size" in capsys.readouterr().err
