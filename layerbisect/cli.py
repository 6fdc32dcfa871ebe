"""The ``layerbisect`` command.

Exit status: 0 when no aligned layer is below the threshold, 1 when one is, 2 on bad usage or
bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import zipfile
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import ContextManager

import numpy as np

from layerbisect.errors import LayerbisectError, first_line
from layerbisect.fallback import keep_in_float
from layerbisect.files import check_outputs, write_text
from layerbisect.find import find_first_bad_layer
from layerbisect.options import check_workers, memory_size
from layerbisect.render import echo
from layerbisect.run import DEFAULT_PROVIDERS
from layerbisect.simulate import simulated

USAGE_EXAMPLE = """example:
  layerbisect model_fp32.onnx model_int8.onnx --inputs feeds.npz --threshold 0.98 --json report.json
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.quant_model is None) == (args.simulate is None):
        parser.error("give either a quantized model or --simulate FORMAT")
    try:
        _check_outputs(args)
        inputs = _read_inputs(args.inputs, args.input)
        quant_model = _quantized_side(args)
        with _executor(args.workers) as executor:
            report = find_first_bad_layer(
                args.float_model,
                quant_model,
                inputs=inputs,
                threshold=args.threshold,
                shapes=dict(args.shape),
                seed=args.seed,
                providers=args.providers,
                ort_optimized=args.ort_optimized,
                allow_swapped=args.allow_swapped,
                quiet=args.quiet,
                strategy=args.strategy,
                memory_budget=args.memory_budget,
                isolated=not args.no_isolated,
                executor=executor,
            )
        if args.json:
            write_text(args.json, report.to_json() + "\n", reads=report.sources)
        if args.html:
            report.save_html(args.html)
    except LayerbisectError as exc:
        print(f"layerbisect: error: {exc}", file=sys.stderr)
        return 2
    try:
        echo(report, quiet=args.quiet)
    except BrokenPipeError:  # piped into head: the reader has what it wanted
        sys.stderr.close()
        return 0 if report else 1
    if report.coverage < 0.8:
        names = ", ".join(report.unaligned[:5]) + (", ..." if len(report.unaligned) > 5 else "")
        print(
            f"layerbisect: warning: only {report.coverage:.0%} of the float model's operations "
            f"were aligned; {len(report.unaligned)} have no counterpart: {names}", file=sys.stderr,
        )
    if report.weighted_paired < report.weighted:
        print(
            f"layerbisect: warning: only {report.weighted_paired} of the float model's {report.weighted} "
            "weighted layers paired one for one; the others are inside fused regions or unpaired",
            file=sys.stderr,
        )
    if args.keep_float or args.repaired_model:
        try:
            _keep_float(args, inputs)
        except LayerbisectError as exc:
            print(f"layerbisect: error: {exc}", file=sys.stderr)
            return 2
    return 0 if report else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerbisect",
        description="Find the first layer where a quantized ONNX model stops agreeing with its "
        "float original.",
        epilog=USAGE_EXAMPLE,
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
    parser.add_argument("--inputs", metavar="FILE.npz", help="feeds: one array per input name")
    parser.add_argument(
        "--input", metavar="NAME=FILE.npy", action="append", default=[], type=_name_value,
        help="one input from a .npy file (repeatable; overrides --inputs)",
    )
    parser.add_argument(
        "--shape", metavar="NAME=D0,D1,...", action="append", default=[], type=_shape,
        help="full shape of an input with dynamic dimensions, for random inputs (repeatable)",
    )
    parser.add_argument("--threshold", type=float, default=0.98, help="cosine threshold (default 0.98)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random inputs (default 0)")
    parser.add_argument(
        "--providers", type=lambda text: [p for p in text.split(",") if p],
        default=list(DEFAULT_PROVIDERS), help="onnxruntime execution providers, comma-separated",
    )
    parser.add_argument(
        "--ort-optimized", action="store_true",
        help="compare the quantized graph as onnxruntime optimizes it (its fused nodes)",
    )
    parser.add_argument(
        "--allow-swapped", action="store_true",
        help="compare even when the float model holds quantization and the quantized one does not",
    )
    parser.add_argument(
        "--strategy", choices=["auto", "scan", "bisect"], default="auto",
        help="scan every layer, bisect to the first bad one with few runs, or choose by the "
        "memory budget (default auto)",
    )
    parser.add_argument(
        "--memory-budget", metavar="SIZE", type=_size, default=None,
        help="activations held at once, e.g. 2G or 500M (default: half the free memory, at most 1G)",
    )
    parser.add_argument("--no-isolated", action="store_true", help="skip the per-layer (isolated) error")
    parser.add_argument("--workers", type=int, default=0, help="spread samples over N processes")
    parser.add_argument(
        "--keep-float", metavar="PATH.json",
        help="find the layers of a QDQ model to keep in float and write them (with "
        "onnxruntime's nodes_to_exclude) as JSON",
    )
    parser.add_argument("--repaired-model", metavar="PATH.onnx", help="write the model with those layers in float (when they repair it)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument(
        "--html", metavar="PATH",
        help="also write the report as one self-contained HTML page (chart, table, models, settings)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar; print only the verdict line",
    )
    return parser


