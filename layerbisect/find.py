"""find_first_bad_layer: load -> align -> expose -> run -> compare -> search -> report."""

from __future__ import annotations

import itertools
import logging
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper

from layerbisect import assemble
from layerbisect.align import Alignment, Pair, align
from layerbisect.cost import cheapest, estimates
from layerbisect.decoder import vocabularies
from layerbisect.errors import NO_SAMPLES, LayerbisectError, SampleError
from layerbisect.files import sources
from layerbisect.fusion import changed, counterparts, fusion_note
from layerbisect.graph import OpGraph, build_graph, inferred_types
from layerbisect.inputs import InputPlan, Sample, plan_inputs, reusable, samples_of
from layerbisect.kernels import saturation_note
from layerbisect.load import ModelLike, declared_inputs, load_model, subgraph_notes
from layerbisect.measure import Saved, Totals, available_memory, measure, prepare
from layerbisect.options import DEFAULT_PROVIDERS, check_past_length, check_strategy, check_threshold, memory_size
from layerbisect.progress import Steps, progress, steps
from layerbisect.report import LayerComparison, Report
from layerbisect.run import lower_ir_version, skipped_providers_note, usable_providers
from layerbisect.run import ort_optimized as ort_optimized_model
from layerbisect.search import bisect_calls, bisect_first_failing
from layerbisect.segment import Segments
from layerbisect.simulate import Simulated, Simulation
from layerbisect.source import compare_source, tensor_source
from layerbisect.summary import quantization

UNKNOWN_TENSOR_BYTES = 1 << 20  # assumed size of a value whose shape is unknown
DEFAULT_BUDGET_CAP = 1 << 30  # beyond this, holding more activations only costs memory
# A scan of one sample measures at most this many bytes of values a pass, whatever the budget:
# the next pass reuses the memory the last one freed, where larger pieces fault in fresh pages.
# PP-OCRv4 det (medians of 5): at 640x640, pieces of 128 MiB took 1.19 s and peaked at 256 MB,
# pieces of 512 MiB 1.45 s and 548 MB; at 320x320, 0.57 s and 246 MB against one pass's 0.59 s
# and 343 MB. With several samples a pass reuses its memory from one sample to the next, and
# more passes only cost more (32 samples at 640x640: 34.9 s against 32.1 s, 1139 MB against 968).
SCAN_PIECE = 1 << 27
# Bisection probes one layer per pass, each pass a short segment resumed from the values saved
# after the last layer known to pass; once this few layers remain, one pass measures them all.
LAST_PASS_LAYERS = 8
# ops that move or re-encode values without computing: a model of only these has no layers
PLUMBING = {"Identity", "Transpose", "Reshape", "QuantizeLinear", "DequantizeLinear", "Cast"}
# Below this share of the float model's weighted layers paired one for one, the two models are
# two networks. Every rewrite measured pairs all of them: QDQ, QOperator and dynamic
# quantization, per tensor and per channel, int4 weights, BatchNorm folding, MatMul + Add into
# Gemm, fp16 (the test CNN 4 of 4, transformer 6 of 6; MiniLM 18 of 18, also as onnxruntime
# optimizes it; PP-OCRv4 det 64 of 64, PP-OCR cls 54 of 54, silero-vad 6 of 6). onnxruntime's
# Attention fusion computes Q, K and V in one operation: 3 of a transformer block's 6, half.
# A CNN against an MLP with the same inputs and outputs pairs 0 of 4.
MIN_WEIGHTED_PAIRED = 0.5
# alignment's steps on a progress bar: the float graph built, the quantized one, their layers paired
ALIGN_STEPS = 3

# progress milestones (models loaded, layers aligned, each pass), on the "layerbisect" logger;
# the CLI shows them with -v
log = logging.getLogger(__name__)


