"""The static part of every comparison: both models loaded, their inputs planned, their
values aligned (load -> inputs -> graph -> align), before anything runs.

``setup`` is what ``find_first_bad_layer``, ``keep_in_float`` and ``diagnose`` start from; it
refuses two models that do not compute the same network before any time is spent running them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import onnx

from layerbisect.align import Alignment, align
from layerbisect.decoder import vocabularies
from layerbisect.errors import LayerbisectError
from layerbisect.graph import OpGraph, build_graph
from layerbisect.inputs import InputPlan, plan_inputs
from layerbisect.load import ModelLike, declared_inputs, load_model
from layerbisect.options import DEFAULT_PROVIDERS
from layerbisect.progress import steps
from layerbisect.run import lower_ir_version
from layerbisect.run import ort_optimized as ort_optimized_model
from layerbisect.simulate import Simulation
from layerbisect.summary import quantization

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

# models loaded and layers aligned, on the "layerbisect" logger; the CLI shows them with -v
log = logging.getLogger(__name__)


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
