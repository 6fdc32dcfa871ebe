"""The layerbisect command: exit statuses, feeds from files, JSON report."""

import json
import signal
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import onnx
import pytest

import layerbisect
import layerbisect.find
import layerbisect.passes
from layerbisect.cli import main
from layerbisect.datasets import BatchedNpz, NpzFolder

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
    said = ("execution provider 'NoSuchExecutionProvider' is not available in this onnxruntime: skipped, "
            "CPUExecutionProvider used instead")
    assert captured.err == f"layerbisect: warning: {said}\n"  # before the run, in the words of the report's note
    assert f"note: {said}" in captured.out
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
    # the real command in a real process, held in the comparison's first step until it is interrupted;
    # Python's Ctrl-C handler put back, as a terminal has it: a process started in the background
    # by a non-interactive shell (a CI runner's) inherits SIGINT ignored
    slow = ("import signal, sys, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "import layerbisect.find\n"
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


LOADER = """import numpy as np


def load_data():
    rng = np.random.default_rng(7)
    for _ in range(3):
        yield {"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The loader script's 3 samples, also as a folder of .npz files and as one batched .npz."""
    folder = tmp_path_factory.mktemp("dataset")
    (folder / "loader.py").write_text(LOADER)
    rng = np.random.default_rng(7)
    samples = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(3)]
    (folder / "samples").mkdir()
    for index, sample in enumerate(samples):
        np.savez(folder / "samples" / f"{index:03}.npz", **sample)
    np.savez(folder / "batch.npz", x=np.stack([s["x"] for s in samples]))
    return folder, samples


def json_report(args, capsys) -> dict:
    main([*args, "--json", "-", "--quiet"])
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("feeds", [
    ["--inputs", "@samples"], ["--inputs", "@batch.npz", "--batched"], ["--data-loader-script", "@loader.py"],
    ["--data-loader-script", "@loader.py:load_data", "--workers", "2"],
])
def test_a_dataset_gives_the_api_means_over_its_samples(models, dataset, capsys, feeds):
    folder, samples = dataset
    data = json_report([str(models["float"]), str(models["broken"]),
                        *(a.replace("@", f"{folder}/") for a in feeds)], capsys)
    api = layerbisect.find_first_bad_layer(models["float"], models["broken"], samples).to_dict()
    assert data["samples"] == api["samples"] == 3
    assert [(row["cosine"], row["sqnr_db"], row["isolated_cosine"]) for row in data["layers"]] == \
        [(row["cosine"], row["sqnr_db"], row["isolated_cosine"]) for row in api["layers"]]


@pytest.mark.parametrize("feeds", [["--inputs", "@samples"], ["--inputs", "@batch.npz", "--batched"],
                                   ["--data-loader-script", "@loader.py"]])
def test_max_samples_keeps_the_first(models, dataset, capsys, feeds):
    folder, samples = dataset
    data = json_report([str(models["float"]), str(models["broken"]), "--max-samples", "2",
                        *(a.replace("@", f"{folder}/") for a in feeds)], capsys)
    api = layerbisect.find_first_bad_layer(models["float"], models["broken"], samples[:2])
    assert data["samples"] == 2 and data["layers"][2]["cosine"] == api.layers[2].cosine


def test_a_folder_and_a_batched_file_are_sequences_that_slice(dataset):
    folder, samples = dataset
    for data in (NpzFolder(folder / "samples", {}, None), BatchedNpz(folder / "batch.npz", {}, 3)):
        assert len(data) == 3 and isinstance(data, Sequence)
        np.testing.assert_array_equal(data[-1]["x"], samples[2]["x"])
        backwards = data[::-2]  # samples 2 and 0, in that order
        assert len(backwards) == 2 and data[3:] == []
        np.testing.assert_array_equal(backwards[0]["x"], samples[2]["x"])
        np.testing.assert_array_equal(backwards[1]["x"], samples[0]["x"])


