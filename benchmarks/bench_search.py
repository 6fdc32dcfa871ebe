"""Benchmark: finding the first bad layer of a model whose activations total several GB.

Builds (seeded, in code, in a temporary directory) the residual CNN of ``bench_scan.py`` at a
size whose exposed activations do not fit comfortably in memory (default: input 1x64x112x112,
70 residual blocks, 141 Conv), quantizes it to QDQ int8 with onnxruntime's static quantizer (2
calibration samples), flips the sign of the int8 weight of one Conv about three quarters deep,
then measures, each in a fresh Python process:

- floor:            one plain onnxruntime run of each model, normal outputs only, sessions included
                    (bench_scan.py's floor);
- bisect, budget B: ``find_first_bad_layer(..., strategy="bisect", memory_budget=B)`` for a few B;
- bisect probes only: the same with ``isolated=False``: the probes and the last pass, no culprit
                    (with isolated error, the layers up to the first bad one follow: their ratio
                    to this row and to the prefix row is printed);
- prefix, budget B: ``strategy="prefix"``: every layer up to the first bad one, in pieces of B;
- auto (default):   ``find_first_bad_layer(...)`` as a user calls it (default budget: half the
                    memory available at the time);
- scan:             ``strategy="scan"`` with a budget that holds everything (one pass), when the
                    machine has the memory for it;
- ORT qdq_loss_debug: onnxruntime's quantization debugger on the same pair (bench_scan.py's),
                    when the machine has the memory for it.

A second group of rows runs bench_scan.py's small and medium CNNs: the full scan (every aligned
layer, cumulative and isolated) against their floor.

    python benchmarks/bench_search.py                      # about 4 minutes on 2 cores
    python benchmarks/bench_search.py --blocks 20 --hw 64  # a quick smoke run

Wall time counts from after numpy is imported and the input sample loaded: importing the tool,
loading models, creating sessions, running, comparing. Peak RSS is the child's VmHWM from
/proc/self/status. The layerbisect rows also time their phases and every model-running pass.
Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_scan  # noqa: E402  (the model builder, quantizer, fault planter, floor and ORT debugger)

MARK = "@@BENCH_SEARCH@@"
CALIBRATION_SAMPLES = 2
FAULT_DEPTH = 0.75  # the planted Conv: first Conv of the block this far down
GOAL_WALL, GOAL_RSS, GOAL_SMALL_WALL = 3.0, 2.0, 3.0
HUGE_BUDGET = 1 << 40  # no limit from the budget: a scan then runs in pieces of layerbisect.footprint.SCAN_PIECE
SMALL_SIZES = ("small", "medium")


# --------------------------------------------------------------------------- model


def prepare(workdir: str, channels: int, hw: int, blocks: int) -> dict:
    """Float model, its QDQ int8 model with a planted fault, one input sample: files in ``workdir``."""
    import numpy as np
    import onnx

    shape = (1, channels, hw, hw)
    model = bench_scan.build_float_model(channels, hw, blocks)
    float_path = os.path.join(workdir, "float.onnx")
    quant_path = os.path.join(workdir, "quant.onnx")
    onnx.save(model, float_path)
    t = time.perf_counter()
    bench_scan.quantize_qdq(float_path, quant_path, shape, samples=CALIBRATION_SAMPLES)
    quantize_s = time.perf_counter() - t
    planted = f"conv{max(1, round(FAULT_DEPTH * blocks))}a"
    weight = bench_scan.plant_fault(quant_path, planted)
    feeds = {"x": np.random.default_rng(2).standard_normal(shape).astype(np.float32)}
    feeds_path = os.path.join(workdir, "feeds.npz")
    np.savez(feeds_path, **feeds)
    quant = onnx.load(quant_path, load_external_data=False)
    return {
        "float_path": float_path, "quant_path": quant_path, "feeds": feeds_path,
        "planted": planted, "weight": weight, "shape": shape, "blocks": blocks,
        "convs": sum(n.op_type == "Conv" for n in model.graph.node),
        "float_nodes": len(model.graph.node), "quant_nodes": len(quant.graph.node),
        "float_mb": os.path.getsize(float_path) / 2**20, "quant_mb": os.path.getsize(quant_path) / 2**20,
        "float_act_bytes": activation_bytes(model), "quant_act_bytes": activation_bytes(quant),
        "quantize_s": quantize_s,
    }


def activation_bytes(model) -> int:
    """Bytes of every value a node of ``model`` produces (what exposing everything holds)."""
    import numpy as np
    import onnx
    from onnx import helper

    inferred = onnx.shape_inference.infer_shapes(model)
    infos = {i.name: i for i in [*inferred.graph.value_info, *inferred.graph.output]}
    total = 0
    for node in model.graph.node:
        for name in node.output:
            info = infos.get(name)
            if info is None or not info.type.HasField("tensor_type"):
                continue
            tensor = info.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim]
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize
            total += itemsize * int(np.prod(dims, dtype=np.int64))
    return total


# --------------------------------------------------------------------------- children


def child(mode: str, info: dict, options: dict) -> dict:
    if mode in ("floor", "floor-float", "floor-quant", "ort-debug"):
        return bench_scan.child(mode, info)
    if mode == "layerbisect":
        return child_layerbisect(info, options)
    raise SystemExit(f"unknown mode {mode}")


def child_layerbisect(info: dict, options: dict) -> dict:
    import numpy as np

    feeds = dict(np.load(info["feeds"]))
    result: dict = {"baseline_rss_mb": bench_scan._vm("VmRSS")}
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    from layerbisect import find_first_bad_layer
    from layerbisect.measure import available_memory

    phases["import"] = time.perf_counter() - t0
    rss_after_import = bench_scan._vm("VmRSS")
    passes: list[dict] = []
    stats: dict = {}
    _instrument(phases, passes, stats)
    kwargs = {"strategy": options["strategy"], "isolated": options.get("isolated", True), "quiet": True}
    if options.get("budget") is not None:
        kwargs["memory_budget"] = int(options["budget"])
    else:
        result["default_budget"] = available_memory() // 2  # what find.py will take, give or take
    report = find_first_bad_layer(info["float_path"], info["quant_path"], inputs=feeds, **kwargs)
    result["wall_s"] = time.perf_counter() - t0
    result["peak_rss_mb"] = bench_scan._vm("VmHWM")
    bad = report.first_bad
    result.update(
        phases=phases,
        passes=passes,
        rss_after_import_mb=rss_after_import,
        rss_after_setup_mb=stats.get("rss_after_setup"),
        aligned=stats.get("aligned"),
        measured=len(report.layers),
        strategy=report.strategy,
        executions=report.executions,
        peak_bytes=report.peak_bytes,
        first_bad=None if bad is None else "+".join(bad.float_nodes),
        first_bad_index=None if bad is None else bad.index,
        first_bad_cosine=None if bad is None else bad.cosine,
        cause=report.first_bad_cause,
        culprit=None if report.culprit is None else "+".join(report.culprit.float_nodes),
        found=bad is not None and info["planted"] in bad.float_nodes,
    )
    return result


ROLES = {"float model": "float", "quantized model": "quant", "quantized model cut for isolated error": "isolated"}


def _instrument(phases: dict[str, float], passes: list[dict], stats: dict) -> None:
    """Wrap what find_first_bad_layer calls with timers (a few hundred calls: negligible cost).

    ``phases`` gets seconds per phase; ``passes`` one record per model-running pass (a scan
    piece, a bisection probe, the isolated pass); ``stats`` the number of aligned pairs.
    """
    import layerbisect.isolate as lbisolate
    import layerbisect.measure as lbmeasure
    import layerbisect.passes as lbpasses
    import layerbisect.pipeline as lbpipeline
    from layerbisect.run import Session

    def add(label: str, seconds: float) -> None:
        phases[label] = phases.get(label, 0.0) + seconds

    def timed(module, name: str, label: str) -> None:
        fn = getattr(module, name, None)
        if fn is None:  # the library moved on: that phase counts as "other"
            return

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                add(label, time.perf_counter() - t)

        setattr(module, name, wrapper)

    for name, label in [
        ("load_model", "setup: load (read, copy, name)"),
        ("build_graph", "setup: graph build (incl. shape inference)"),
        ("plan_inputs", "setup: plan inputs"),
        ("summarize", "report: summaries, neighbourhood"),
        ("neighbourhood", "report: summaries, neighbourhood"),
    ]:
        timed(lbpipeline, name, label)
    timed(lbmeasure.Segments, "extract", "pass: extract segments")
    timed(lbmeasure, "cut", "pass: cut (isolated model)")
    timed(lbmeasure, "compare", "pass: compare (metrics)")
    timed(lbisolate.Cut, "feed", "pass: feeds for cuts")

    align = lbpipeline.align

    @functools.wraps(align)
    def align_wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = align(*args, **kwargs)
        add("setup: align", time.perf_counter() - t)
        stats["aligned"] = len(out.pairs)
        return out

    lbpipeline.align = align_wrapper

    def session_wrapper(fn, kind):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                role = ROLES.get(getattr(self, "role", ""), "other")
                add(f"pass: {kind} {role}", time.perf_counter() - t)
        return wrapper

    Session.__init__ = session_wrapper(Session.__init__, "session creation")
    Session.run = session_wrapper(Session.run, "run")

    prepare = lbpasses.prepare

    @functools.wraps(prepare)
    def prepare_wrapper(float_model, quant_model, pairs, boundaries, *args, **kwargs):
        stats.setdefault("rss_after_setup", bench_scan._vm("VmRSS"))
        before = dict(phases)
        t = time.perf_counter()
        measurement = prepare(float_model, quant_model, pairs, boundaries, *args, **kwargs)
        seconds = time.perf_counter() - t
        inner = sum(phases.get(k, 0.0) - before.get(k, 0.0) for k in phases)
        add("pass: prepare other (model copies)", seconds - inner)
        passes.append({
            "values": len(pairs),
            "isolated": boundaries is not None,
            "resumed": kwargs.get("start") is not None,
            "float_nodes": len(measurement.float_model.graph.node) if measurement.float_model else 0,
            "quant_nodes": len(measurement.quant_model.graph.node) if measurement.quant_model else 0,
            "prepare_s": seconds,
        })
        return measurement

    lbpasses.prepare = prepare_wrapper

    measure = lbpasses.measure

    @functools.wraps(measure)
    def measure_wrapper(*args, **kwargs):
        before = dict(phases)
        t = time.perf_counter()
        totals, saved = measure(*args, **kwargs)
        record = passes[-1] if passes else {}
        record["measure_s"] = time.perf_counter() - t
        for key in phases:
            delta = phases[key] - before.get(key, 0.0)
            if delta and key.startswith("pass: "):
                record[key[6:]] = delta
        record.update(executions=totals.executions, held_mb=totals.peak_bytes / 2**20,
                      rss_mb=bench_scan._vm("VmRSS"), hwm_mb=bench_scan._vm("VmHWM"))
        return totals, saved

    lbpasses.measure = measure_wrapper


# --------------------------------------------------------------------------- parent


def spawn(mode: str, info: dict, options: dict, timeout: float) -> dict:
    """Run one measurement in a fresh interpreter; on failure, a dict with ``error``."""
    command = [sys.executable, os.path.abspath(__file__), "--child", mode,
               "--info", json.dumps(info), "--options", json.dumps(options)]
    load = os.getloadavg()[0]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    load = max(load, os.getloadavg()[0])
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        return {"error": f"{why}: {tail[0][:200]}"}
    result = json.loads(lines[-1][len(MARK):])
    result["load"] = load  # 1-minute load average before/after: above the CPU count, timings are noisy
    return result


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64M, 1G)")
    unit = match.group(2).upper()
    return int(float(match.group(1)) * 1024 ** ("KMGT".index(unit) + 1 if unit else 0))


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def fmt_mb(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def median_run(results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    chosen = bench_scan._median_run(ok)
    chosen["wall_range"] = (min(r["wall_s"] for r in ok), max(r["wall_s"] for r in ok))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--hw", type=int, default=112, help="input height and width (default 112)")
    parser.add_argument("--blocks", type=int, default=70, help="residual blocks, 2 Conv each (default 70: 141 Conv)")
    parser.add_argument("--budgets", default="64M,256M,1G",
                        help="memory budgets of the bisect rows, comma separated (default 64M,256M,1G)")
    parser.add_argument("--repeat", type=int, default=1, help="fresh processes per big-model row (median)")
    parser.add_argument("--small-repeat", type=int, default=3, help="fresh processes per small-model row")
    parser.add_argument("--no-small", action="store_true", help="skip the small/medium full-scan rows")
    parser.add_argument("--no-big", action="store_true", help="skip the big model")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement")
    parser.add_argument("--json", help="also write every measurement here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--info", help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = child(args.child, json.loads(args.info), json.loads(args.options or "{}"))
        print(MARK + json.dumps(result), flush=True)
        return

    bench_scan.compile_layerbisect()
    start = time.perf_counter()
    print(f"{time.strftime('%Y-%m-%d')}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"{fmt_mb(mem_available())} available,", bench_scan._versions())
    everything: dict = {}
    if not args.no_big:
        everything["big"] = run_big(args)
    if not args.no_small:
        everything["small"] = run_small(args)
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=1, default=str)


def run_big(args) -> dict:
    budgets = [parse_bytes(b) for b in args.budgets.split(",") if b.strip()]
    with tempfile.TemporaryDirectory(prefix="bench_search_") as workdir:
        t = time.perf_counter()
        info = prepare(workdir, args.channels, args.hw, args.blocks)
        build_s = time.perf_counter() - t
        print(f"\nbig model: input 1x{args.channels}x{args.hw}x{args.hw}, {args.blocks} residual blocks, "
              f"{info['convs']} Conv; float {info['float_nodes']} nodes ({info['float_mb']:.1f} MB), "
              f"QDQ {info['quant_nodes']} nodes ({info['quant_mb']:.1f} MB); built + quantized "
              f"({CALIBRATION_SAMPLES} calibration samples) in {build_s:.0f} s")
        print(f"every node output: float model {fmt_mb(info['float_act_bytes'])}, QDQ model "
              f"{fmt_mb(info['quant_act_bytes'])}; planted fault: sign-flipped int8 weight "
              f"{info['weight']!r} of {info['planted']!r}")

        rows: list[tuple[str, str, dict]] = [
            ("floor", "floor: ORT plain run, float + quant", {}),
            ("floor-float", "  (float model only)", {}),
            ("floor-quant", "  (quant model only)", {}),
        ]
        for budget in budgets:
            rows.append(("layerbisect", f"bisect, budget {fmt_mb(budget)}",
                         {"strategy": "bisect", "budget": budget}))
            rows.append(("layerbisect", f"bisect probes only, {fmt_mb(budget)}",
                         {"strategy": "bisect", "budget": budget, "isolated": False}))
        for budget in budgets:
            rows.append(("layerbisect", f"prefix, budget {fmt_mb(budget)}",
                         {"strategy": "prefix", "budget": budget}))
        rows.append(("layerbisect", "auto, default budget", {"strategy": "auto"}))
        available = mem_available()
        # a scan used to hold every float, quantized and isolated value and cut feed at once;
        # in pieces it holds far less, but the row stays as cautious
        scan_need = 4 * info["float_act_bytes"]
        # the debugger holds every value of both models, plus onnxruntime's own copies
        debug_need = 2 * (info["float_act_bytes"] + info["quant_act_bytes"])
        skipped: dict[str, str] = {}
        if scan_need < 0.8 * available:
            rows.append(("layerbisect", "scan, budget unbounded", {"strategy": "scan", "budget": HUGE_BUDGET}))
        else:
            skipped["scan"] = f"needs about {fmt_mb(scan_need)}, {fmt_mb(available)} available"
        if debug_need < 0.8 * available:
            rows.append(("ort-debug", "ORT qdq_loss_debug", {}))
        else:
            skipped["ORT qdq_loss_debug"] = f"needs about {fmt_mb(debug_need)}, {fmt_mb(available)} available"
        for what, why in skipped.items():
            print(f"skipped: {what} ({why})")
        print()

        runs: list[list[dict]] = [[] for _ in rows]
        for _ in range(max(1, args.repeat)):
            for i, (mode, label, options) in enumerate(rows):
                t = time.perf_counter()
                runs[i].append(spawn(mode, info, options, args.timeout))
                print(f"  measured {label} in {time.perf_counter() - t:.0f} s", flush=True)
    results = [median_run(r) for r in runs]
    print_table([(label, mode, r) for (mode, label, _), r in zip(rows, results)], len(runs[0]), info["planted"])
    lb_rows = [(label, r) for (mode, label, _), r in zip(rows, results) if mode == "layerbisect" and "error" not in r]
    print_bisection_cost(lb_rows)
    print_passes(lb_rows)
    print_phases(lb_rows, results[0])
    return {"info": info, "rows": [{"label": label, "options": options, "runs": r}
                                   for (_, label, options), r in zip(rows, runs)], "skipped": skipped}


def run_small(args) -> dict:
    out = {}
    table = []
    for size in SMALL_SIZES:
        channels, hw, blocks = bench_scan.SIZES[size]
        with tempfile.TemporaryDirectory(prefix="bench_search_small_") as workdir:
            info = bench_scan.prepare(workdir, channels, hw, blocks)
            rows = [("floor", f"{size}: floor", {}),
                    ("layerbisect", f"{size}: full scan (cumul.+isolated)",
                     {"strategy": "scan", "budget": HUGE_BUDGET, "isolated": True})]
            runs: list[list[dict]] = [[] for _ in rows]
            for _ in range(max(1, args.small_repeat)):
                for i, (mode, _label, options) in enumerate(rows):
                    runs[i].append(spawn(mode, info, options, args.timeout))
        results = [median_run(r) for r in runs]
        table += [(label, mode, r) for (mode, label, _), r in zip(rows, results)]
        out[size] = {"info": info, "runs": runs}
        print(f"\n{size}: bench_scan.py's CNN, input 1x{channels}x{hw}x{hw}, {info['convs']} Conv, "
              f"fault in {info['planted']}")
    print()
    print_table(table, args.small_repeat, None, goal_wall=GOAL_SMALL_WALL, goal_rss=None)
    for label, mode, r in table:
        if mode == "layerbisect" and "error" not in r:
            parts = {k: v for k, v in r["phases"].items() if v >= 0.005}
            print(f"{label}: " + ", ".join(f"{k} {v:.3f}s" for k, v in parts.items()))
    return out


def print_table(rows, repeat: int, planted: str | None, goal_wall: float = GOAL_WALL,
                goal_rss: float | None = GOAL_RSS) -> None:
    header = (f"{'measurement':<38} {'wall s':>7} {'(range)':>11} {'import s':>8} {'peak RSS MB':>11} "
              f"{'x wall':>7} {'x RSS':>6} "
              f"{'runs':>5} {'held MB':>8} {'first bad':>10} {'load':>5}  verdict")
    print(header)
    print("-" * len(header))
    def group(label: str) -> str:  # each row is compared with the floor of its own model
        return label.split(":")[0] if label.startswith(SMALL_SIZES) else ""

    floors = {group(label): r for label, mode, r in rows if mode == "floor"}
    for label, mode, r in rows:
        floor = floors[group(label)]
        if "error" in floor:
            raise SystemExit(f"the floor of {group(label) or 'the big model'} failed: {floor['error']}")
        if "error" in r:
            print(f"{label:<38} failed: {r['error']}")
            continue
        xw, xr = r["wall_s"] / floor["wall_s"], r["peak_rss_mb"] / floor["peak_rss_mb"]
        runs = r.get("executions", {"floor": 2, "floor-float": 1, "floor-quant": 1}.get(mode))
        held = r.get("peak_bytes")
        found = r.get("found")
        verdict = ""
        if mode == "layerbisect":
            ok_wall = xw <= goal_wall
            ok_rss = goal_rss is None or xr <= goal_rss
            verdict = "meets goal" if ok_wall and ok_rss and found else "misses: " + ", ".join(
                w for w, bad in [("wall", not ok_wall), ("RSS", not ok_rss), ("wrong layer", not found)] if bad)
        low, high = r["wall_range"]
        print(f"{label:<38} {r['wall_s']:>7.2f} {f'{low:.2f}-{high:.2f}':>11} {r['phases']['import']:>8.2f} "
              f"{r['peak_rss_mb']:>11.0f} "
              f"{xw:>7.2f} {xr:>6.2f} {'-' if runs is None else runs:>5} "
              f"{'-' if held is None else format(held / 2**20, '.0f'):>8} "
              f"{'-' if found is None else ('yes' if found else 'NO'):>10} {r.get('load', 0):>5.1f}  {verdict}")
    goals = f"goal: wall <= {goal_wall:g}x" + ("" if goal_rss is None else f" and RSS <= {goal_rss:g}x") + " the floor"
    print(f"median of {repeat} fresh process(es) per row; runs = model executions; held = activations held "
          f"at once (report.peak_bytes); load = 1-min load average around the row; {goals}")
    for label, mode, r in rows:
        if "error" in r:
            continue
        if mode == "layerbisect":
            print(f"  {label}: strategy {r['strategy']}, {r['measured']} of {r['aligned']} aligned layers measured, "
                  f"first bad {r['first_bad']} #{r['first_bad_index']} (cosine {r['first_bad_cosine']:.4f}, "
                  f"{r['cause']}), culprit {r['culprit']}"
                  + (f", default budget {fmt_mb(r['default_budget'])}" if "default_budget" in r else ""))
        elif mode == "ort-debug":
            sqnr = r["first_low_sqnr"]
            print(f"  ORT debugger: {r['aligned']} matched activations; earliest with SQNR < 14 dB: {r['first_low']} "
                  f"({'-' if sqnr is None else format(sqnr, '.1f') + ' dB'}) -> "
                  f"{'the planted layer' if r['found'] else 'not the planted layer'}")
    if planted:
        print(f"  planted: {planted}")


def print_bisection_cost(rows) -> None:
    """What bisection's culprit costs: with isolated error it measures, after its probes, every
    layer up to the first bad one as the prefix does (the scan's culprit and cause); without,
    the probes and the last pass only."""
    by_label = dict(rows)
    print("\nbisection's culprit (the layers up to the first bad one, with isolated error, after the probes):")
    for label, r in rows:
        if not label.startswith("bisect, budget "):
            continue
        budget = label.removeprefix("bisect, budget ")
        probes, prefix = by_label.get(f"bisect probes only, {budget}"), by_label.get(f"prefix, budget {budget}")
        parts = [f"{r['executions']} runs, {r['measured']} layers measured, {r['wall_s']:.2f} s"]
        for name, other in [("probes only", probes), ("prefix", prefix)]:
            if other is not None:
                parts.append(f"{r['wall_s'] / other['wall_s']:.2f}x the wall and {r['executions'] / other['executions']:.2f}x "
                             f"the runs of {name} ({other['wall_s']:.2f} s, {other['executions']} runs)")
        print(f"  {budget}: " + "; ".join(parts))


def print_passes(rows) -> None:
    print("\nmodel-running passes of each layerbisect row (one line per pass):")
    header = (f"  {'row':<30} {'pass':>4} {'kind':<17} {'values':>6} {'f/q nodes':>10} {'prep s':>7} "
              f"{'sess s':>7} {'run s':>7} {'cmp s':>6} {'held MB':>8} {'HWM MB':>7}")
    print(header)
    for label, r in rows:
        for i, p in enumerate(r["passes"]):
            sessions = sum(v for k, v in p.items() if k.startswith("session creation"))
            runs = sum(v for k, v in p.items() if k.startswith("run "))
            kind = ("isolated" if p["isolated"] else "values") + (", resumed" if p["resumed"] else "")
            print(f"  {label:<30} {i:>4} {kind:<17} {p['values']:>6} "
                  f"{str(p['float_nodes']) + '/' + str(p['quant_nodes']):>10} {p['prepare_s']:>7.2f} "
                  f"{sessions:>7.2f} {runs:>7.2f} {p.get('compare (metrics)', 0.0):>6.2f} "
                  f"{p.get('held_mb', 0.0):>8.0f} {p.get('hwm_mb', 0.0):>7.0f}")


def print_phases(rows, floor: dict) -> None:
    print("\nwhere the time goes (seconds):")
    labels: list[str] = []
    for _, r in rows:
        for k in r["phases"]:
            if k not in labels:
                labels.append(k)
    names = [label for label, _ in rows]
    width = max(12, *(len(n) for n in names))
    print(f"  {'phase':<44} " + " ".join(f"{n[:width]:>{width}}" for n in names))
    for k in labels:
        print(f"  {k:<44} " + " ".join(f"{r['phases'].get(k, 0.0):>{width}.2f}" for _, r in rows))
    print(f"  {'other':<44} " + " ".join(
        f"{r['wall_s'] - sum(r['phases'].values()):>{width}.2f}" for _, r in rows))
    print(f"  {'total':<44} " + " ".join(f"{r['wall_s']:>{width}.2f}" for _, r in rows))
    fp = floor.get("phases", {})
    print(f"  floor: import {fp.get('import', 0):.2f}, sessions {fp.get('sessions', 0):.2f}, "
          f"run {fp.get('run', 0):.2f}, total {floor.get('wall_s', 0):.2f}; "
          f"peak RSS {floor.get('peak_rss_mb', 0):.0f} MB")
    print("  RSS after import / after setup (MB): " + ", ".join(
        f"{label} {r['rss_after_import_mb']:.0f} / {r['rss_after_setup_mb'] or 0:.0f}" for label, r in rows))


if __name__ == "__main__":
    main()
