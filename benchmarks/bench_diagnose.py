"""Benchmark: what ``layerbisect.diagnose`` costs on top of the plain report.

The diagnosis of a layer runs its variants (only the weights, only the inputs, only the
output quantized) on the isolated layer alone, never the model; the float model runs once per
sample for the float values, and the quantized model with each candidate fix once per
sample (the quantized model's cosines before any fix are the report's).
The issue's bound: at most two runs of the model per candidate
fix. This prints, per case, the model runs and isolated-layer runs counted, the model runs per
candidate fix and sample, and the diagnosis's wall time against the plain report's (median of
``--repeat``), in this process, sessions included.

Cases:

- ``cnn``: the test CNN (tests/models.py make_cnn) quantized by onnxruntime to QDQ uint8, with
  conv2's output scale 20 times too small (saturation); 3 samples.
- ``cnn-qop``: the same CNN quantized to QOperator uint8 (QLinearConv ...), the same fault
  (diagnosed in its QDQ form); 3 samples.
- ``cnn-dyn``: the same CNN quantized by quantize_dynamic, conv2's int8 weights replaced by
  random integers; 3 samples.
- ``silero``: silero-vad's if-less 16 kHz export, QDQ uint8 on 8 calibration chunks, no fault
  planted (its LSTM state collapses); 3 samples. Needs the ``integration`` extra.
- ``ocr``: PP-OCRv4 det, QDQ uint8 per-tensor on 4 synthetic pages, no fault planted; 2 pages of
  64x64. Needs the ``integration`` extra.

    python benchmarks/bench_diagnose.py
    python benchmarks/bench_diagnose.py --case cnn --repeat 5

Nothing here asserts on time.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from layerbisect import diagnose, find_first_bad_layer  # noqa: E402

import real_models  # noqa: E402
from models import corrupt_weights, make_cnn, quantize, random_inputs  # noqa: E402

CASES = ("cnn", "cnn-qop", "cnn-dyn", "silero", "ocr")


def case(name: str):
    """(float model, quantized model, samples) of a case; None when its package is missing."""
    if name == "cnn-dyn":
        float_model = make_cnn()
        quant = corrupt_weights(quantize(float_model, "dynamic"), "conv2_quant")
        return float_model, quant, [random_inputs(float_model, seed) for seed in range(3)]
    if name in ("cnn", "cnn-qop"):
        float_model = make_cnn()
        quant = quantize(float_model, "qdq" if name == "cnn" else "qoperator", activation_type="uint8")
        init = next(i for i in quant.graph.initializer if i.name == "conv2_scale")
        init.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(init) * 0.05).astype(np.float32), init.name))
        return float_model, quant, [random_inputs(float_model, seed) for seed in range(3)]
    try:
        if name == "silero":
            folded = real_models.fold_sample_rate(onnx.load(real_models.silero_path("ifless")))
            float_model = real_models.inline_taken_branch(real_models.drop_value_info(folded))
            calibration = [real_models.audio_sample(100 + seed) for seed in range(8)]
            samples = [real_models.audio_sample(seed) for seed in range(3)]
        else:
            float_model = real_models.constants_to_initializers(onnx.load(real_models.ocr_path("det")))
            calibration = [real_models.page_sample(100 + seed) for seed in range(4)]
            samples = [real_models.page_sample(seed) for seed in range(2)]
    except real_models.ModelUnavailable:
        return None
    return float_model, quantize(float_model, "qdq", activation_type="uint8", calibration_inputs=calibration), samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES, action="append")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{'case':8} {'layers':>6} {'fixes':>5} {'model runs':>10} {'per fix':>7} {'layer runs':>10} "
          f"{'report s':>8} {'diagnosis s':>11} {'ratio':>6}")
    for name in args.case or CASES:
        built = case(name)
        if built is None:
            print(f"{name:8} skipped: the integration extra is not installed")
            continue
        float_model, quant, samples = built
        plain, extra = [], []
        for _ in range(args.repeat):
            start = time.perf_counter()
            report = find_first_bad_layer(float_model, quant, samples, quiet=True)
            middle = time.perf_counter()
            diagnosed = diagnose(float_model, quant, samples, report=report)
            plain.append(middle - start)
            extra.append(time.perf_counter() - middle)
        d = diagnosed.diagnosis
        per_fix = d.model_runs / (d.fixes_tried * d.samples) if d.fixes_tried else float("nan")
        p, e = statistics.median(plain), statistics.median(extra)
        print(f"{name:8} {len(d.layers):>6} {d.fixes_tried:>5} {d.model_runs:>10} {per_fix:>7.2f} {d.layer_runs:>10} "
              f"{p:>8.2f} {e:>11.2f} {e / p:>6.2f}")
    print("model runs: whole-model runs of the diagnosis over all samples (the float model and each fix once "
          "per sample; the quantized model's cosines are the report's); per fix: model runs per candidate fix "
          "and sample (at most 2); ratio: diagnosis time / plain report time")


if __name__ == "__main__":
    main()
