"""Benchmark: peak memory of layerbisect on models whose weights are in external data files.

Builds, in a temporary folder removed afterwards (also on errors), a float model of MatMul+Relu
layers of width 2048 whose float32 weights (seeded) fill about ``--gb`` GiB of an external data
file, and its QDQ int8 version (int8 activations, per-channel int8 weights, in its own external
file) with the int8 weights of the layer two thirds deep negated. Then measures, each in a fresh
Python process (peak RSS is the child's VmHWM from /proc/self/status):

- floor:        onnxruntime sessions of both files, one run each;
- load:         ``layerbisect.load.load_model`` of both files, nothing else;
- layerbisect:  ``find_first_bad_layer(float_path, quant_path, inputs=...)``.

    python benchmarks/bench_external.py            # about 1 GiB of float weights
    python benchmarks/bench_external.py --gb 2.5   # over 2 GiB: more than one protobuf can hold

The table gives peak RSS against the size W of both models' weights on disk and against the
floor. Nothing here asserts on time or memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_scan  # noqa: E402  (peak RSS readings, bytecode)

WIDTH = 2048
BATCH = 8
MARK = bench_scan.MARK
MODES = (
    ("floor", "floor: ORT sessions of both files, one run each"),
    ("load", "load_model of both files"),
    ("layerbisect", "find_first_bad_layer"),
)


class DataFile:
    """An external data file written a tensor at a time; small tensors stay in the model."""

    def __init__(self, folder: str, name: str) -> None:
        self.name = name
        self.file = open(os.path.join(folder, name), "wb")

    def tensor(self, name: str, array):
        """The TensorProto of ``array``, its data appended to the file (page-aligned)."""
        import onnx
        from onnx import numpy_helper

        if array.nbytes < 1024:
            return numpy_helper.from_array(array, name)
        offset = -(-self.file.tell() // 4096) * 4096
        self.file.seek(offset)
        array.tofile(self.file)
        tensor = onnx.TensorProto(
            name=name, dims=array.shape, data_location=onnx.TensorProto.EXTERNAL,
            data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
        )
        for key, value in (("location", self.name), ("offset", offset), ("length", array.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        return tensor


def qdq_layer(i: int, current: str, w, activation, data: DataFile, broken: bool) -> tuple[list, list]:
    """The nodes and initializers of layer ``i`` of an int8 QDQ MatMul+Relu model reading
    ``current``: activation quantized with the range of ``activation`` (its float input),
    ``w`` per output channel, the int8 weights negated when ``broken``."""
    import numpy as np
    from onnx import helper

    w_scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)  # per output channel
    w_int8 = np.clip(np.rint(w / w_scale), -127, 127).astype(np.int8)
    if broken:
        w_int8 = -w_int8
    a_scale = np.array(np.abs(activation).max() / 127, np.float32)
    inits = [
        data.tensor(f"w{i}_q", w_int8), data.tensor(f"w{i}_scale", w_scale),
        data.tensor(f"w{i}_zp", np.zeros(w.shape[1], np.int8)),
        data.tensor(f"a{i}_scale", a_scale), data.tensor(f"a{i}_zp", np.array(0, np.int8)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", [current, f"a{i}_scale", f"a{i}_zp"], [f"q{i}"], name=f"q{i}"),
        helper.make_node("DequantizeLinear", [f"q{i}", f"a{i}_scale", f"a{i}_zp"], [f"dq{i}"], name=f"dq{i}"),
        helper.make_node("DequantizeLinear", [f"w{i}_q", f"w{i}_scale", f"w{i}_zp"], [f"w{i}_dq"],
                         name=f"dqw{i}", axis=1),
        helper.make_node("MatMul", [f"dq{i}", f"w{i}_dq"], [f"mm{i}"], name=f"mm{i}"),
        helper.make_node("Relu", [f"mm{i}"], [f"relu{i}"], name=f"relu{i}"),
    ]
    return nodes, inits


def save_models(folder: str, models: dict, width: int, batch: int, output: str) -> tuple[dict, str]:
    """Write each of ``models`` (name -> (nodes, initializers)) as ``<name>.onnx`` in ``folder``
    (input "x" [batch, width], output ``output``) and a seeded ``feeds.npz``; return the paths."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    paths = {}
    for name, (nodes, inits) in models.items():
        graph = helper.make_graph(
            nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, width])], inits,
        )
        paths[name] = os.path.join(folder, f"{name}.onnx")
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), paths[name])
    feeds = os.path.join(folder, "feeds.npz")
    np.savez(feeds, x=np.random.default_rng(1).standard_normal((batch, width)).astype(np.float32))
    return paths, feeds