def _check_outputs(args: argparse.Namespace) -> None:
    """Before any work: every output can be written, and none is a file the run reads."""
    outputs = {"--json": args.json, "--html": args.html, "--keep-float": args.keep_float,
               "--repaired-model": args.repaired_model}
    reads = [args.float_model, args.quant_model, args.inputs, *(path for _, path in args.input)]
    check_outputs(outputs, reads)


def _quantized_side(args: argparse.Namespace):
    """The quantized model given, or the format to simulate."""
    if (args.simulate is not None or Path(args.quant_model).is_dir()) and (args.keep_float or args.repaired_model):
        raise LayerbisectError("--keep-float and --repaired-model need a quantized .onnx model")
    return args.quant_model if args.simulate is None else simulated(args.simulate)


def _size(text: str) -> int:
    try:
        return memory_size(text, "--memory-budget")
    except LayerbisectError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _executor(workers: int) -> ContextManager[Executor | None]:
    if check_workers(workers, "--workers") == 0:
        return nullcontext()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _keep_float(args: argparse.Namespace, inputs: dict | None) -> None:
    """Find the layers to keep in float, say so on stderr, and write what was asked; the
    repaired model only when it repairs (a model that does not is no suggestion)."""
    fallback = keep_in_float(
        args.float_model, args.quant_model, inputs=inputs, threshold=args.threshold,
        shapes=dict(args.shape), seed=args.seed, providers=args.providers, allow_swapped=args.allow_swapped,
    )
    print(fallback, file=sys.stderr)
    if args.keep_float:
        write_text(args.keep_float, fallback.to_json() + "\n", reads=fallback.sources)
    if args.repaired_model and fallback:
        fallback.save_model(args.repaired_model)
    elif args.repaired_model:
        print(f"layerbisect: {args.repaired_model} not written: no set of layers kept in float repairs the model",
              file=sys.stderr)


def _name_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.npy, got {text!r}")
    return name, value


def _shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, value = text.partition("=")
    try:
        dims = tuple(int(d) for d in value.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if not name or not dims:
        raise argparse.ArgumentTypeError(f"expected NAME=D0,D1,... with integers, got {text!r}")
    return name, dims


def _read_inputs(npz: str | None, singles: list[tuple[str, str]]) -> dict | None:
    if npz is None and not singles:
        return None
    feeds: dict[str, np.ndarray] = {}
    if npz is not None:
        archive = _load(npz, "--inputs", "an .npz archive")
        if isinstance(archive, np.ndarray):
            raise LayerbisectError(
                f"--inputs {npz} holds a single array, not an .npz archive; use --input NAME={npz}"
            )
        feeds.update(archive)
    for name, path in singles:
        array = _load(path, f"--input {name}", "an .npy array")
        if not isinstance(array, np.ndarray):
            raise LayerbisectError(f"--input {name}={path} is an .npz archive, not one .npy array")
        feeds[name] = array
    return feeds


def _load(path: str, flag: str, kind: str) -> np.ndarray | dict[str, np.ndarray]:
    """The array, or the arrays of an archive, in a feeds file; or an error naming the flag
    and what is wrong."""
    if Path(path).is_dir():
        raise LayerbisectError(f"{flag}: {path} is a folder, not {kind}")
    if not Path(path).is_file():
        raise LayerbisectError(f"{flag}: file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:  # an archive's arrays are read when asked for: read them here
            return {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        # numpy takes any file it does not know for a pickle and advises allowing pickles
        text = str(exc)
        reason = ("it holds Python objects" if "Object arrays" in text else
                  "it is neither an .npy nor an .npz file" if "pickle" in text else first_line(exc))
        raise LayerbisectError(
            f"{flag}: {path} is not {kind} (numpy could not read it: {reason}); save it with "
            f"{'numpy.savez' if kind.endswith('archive') else 'numpy.save'}"
        ) from None


if __name__ == "__main__":
    sys.exit(main())
