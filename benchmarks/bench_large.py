"""Benchmark: a model of several GB of external data, against the floor of running it.

Builds, in a temporary folder removed afterwards (also on errors), a float model of
``--layers`` MatMul+Relu layers of ``--width`` x ``--width`` float32 weights (seeded; the
defaults, five of 11000x11000, make 2.4 GB) in an external data file, and a copy in a file of
its own whose middle layer has half its columns negated (``--kind copy``) or an int8 QDQ
version with that layer's int8 weights negated (``--kind int8``). Or (``--kind llama``) a tiny
Llama-architecture decoder with a KV cache, float, against its int4 version by onnxruntime's
MatMulNBitsQuantizer (blocks of 32, asymmetric) with the packed blocks of the middle layer's
up_proj shuffled: the model ``export_tiny_llama.py`` exports from a ``transformers`` LlamaConfig
(``--llama-onnx FILE``; it needs torch and transformers, in an environment of their own), else
``tests/models.py``'s ``make_llama`` built with onnx.helper (``--width`` its hidden size,
``--layers`` its layers). Its inputs are generated as layerbisect generates them (a step of 8
tokens after 8 past positions), saved, and given to both measurements. Then measures, each in a
fresh Python process (peak RSS is the child's VmHWM from /proc/self/status), medians of
``--repeat`` runs (the decoder's at threshold ``LLAMA_THRESHOLD``, 0.9):

- floor:        onnxruntime, default settings: a session of each model created, run once on
                the sample and released, one model after the other;
- layerbisect:  ``find_first_bad_layer(float_path, other_path, inputs=...)``, the default run.

    python benchmarks/bench_large.py                      # 2 x 2.4 GB, about a minute
    python benchmarks/bench_large.py --width 8192 --repeat 1
    python benchmarks/bench_large.py --kind llama --llama-onnx /tmp/tiny_llama.onnx

Prints wall time and peak RSS of each and their ratios to the floor, and whether the planted
layer was named. The disk needs room for both models. Nothing here asserts on time or memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_scan  # noqa: E402  (peak RSS readings, child processes, bytecode)
from bench_external import DataFile, qdq_layer, save_models  # noqa: E402  (external data, QDQ layers, files)

BATCH = 1
MODES = ("floor", "layerbisect")
# the decoder's threshold: int4 blocks of random weights (std 0.02, as transformers initializes
# them) bring the clean int4 logits to a cosine near 0.96 and the last MLPs' values near 0.95,
# below the default 0.98 (error accumulated) before the planted layer is reached
LLAMA_THRESHOLD = 0.9


def build(folder: str, width: int, layers: int, kind: str) -> dict:
    """Write float.onnx and other.onnx (with float.data and other.data) into ``folder``."""
    import numpy as np
    from onnx import helper

    rng = np.random.default_rng(0)
    fault = layers // 2
    float_data, other_data = DataFile(folder, "float.data"), DataFile(folder, "other.data")
    float_nodes, float_inits, other_nodes, other_inits = [], [], [], []
    x = rng.standard_normal((BATCH, width)).astype(np.float32)
    activation, current = x, "x"
    for i in range(layers):
        w = rng.standard_normal((width, width), dtype=np.float32)
        w *= np.float32(np.sqrt(2.0 / width))
        float_inits.append(float_data.tensor(f"w{i}", w))
        float_nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"], name=f"mm{i}"),
                        helper.make_node("Relu", [f"mm{i}"], [f"relu{i}"], name=f"relu{i}")]
        if kind == "copy":
            if i == fault:
                w[:, : width // 2] *= -1
            other_inits.append(other_data.tensor(f"w{i}", w))
            other_nodes += float_nodes[-2:]
        else:
            nodes, inits = qdq_layer(i, current, w, activation, other_data, broken=i == fault)
            other_nodes += nodes
            other_inits += inits
            activation = np.maximum(activation @ w, 0)
        current = f"relu{i}"
        del w
    float_data.file.close()
    other_data.file.close()
    paths, feeds = save_models(folder, {"float": (float_nodes, float_inits), "other": (other_nodes, other_inits)},
                               width, BATCH, current)
    sizes = {name: os.path.getsize(os.path.join(folder, f"{name}.data")) / 2**20 for name in ("float", "other")}
    return {"float_path": paths["float"], "other_path": paths["other"], "feeds": feeds,
            "planted": f"mm{fault}", "sizes_mb": sizes}


def build_llama(folder: str, exported: str | None, hidden: int, layers: int) -> dict:
    """Write float.onnx (the exported decoder, or ``make_llama``), other.onnx (its int4 version
    with the planted fault) and feeds.npz (the inputs layerbisect generates) into ``folder``."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from layerbisect.decoder import vocabularies
    from layerbisect.inputs import plan_inputs
    from layerbisect.load import declared_inputs

    if exported:
        model = onnx.load(exported)
    else:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from models import make_llama

        model = make_llama(vocab=32000, hidden=hidden, heads=8, kv_heads=4, layers=layers)
    paths = {"float": os.path.join(folder, "float.onnx"), "other": os.path.join(folder, "other.onnx")}
    onnx.save(model, paths["float"])
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the quantizer changes the model it is given
    quantizer = MatMulNBitsQuantizer(copy, algo_config=DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False))
    quantizer.process()
    quant = quantizer.model.model
    depth = sum(n.op_type == "MatMulNBits" and "up_proj" in n.name for n in quant.graph.node) // 2
    node = next(n for n in quant.graph.node if n.op_type == "MatMulNBits" and f"layers.{depth}" in n.name
                and "up_proj" in n.name)
    init = next(i for i in quant.graph.initializer if i.name == node.input[1])
    blocks = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(np.random.default_rng(0).permutation(blocks.reshape(-1)).reshape(blocks.shape),
                                          init.name))
    onnx.save(quant, paths["other"])
    specs = declared_inputs(model)
    plan = plan_inputs(specs, specs, vocabulary=vocabularies(model))
    feeds = os.path.join(folder, "feeds.npz")
    np.savez(feeds, **plan.feeds(None, seed=0)[0])
    planted = next(n.name for n in model.graph.node if n.output[0] == node.output[0])
    sizes = {name: os.path.getsize(path) / 2**20 for name, path in paths.items()}
    return {"float_path": paths["float"], "other_path": paths["other"], "feeds": feeds, "planted": planted,
            "sizes_mb": sizes, "nodes": len(model.graph.node), "notes": list(plan.generated_notes),
            "threshold": LLAMA_THRESHOLD}