def build(folder: str, layers: int, fault: int) -> dict:
    """Write float.onnx and quant.onnx (with float.data and quant.data) into ``folder``."""
    import numpy as np
    from onnx import helper

    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, WIDTH)).astype(np.float32)
    float_data, quant_data = DataFile(folder, "float.data"), DataFile(folder, "quant.data")
    float_nodes, float_inits, quant_nodes, quant_inits = [], [], [], []
    activation, current = x, "x"
    for i in range(layers):
        w = (rng.standard_normal((WIDTH, WIDTH), dtype=np.float32) * np.sqrt(2.0 / WIDTH)).astype(np.float32)
        float_inits.append(float_data.tensor(f"w{i}", w))
        float_nodes += [
            helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"], name=f"mm{i}"),
            helper.make_node("Relu", [f"mm{i}"], [f"relu{i}"], name=f"relu{i}"),
        ]
        nodes, inits = qdq_layer(i, current, w, activation, quant_data, broken=i == fault)
        quant_nodes += nodes
        quant_inits += inits
        activation, current = np.maximum(activation @ w, 0), f"relu{i}"
    float_data.file.close()
    quant_data.file.close()
    paths, feeds = save_models(folder, {"float": (float_nodes, float_inits), "quant": (quant_nodes, quant_inits)},
                               WIDTH, BATCH, current)
    weights = sum(os.path.getsize(os.path.join(folder, f)) for f in ("float.data", "quant.data"))
    return {"float_path": paths["float"], "quant_path": paths["quant"], "feeds": feeds,
            "planted": f"mm{fault}", "weights_mb": weights / 2**20,
            "float_mb": os.path.getsize(os.path.join(folder, "float.data")) / 2**20}


def child(mode: str, info: dict) -> dict:
    """One measurement, in this (fresh) process."""
    import numpy as np

    feeds = dict(np.load(info["feeds"]))
    result: dict = {}
    start = time.perf_counter()
    if mode == "floor":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        sessions = [ort.InferenceSession(info[p], options, providers=["CPUExecutionProvider"])
                    for p in ("float_path", "quant_path")]
        for session in sessions:
            session.run(None, feeds)
    elif mode == "load":
        from layerbisect.load import load_model

        models = [load_model(info[p]) for p in ("float_path", "quant_path")]
        result["loaded_mb"] = sum(m.ByteSize() for m in models) / 2**20
    elif mode == "layerbisect":
        from layerbisect import find_first_bad_layer

        report = find_first_bad_layer(info["float_path"], info["quant_path"], inputs=feeds)
        bad = report.first_bad
        result.update(
            first_bad=None if bad is None else list(bad.float_nodes),
            found=bad is not None and info["planted"] in bad.float_nodes,
            strategy=report.strategy, layers=len(report.layers), executions=report.executions,
        )
    result.update(wall_s=time.perf_counter() - start, peak_rss_mb=bench_scan._vm("VmHWM"))
    return result


def measure(mode: str, info: dict) -> dict:
    """Run one measurement in a fresh interpreter and return what it reports."""
    return bench_scan.run_child(__file__, mode, info, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0,
                        help="GiB of float32 weights (default 1; 2.5 exceeds one protobuf's 2 GiB)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--info", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(MARK + json.dumps(child(args.child, json.loads(args.info))), flush=True)
        return
    bench_scan.compile_layerbisect()
    layers = max(3, round(args.gb * 2**30 / (WIDTH * WIDTH * 4)))
    import numpy
    import onnx
    import onnxruntime

    import layerbisect

    with tempfile.TemporaryDirectory(prefix="bench_external_") as folder:
        start = time.perf_counter()
        info = build(folder, layers, fault=2 * layers // 3)
        print(f"{layers} MatMul+Relu layers of {WIDTH}x{WIDTH}, batch {BATCH}: float weights "
              f"{info['float_mb']:.0f} MiB, both models' weights W = {info['weights_mb']:.0f} MiB; "
              f"built in {time.perf_counter() - start:.1f} s; fault planted in {info['planted']}")
        print(f"{time.strftime('%Y-%m-%d')}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
              f"onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, numpy {numpy.__version__}, "
              f"layerbisect from {os.path.dirname(layerbisect.__file__)}")
        results = {mode: measure(mode, info) for mode, _ in MODES}
    floor, weights = results["floor"]["peak_rss_mb"], info["weights_mb"]
    print(f"\n| {'measurement':<48} | wall s | peak RSS MiB | x W  | x floor |")
    print(f"|{'-' * 50}|-------:|-------------:|-----:|--------:|")
    for mode, label in MODES:
        r = results[mode]
        print(f"| {label:<48} | {r['wall_s']:6.1f} | {r['peak_rss_mb']:12.0f} | "
              f"{r['peak_rss_mb'] / weights:4.2f} | {r['peak_rss_mb'] / floor:7.2f} |")
    found = results["layerbisect"]
    print(f"\nlayerbisect: first bad {found['first_bad']} ({'the planted layer' if found['found'] else 'NOT the planted layer'}), "
          f"{found['strategy']}, {found['layers']} layers measured, {found['executions']} model runs")


if __name__ == "__main__":
    main()
