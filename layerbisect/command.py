"""Running the ``layerbisect`` command, once ``layerbisect.cli`` has parsed its arguments.

The report goes to stdout, or to stderr when ``--json -`` or ``--html -`` puts that file on
stdout; errors, warnings, the log (``-v``), the keep-in-float summary and a ``wrote PATH``
line per file written go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import ContextManager

from layerbisect.datasets import Dataset, read_samples
from layerbisect.diagnosis import diagnose
from layerbisect.errors import LayerbisectError, SampleError
from layerbisect.explorer import FILES as EXPLORER_FILES
from layerbisect.fallback import keep_in_float
from layerbisect.files import check_outputs, write_text
from layerbisect.find import find_first_bad_layer
from layerbisect.options import check_workers
from layerbisect.render import echo
from layerbisect.report import Report
from layerbisect.run import skipped_providers_note, usable_providers
from layerbisect.simulate import simulated

STDOUT = "-"
LOG_LEVELS = (logging.WARNING, logging.INFO, logging.DEBUG)  # no -v, -v, -vv


def run(args: argparse.Namespace) -> int:
    """Compare the models ``args`` name, print and write the report; return the exit status.
    The package's log goes to stderr at the level ``-v``/``-q`` set, for this run."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("layerbisect: %(message)s"))
    logger = logging.getLogger("layerbisect")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR if args.quiet else LOG_LEVELS[min(args.verbose, len(LOG_LEVELS) - 1)])
    try:
        return _run(args)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _run(args: argparse.Namespace) -> int:
    inputs = None
    try:
        _check_outputs(args)
        kept, missing = usable_providers(args.providers)
        if missing:  # said now, before the run, and in the report's notes
            _warn(skipped_providers_note(kept, missing))
        inputs = read_samples(args)
        quant_model = _quantized_side(args)
        with _executor(args.workers) as executor:
            report = find_first_bad_layer(
                args.float_model,
                quant_model,
                inputs=inputs,
                threshold=args.threshold,
                shapes=dict(args.shape),
                past_length=args.past_length,
                seed=args.seed,
                providers=args.providers,
                ort_optimized=args.ort_optimized,
                allow_swapped=args.allow_swapped,
                quant_graph=args.quant_graph,
                quiet=args.quiet,
                strategy=args.strategy,
                memory_budget=args.memory_budget,
                isolated=not args.no_isolated,
                executor=executor,
            )
        if args.diagnose:
            report = diagnose(args.float_model, quant_model, inputs, args.threshold, report=report,
                              shapes=dict(args.shape), seed=args.seed, providers=args.providers,
                              allow_swapped=args.allow_swapped)
        if args.json not in (None, STDOUT):
            write_text(args.json, report.to_json() + "\n", reads=report.sources)
            _wrote(args, args.json)
        if args.html not in (None, STDOUT):
            report.save_html(args.html)
            _wrote(args, args.html)
        if args.model_explorer is not None:
            for path in report.to_model_explorer(args.model_explorer):
                _wrote(args, str(path))
    except LayerbisectError as exc:
        return _error(exc, inputs)
    status = 0 if report else 1
    try:
        _print(report, args)
    except BrokenPipeError:  # piped into head: the reader has what it wanted
        sys.stderr.close()
        return status
    if report.coverage < 0.8:
        names = ", ".join(report.unaligned[:5]) + (", ..." if len(report.unaligned) > 5 else "")
        _warn(f"only {report.coverage:.0%} of the float model's operations were aligned; "
              f"{len(report.unaligned)} have no counterpart: {names}")
    if report.weighted_paired < report.weighted:
        _warn(f"only {report.weighted_paired} of the float model's {report.weighted} weighted layers paired "
              "one for one; the others are inside fused regions or unpaired")
    if args.keep_float or args.repaired_model:
        try:
            _keep_float(args, inputs)
        except LayerbisectError as exc:
            return _error(exc, inputs)
    return status


def _print(report: Report, args: argparse.Namespace) -> None:
    """The JSON or HTML asked for on stdout, if any, and the report: on stdout, or on stderr
    when stdout carries that file."""
    if args.json == STDOUT:
        sys.stdout.write(report.to_json() + "\n")
    if args.html == STDOUT:
        sys.stdout.write(report.to_html())
    sys.stdout.flush()
    echo(report, sys.stderr if STDOUT in (args.json, args.html) else sys.stdout, quiet=args.quiet)


def _error(exc: LayerbisectError, inputs: object = None) -> int:
    """Say what is wrong, on one line (naming a dataset's bad sample as the dataset knows it)."""
    if isinstance(exc, SampleError) and isinstance(inputs, Dataset):
        exc = LayerbisectError(f"{inputs.describe(exc.index)}: {exc.reason}")
    print(f"layerbisect: error: {exc}", file=sys.stderr)
    return 2


def _warn(message: str) -> None:
    print(f"layerbisect: warning: {message}", file=sys.stderr)


def _wrote(args: argparse.Namespace, path: str) -> None:
    """Say where a file went, unless ``--quiet``."""
    if not args.quiet:
        print(f"layerbisect: wrote {path}", file=sys.stderr)


def _check_outputs(args: argparse.Namespace) -> None:
    """Before any work: every output file can be written, and none is a file the run reads."""
    outputs = {"--json": args.json, "--html": args.html, "--keep-float": args.keep_float,
               "--repaired-model": args.repaired_model}
    if args.model_explorer is not None:
        if not Path(args.model_explorer).is_dir():
            raise LayerbisectError(f"--model-explorer {args.model_explorer} is not a folder; create it first")
        outputs.update((f"--model-explorer {name}", Path(args.model_explorer) / name) for name in EXPLORER_FILES)
    script = args.data_loader_script[0] if args.data_loader_script else None
    check_outputs({flag: path for flag, path in outputs.items() if path != STDOUT},
                  [args.inputs, script, *(path for _, path in args.input)],
                  models=[args.float_model, args.quant_model, args.quant_graph])


def _quantized_side(args: argparse.Namespace):
    """The quantized model given, or the format to simulate."""
    if (args.simulate is not None or Path(args.quant_model).is_dir()) and (args.keep_float or args.repaired_model):
        raise LayerbisectError("--keep-float and --repaired-model need a quantized .onnx model")
    if (args.simulate is not None or Path(args.quant_model).is_dir()) and args.diagnose:
        raise LayerbisectError("--diagnose needs a quantized .onnx model, not a simulated format or dumps")
    return args.quant_model if args.simulate is None else simulated(args.simulate)


def _executor(workers: int) -> ContextManager[Executor | None]:
    if check_workers(workers, "--workers") == 0:
        return nullcontext()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _keep_float(args: argparse.Namespace, inputs: dict | Dataset | None) -> None:
    """Find the layers to keep in float, say so on stderr, and write what was asked; the
    repaired model only when it repairs (a model that does not is no suggestion)."""
    fallback = keep_in_float(
        args.float_model, args.quant_model, inputs=inputs, threshold=args.threshold,
        shapes=dict(args.shape), past_length=args.past_length, seed=args.seed, providers=args.providers,
        allow_swapped=args.allow_swapped, quiet=args.quiet,
    )
    print(fallback, file=sys.stderr)
    if args.keep_float:
        write_text(args.keep_float, fallback.to_json() + "\n", reads=fallback.sources)
        _wrote(args, args.keep_float)
    if args.repaired_model and fallback:
        fallback.save_model(args.repaired_model)
        _wrote(args, args.repaired_model)
    elif args.repaired_model:
        print(f"layerbisect: {args.repaired_model} not written: no set of layers kept in float repairs the model",
              file=sys.stderr)
