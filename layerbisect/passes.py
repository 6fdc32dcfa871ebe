"""The passes of a search: each runs both models over the samples once, measuring some pairs.

``Passes`` runs one pass (a segment of each model, resumed from the values the last pass
saved, with the cut model for isolated error) and keeps what each pair measured; ``scan``
measures every piece in order, ``bisect`` probes one pair a pass (``layerbisect.search``'s
bisection), then measures the pieces up to the first failing probe as ``scan`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor

from layerbisect import assemble
from layerbisect.align import Pair
from layerbisect.inputs import InputPlan
from layerbisect.measure import Saved, Totals, measure, prepare
from layerbisect.progress import Steps, progress
from layerbisect.report import LayerComparison
from layerbisect.search import bisect_first_failing
from layerbisect.segment import Segments

# each pass, on the "layerbisect" logger; the CLI shows it with -v
log = logging.getLogger(__name__)


class Passes:
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


def scan(
    passes: Passes, groups: Sequence[Sequence[int]], isolated: bool, threshold: float | None = None,
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


def bisect(passes: Passes, threshold: float, last_pass: int, pieces: Sequence[Sequence[int]] | None) -> None:
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
        scan(passes, [[i for i in piece if i <= end] for piece in pieces if piece[0] <= end], True, threshold,
              alone=False)
