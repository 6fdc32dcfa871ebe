"""Benchmark: keep_in_float on real models, against one full scan of the same pair.

Needs the ``integration`` extra (``scripts/install-integration``): PP-OCR's direction
classifier (mobile v2.0 cls) and text detector (PP-OCRv4 det) from ``rapidocr-onnxruntime``, as
the wheel ships them (weights in Constant nodes), quantized to static QDQ int8 by onnxruntime
(per-tensor, 4 synthetic pages, ``tests/test_real_models.py``'s ``ocr_as_exported``), on 2
synthetic pages: the classifier at 48x192, the detector at ``--side`` x ``--side``.

Each row: ``keep_in_float(float, quant, pages)`` in this process (models quantized before the
clock starts), its wall time, the sets it tried (model runs / samples), what it kept in float
and the lowest layer cosine before and after; then the ratio of its wall time to one
``find_first_bad_layer(..., strategy="scan", isolated=False)`` of the same pair (a trial is
about one such run: the repaired model measured at every aligned layer).

    python benchmarks/bench_keep_float.py              # classifier, and detector at 64x64: about 2 minutes
    python benchmarks/bench_keep_float.py --side 160   # the detector at 160x160

Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=64, help="detector page side, a multiple of 32 (default 64)")
    parser.add_argument("--case", choices=("cls", "det"), action="append", help="a case to run (default: both)")
    args = parser.parse_args()

    import test_real_models as real

    from layerbisect import find_first_bad_layer, keep_in_float

    from real_models import ModelUnavailable, page_sample

    pages = {"cls": real.LINES, "det": [page_sample(seed, args.side, args.side) for seed in range(2)]}
    print(f"{'case':<22} {'wall s':>7} {'trials':>6} {'kept':>5} {'before':>7} {'after':>7} {'scan s':>7} {'x scan':>7}")
    for case in args.case or ["cls", "det"]:
        try:
            float_model, quant = real._cached_load(real.ocr_path(case)), real._ocr_as_exported_quant(case)
        except ModelUnavailable as exc:
            print(f"{case}: skipped ({exc})")
            continue
        t = time.perf_counter()
        find_first_bad_layer(float_model, quant, pages[case], strategy="scan", isolated=False, quiet=True)
        scan_s = time.perf_counter() - t
        t = time.perf_counter()
        fix = keep_in_float(float_model, quant, pages[case])
        wall = time.perf_counter() - t
        label = f"{case} {pages[case][0]['x'].shape[2]}x{pages[case][0]['x'].shape[3]}"
        print(f"{label:<22} {wall:>7.1f} {fix.executions // len(pages[case]):>6} {len(fix.nodes_to_exclude):>5} "
              f"{fix.cosine_before:>7.4f} {fix.cosine_after:>7.4f} {scan_s:>7.2f} {wall / scan_s:>7.1f}", flush=True)
    print("trials: sets of layers tried (the model with them in float, run over every page); kept: nodes_to_exclude; "
          "before/after: lowest layer cosine of the quantized and of the repaired model")


if __name__ == "__main__":
    main()
