"""Issue 22's battery: bad input through the CLI and the API gets one clear line (exit 2), and
no input file changes, hard links, symlinks and external data included (sha256 of every file
of the user's folder before and after each case). Outputs that would overwrite an input are
refused before any work."""

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import layerbisect.command
import layerbisect.files
from layerbisect import LayerbisectError, find_first_bad_layer, keep_in_float
from layerbisect.cli import main
from layerbisect.files import write

from models import make_cnn, quantize, random_inputs, save_user_files
from test_networks import mlp_like_cnn
from test_unusual_models import to_float16


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (links read through)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def log_model() -> onnx.ModelProto:
    """y = Log(x - 1) + 1 on x float32[1, 8]: NaN where x < 1, from finite inputs."""
    nodes = [helper.make_node("Sub", ["x", "one"], ["s"], name="shift"),
             helper.make_node("Log", ["s"], ["l"], name="log"),
             helper.make_node("Add", ["l", "one"], ["y"], name="after")]
    graph = helper.make_graph(
        nodes, "log", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    """A user's folder: models (one with external data), feeds, and links to them."""
    folder = tmp_path_factory.mktemp("user")
    float_model, quant, feeds = save_user_files(folder)
    onnx.save(mlp_like_cnn(), folder / "mlp.onnx")
    onnx.save(quant, folder / "qdq.onnx")
    onnx.save(float_model, folder / "ext.onnx", save_as_external_data=True, location="ext.onnx.data",
              size_threshold=0)
    np.save(folder / "x.npy", feeds["x"])
    nan = feeds["x"].copy()
    nan[0, 0, 0, 0] = np.nan
    np.savez(folder / "nan.npz", x=nan)
    np.savez(folder / "inf.npz", x=np.where(feeds["x"] > 2.5, np.inf, feeds["x"]).astype(np.float32))
    np.save(folder / "objects.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    (folder / "notes.txt").write_text("not an array")
    (folder / "models").mkdir()
    os.link(folder / "int8.onnx", folder / "int8_hardlink.json")
    os.link(folder / "ext.onnx.data", folder / "data_hardlink.html")
    (folder / "int8_symlink.json").symlink_to(folder / "int8.onnx")
    (folder / "dataset").mkdir()  # a third sample in float64
    for index, x in enumerate([feeds["x"], feeds["x"], feeds["x"].astype(np.float64)]):
        np.savez(folder / "dataset" / f"{index}.npz", x=x)
    np.savez(folder / "ragged_batch.npz", x=np.stack([feeds["x"]] * 3), y=np.zeros((2, 4)))
    np.savez(folder / "scalar_batch.npz", x=np.float32(1.0))
    (folder / "loader_bad_shape.py").write_text(
        "import numpy as np\n\ndef load_data():\n    for size in (16, 16, 15):\n"
        "        yield {'x': np.zeros((1, 3, size, size), np.float32)}\n")
    (folder / "loader_raises.py").write_text(
        "def load_data():\n    raise FileNotFoundError('calibration/ is gone')\n")
    (folder / "loader_import_fails.py").write_text("import no_such_module_here\n")
    return folder


# (arguments, what stderr says); "@" stands for the user's folder
CASES = {
    # outputs that are inputs: refused before any work
    "json over the quantized model": (["@fp32.onnx", "@int8.onnx", "--json", "@int8.onnx"], "would overwrite an input file"),
    "html over the float model": (["@fp32.onnx", "@int8.onnx", "--html", "@fp32.onnx"], "would overwrite an input file"),
    "repaired model over the quantized model": (
        ["@fp32.onnx", "@int8.onnx", "--repaired-model", "@int8.onnx"], "would overwrite an input file"),
    "keep-float json over the feeds": (
        ["@fp32.onnx", "@int8.onnx", "--inputs", "@feeds.npz", "--keep-float", "@feeds.npz"], "would overwrite an input file"),
    "json over a single feed": (["@fp32.onnx", "@int8.onnx", "--input", "x=@x.npy", "--json", "@x.npy"],
                                "would overwrite an input file"),
    "json on a hard link to the quantized model": (
        ["@fp32.onnx", "@int8.onnx", "--json", "@int8_hardlink.json"], "same file as"),
    "repaired model on a hard link to the quantized model": (
        ["@fp32.onnx", "@int8.onnx", "--repaired-model", "@int8_hardlink.json"], "same file as"),
    "json on a symlink to the quantized model": (
        ["@fp32.onnx", "@int8.onnx", "--json", "@int8_symlink.json"], "would overwrite an input file"),
    "json over the float model's external data": (
        ["@ext.onnx", "@int8.onnx", "--json", "@ext.onnx.data"], "would overwrite an input file"),
    "html on a hard link to the external data": (
        ["@ext.onnx", "@int8.onnx", "--html", "@data_hardlink.html"], "same file as"),
    "two outputs one file": (["@fp32.onnx", "@int8.onnx", "--json", "@out.json", "--html", "@out.json"],
                             "are the same file"),
    "output folder missing": (["@fp32.onnx", "@int8.onnx", "--json", "@missing/report.json"], "does not exist"),
    "output is a folder": (["@fp32.onnx", "@int8.onnx", "--html", "@models"], "it is a folder"),
    # models
    "float model missing": (["@nope.onnx", "@int8.onnx"], "float model file not found"),
    "model is a folder": (["@models", "@int8.onnx"], "is a folder, not an .onnx file"),
    "model is text": (["@notes.txt", "@int8.onnx"], "is not a readable ONNX file"),
    "another network, same inputs and outputs": (
        ["@fp32.onnx", "@mlp.onnx"], "the two models do not compute the same network: 0 of 4 weighted layers pair"),
    "models take different inputs": (
        ["@fp32.onnx", "@transformer.onnx"],
        "input 'x' is float32[1,3,16,16] in the float model but float32[1,8,32] in the quantized model"),
    # feeds
    "feeds missing": (["@fp32.onnx", "@int8.onnx", "--inputs", "@nope.npz"], "--inputs: file not found"),
    "feeds are text": (["@fp32.onnx", "@int8.onnx", "--inputs", "@notes.txt"],
                       "is not an .npz archive (numpy could not read it: it is neither an .npy nor an .npz file)"),
    "feed holds objects": (["@fp32.onnx", "@int8.onnx", "--input", "x=@objects.npy"], "it holds Python objects"),
    "feeds are a folder of no .npz": (["@fp32.onnx", "@int8.onnx", "--inputs", "@models"], "holds no .npz file"),
    "feeds are one array": (["@fp32.onnx", "@int8.onnx", "--inputs", "@x.npy"], "holds a single array, not an .npz"),
    "a feed is an archive": (["@fp32.onnx", "@int8.onnx", "--input", "x=@feeds.npz"], "is an .npz archive, not one .npy"),
    "a feed missing": (["@fp32.onnx", "@int8.onnx", "--input", "x=@nofile.npy"], "--input x: file not found"),
    "a feed no model takes": (["@fp32.onnx", "@int8.onnx", "--input", "z=@x.npy"], "'z' is not an input of either model"),
    "feeds under other names": (["@fp32.onnx", "@int8.onnx", "--inputs", "@wrong_keys.npz"],
                                "input 'image' is not an input of either model; the models take ['x']"),
    "feeds with an extra key": (["@fp32.onnx", "@int8.onnx", "--inputs", "@extra_key.npz"],
                                "input 'mask' is not an input of either model"),
    "a NaN pixel": (["@fp32.onnx", "@int8.onnx", "--inputs", "@nan.npz"], "input 'x' holds 1 NaN and 0 infinite values"),
    "infinite pixels": (["@fp32.onnx", "@int8.onnx", "--inputs", "@inf.npz"], "NaN and "),
    # datasets: a bad sample is named by its file or its index
    "a folder's third sample in float64": (
        ["@fp32.onnx", "@int8.onnx", "--inputs", "@dataset"],
        "--inputs @dataset/2.npz (sample 2): input 'x' of the float model expects float32[1,3,16,16], got float64"),
    "a loader's third sample of another shape": (
        ["@fp32.onnx", "@int8.onnx", "--data-loader-script", "@loader_bad_shape.py"],
        "sample 2 of --data-loader-script @loader_bad_shape.py:load_data: input 'x' of the float model expects"),
    "a third sample spread to workers": (
        ["@fp32.onnx", "@int8.onnx", "--inputs", "@dataset", "--workers", "2"], "--inputs @dataset/2.npz (sample 2)"),
    "a loader that raises": (["@fp32.onnx", "@int8.onnx", "--data-loader-script", "@loader_raises.py"],
                             "--data-loader-script @loader_raises.py:load_data: calling it raised "
                             "FileNotFoundError: calibration/ is gone"),
    "a loader whose import fails": (
        ["@fp32.onnx", "@int8.onnx", "--data-loader-script", "@loader_import_fails.py"],
        "--data-loader-script @loader_import_fails.py: running it raised ModuleNotFoundError"),
    "a loader without the function": (["@fp32.onnx", "@int8.onnx", "--data-loader-script", "@loader_raises.py:load"],
                                      "has no function 'load'"),
    "a loader script missing": (["@fp32.onnx", "@int8.onnx", "--data-loader-script", "@nope.py"],
                                "--data-loader-script: file not found"),
    "a loader that is not Python": (["@fp32.onnx", "@int8.onnx", "--data-loader-script", "@notes.txt"],
                                    "is not a Python (.py) file"),
    "batched arrays of other lengths": (["@fp32.onnx", "@int8.onnx", "--inputs", "@ragged_batch.npz", "--batched"],
                                        "leading (sample) axes differ: x 3, y 2"),
    "a batched scalar": (["@fp32.onnx", "@int8.onnx", "--inputs", "@scalar_batch.npz", "--batched"],
                         "is a scalar, with no sample axis"),
    "a batched folder": (["@fp32.onnx", "@int8.onnx", "--inputs", "@dataset", "--batched"],
                         "--batched applies to one .npz file"),
    # options
    "threshold above 1": (["@fp32.onnx", "@int8.onnx", "--threshold", "1.5"], "threshold must be in (0, 1], got 1.5"),
    "negative workers": (["@fp32.onnx", "@int8.onnx", "--workers", "-1"], "--workers must be 0 or more"),
    "unknown provider": (["@fp32.onnx", "@int8.onnx", "--providers", "NoSuchProvider"],
                         "execution provider 'NoSuchProvider' is not available"),
}


@pytest.mark.parametrize("case", CASES)
def test_cli_refuses_in_one_line_and_changes_no_file(user, capsys, monkeypatch, case):
    args, message = CASES[case]
    if {"--json", "--html", "--repaired-model", "--keep-float"} & set(args):  # refused before any work
        monkeypatch.setattr(layerbisect.command, "find_first_bad_layer", lambda *a, **k: pytest.fail("the run started"))
    before = digest(user)
    assert main([a.replace("@", f"{user}/") for a in args]) == 2
    err = capsys.readouterr().err
    assert message.replace("@", f"{user}/") in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert digest(user) == before


@pytest.mark.parametrize("args,message", [
    (["--inputs", "@feeds.npz", "--data-loader-script", "@loader_raises.py"], "give --inputs or --data-loader-script, not both"),
    (["--batched"], "--batched needs --inputs FILE.npz"),
    (["--max-samples", "2"], "--max-samples applies to a dataset"),
    (["--inputs", "@dataset", "--max-samples", "0"], "expected a number of samples, 1 or more, got '0'"),
])
def test_cli_dataset_flags_misused_are_bad_usage(user, capsys, args, message):
    before = digest(user)
    with pytest.raises(SystemExit) as exit_info:
        main([str(user / "fp32.onnx"), str(user / "int8.onnx"), *(a.replace("@", f"{user}/") for a in args)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1
    assert digest(user) == before


@pytest.mark.parametrize("value,message", [
    ("lots", "must be a size such as 2G"), ("inf", "positive, finite size"), ("0", "positive, finite size"),
])
def test_cli_memory_budget_is_bad_usage(user, capsys, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(user / "fp32.onnx"), str(user / "int8.onnx"), "--memory-budget", value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_quantized_model_against_itself_passes_at_cosine_1(user, capsys):
    before = digest(user)
    assert main([str(user / "qdq.onnx"), str(user / "qdq.onnx"), "--inputs", str(user / "feeds.npz")]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line[:4].strip().isdigit()]
    assert len(rows) > 5 and all(row[-3:] == ["1.0000", "inf", "1.0000"] for row in rows)
    assert digest(user) == before


def test_outputs_beside_inputs_are_written_whole_and_inputs_unchanged(user, tmp_path, capsys):
    before = digest(user)
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old")  # an earlier report is replaced, not refused
    args = [str(user / "fp32.onnx"), str(user / "int8.onnx"), "--inputs", str(user / "feeds.npz"),
            "--json", str(out / "report.json"), "--html", str(out / "report.html")]
    assert main(args) == 1
    assert '"passed": false' in (out / "report.json").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json"]  # no temporary left
    assert digest(user) == before


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")

    def crash(temporary: Path) -> None:
        temporary.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(LayerbisectError, match="cannot write .*report.json: No space left on device"):
        write(target, crash)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_api_writers_refuse_the_files_a_result_was_made_from(user, tmp_path):
    onnx.save(make_cnn(), tmp_path / "ext.onnx", save_as_external_data=True, location="ext.onnx.data",
              size_threshold=0)
    before = digest(user), digest(tmp_path)
    report = find_first_bad_layer(tmp_path / "ext.onnx", user / "int8.onnx", random_inputs(make_cnn()))
    assert str(tmp_path / "ext.onnx.data") in report.sources  # where its weights are
    for path in (user / "int8.onnx", user / "int8_hardlink.json", tmp_path / "ext.onnx", tmp_path / "ext.onnx.data"):
        with pytest.raises(LayerbisectError, match="would overwrite an input file"):
            report.save_html(path)
    fallback = keep_in_float(user / "fp32.onnx", user / "int8.onnx", random_inputs(make_cnn()))
    with pytest.raises(LayerbisectError, match="would overwrite an input file"):
        fallback.save_model(user / "int8_hardlink.json")
    assert (digest(user), digest(tmp_path)) == before


def test_writing_over_outputs_reads_each_model_graph_once_and_no_feeds_file(tmp_path, monkeypatch):
    float_model = make_cnn()
    onnx.save(quantize(float_model, "qdq"), tmp_path / "int8.onnx")
    onnx.save(float_model, tmp_path / "fp32.onnx", save_as_external_data=True, location="fp32.data",
              size_threshold=0)  # (float_model now refers to that file)
    np.savez(tmp_path / "feeds.npz", **random_inputs(float_model))
    (tmp_path / "overlays").mkdir()
    args = [str(tmp_path / name) for name in ("fp32.onnx", "int8.onnx")] + [
        "--inputs", str(tmp_path / "feeds.npz"), "--json", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html"),
        "--model-explorer", str(tmp_path / "overlays"), "--quiet"]
    assert main(args) == 0  # the outputs are there now: the run after writes over 11 files
    parsed = []
    original = layerbisect.files.graph_only
    monkeypatch.setattr(layerbisect.files, "graph_only", lambda path: parsed.append(Path(path).name) or original(path))
    before = digest(tmp_path)
    assert main(args) == 0
    assert sorted(parsed) == ["fp32.onnx", "int8.onnx"]  # once each (no feeds, no data file), for 11 files
    changed = {name for name, sha in digest(tmp_path).items() if before[name] != sha}
    assert {"fp32.onnx", "fp32.data", "int8.onnx", "feeds.npz"}.isdisjoint(changed)
    for output in ("r.json", "fp32.data"):  # and the protection holds
        with pytest.raises(LayerbisectError, match="would overwrite an input file"):
            layerbisect.files.check_outputs({"--json": tmp_path / output}, [tmp_path / "feeds.npz"],
                                            models=[tmp_path / "fp32.onnx", tmp_path / "r.json"])


@pytest.mark.parametrize("budget,expected", [
    ("2G", "scan"), ("500M", "scan"), (1 << 30, "scan"), ("64KiB", "prefix"), (" 64 kb ", "prefix"),
    (float("nan"), "positive, finite size"), ("lots", "must be a size such as 2G"), (True, "number of bytes"),
    (0, "positive, finite size"), (-5, "positive, finite size"),
])
def test_api_memory_budget_takes_what_the_cli_takes(budget, expected):
    float_model = make_cnn()
    if expected not in ("scan", "prefix"):
        with pytest.raises(LayerbisectError, match=expected):
            find_first_bad_layer(float_model, float_model, memory_budget=budget)
        return
    report = find_first_bad_layer(float_model, quantize(float_model, "qdq"), memory_budget=budget)
    assert report.first_bad is None and report.strategy == expected


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_api_refuses_nonfinite_inputs(bad):
    float_model = make_cnn()
    feeds = random_inputs(float_model)
    feeds["x"][0, 1, 2, 3] = bad
    with pytest.raises(LayerbisectError, match=r"input 'x' holds \d NaN and \d infinite values \(of 768\)"):
        find_first_bad_layer(float_model, quantize(float_model, "qdq"), [random_inputs(float_model), feeds])


def test_nan_the_float_model_makes_itself_is_a_finding_not_the_first_bad_layer():
    model = log_model()
    x = {"x": np.linspace(0.0, 3.0, 8, dtype=np.float32).reshape(1, 8)}  # Log of x - 1 < 0: NaN
    report = find_first_bad_layer(model, model, x)
    by_node = {layer.float_nodes[-1]: layer for layer in report.layers}
    assert report.first_bad is None
    assert by_node["shift"].float_nonfinite == 0
    assert by_node["log"].float_nonfinite == 3 and by_node["after"].float_nonfinite == 3  # x < 1 at 3 of 8
    assert by_node["log"].cosine == pytest.approx(1.0)  # where both are finite
    note = next(n for n in report.notes if n.startswith("float model produced NaN/Inf"))
    assert "3 values at #1 Log 'log'" in note and "1 later layer carry them" in note


def test_api_options_refused_in_one_place():
    model = make_cnn()
    with pytest.raises(LayerbisectError, match="strategy must be one of auto, scan, prefix, bisect"):
        find_first_bad_layer(model, model, strategy="fast")
    with pytest.raises(LayerbisectError, match=r"threshold must be in \(0, 1\]"):
        find_first_bad_layer(model, model, threshold=math.nan)


@pytest.mark.parametrize("kind", ["qdq", "qoperator", "dynamic"])
def test_models_given_the_wrong_way_round_are_refused_unless_allowed(user, capsys, kind):
    float_model = make_cnn()
    quant = quantize(float_model, kind)
    with pytest.raises(LayerbisectError, match=r"the float model holds quantization \(\d+ \w+.*the two look swapped"):
        find_first_bad_layer(quant, float_model)
    assert find_first_bad_layer(quant, float_model, allow_swapped=True).layers
    assert find_first_bad_layer(quant, quant).first_bad is None  # both quantized: not swapped
    with pytest.raises(LayerbisectError, match=r"holds quantization \(4 of its 4 weights in 16 bits\)"):
        find_first_bad_layer(to_float16(float_model), float_model)
    before = digest(user)
    assert main([str(user / "int8.onnx"), str(user / "fp32.onnx")]) == 2
    assert "look swapped" in capsys.readouterr().err
    assert main([str(user / "int8.onnx"), str(user / "fp32.onnx"), "--allow-swapped", "--quiet"]) in (0, 1)
    assert digest(user) == before
