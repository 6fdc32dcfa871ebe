"""The ``layerbisect`` command's arguments.

This module imports only the standard library and layerbisect's option checks, so that
``--help``, ``--version`` and usage errors answer at once; ``layerbisect.command`` (onnx,
onnxruntime, numpy) is imported once the arguments are good.

Exit status: 0 when no aligned layer is below the threshold, 1 when one is, 2 on bad usage or
bad input (one line on stderr, no traceback), 130 when interrupted (Ctrl-C: one line, no
traceback; files are written whole or not at all).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from layerbisect import __version__
from layerbisect.errors import LayerbisectError
from layerbisect.options import DEFAULT_PROVIDERS, STRATEGIES, memory_size

EPILOG = """exit status:
  0  every aligned layer reaches the threshold (PASS)
  1  a layer is below it (FAIL; the report names the first)
  2  bad usage or bad input (one line on stderr, no report)
  130  interrupted (Ctrl-C)

example:
  layerbisect model_fp32.onnx model_int8.onnx --inputs feeds.npz --threshold 0.98 --json report.json
  layerbisect model_fp32.onnx model_int8.onnx --inputs calibration/ --max-samples 32 --workers 4
  layerbisect model_fp32.onnx model_int8.onnx --json - | jq .first_bad.float_nodes
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.quant_model is None) == (args.simulate is None):
        parser.error("give either a quantized model or --simulate FORMAT")
    if args.json == "-" and args.html == "-":
        parser.error("only one of --json and --html can go to stdout (-)")
    if args.inputs is not None and args.data_loader_script is not None:
        parser.error("give --inputs or --data-loader-script, not both")
    if args.batched and args.inputs is None:
        parser.error("--batched needs --inputs FILE.npz (whose arrays carry a leading sample axis)")
    if args.diagnose and args.no_isolated:
        parser.error("--diagnose needs the isolated error: leave out --no-isolated")
    if args.max_samples is not None and args.inputs is None and args.data_loader_script is None:
        parser.error("--max-samples applies to a dataset: --inputs FOLDER, --inputs FILE.npz --batched or "
                     "--data-loader-script")
    try:
        from layerbisect.command import run
    except LayerbisectError as exc:  # no onnxruntime installed
        print(f"layerbisect: error: {exc}", file=sys.stderr)
        return 2
    try:
        return run(args)
    except KeyboardInterrupt:
        print("layerbisect: interrupted", file=sys.stderr)
        return 130


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, pointing to ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="layerbisect",
        description="Find the first layer where a quantized ONNX model stops agreeing with its "
        "float original.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("float_model", help="the float (reference) .onnx model")
    parser.add_argument(
        "quant_model", nargs="?",
        help="the quantized or optimized .onnx model, or a folder of dumped tensors (left out with --simulate)",
    )
    parser.add_argument(
        "--simulate", metavar="FORMAT",
        help="instead of a quantized model, the float model with every activation in FORMAT: "
        "'ap_fixed<16,8>' (W total bits, I integer bits), int8, uint8, int16",
    )
    parser.add_argument(
        "--inputs", metavar="FILE.npz|FOLDER",
        help="feeds: an .npz file with one array per input name (one sample), or a folder of such "
        "files (one sample each, in the order of their names)",
    )
    parser.add_argument(
        "--batched", action="store_true",
        help="the arrays of --inputs FILE.npz carry a leading sample axis: one sample per row",
    )
    parser.add_argument(
        "--data-loader-script", metavar="FILE.py[:FUNC]", type=_script,
        help="samples from a Python function returning or yielding dicts of input name -> array "
        "(default function name load_data)",
    )
    parser.add_argument(
        "--max-samples", metavar="N", type=_positive,
        help="read at most the first N samples of the dataset",
    )
    parser.add_argument(
        "--input", metavar="NAME=FILE.npy", action="append", default=[], type=_name_value,
        help="one input from a .npy file (repeatable; overrides --inputs, in every sample)",
    )
    parser.add_argument(
        "--shape", metavar="NAME=D0,D1,...", action="append", default=[], type=_shape,
        help="full shape of an input with dynamic dimensions, for random inputs (repeatable)",
    )
    parser.add_argument(
        "--past-length", metavar="N", type=int, default=None,
        help="past positions of a KV-cache decoder's random inputs (default 8; 0: no past)",
    )
    parser.add_argument("--threshold", type=float, default=0.98, help="cosine threshold (default 0.98)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random inputs (default 0)")
    parser.add_argument(
        "--providers", type=lambda text: [p for p in text.split(",") if p],
        default=list(DEFAULT_PROVIDERS),
        help="onnxruntime execution providers, comma-separated, in order of preference: those "
        "this onnxruntime lacks are skipped with a warning (default CPUExecutionProvider)",
    )
    parser.add_argument(
        "--ort-optimized", action="store_true",
        help="compare the quantized graph as onnxruntime optimizes it (its fused nodes)",
    )
    parser.add_argument(
        "--quant-graph", metavar="GRAPH.onnx",
        help="with a dump folder: the graph its tensors come from (names as the dump uses them), "
        "to pair them by structure",
    )
    parser.add_argument(
        "--allow-swapped", action="store_true",
        help="compare even when the float model holds quantization and the quantized one does not",
    )
    parser.add_argument(
        "--strategy", choices=list(STRATEGIES), default="auto",
        help="scan every layer; prefix: the layers up to the first bad one, in order; bisect: "
        "probe for it with few runs, then as prefix; auto: scan when everything fits "
        "one pass, else the one of least estimated cost (default)",
    )
    parser.add_argument(
        "--memory-budget", metavar="SIZE", type=_size, default=None,
        help="activations held at once, e.g. 2G or 500M (default: half the free memory, at most 1G)",
    )
    parser.add_argument("--no-isolated", action="store_true", help="skip the per-layer (isolated) error")
    parser.add_argument("--workers", metavar="N", type=int, default=0, help="spread samples over N processes")
    parser.add_argument(
        "--keep-float", metavar="PATH.json",
        help="find the layers of a QDQ model to keep in float and write them (with "
        "onnxruntime's nodes_to_exclude) as JSON",
    )
    parser.add_argument(
        "--diagnose", action="store_true",
        help="for the culprit and the worst layers of a QDQ, QOperator or dynamic model: which quantizer breaks each "
        "(weights, inputs, output), why (saturation or resolution), and which fix repairs it (a "
        "percentile range, 16-bit, per-channel weights, float), each verified by running the "
        "model with it; in the report, its JSON and HTML",
    )
    parser.add_argument(
        "--repaired-model", metavar="PATH.onnx",
        help="write the model with those layers in float (when they repair it)",
    )
    parser.add_argument(
        "--json", metavar="PATH",
        help="also write the report as JSON; - writes it to stdout (the report text then goes to stderr)",
    )
    parser.add_argument(
        "--html", metavar="PATH",
        help="also write the report as one self-contained HTML page (chart, table, models, settings); "
        "- writes it to stdout (the report text then goes to stderr)",
    )
    parser.add_argument(
        "--model-explorer", metavar="FOLDER",
        help="also write Model Explorer overlays of both graphs (cosine, isolated cosine, SQNR, the "
        "first bad layer and the culprit) and the float-to-quantized node mapping into FOLDER",
    )
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="log progress on stderr: models loaded, layers aligned, each pass (-vv: debug too)",
    )
    loudness.add_argument(
        "-q", "--quiet", action="store_true",
        help="no progress bars, no log and no 'wrote PATH' lines; print only the verdict line",
    )
    parser.add_argument("--version", action="version", version=f"layerbisect {__version__}")
    return parser


def _size(text: str) -> int:
    try:
        return memory_size(text, "--memory-budget")
    except LayerbisectError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _name_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.npy, got {text!r}")
    return name, value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of samples, 1 or more, got {text!r}")
    return value


def _script(text: str) -> tuple[str, str]:
    """FILE.py[:FUNC] as (file, function): load_data unless a name follows the last colon."""
    path, sep, name = text.rpartition(":")
    return (path, name) if sep and path and name.isidentifier() else (text, "load_data")


def _shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, value = text.partition("=")
    try:
        dims = tuple(int(d) for d in value.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if not name or not dims:
        raise argparse.ArgumentTypeError(f"expected NAME=D0,D1,... with integers, got {text!r}")
    return name, dims


if __name__ == "__main__":
    sys.exit(main())
