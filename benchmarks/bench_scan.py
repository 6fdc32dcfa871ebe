"""Benchmark: cost of one layerbisect scan against a plain onnxruntime run of both models.

Builds a residual CNN in code (seeded), quantizes it to QDQ int8 with onnxruntime's static
quantizer, flips the sign of the int8 weights of one Conv about two thirds deep, then measures,
each in a fresh Python process (so peak memory is per measurement):

- floor:        one plain onnxruntime run of the float model and of the quantized model
                (both sessions created from the files and kept alive, normal outputs only);
- layerbisect:  ``find_first_bad_layer(float_path, quant_path, inputs=feeds)``;
- ort-debug:    onnxruntime's own quantization debugger on the same pair
                (``onnxruntime.quantization.qdq_loss_debug``: augment both models, collect
                activations, match them, compute SQNR).

    python benchmarks/bench_scan.py --size medium

Wall time counts everything the measured tool does after Python and numpy are up and the input
sample is loaded: importing the tool, loading the models, creating sessions, running, comparing.
Peak RSS is the child's VmHWM (/proc/self/status). Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# name: (channels, height/width, residual blocks). Convs = 2 * blocks + 1.
SIZES = {
    "small": (16, 28, 4),
    "medium": (32, 56, 16),
    "large": (64, 80, 52),
}
CALIBRATION_SAMPLES = 4
MARK = "@@BENCH@@"


# --------------------------------------------------------------------------- model building


def build_float_model(channels: int, size: int, blocks: int, seed: int = 0):
    """x[1,C,S,S] -> stem conv0/bn0/relu0 -> ``blocks`` residual blocks -> pool -> fc -> y[1,10].

    Block i: conv{i}a/bn{i}a/relu{i}a -> conv{i}b/bn{i}b -> add{i} (+ block input) -> relu{i}.
    Every node's output tensor carries the node's name, except fc -> "y".
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes: list = []
    weights: list = []

    def init(name: str, array) -> str:
        weights.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def node(op: str, name: str, inputs: list[str], **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv_bn(name: str, bn: str, x: str, gain: tuple[float, float]) -> str:
        c = channels
        w = init(f"{name}.w", rng.standard_normal((c, c, 3, 3)) * np.sqrt(2.0 / (c * 9)))
        b = init(f"{name}.b", rng.standard_normal(c) * 0.05)
        h = node("Conv", name, [x, w, b], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
        stats = [
            init(f"{bn}.scale", rng.uniform(*gain, c)),
            init(f"{bn}.bias", rng.standard_normal(c) * 0.05),
            init(f"{bn}.mean", rng.standard_normal(c) * 0.05),
            init(f"{bn}.var", rng.uniform(0.8, 1.2, c)),
        ]
        return node("BatchNormalization", bn, [h, *stats])

    x = node("Relu", "relu0", [conv_bn("conv0", "bn0", "x", (0.8, 1.2))])
    for i in range(1, blocks + 1):
        h = node("Relu", f"relu{i}a", [conv_bn(f"conv{i}a", f"bn{i}a", x, (0.8, 1.2))])
        h = conv_bn(f"conv{i}b", f"bn{i}b", h, (0.2, 0.4))  # small gain: bounded residual growth
        x = node("Relu", f"relu{i}", [node("Add", f"add{i}", [h, x])])
    pool = node("GlobalAveragePool", "pool", [x])
    flat = node("Flatten", "flatten", [pool])
    fc_w = init("fc.w", rng.standard_normal((10, channels)) / np.sqrt(channels))
    nodes.append(helper.make_node(
        "Gemm", [flat, fc_w, init("fc.b", rng.standard_normal(10) * 0.05)], ["y"], name="fc", transB=1,
    ))
    graph = helper.make_graph(
        nodes, f"resnet_{blocks}blocks",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def quantize_qdq(
    float_path: str, quant_path: str, shape: tuple[int, ...], seed: int = 1, samples: int = CALIBRATION_SAMPLES
) -> None:
    """QDQ int8 (activations and weights), MinMax on ``samples`` seeded random samples."""
    import logging

    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(seed)
    feeds = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(samples)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # "please run pre-processing" advice
    try:
        quantize_static(
            float_path, quant_path, Reader(), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        )
    finally:
        logging.disable(previous)


def plant_fault(quant_path: str, conv_name: str) -> str:
    """Flip the sign of the int8 weight that reaches ``conv_name`` through a DequantizeLinear.

    Returns the initializer's name. The file is rewritten in place.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(quant_path)
    producer = {out: n for n in model.graph.node for out in n.output}
    conv = next(n for n in model.graph.node if n.name == conv_name and n.op_type == "Conv")
    dq = producer[conv.input[1]]
    if dq.op_type != "DequantizeLinear":
        raise RuntimeError(f"{conv_name}'s weight does not come from a DequantizeLinear ({dq.op_type})")
    init = next(i for i in model.graph.initializer if i.name == dq.input[0])
    w = numpy_helper.to_array(init)
    if w.dtype != np.int8:
        raise RuntimeError(f"expected an int8 weight, got {w.dtype}")
    flipped = np.clip(-w.astype(np.int16), -128, 127).astype(np.int8)
    init.CopyFrom(numpy_helper.from_array(flipped, init.name))
    onnx.save(model, quant_path)
    return init.name


def prepare(workdir: str, channels: int, hw: int, blocks: int) -> dict:
    import numpy as np
    import onnx

    shape = (1, channels, hw, hw)
    model = build_float_model(channels, hw, blocks)
    float_path = os.path.join(workdir, "float.onnx")
    quant_path = os.path.join(workdir, "quant.onnx")
    onnx.save(model, float_path)
    t = time.perf_counter()
    quantize_qdq(float_path, quant_path, shape)
    quantize_s = time.perf_counter() - t
    planted = f"conv{max(1, round(2 * blocks / 3))}a"
    weight = plant_fault(quant_path, planted)
    feeds = {"x": np.random.default_rng(2).standard_normal(shape).astype(np.float32)}
    np.savez(os.path.join(workdir, "feeds.npz"), **feeds)
    quant = onnx.load(quant_path, load_external_data=False)
    return {
        "float_path": float_path, "quant_path": quant_path, "feeds": os.path.join(workdir, "feeds.npz"),
        "planted": planted, "weight": weight, "shape": shape, "blocks": blocks,
        "convs": sum(n.op_type == "Conv" for n in model.graph.node),
        "float_nodes": len(model.graph.node), "quant_nodes": len(quant.graph.node),
        "float_mb": os.path.getsize(float_path) / 2**20, "quant_mb": os.path.getsize(quant_path) / 2**20,
        "quantize_s": quantize_s,
    }


# --------------------------------------------------------------------------- measurements (children)


def compile_layerbisect() -> None:
    """Write layerbisect's bytecode, as pip does when it installs a package. An editable
    install run with PYTHONDONTWRITEBYTECODE=1 would otherwise compile every module again in
    each measured process: about 60 ms of its import on this machine, which no user pays."""
    import compileall
    import importlib.util

    compileall.compile_dir(os.path.dirname(importlib.util.find_spec("layerbisect").origin), quiet=1)


def _vm(field: str) -> float:
    """A /proc/self/status field in MB (VmHWM: peak RSS of this process image; VmRSS: now)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, info: dict) -> dict:
    import numpy as np

    feeds = dict(np.load(info["feeds"]))
    result: dict = {"baseline_rss_mb": _vm("VmRSS")}
    phases: dict[str, float] = {}
    t0 = time.perf_counter()

    if mode.startswith("floor"):
        import onnxruntime as ort

        phases["import"] = time.perf_counter() - t0
        options = ort.SessionOptions()
        options.log_severity_level = 3
        paths = {"floor": ["float_path", "quant_path"], "floor-float": ["float_path"],
                 "floor-quant": ["quant_path"]}[mode]
        t = time.perf_counter()
        sessions = [ort.InferenceSession(info[p], options, providers=["CPUExecutionProvider"]) for p in paths]
        phases["sessions"] = time.perf_counter() - t
        t = time.perf_counter()
        outputs = [s.run(None, feeds) for s in sessions]
        phases["run"] = time.perf_counter() - t
        result["outputs"] = [o[0].shape for o in outputs]

    elif mode == "layerbisect":
        import layerbisect.measure as lbmeasure
        import layerbisect.pipeline as lbpipeline
        from layerbisect import find_first_bad_layer

        phases["import"] = time.perf_counter() - t0
        rss_marks: dict[str, float] = {"import": _vm("VmRSS")}
        _instrument(lbpipeline, phases, rss_marks)
        _instrument(lbmeasure, phases, rss_marks)
        report = find_first_bad_layer(info["float_path"], info["quant_path"], inputs=feeds)
        bad = report.first_bad
        exposed = {}
        for layer in report.layers:  # float32 values each model returns at once
            exposed[("f", layer.float_tensor)] = exposed[("q", layer.quant_tensor)] = 4 * _prod(layer.shape)
        result.update(
            rss_marks=rss_marks,
            exposed_mb=sum(exposed.values()) / 2**20,
            aligned=len(report.layers),
            coverage=report.coverage,
            first_bad=None if bad is None else list(bad.float_nodes),
            first_bad_index=None if bad is None else bad.index,
            first_bad_cosine=None if bad is None else bad.cosine,
            found=bad is not None and info["planted"] in bad.float_nodes,
            failing=sum(not layer.passes(report.threshold) for layer in report.layers),
        )

    elif mode == "ort-debug":
        _, errors = ort_debugger_errors(info, feeds, phases, t0)
        result.update(aligned=len(errors), **_first_low_sqnr(info, errors))

    else:
        raise SystemExit(f"unknown mode {mode}")

    result["wall_s"] = time.perf_counter() - t0
    result["peak_rss_mb"] = _vm("VmHWM")
    result["phases"] = phases
    return result


def ort_debugger_errors(info: dict, feeds: dict, phases: dict[str, float], t0: float) -> tuple[dict, dict]:
    """onnxruntime's quantization debugger on the pair (augment, collect activations, match,
    SQNR), each step timed into ``phases``; its matched activations and errors by tensor name."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    phases["import"] = time.perf_counter() - t0

    class Reader:  # collect_activations only iterates over it
        def __iter__(self):
            return iter([feeds])

    with tempfile.TemporaryDirectory() as tmp:
        aug_float, aug_quant = os.path.join(tmp, "float_aug.onnx"), os.path.join(tmp, "quant_aug.onnx")
        t = time.perf_counter()
        modify_model_output_intermediate_tensors(info["float_path"], aug_float)
        modify_model_output_intermediate_tensors(info["quant_path"], aug_quant)
        phases["augment (load, infer shapes, save)"] = time.perf_counter() - t
        t = time.perf_counter()
        float_acts = collect_activations(aug_float, Reader())
        quant_acts = collect_activations(aug_quant, Reader())
        phases["collect (sessions + run)"] = time.perf_counter() - t
    t = time.perf_counter()
    matched = create_activation_matching(quant_acts, float_acts)
    # compute_activation_error indexes match["float"]; keep the pairs that have one.
    matched = {k: v for k, v in matched.items() if "float" in v}
    errors = compute_activation_error(matched)
    phases["match + SQNR"] = time.perf_counter() - t
    return matched, errors


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _instrument(module, phases: dict[str, float], rss_marks: dict[str, float]) -> None:
    """Wrap what ``module`` (layerbisect.pipeline, layerbisect.measure) calls with timers (a few
    hundred calls: negligible cost).

    ``rss_marks`` gets the highest resident size seen right after each phase.
    """
    import functools

    labels = {
        "load_model": "load (read + copy + name)",
        "build_graph": "graph build (incl. shape inference)",
        "align": "align",
        "expose": "expose (graphsurgeon)",
        "plan_inputs": "plan inputs",
        "compare": "compare (metrics)",
        "cut": "cut (isolated error)",
    }

    def timed(fn, label):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - t
                if label != "compare (metrics)":  # called per layer: keep it cheap
                    rss_marks[label] = max(rss_marks.get(label, 0.0), _vm("VmRSS"))
        return wrapper

    for name, label in labels.items():
        if hasattr(module, name):
            setattr(module, name, timed(getattr(module, name), label))
    session = getattr(module, "Session", None)
    if session is not None and not hasattr(session, "_timed"):
        session._timed = True
        session.__init__ = timed(session.__init__, "session creation")
        session.run = timed(session.run, "run")


def _first_low_sqnr(info: dict, errors: dict, limit_db: float = 14.0) -> dict:
    """The earliest activation (float model order) whose float-vs-QDQ SQNR is below ``limit_db``.

    14 dB is roughly cosine 0.98 for noise uncorrelated with the signal; the ORT debugger gives
    no verdict of its own, only SQNR per tensor name.
    """
    import onnx

    model = onnx.load(info["float_path"], load_external_data=False)
    order = {out: i for i, n in enumerate(model.graph.node) for out in n.output}
    ranked = sorted((order.get(name, 1 << 30), name) for name in errors)
    for _, name in ranked:
        sqnr = errors[name].get("xmodel_err")
        if sqnr is not None and sqnr < limit_db:
            return {"first_low": name, "first_low_sqnr": sqnr,
                    "found": name.startswith((info["planted"], "bn" + info["planted"][4:], "relu" + info["planted"][4:]))}
    return {"first_low": None, "first_low_sqnr": None, "found": False}


# --------------------------------------------------------------------------- parent


def measure(mode: str, info: dict, timeout: float) -> dict:
    """Run one measurement of this script in a fresh interpreter and return what it reports."""
    return run_child(__file__, mode, info, timeout)


def run_child(script: str, mode: str, info: dict, timeout: float | None = None) -> dict:
    """Run ``script --child mode`` in a fresh interpreter and return the result it prints."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(script), "--child", mode, "--info", json.dumps(info)],
        capture_output=True, text=True, timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"measurement {mode!r} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(MARK):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="medium",
                        help="small: 1x16x28x28, 9 Conv; medium: 1x32x56x56, 33 Conv; large: 1x64x80x80, 105 Conv")
    parser.add_argument("--blocks", type=int, help="override the number of residual blocks (2 Conv each)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="fresh processes per measurement; the table shows the median (default 3)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--info", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = child(args.child, json.loads(args.info))
        print(MARK + json.dumps(result), flush=True)
        return

    compile_layerbisect()
    start = time.perf_counter()
    channels, hw, blocks = SIZES[args.size]
    blocks = args.blocks or blocks
    rows = [
        ("floor", "floor: ORT plain run, float + quant"),
        ("floor-float", "  (float model only)"),
        ("floor-quant", "  (quant model only)"),
        ("layerbisect", "layerbisect find_first_bad_layer"),
        ("ort-debug", "ORT qdq_loss_debug"),
    ]
    runs: dict[str, list[dict]] = {mode: [] for mode, _ in rows}
    with tempfile.TemporaryDirectory(prefix="bench_scan_") as workdir:
        t = time.perf_counter()
        info = prepare(workdir, channels, hw, blocks)
        build_s = time.perf_counter() - t
        print(f"size {args.size}: input 1x{channels}x{hw}x{hw}, {blocks} residual blocks, {info['convs']} Conv; "
              f"float model {info['float_nodes']} nodes ({info['float_mb']:.1f} MB), "
              f"QDQ model {info['quant_nodes']} nodes ({info['quant_mb']:.1f} MB); "
              f"built + quantized in {build_s:.1f} s")
        print(f"planted fault: sign-flipped int8 weight {info['weight']!r} of {info['planted']!r}")
        print(f"{time.strftime('%Y-%m-%d')}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs,", _versions())
        print()
        for _ in range(max(1, args.repeat)):  # round-robin, so drift hits every row alike
            for mode, _label in rows:
                runs[mode].append(measure(mode, info, args.timeout))

    results = {mode: _median_run(r) for mode, r in runs.items()}
    floor = results["floor"]
    header = (f"{'measurement':<36} {'wall s':>7} {'(range)':>13} {'import s':>8} {'peak RSS MB':>11} "
              f"{'x wall':>7} {'x RSS':>6}")
    print(header)
    print("-" * len(header))
    for mode, label in rows:
        r = results[mode]
        walls = [x["wall_s"] for x in runs[mode]]
        spread = f"{min(walls):.2f}-{max(walls):.2f}"
        print(f"{label:<36} {r['wall_s']:>7.2f} {spread:>13} {r['phases']['import']:>8.2f} {r['peak_rss_mb']:>11.0f} "
              f"{r['wall_s'] / floor['wall_s']:>7.2f} {r['peak_rss_mb'] / floor['peak_rss_mb']:>6.2f}")
    print(f"median of {len(runs['floor'])} fresh processes per row; ratios vs the floor row; wall includes "
          f"the tool's import; python + numpy + the input sample alone: {floor['baseline_rss_mb']:.0f} MB RSS")
    print()

    lb, dbg = results["layerbisect"], results["ort-debug"]
    cosine = lb["first_bad_cosine"]
    print(f"layerbisect: {lb['aligned']} aligned layers (coverage {lb['coverage']:.0%}); model "
          f"{info['float_nodes']} float / {info['quant_nodes']} QDQ nodes; {lb['failing']} layers below "
          f"threshold; first bad #{lb['first_bad_index']} {'+'.join(lb['first_bad'] or ['-'])} (cosine "
          f"{'-' if cosine is None else format(cosine, '.4f')}) -> "
          f"{'names the planted layer' if lb['found'] else 'DOES NOT name the planted layer ' + info['planted']}")
    print(f"ORT debugger: {dbg['aligned']} matched activations; earliest with SQNR < 14 dB: "
          f"{dbg['first_low']} ({'-' if dbg['first_low_sqnr'] is None else format(dbg['first_low_sqnr'], '.1f') + ' dB'}) -> "
          f"{'the planted layer' if dbg['found'] else 'not the planted layer'}")
    print()
    for mode in ("floor", "layerbisect", "ort-debug"):
        r = results[mode]
        parts = dict(r["phases"])
        parts["other"] = r["wall_s"] - sum(parts.values())
        print(f"{mode} time: " + ", ".join(f"{k} {v:.2f}s" for k, v in parts.items()))
    marks = ", ".join(f"{k} {v:.0f}" for k, v in lb["rss_marks"].items())
    print(f"layerbisect RSS (MB) right after: {marks}; values returned by the two runs: "
          f"{lb['exposed_mb']:.0f} MB (float32)")
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s")


def _median_run(results: list[dict]) -> dict:
    """The run with the median wall time, with the median peak RSS of all runs."""
    ordered = sorted(results, key=lambda r: r["wall_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    rss = sorted(r["peak_rss_mb"] for r in results)
    chosen["peak_rss_mb"] = rss[(len(rss) - 1) // 2]
    return chosen


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("onnxruntime", "onnx", "numpy", "layerbisect"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


if __name__ == "__main__":
    main()