def child(mode: str, info: dict) -> dict:
    """One measurement, in this (fresh) process."""
    import numpy as np

    feeds = dict(np.load(info["feeds"]))
    result: dict = {}
    start = time.perf_counter()
    if mode == "floor":
        import onnxruntime as ort

        for path in (info["float_path"], info["other_path"]):
            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            session.run(None, feeds)
            del session
    else:
        from layerbisect import find_first_bad_layer

        # a decoder's inputs are generated here, as feeds.npz holds them (the same seed)
        report = find_first_bad_layer(info["float_path"], info["other_path"], quiet=True,
                                      inputs=None if info.get("notes") else feeds, threshold=info.get("threshold", 0.98))
        bad = report.culprit or report.first_bad
        result.update(first_bad=None if bad is None else list(bad.float_nodes),
                      found=bad is not None and info["planted"] in bad.float_nodes,
                      cause=report.first_bad_cause, strategy=report.strategy, executions=report.executions)
    result.update(wall_s=time.perf_counter() - start, peak_rss_mb=bench_scan._vm("VmHWM"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=11000, help="rows and columns of each weight (default 11000)")
    parser.add_argument("--layers", type=int, default=5, help="MatMul+Relu layers (default 5)")
    parser.add_argument("--kind", choices=("copy", "int8", "llama"), default="copy",
                        help="copy: a float copy with one layer corrupted; int8: a QDQ int8 version; "
                             "llama: a tiny Llama decoder against its int4 version")
    parser.add_argument("--llama-onnx", metavar="FILE",
                        help="with --kind llama: the decoder export_tiny_llama.py exported (default: "
                             "make_llama of tests/models.py, hidden --width, --layers layers)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement (medians)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--info", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(bench_scan.MARK + json.dumps(child(args.child, json.loads(args.info))), flush=True)
        return
    bench_scan.compile_layerbisect()
    import numpy
    import onnxruntime

    import layerbisect

    with tempfile.TemporaryDirectory(prefix="bench_large_") as folder:
        start = time.perf_counter()
        if args.kind == "llama":
            hidden = args.width if args.width != parser.get_default("width") else 256
            info = build_llama(folder, args.llama_onnx, hidden, args.layers)
            sizes = info["sizes_mb"]
            print(f"Llama decoder ({args.llama_onnx or f'make_llama, hidden {hidden}, {args.layers} layers'}, "
                  f"{info['nodes']} nodes): float {sizes['float']:.0f} MiB, int4 {sizes['other']:.0f} MiB; built in "
                  f"{time.perf_counter() - start:.1f} s; fault planted in {info['planted']}; {info['notes'][0]}")
        else:
            info = build(folder, args.width, args.layers, args.kind)
            sizes = info["sizes_mb"]
            print(f"{args.layers} MatMul+Relu layers of {args.width}x{args.width}, batch {BATCH}, {args.kind}: "
                  f"float model {sizes['float']:.0f} MiB, other {sizes['other']:.0f} MiB of external data; "
                  f"built in {time.perf_counter() - start:.1f} s; fault planted in {info['planted']}")
        print(f"{time.strftime('%Y-%m-%d')}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
              f"onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}, "
              f"layerbisect from {os.path.dirname(layerbisect.__file__)}; medians of {args.repeat}")
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(args.repeat):  # interleaved, so that a load on the machine hits both alike
            for mode in MODES:
                runs[mode].append(bench_scan.run_child(__file__, mode, info, None))
    median = {mode: {key: statistics.median(r[key] for r in results) for key in ("wall_s", "peak_rss_mb")}
              for mode, results in runs.items()}
    floor = median["floor"]
    print(f"\n| {'measurement':<40} | wall s | peak RSS MiB | time x floor | RSS x floor |")
    print(f"|{'-' * 42}|-------:|-------------:|-------------:|------------:|")
    labels = {"floor": "floor: ORT, one model after the other", "layerbisect": "find_first_bad_layer (default)"}
    for mode in MODES:
        m = median[mode]
        print(f"| {labels[mode]:<40} | {m['wall_s']:6.2f} | {m['peak_rss_mb']:12.0f} | "
              f"{m['wall_s'] / floor['wall_s']:12.2f} | {m['peak_rss_mb'] / floor['peak_rss_mb']:11.2f} |")
    found = runs["layerbisect"][-1]
    print(f"\nlayerbisect: culprit (else first bad) {found['first_bad']} "
          f"({'the planted layer' if found['found'] else 'NOT the planted layer'}), {found['cause']}, "
          f"{found['strategy']}, {found['executions']} model runs")


if __name__ == "__main__":
    main()
