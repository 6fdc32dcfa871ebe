"""find_first_bad_layer: load -> align -> expose -> run -> compare -> search -> report.

The public function: it checks its arguments, sends a tensor source to ``layerbisect.source``,
and otherwise strings the steps together: ``pipeline.setup`` (load, inputs, align),
``footprint`` (the memory plan), ``passes`` (the search), ``assemble`` (the report)."""

from __future__ import annotations

import itertools
import logging
import operator
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import replace

from layerbisect import assemble
from layerbisect.cost import cheapest, estimates
from layerbisect.errors import NO_SAMPLES, LayerbisectError, SampleError
from layerbisect.files import sources
from layerbisect.footprint import DEFAULT_BUDGET_CAP, Footprint, feeders, pieces, value_bytes
from layerbisect.fusion import changed, counterparts, fusion_note
from layerbisect.inputs import Sample, plan_inputs, reusable, samples_of
from layerbisect.kernels import saturation_note
from layerbisect.load import ModelLike, declared_inputs, subgraph_notes
from layerbisect.measure import available_memory
from layerbisect.options import DEFAULT_PROVIDERS, check_past_length, check_strategy, check_threshold, memory_size
from layerbisect.passes import Passes, bisect, scan
from layerbisect.pipeline import setup
from layerbisect.progress import steps
from layerbisect.report import Report
from layerbisect.run import skipped_providers_note, usable_providers
from layerbisect.search import bisect_calls
from layerbisect.segment import Segments
from layerbisect.simulate import Simulated, Simulation
from layerbisect.source import compare_source, tensor_source

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
    sizes, quant_sizes = value_bytes(float_proto, float_graph.types, pairs, input_shapes)
    fed = feeders(float_proto, pairs) if isolated else [() for _ in pairs]
    groups, last_pass = pieces(Footprint(sizes, quant_sizes, fed, isolated), len(pairs), budget, single)
    # auto scans when everything fits one pass (every layer for a run of each model), else
    # takes the strategy of least estimated cost (layerbisect.cost)
    if strategy == "auto":
        costs = estimates(sizes, quant_sizes, groups, isolated=isolated, last_pass=last_pass, samples=count or 1)
        strategy = "scan" if len(groups) == 1 else cheapest(costs)
        log.info("estimated: %s", ", ".join(f"{name} {cost.seconds:.2f} s" for name, cost in costs.items()))
    if strategy == "bisect" or len(groups) > 1:
        samples = reusable(samples)  # several passes over the samples
    log.info("strategy %s: %s", strategy, "one pass per probe" if strategy == "bisect" else
             f"{len(groups)} pass(es) over the samples")
    passes = Passes(
        pairs, (Segments(float_proto, float_graph.types), Segments(quant_proto, quant_types)), fed, plan, samples,
        1 if single else count,
        seed=seed, providers=providers, executor=executor, quiet=quiet, save_limit=budget / 4,
    )
    # one sample: a bar over the passes (several samples have theirs over the samples, each pass)
    if strategy in ("scan", "prefix"):
        with steps(len(groups), "pass", quiet=quiet or not single) as passes.bar:
            scan(passes, groups, isolated, threshold if strategy == "prefix" else None)
    else:
        # bisection's passes, at most: its probes (about log2 of the pairs), then, for the
        # culprit, the pieces up to the first bad layer
        passes.at_most = bisect_calls(len(pairs), last_pass, probes=1) + (len(groups) if isolated else 0)
        with steps(passes.at_most, "pass", quiet=quiet or not single,
                   desc=f"bisect (at most {passes.at_most} passes)") as passes.bar:
            bisect(passes, threshold, last_pass, groups if isolated else None)
    records = assemble.layers(pairs, passes.measured)
    first_bad = assemble.first_bad(records, threshold)
    cause = assemble.cause(records, first_bad, threshold)
    notes = [*provider_notes, *load_notes, *plan.notes, *(plan.generated_notes if inputs is None else ()),
             *subgraph_notes(float_proto, "float model"),
             *subgraph_notes(quant_proto, "quantized model")]
    if given is not None:  # onnxruntime's optimized graph: the layers it computes otherwise
        notes.append(_fusions(float_graph, given, quant_proto, pairs, first_quant_feeds, groups, passes,
                              seed=seed, providers=providers, budget=budget))
    if isinstance(quantized, Simulation):
        notes += quantized.notes([first_bad, cause.culprit])
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
        cause=cause,
        notes=notes, problems=[why for totals in passes.totals for why in totals.problems.values()],
        generated=inputs is None, sources=sources(float_model, quantized, float_proto, quant_proto),
    )


def _fusions(float_graph, given, optimized, pairs, feeds, groups, passes: Passes, *, seed, providers, budget) -> str:
    """The note on the layers onnxruntime's ``optimized`` graph computes otherwise than the
    quantized model ``given`` (``layerbisect.fusion``): both run on the first sample's quantized
    ``feeds``, in the scan's pieces (``groups``); their runs count in ``passes``' totals."""
    found = counterparts(float_graph, given, pairs)
    position = {index: k for k, index in enumerate(found.indices)}
    pieces = [[position[i] for i in group if i in position] for group in groups]
    plan = plan_inputs(declared_inputs(given), declared_inputs(optimized))
    both = Passes(found.pairs, (Segments(given), Segments(optimized)), [() for _ in found.pairs], plan, [feeds], 1,
                   seed=seed, providers=providers, executor=None, quiet=True, save_limit=budget / 4)
    scan(both, [piece for piece in pieces if piece], False, alone=False)
    passes.totals += both.totals
    layers = [both.layer(k) if assemble.comparable(*both.measured[k]) else None for k in range(len(found.pairs))]
    return fusion_note(changed(found, pairs, layers), found)


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


