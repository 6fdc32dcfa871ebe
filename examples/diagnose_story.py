"""The diagnosis story: a real model onnxruntime quantizes to uint8 breaks, with no fault planted;
the report says which quantizer breaks it, why, and which fix repairs it, each fix run.

silero-vad (its if-less 16 kHz export, the taken branch inlined) is quantized by
onnxruntime's quantize_static to QDQ, uint8 activations and per-tensor int8 weights,
calibrated on 8 chunks of synthetic audio. Its LSTM state output collapses (cosine near 0).
``layerbisect.diagnose`` names the layers that break on their own, splits each one's error
into weights, inputs and output, says why (an outlier channel setting a per-tensor weight
scale; an output range too narrow), and runs each candidate fix in memory. The settings it
prints are then pasted into quantize_static, and the model quantized again is compared.

Needs the ``integration`` extra (``pip install --no-deps silero-vad``: only its .onnx file is
read); without it the story says so and stops.

    python examples/diagnose_story.py
"""

import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the real models' helpers

from layerbisect import diagnose, find_first_bad_layer  # noqa: E402

from real_models import (  # noqa: E402
    ModelUnavailable,
    audio_sample,
    drop_value_info,
    fold_sample_rate,
    inline_taken_branch,
    silero_path,
)

logging.getLogger().setLevel(logging.ERROR)


def quantize(model: onnx.ModelProto, calibration, **settings) -> onnx.ModelProto:
    """onnxruntime's quantize_static: QDQ, uint8 activations, int8 weights per tensor."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.samples = iter(calibration)

        def get_next(self):
            return next(self.samples, None)

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder, "float.onnx"), Path(folder, "quant.onnx")
        onnx.save(model, source)
        quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, **settings)
        return onnx.load(target)


def main() -> None:
    try:
        path = silero_path("ifless")
    except ModelUnavailable as exc:
        print(f"skipped: {exc}")
        return
    model = inline_taken_branch(drop_value_info(fold_sample_rate(onnx.load(path))))
    calibration = [audio_sample(100 + seed) for seed in range(8)]
    samples = [audio_sample(seed) for seed in range(3)]
    quant = quantize(model, calibration)

    report = diagnose(model, quant, samples)
    print(report.verdict)
    print(report.diagnosis)

    # paste the settings into quantize_static, quantize again, and compare
    from onnxruntime.quantization import QuantType  # noqa: F401  (the pasted text names it)

    settings = report.diagnosis
    again = quantize(model, calibration, nodes_to_exclude=settings.nodes_to_exclude(),
                     extra_options=settings.extra_options())
    after = find_first_bad_layer(model, again, samples, quiet=True)
    for name, tensor in report.outputs:
        before = next(layer.cosine for layer in report.layers if layer.float_tensor == tensor)
        now = next(layer.cosine for layer in after.layers if layer.float_tensor == tensor)
        print(f"output {name!r}: cosine {before:.4f} quantized as before, {now:.4f} quantized with the pasted settings")
    print("verdict with the pasted settings:", after.verdict)
    assert np.isfinite(now)


if __name__ == "__main__":
    main()