def test_a_folder_is_read_again_for_each_pass_of_a_bisection(models, dataset, capsys):
    folder, samples = dataset
    data = json_report([str(models["float"]), str(models["broken"]), "--inputs", str(folder / "samples"),
                        "--strategy", "bisect", "--memory-budget", "1K"], capsys)
    api = layerbisect.find_first_bad_layer(models["float"], models["broken"], samples, strategy="bisect",
                                           memory_budget="1K")
    assert data["strategy"] == "bisect" and data["samples"] == 3
    assert data["first_bad"]["cosine"] == api.first_bad.cosine


def test_keep_float_reads_a_loader_again(models, dataset, tmp_path, capsys):
    folder, _ = dataset
    keep = tmp_path / "keep.json"
    assert main([str(models["float"]), str(models["broken"]), "--data-loader-script", str(folder / "loader.py"),
                 "--keep-float", str(keep), "--quiet"]) == 1
    assert json.loads(keep.read_text())["nodes_to_exclude"] == ["conv2"]


def test_verbose_logs_the_milestones_and_quiet_does_not(models, dataset, capsys):
    folder, _ = dataset
    args = [str(models["float"]), str(models["broken"]), "--inputs", str(folder / "samples")]
    assert main([*args, "-v"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "layerbisect: loaded the float model (14 nodes) and the quantized model (44 nodes)"
    assert "layerbisect: aligned 14 of 14 float operations (10 layers); 4 of 4 weighted layers paired" in err
    assert "layerbisect: pass 1 of 1: 10 layer(s), #0 to #9, with isolated error" in err
    assert "layerbisect: pass 1 done: 3 sample(s), 9 model runs" in err
    assert main(args) == 1 and capsys.readouterr().err == ""
    assert main([*args, "-q"]) == 1 and capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "-v", "-q"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_python_m_layerbisect_answers_help():
    result = subprocess.run([sys.executable, "-m", "layerbisect", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--data-loader-script FILE.py[:FUNC]" in result.stdout


@pytest.mark.parametrize("feeds,total", [
    (["--inputs", "@samples"], 3), (["--inputs", "@batch.npz", "--batched", "--max-samples", "2"], 2),
    (["--data-loader-script", "@loader.py", "--max-samples", "2"], 2), (["--data-loader-script", "@loader.py"], None),
])
def test_the_progress_bar_gets_the_count_where_it_is_known(models, dataset, monkeypatch, feeds, total):
    folder, _ = dataset
    totals = []
    monkeypatch.setattr(layerbisect.passes, "progress", lambda samples, quiet, count=None, desc=None: (
        totals.append(count) or samples))
    main([str(models["float"]), str(models["broken"]), *(a.replace("@", f"{folder}/") for a in feeds), "--quiet"])
    assert totals == [total]


WITHOUT_ONNXRUNTIME = "import sys; sys.modules['onnxruntime'] = None; "  # as if none were installed


def test_without_onnxruntime_the_package_imports_and_a_comparison_says_what_to_install(models):
    """layerbisect requires no onnxruntime distribution (the cpu, gpu, directml and openvino
    extras pick one): without any, it imports, and the first comparison says what to install."""
    fp32, int8 = models["float"], models["broken"]
    script = WITHOUT_ONNXRUNTIME + (
        "import layerbisect\n"
        "try:\n"
        f"    layerbisect.find_first_bad_layer({str(fp32)!r}, {str(int8)!r})\n"
        "except layerbisect.LayerbisectError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "none is installed: pip install 'layerbisect[cpu]'" in out and "onnxruntime-gpu" in out
    cli = WITHOUT_ONNXRUNTIME + f"sys.argv = ['layerbisect', {str(fp32)!r}, {str(int8)!r}]; " \
        "from layerbisect.cli import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", cli], capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("layerbisect: error: layerbisect runs models with onnxruntime, and none is "
                                    "installed") and result.stderr.count("\n") == 1
