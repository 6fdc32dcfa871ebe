"""The layerbisect command: exit statuses, feeds from files, JSON report."""

import json
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest

import layerbisect

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


def test_bad_usage_exits_2_with_one_line_pointing_to_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["only_one.onnx"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "layerbisect: error: give either a quantized model or --simulate FORMAT (see layerbisect --help)\n"
    )
    with pytest.raises(SystemExit):
        main(["a.onnx", "b.onnx", "--bogus"])
    assert capsys.readouterr().err == "layerbisect: error: unrecognized arguments: --bogus (see layerbisect --help)\n"


def test_help_lists_exit_statuses_and_an_example_and_version_answers(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "exit status:\n  0  every aligned layer reaches the threshold (PASS)\n  1  a layer is below it" in out
    assert "2  bad usage or bad input" in out and "example:\n  layerbisect model_fp32.onnx model_int8.onnx" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"layerbisect {layerbisect.__version__}\n"


def test_help_and_usage_errors_import_neither_onnx_nor_numpy():
    code = """if True:
        import sys
        from layerbisect.cli import main
        for argv in (["--help"], ["--version"], ["one.onnx"]):
            try:
                main(argv)
            except SystemExit:
                pass
        print(sorted({"onnx", "onnxruntime", "numpy", "networkx"} & set(sys.modules)))
    """
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "[]"


def test_files_written_are_named_on_stderr_unless_quiet(models, tmp_path, capsys):
    out, page = tmp_path / "report.json", tmp_path / "report.html"
    assert main([str(models["float"]), str(models["int8"]), "--json", str(out), "--html", str(page)]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"layerbisect: wrote {out}\nlayerbisect: wrote {page}\n"
    assert captured.out.startswith("PASS")
    assert main([str(models["float"]), str(models["int8"]), "--json", str(out), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_json_dash_is_stdout_and_the_report_text_goes_to_stderr(models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([str(models["float"]), str(models["broken"]), "--json", "-"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["first_bad"]["float_nodes"] == ["conv2"]
    assert captured.err.startswith("FAIL: first layer below cosine 0.98 is #2 Conv 'conv2'")
    assert "wrote" not in captured.err and not (tmp_path / "-").exists()
    assert main([str(models["float"]), str(models["broken"]), "--html", "-", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("<!DOCTYPE html>") and captured.err.startswith("FAIL") and captured.err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        main([str(models["float"]), str(models["broken"]), "--html", "-", "--json", "-"])
    assert exit_info.value.code == 2 and "only one of --json and --html" in capsys.readouterr().err


def test_providers_are_an_order_of_preference(models, capsys):
    providers = "NoSuchExecutionProvider,CPUExecutionProvider"
    assert main([str(models["float"]), str(models["broken"]), "--providers", providers]) == 1
    captured = capsys.readouterr()
    assert captured.err == ("layerbisect: warning: execution provider 'NoSuchExecutionProvider' is not available "
                            "in this onnxruntime; running with CPUExecutionProvider\n")
    assert ("note: execution provider 'NoSuchExecutionProvider' not available in this onnxruntime, skipped; "
            "ran with CPUExecutionProvider") in captured.out
    assert main([str(models["float"]), str(models["broken"]), "--providers", "NoSuchExecutionProvider,Other"]) == 2
    assert "none of the execution providers 'NoSuchExecutionProvider', 'Other' is available" in capsys.readouterr().err


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


def test_ctrl_c_prints_one_line_exits_130_and_leaves_nothing_behind(models, tmp_path):
    # the real command in a real process, held in the comparison's first step until it is interrupted
    slow = ("import sys, time\nimport layerbisect.find\n"
            "def setup(*args, **kwargs):\n    print('started', flush=True)\n    time.sleep(120)\n"
            "layerbisect.find.setup = setup\nfrom layerbisect.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-c", slow, str(models["float"]), str(models["broken"]),
               "--json", str(out / "report.json"), "--html", str(out / "report.html")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "started\n"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert (process.returncode, stdout, stderr) == (130, "", "layerbisect: interrupted\n")
    assert list(out.iterdir()) == []
