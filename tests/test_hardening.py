"""Issue 6: bad input gets a clear error from the API and the CLI; the user's files are never
written; temporary files never outlive a run, even on errors and Ctrl-C; same seed, same report."""

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import layerbisect.run
from layerbisect import LayerbisectError, find_first_bad_layer
from layerbisect.cli import main

from models import make_cnn, quantize, save_user_files


def scaled(factor: float, shape: list[int]) -> onnx.ModelProto:
    """y = Relu(x * factor) on x float32[shape]."""
    nodes = [helper.make_node("Mul", ["x", "k"], ["m"], name="scale"), helper.make_node("Relu", ["m"], ["y"], name="relu")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.array(factor, np.float32), "k")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_zero_dimensional_tensors_are_compared():
    report = find_first_bad_layer(scaled(2.0, []), scaled(-2.0, []), {"x": np.array(1.5, np.float32)})
    assert report.first_bad.float_nodes == ("scale",) and report.layers[0].shape == ()
    with pytest.raises(LayerbisectError, match=r"input 'x' of the float model expects float32\[\], got float32\[1\]"):
        find_first_bad_layer(scaled(2.0, []), scaled(2.0, []), {"x": np.ones(1, np.float32)})


@pytest.mark.parametrize("inputs", [{"x": np.ones((0, 3), np.float32)}, None])
def test_empty_inputs_are_an_error(inputs):
    with pytest.raises(LayerbisectError, match=r"every input is empty \(input 'x' has shape \[0, 3\]\)"):
        find_first_bad_layer(scaled(2.0, [0, 3]), scaled(2.0, [0, 3]), inputs)


def digest(folder: Path) -> dict[str, tuple[str, int]]:
    """Content hash and modification time of every file in ``folder``."""
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.iterdir())
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    save_user_files(folder)
    return folder


def cli(files: Path, *args: str) -> list[str]:
    return [str(files / a) if (files / a).exists() else a for a in args]


def test_user_files_are_never_written(files, tmp_path, capsys):
    before = digest(files)
    out = tmp_path / "out"
    out.mkdir()
    for extra in ([], ["--ort-optimized"], ["--strategy", "bisect", "--no-isolated"]):
        status = main(cli(files, "fp32.onnx", "int8.onnx", "--inputs", "feeds.npz", *extra,
                          "--json", str(out / "report.json")))
        assert status == 1
    assert main(cli(files, "fp32.onnx", "int8.onnx", "--inputs", "wrong_keys.npz")) == 2
    assert digest(files) == before
    assert [p.name for p in out.iterdir()] == ["report.json"]


def test_same_seed_same_json_report(files, tmp_path, capsys):
    texts = []
    for run in range(2):
        path = tmp_path / f"report{run}.json"
        args = ["fp32.onnx", "int8.onnx", "--seed", "7", "--memory-budget", "1G", "--json", str(path)]
        assert main(cli(files, *args)) == 1
        texts.append(path.read_text())
    assert texts[0] == texts[1]


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """A temporary-files folder of our own, to see what is left in it."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_temporary_files_are_removed_on_ctrl_c_and_errors(private_tmp, monkeypatch, failure):
    """onnxruntime's optimized model is the only temporary file: it goes, whatever happens."""
    def interrupted(model, options, providers):
        Path(options.optimized_model_filepath).write_bytes(b"partial")
        raise failure("stopped")

    monkeypatch.setattr(layerbisect.run, "_create", interrupted)
    expected = KeyboardInterrupt if failure is KeyboardInterrupt else LayerbisectError
    with pytest.raises(expected):
        find_first_bad_layer(make_cnn(), make_cnn(), ort_optimized=True)
    assert list(private_tmp.iterdir()) == []


def test_temporary_files_are_removed_after_a_run(private_tmp):
    report = find_first_bad_layer(make_cnn(), quantize(make_cnn(), "qdq"), ort_optimized=True)
    assert report.first_bad is None
    assert list(private_tmp.iterdir()) == []