def find_first_bad_layer(
    float_model: ModelLike,
    quant_model: ModelLike,
    inputs: Sample | Iterable[Sample] | None = None,
    threshold: float = 0.98,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    past_length: int | None = None,
    seed: int = 0,
    providers: str | Sequence[str] = DEFAULT_PROVIDERS,
    ort_optimized: bool = False,
    allow_swapped: bool = False,
    quant_graph: ModelLike | None = None,
    strategy: str = "auto",
    memory_budget: int | str | None = None,
    isolated: bool = True,
    executor: Executor | None = None,
    quiet: bool = False,
) -> Report:
    """Compare the aligned layers of two models and find the first below ``threshold``.

    ``float_model`` and ``quant_model`` are paths or ``onnx.ModelProto`` (never modified);
    ``quant_model`` may be ``layerbisect.simulated("ap_fixed<16,8>")``: the float model with
    every activation in that format (the report's notes say why the first bad layer breaks),
    or a tensor source (``layerbisect.source``): a folder of dumped tensors or a function of the
    feeds returning named tensors, compared for cumulative error only.
    ``inputs`` is one sample (a dict of input name -> array), several (a list or any iterable
    of such dicts), or None for one seeded random sample; ``shapes`` gives the full shape of
    inputs with dynamic dimensions when inputs are random; a language model's random inputs
    agree with one another (token ids below the vocabulary, an attention mask of ones, position
    ids after the past, past keys and values of ``past_length`` positions, 8 by default for a
    KV-cache decoder, 0 for none: docs/api.md#language-models). A layer's cosine is its mean over
    samples. ``ort_optimized=True`` compares the graph onnxruntime actually runs for the
    quantized model (after its fusions), to find errors that appear only after fusion. A float
    model that holds quantization while the quantized one does not is refused as swapped,
    unless ``allow_swapped=True``. With a tensor source, ``quant_graph`` is the graph its
    tensors come from (the vendor's compiled or optimized ONNX, whose tensor names a dump
    uses): its tensors then pair by structure, as a quantized model's values do.
    ``providers`` are onnxruntime's execution providers in order of preference (a plain
    string is one): those this onnxruntime lacks are skipped, with a note in the report; none
    left is an error.

    ``strategy="scan"`` measures every aligned layer, in pieces that fit ``memory_budget``
    (activations held at once, in bytes or as "2G", "500M"; default: half the memory available
    now, at most 1 GiB; a piece holds one layer and the values feeding it at least, and for one
    sample at most 128 MiB of values, the fastest size measured), each resuming from values
    the last one saved; ``"prefix"`` measures the same pieces in order and stops after the first
    piece holding a bad layer: the scan's first bad layer and culprit, for the layers up to it;
    ``"bisect"`` finds a bad layer with a probe per pass (cumulative error only, so each model
    runs about once over the probes), then, with ``isolated``, measures the layers up to it as
    ``"prefix"`` does: the scan's answer wherever a probe fails (a layer below the threshold
    followed by layers above it, up to every probe, can go unseen); ``"auto"`` scans when
    everything fits one pass, else takes the one of least estimated cost
    (``layerbisect.cost``: passes, and bytes run and compared, from the shapes).
    ``isolated=True`` also measures each layer fed the float model's own inputs, to tell
    where error is introduced from where it is inherited. ``executor`` (any
    ``concurrent.futures.Executor``) spreads samples over its workers. Progress bars (loading,
    alignment, the passes, the samples of each pass) show on long runs when tqdm is installed,
    unless ``quiet`` (docs/api.md#progress).

    >>> from layerbisect import demo  # a float CNN and its int8 copy, conv2 broken
    >>> report = find_first_bad_layer(*demo.files(), inputs=demo.image())
    >>> report.first_bad.float_nodes, report.first_bad_cause
    (('conv2',), 'introduced')
    """
    check_threshold(threshold)
    past_length = check_past_length(past_length)
    if past_length is not None and inputs is not None:
        raise LayerbisectError("past_length sizes generated inputs; the inputs given hold their own past: leave it out")
    strategy = check_strategy(strategy)
    memory_budget = None if memory_budget is None else memory_size(memory_budget)
    providers, missing = usable_providers(providers)
    provider_notes = [skipped_providers_note(providers, missing)] if missing else []
    samples = samples_of(inputs)
    source = tensor_source(quant_model)
    if ort_optimized and (source is not None or isinstance(quant_model, Simulated)):
        raise LayerbisectError("ort_optimized applies to a quantized model, not to a simulated format or tensor source")
    if source is not None:
        ignored = [name for name, value in [("strategy", strategy != "auto"), ("memory_budget", memory_budget),
                                            ("executor", executor), ("isolated", not isolated)] if value]
        if ignored:
            raise LayerbisectError(
                f"{', '.join(ignored)} cannot apply to a tensor source: its tensors are dumped, not "
                "computed here, and are compared as they come (cumulative error only); leave it out"
            )
        report = compare_source(float_model, source, samples, threshold, shapes=shapes, seed=seed,
                                providers=providers, quiet=quiet, quant_graph=quant_graph, past_length=past_length)
        return replace(report, notes=(*provider_notes, *report.notes))
    if quant_graph is not None:
        raise LayerbisectError(
            "quant_graph names the graph a tensor source's tensors come from; with a quantized "
            "model, leave it out (the model is its own graph)"
        )
    quantized: ModelLike | Simulation = quant_model
    if isinstance(quant_model, Simulated):
        samples = reusable(samples)  # the ranges are observed over them, then they are compared
        quantized = quant_model.build(float_model, samples, shapes=shapes, seed=seed, providers=providers)
    float_proto, quant_proto, plan, float_graph, alignment, load_notes, given, quant_types = setup(
        float_model, quantized, shapes=shapes, providers=providers, ort_optimized=ort_optimized,
        allow_swapped=allow_swapped, quiet=quiet, past_length=past_length,
    )
    pairs = alignment.pairs
    budget = memory_budget if memory_budget is not None else min(available_memory() // 2, DEFAULT_BUDGET_CAP)
    count = operator.length_hint(samples) or None  # a list's length, a loader's hint, None for a generator
    first, single, samples = _peek(samples)
    try:
        first_feeds = plan.feeds(first, seed)
    except LayerbisectError as exc:
        raise exc if single else SampleError(0, str(exc)) from None
    input_shapes = {name: array.shape for name, array in first_feeds[0].items()}
    # samples stream: only a pass holds them, a few at a time (and, with ort_optimized, the
    # first one's quantized feeds, for the optimized graph's check)
    first_quant_feeds = first_feeds[1] if given is not None else None
    del first_feeds
    del first
    sizes, quant_sizes = _value_bytes(float_proto, float_graph.types, pairs, input_shapes)
    feeders = _feeders(float_proto, pairs) if isolated else [() for _ in pairs]
    footprint = _Footprint(sizes, quant_sizes, feeders, isolated)
    everything = list(range(len(pairs)))
    # A scan runs in one pass when everything fits (a piece, for one sample); else half the
    # budget (at most a piece, for one sample) holds the values a pass measures, a quarter each
    # the values it resumes from and those it saves for the next (saved values past that are
    # dropped: the next pass then starts from the inputs). auto scans when everything fits one
    # pass, else takes the strategy of least estimated cost (layerbisect.cost)
    held = footprint.of(everything)
    piece = SCAN_PIECE if single else math.inf
    groups = [everything] if held <= min(budget, piece) else footprint.groups(min(budget / 2, piece))
    largest = max(footprint.of([i]) for i in everything)
    last_pass = max(1, min(LAST_PASS_LAYERS, int(budget / 2 // largest)))
    if strategy == "auto":  # one pass holding everything: every layer for a run of each model
        costs = estimates(sizes, quant_sizes, groups, isolated=isolated, last_pass=last_pass, samples=count or 1)
        strategy = "scan" if len(groups) == 1 else cheapest(costs)
        log.info("estimated: %s", ", ".join(f"{name} {cost.seconds:.2f} s" for name, cost in costs.items()))
    if strategy == "bisect" or len(groups) > 1:
        samples = reusable(samples)  # several passes over the samples
    log.info("strategy %s: %s", strategy, "one pass per probe" if strategy == "bisect" else
             f"{len(groups)} pass(es) over the samples")
    passes = _Passes(
        pairs, (Segments(float_proto, float_graph.types), Segments(quant_proto, quant_types)), feeders, plan, samples,
        1 if single else count,
        seed=seed, providers=providers, executor=executor, quiet=quiet, save_limit=budget / 4,
    )
    # one sample: a bar over the passes (several samples have theirs over the samples, each pass)
    if strategy in ("scan", "prefix"):
        with steps(len(groups), "pass", quiet=quiet or not single) as passes.bar:
            _scan(passes, groups, isolated, threshold if strategy == "prefix" else None)
    else:
        # bisection's passes, at most: its probes (about log2 of the pairs), then, for the
        # culprit, the pieces up to the first bad layer
        passes.at_most = bisect_calls(len(pairs), last_pass, probes=1) + (len(groups) if isolated else 0)
        with steps(passes.at_most, "pass", quiet=quiet or not single,
                   desc=f"bisect (at most {passes.at_most} passes)") as passes.bar:
            _bisect(passes, threshold, last_pass, groups if isolated else None)
    records = assemble.layers(pairs, passes.measured)
    first_bad = assemble.first_bad(records, threshold)
    culprit = _culprit(records, first_bad, threshold)
    cause = _cause(first_bad, culprit, threshold)
    notes = [*provider_notes, *load_notes, *plan.notes, *(plan.generated_notes if inputs is None else ()),
             *subgraph_notes(float_proto, "float model"),
             *subgraph_notes(quant_proto, "quantized model")]
    if given is not None:  # onnxruntime's optimized graph: the layers it computes otherwise
        notes.append(_fusions(float_graph, given, quant_proto, pairs, first_quant_feeds, groups, passes,
                              seed=seed, providers=providers, budget=budget))
    if isinstance(quantized, Simulation):
        notes += quantized.notes([first_bad, culprit])
    else:
        notes += filter(None, [saturation_note(quant_proto, providers, first_bad.quant_nodes if first_bad else ())])
    return assemble.build_report(
        records, threshold,
        float_side=assemble.Side(float_proto, assemble.label(float_model)),
        quant_side=assemble.Side(quant_proto, assemble.label(quantized)),
        float_graph=float_graph, alignment=alignment,
        run=assemble.Run(samples=passes.totals[0].samples, executions=sum(t.executions for t in passes.totals),
                         peak_bytes=max(t.peak_bytes for t in passes.totals), providers=tuple(providers), seed=seed,
                         strategy=strategy, ort_optimized=ort_optimized),
        cause=assemble.Cause(culprit, cause,
                             _contributors(records, first_bad, culprit) if cause == "accumulated" else ()),
        notes=notes, problems=[why for totals in passes.totals for why in totals.problems.values()],
        generated=inputs is None, sources=sources(float_model, quantized, float_proto, quant_proto),
    )


class _Passes:
    """Runs the passes of one search over the samples and keeps what each measured: for each
    pair measured, the totals of its pass and its position there."""

    def __init__(
        self, pairs: Sequence[Pair], segments: tuple[Segments, Segments], feeders: Sequence[Sequence[int]],
        plan: InputPlan, samples: Iterable, count: int | None, *, seed: int, providers: Sequence[str],
        executor: Executor | None, quiet: bool, save_limit: float,
    ) -> None:
        """``count`` is the number of samples, None when not known before they are read."""
        self.pairs, self.segments, self.feeders, self.plan, self.samples = pairs, segments, feeders, plan, samples
        self.count = count
        self.seed, self.providers, self.executor, self.quiet = seed, providers, executor, quiet
        self.save_limit = save_limit
        self.measured: dict[int, tuple[Totals, int]] = {}
        self.totals: list[Totals] = []
        self.bar = Steps(None)  # advanced after each pass
        self.at_most: int | None = None  # bisection's bound on the number of passes

    def run(
        self, indices: Sequence[int], isolated: bool, start: Saved | None, save_after: int | None = None,
        of: int | None = None,
    ) -> Saved | None:
        """Measure the pairs ``indices`` (isolated error too if ``isolated``), resuming from the
        values ``start`` holds; return the values saved for a pass that resumes after pair
        ``save_after``, if given and they fit. ``of`` is the number of passes, when known."""
        number = len(self.totals) + 1
        planned = f" of {of}" if of is not None else f" of at most {self.at_most}" if self.at_most else ""
        log.info("pass %d%s: %d layer(s), #%d to #%d%s", number, planned, len(indices),
                 indices[0], indices[-1], ", with isolated error" if isolated else "")
        pairs = self.pairs
        saves: tuple[Sequence[str], Sequence[str]] = ((), ())
        if save_after is not None:
            done, later = pairs[: save_after + 1], pairs[save_after + 1:]
            float_segments, quant_segments = self.segments
            saves = (
                float_segments.boundary([p.float_tensor for p in done], [p.float_tensor for p in later]),
                quant_segments.boundary([p.quant_tensor for p in done], [p.quant_tensor for p in later]),
            )
        boundaries = sorted({b for i in indices for b in self.feeders[i]})
        # a cut feeds the readers of its float value only: a measured layer that reads the same
        # quantized tensor for another float value (a Relu the quantizer dropped though its
        # input had another reader) keeps reading the quantized model's own
        others = {pairs[b].float_tensor: frozenset(name for i in indices if b not in self.feeders[i]
                                                   for name in pairs[i].quant_nodes) for b in boundaries}
        measurement = prepare(
            *self.segments, [pairs[i] for i in indices],
            [pairs[b] for b in boundaries] if isolated else None,
            self.plan, seed=self.seed, providers=self.providers, start=start, saves=saves, unfed=others,
        )
        label = f"pass {number}{planned}" if planned and of != 1 else None  # of several: on the samples' bar
        totals, saved = measure(
            measurement, progress(self.samples, self.quiet, self.count, desc=label), self.executor, start,
            save_limit=self.save_limit,
        )
        self.bar.advance()
        self.totals.append(totals)
        log.info("pass %d done: %d sample(s), %d model runs", number, totals.samples, totals.executions)
        for position, index in enumerate(indices):
            self.measured[index] = (totals, position)
        return saved

    def layer(self, index: int) -> LayerComparison:
        return assemble.layer(self.pairs[index], index, *self.measured[index])

    def passes(self, index: int, threshold: float) -> bool:
        """Whether a measured pair passes; one that cannot be compared (not float, shapes
        differ) counts as passing."""
        return not assemble.comparable(*self.measured[index]) or self.layer(index).passes(threshold)


def _scan(
    passes: _Passes, groups: Sequence[Sequence[int]], isolated: bool, threshold: float | None = None,
    alone: bool = True,
) -> None:
    """Measure every group in order, each pass resuming where the previous one stopped; with a
    ``threshold``, stop after the first group holding a pair below it (every pair up to the
    first bad one is measured: the scan's first bad layer and culprit). ``alone``: these are
    all the search's passes (their number is shown as the plan)."""
    start = None
    for number, group in enumerate(groups):
        last = number == len(groups) - 1
        start = passes.run(group, isolated, start, None if last else group[-1], of=len(groups) if alone else None)
        if threshold is not None and not all(passes.passes(i, threshold) for i in group):
            return


def _bisect(passes: _Passes, threshold: float, last_pass: int, pieces: Sequence[Sequence[int]] | None) -> None:
    """Find the first failing pair with one probe per pass, each pass resuming after the last
    probe known to pass, measuring cumulative error only; once at most ``last_pass`` pairs
    remain, one pass measures them all. With ``pieces`` (the scan's groups: isolated error
    wanted), the culprit rule needs every pair up to the first failing one: once a probe has
    failed, the pairs up to it are measured in order, in those pieces, with isolated error,
    stopping after the first piece holding a failing pair (``strategy="prefix"``), instead of
    the last pass. The first bad layer, culprit and cause are then the scan's."""
    failing: list[int] = []
    resume: Saved | None = None  # the values saved after the last probe known to pass

    def check(indices: Sequence[int], final: bool) -> dict[int, bool]:
        nonlocal resume
        if final and pieces is not None and failing:
            return {}  # the prefix measures these
        if not final:  # one probe: the segment up to it, saving where the next pass resumes
            probe = indices[-1]
            saved = passes.run([probe], False, resume, probe)
            ok = passes.passes(probe, threshold)
            resume = saved if ok else resume
            failing.extend([] if ok else [probe])
            return {probe: ok}
        passes.run(indices, False, resume)
        results = {i: passes.passes(i, threshold) for i in indices}
        failing.extend(sorted(i for i, ok in results.items() if not ok)[:1])
        return results

    bisect_first_failing(check, len(passes.pairs), last_pass, probes=1)
    if pieces is not None and failing:
        end = min(failing)
        _scan(passes, [[i for i in piece if i <= end] for piece in pieces if piece[0] <= end], True, threshold,
              alone=False)


def _fusions(float_graph, given, optimized, pairs, feeds, groups, passes: _Passes, *, seed, providers, budget) -> str:
    """The note on the layers onnxruntime's ``optimized`` graph computes otherwise than the
    quantized model ``given`` (``layerbisect.fusion``): both run on the first sample's quantized
    ``feeds``, in the scan's pieces (``groups``); their runs count in ``passes``' totals."""
    found = counterparts(float_graph, given, pairs)
    position = {index: k for k, index in enumerate(found.indices)}
    pieces = [[position[i] for i in group if i in position] for group in groups]
    plan = plan_inputs(declared_inputs(given), declared_inputs(optimized))
    both = _Passes(found.pairs, (Segments(given), Segments(optimized)), [() for _ in found.pairs], plan, [feeds], 1,
                   seed=seed, providers=providers, executor=None, quiet=True, save_limit=budget / 4)
    _scan(both, [piece for piece in pieces if piece], False, alone=False)
    passes.totals += both.totals
    layers = [both.layer(k) if assemble.comparable(*both.measured[k]) else None for k in range(len(found.pairs))]
    return fusion_note(changed(found, pairs, layers), found)


class Setup(NamedTuple):
    """Both models loaded, their inputs planned, and their values aligned."""

    float_model: onnx.ModelProto
    quant_model: onnx.ModelProto
    inputs: InputPlan
    float_graph: OpGraph
    alignment: Alignment
    notes: tuple[str, ...]
    given: onnx.ModelProto | None = None  # with ort_optimized: the quantized model as given
    quant_types: Mapping[str, onnx.TypeProto] | None = None  # the quantized graph's (none simulated)


def setup(
    float_model: ModelLike,
    quant_model: ModelLike | Simulation,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    ort_optimized: bool = False,
    allow_swapped: bool = False,
    quiet: bool = False,
    past_length: int | None = None,
) -> Setup:
    """Load both models, plan their inputs and align their values (the static part), with a
    bar over each of the two on long runs, unless ``quiet``.

    Refuses two models that do not compute the same network: fewer than half of the float
    model's weighted layers pair one for one (``MIN_WEIGHTED_PAIRED``); and, unless
    ``allow_swapped``, a float model that holds quantization while the quantized one does not."""
    simulation = quant_model if isinstance(quant_model, Simulation) else None
    with steps(2 + ort_optimized, "model", quiet=quiet, desc="loading the float model") as bar:
        float_proto = load_model(float_model, role="float model")
        bar.advance("loading the quantized model")
        quant_proto = load_model(quant_model.model if isinstance(quant_model, Simulation) else quant_model,
                                 role="quantized model")
        bar.advance("optimizing the quantized model" if ort_optimized else None)
        log.info("loaded the float model (%d nodes) and the quantized model (%d nodes)",
                 len(float_proto.graph.node), len(quant_proto.graph.node))
        if not allow_swapped:
            _check_direction(float_proto, quant_proto)
        notes = (*lower_ir_version(float_proto, "float model"), *lower_ir_version(quant_proto, "quantized model"))
        given = None
        if ort_optimized:
            given = quant_proto
            quant_proto = load_model(ort_optimized_model(quant_proto, "quantized model", providers),
                                     role="quantized model")
            bar.advance()
    plan = plan_inputs(declared_inputs(float_proto), declared_inputs(quant_proto), shapes, past_length=past_length,
                       vocabulary={**vocabularies(quant_proto), **vocabularies(float_proto)})
    with steps(ALIGN_STEPS, "step", quiet=quiet, desc="aligning: the float graph") as bar:
        float_graph = build_graph(float_proto)
        bar.advance("aligning: the quantized graph")
        if simulation is not None:  # the float graph, simulated: no graph of its own
            bar.advance("aligning: pairing layers")
            alignment = simulation.alignment(float_graph)
        else:
            quant_graph = build_graph(quant_proto)
            bar.advance("aligning: pairing layers")
            alignment = align(float_graph, quant_graph)
        bar.advance()
    log.info("aligned %d of %d float operations (%d layers); %d of %d weighted layers paired",
             alignment.float_ops - len(alignment.unaligned), alignment.float_ops, len(alignment.pairs),
             alignment.weighted_paired, alignment.weighted)
    computing = [n for n in quant_proto.graph.node if n.op_type not in PLUMBING]
    if not alignment.pairs and not computing:
        raise LayerbisectError(
            "no layer of the float model could be paired with the quantized model: the quantized "
            "model computes nothing (it holds only Identity, Transpose or quantization nodes; an "
            "optimizer may have removed every layer)"
        )
    if alignment.weighted_paired < MIN_WEIGHTED_PAIRED * alignment.weighted:
        raise LayerbisectError(
            f"the two models do not compute the same network: {alignment.weighted_paired} of "
            f"{alignment.weighted} weighted layers pair (Conv, ConvTranspose, MatMul, Gemm with a "
            "constant weight; quantization, BatchNorm folding and fusions keep every one), the first "
            f"without a counterpart is {alignment.first_unpaired!r}: check that the quantized model was "
            "made from this float model (the same architecture and export), and that both take the "
            "same inputs"
        )
    if not alignment.pairs:
        raise LayerbisectError(
            "no layer of the float model could be paired with the quantized model: do the two "
            "models compute the same network, from the same inputs?"
        )
    return Setup(float_proto, quant_proto, plan, float_graph, alignment, notes, given,
                 None if simulation is not None else quant_graph.types)


def _check_direction(float_proto: onnx.ModelProto, quant_proto: onnx.ModelProto) -> None:
    """Refuse models given the wrong way round: the float one quantized, the quantized one not."""
    held = quantization(float_proto)
    if held and not quantization(quant_proto):
        raise LayerbisectError(
            f"the float model holds quantization ({held}) and the quantized model does not: the two "
            "look swapped; give the float model first, or, to compare them this way on purpose, pass "
            "allow_swapped=True (CLI: --allow-swapped)"
        )


def _cause(first_bad: LayerComparison | None, culprit: LayerComparison | None, threshold: float) -> str | None:
    """How the first bad layer came to fail (see docs/concepts.md): "introduced" there, when its
    own (isolated) cosine is below the threshold; "inherited" from the culprit, an earlier layer
    whose own cosine is; "accumulated" when no layer up to it is below the threshold on its own.
    None when isolated error was not measured."""
    if first_bad is None or math.isnan(first_bad.isolated_cosine):
        return None
    if not first_bad.isolated_cosine >= threshold:
        return "introduced"
    return "inherited" if culprit is not None else "accumulated"


def _culprit(layers, first_bad, threshold) -> LayerComparison | None:
    """Up to the first bad layer, the earliest judged layer whose isolated cosine is below the
    threshold: where the error starts. None when no layer is bad, or none is on its own."""
    if first_bad is None:
        return None
    return next((layer for layer in _up_to(layers, first_bad) if not layer.isolated_cosine >= threshold), None)


def _contributors(layers, first_bad, culprit, count: int = 3) -> tuple[LayerComparison, ...]:
    """When the error accumulates (a first bad layer, no culprit), the ``count`` layers up to
    the first bad one that add the most error on their own, the most first; only those adding
    at least a tenth of the most (the others are rounding: isolated cosines of 1.0000)."""
    if first_bad is None or culprit is not None:
        return ()
    ranked = sorted(_up_to(layers, first_bad), key=lambda layer: layer.isolated_cosine)[:count]
    most = 1.0 - ranked[0].isolated_cosine if ranked else 0.0
    return tuple(layer for layer in ranked if 1.0 - layer.isolated_cosine >= most / 10 and most > 0)


def _up_to(layers, first_bad) -> list[LayerComparison]:
    """The judged layers up to and including the first bad one whose isolated error is known."""
    return [layer for layer in layers
            if layer.index <= first_bad.index and not math.isnan(layer.isolated_cosine) and layer.judged]


def _feeders(model: onnx.ModelProto, pairs: Sequence[Pair]) -> list[tuple[int, ...]]:
    """For each pair, the earlier pairs whose float values its float operations read."""
    nodes = {node.name: node for node in model.graph.node}
    index_of = {pair.float_tensor: i for i, pair in enumerate(pairs)}
    feeders = []
    for i, pair in enumerate(pairs):
        span = [nodes[name] for name in pair.float_nodes if name in nodes]
        produced = {out for node in span for out in node.output}
        read = {name for node in span for name in node.input} - produced
        feeders.append(tuple(sorted(index_of[t] for t in read if t in index_of and index_of[t] < i)))
    return feeders


def _value_bytes(model: onnx.ModelProto, types: Mapping[str, onnx.TypeProto], pairs: Sequence[Pair],
                 input_shapes: Mapping) -> tuple[list[int], list[int]]:
    """Estimated bytes of each pair's float value and of its quantized value, from shapes
    inferred for these inputs (``types``, inferred for the declared ones, where they are these).
    A quantized value with a scale is read as integers: of its zero point's type, else 8-bit."""
    if any(spec.shape != tuple(input_shapes.get(spec.name, ())) for spec in declared_inputs(model)):
        types = inferred_types(model, input_shapes)
    sizes, quant_sizes = [], []
    for pair in pairs:
        typ = types.get(pair.float_tensor)
        if typ is None or not typ.HasField("tensor_type") or not typ.tensor_type.HasField("shape"):
            elements, itemsize = UNKNOWN_TENSOR_BYTES // 4, 4
        else:
            elem = typ.tensor_type.elem_type
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).itemsize if elem else 4
            elements = math.prod(max(d.dim_value, 1) for d in typ.tensor_type.shape.dim)
        readout = pair.quant_readout
        if readout.scale is not None:
            itemsize_quant = readout.zero_point.dtype.itemsize if readout.zero_point is not None else 1
        else:
            itemsize_quant = itemsize
        sizes.append(elements * itemsize)
        quant_sizes.append(elements * itemsize_quant)
    return sizes, quant_sizes


def _peek(samples: Iterable) -> tuple[object, bool, Iterable]:
    """The first sample, whether it is the only one, and all the samples still to iterate (a
    sequence as it is: it can be read again)."""
    if isinstance(samples, Sequence):
        if not samples:
            raise LayerbisectError(NO_SAMPLES)
        return samples[0], len(samples) == 1, samples
    iterator = iter(samples)
    head = list(itertools.islice(iterator, 2))
    if not head:
        raise LayerbisectError(NO_SAMPLES)
    return head[0], len(head) == 1, itertools.chain(iter(head), iterator)  # head is let go once read


class _Footprint:
    """Estimated bytes a pass holds: the float and quantized values of each pair it measures
    (and its value in the cut model, for isolated error), and for each value fed to the cuts,
    what is fed and, unless a measured pair holds it already, its float value."""

    def __init__(self, sizes: Sequence[int], quant_sizes: Sequence[int], feeders, isolated: bool) -> None:
        self.sizes, self.quant_sizes, self.feeders = sizes, quant_sizes, feeders
        self.copies = 2 if isolated else 1

    def of(self, indices: Sequence[int]) -> int:
        measured = set(indices)
        fed = {f for i in indices for f in self.feeders[i]}
        return sum(self.sizes[i] + self.copies * self.quant_sizes[i] for i in measured) + sum(
            self.quant_sizes[f] + (0 if f in measured else self.sizes[f]) for f in fed
        )

    def groups(self, budget: float) -> list[list[int]]:
        """Consecutive pairs whose values, held together, fit ``budget`` (one pair at least)."""
        groups: list[list[int]] = []
        measured: set[int] = set()
        fed: set[int] = set()
        held = 0
        for index in range(len(self.sizes)):
            cost = self._added(index, measured, fed)
            if not groups or held + cost > budget:
                groups.append([])
                measured, fed = set(), set()
                held, cost = 0, self._added(index, measured, fed)
            groups[-1].append(index)
            measured.add(index)
            fed.update(self.feeders[index])
            held += cost
        return groups

    def _added(self, index: int, measured: set[int], fed: set[int]) -> int:
        """What measuring pair ``index`` adds to a pass that measures ``measured`` and feeds
        ``fed`` (feeders come before the pairs they feed: ``index`` is not fed yet)."""
        new = set(self.feeders[index]) - fed
        return self.sizes[index] + self.copies * self.quant_sizes[index] + sum(
            self.quant_sizes[f] + (0 if f in measured else self.sizes[f]) for f in new
        )
