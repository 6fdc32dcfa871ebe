"""Deterministic builders of small ONNX models, their onnxruntime-quantized
versions, and helpers to plant faults in quantized weights.

Plain module (no pytest dependency) so that tests, examples and benchmarks can
all ``from models import ...``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8

__all__ = ["make_cnn", "make_transformer", "make_bert", "make_decoder", "make_llama", "quantize", "int4_weights", "corrupt_weights", "quant_node_for",
           "weight_initializer_of", "random_inputs", "weight_only_int8", "float16"]


class _Graph:
    """Tiny helper accumulating nodes and initializers with unique names."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def randn(self, name: str, shape: tuple[int, ...], std: float) -> str:
        return self.const(name, (self.rng.standard_normal(shape) * std).astype(np.float32))

    def weight(self, name: str, value: np.ndarray, axes: tuple[int, ...] = ()) -> str:
        """Store ``value`` snapped onto the int8 grid ``k * absmax / 127``, with every
        slice along each of ``axes`` reaching ``|k| = 127``. ORT's symmetric int8
        weight quantization (per-tensor or per-channel on those axes) is then
        lossless, so healthy quantization error comes from activations only."""
        step = np.abs(value).max() / 127.0
        k = np.clip(np.round(value / step), -127, 127)
        for axis in axes:
            moved = np.moveaxis(k, axis, 0).reshape(k.shape[axis], -1)  # view into k
            rows = np.arange(moved.shape[0])
            cols = np.abs(moved).argmax(axis=1)
            moved[rows, cols] = np.where(moved[rows, cols] < 0, -127, 127)
        return self.const(name, (k * step).astype(np.float32))

    def layer_norm(self, name: str, x: str, hidden: int) -> str:
        """LayerNormalization ``name`` over the last axis, scale near 1 and a small bias."""
        s = self.weight(f"{name}.scale", self.rng.uniform(0.8, 1.2, hidden))
        b = self.const(f"{name}.bias", self.rng.uniform(-0.1, 0.1, hidden).astype(np.float32))
        return self.node("LayerNormalization", name, [x, s, b], axis=-1, epsilon=1e-5)

    def linear(self, name: str, x: str, fin: int, fout: int, gain: float = 1.0, bias_first: bool = False) -> str:
        """MatMul ``{name}_proj`` followed by bias Add ``{name}_bias`` (reading the bias first
        when ``bias_first``, as the pattern onnxruntime's transformers optimizer fuses)."""
        w = self.weight(f"{name}.weight", self.rng.standard_normal((fin, fout)) * gain / math.sqrt(fin), (0, 1))
        h = self.node("MatMul", f"{name}_proj", [x, w])
        bias = self.randn(f"{name}.bias", (fout,), 0.05)
        return self.node("Add", f"{name}_bias", [bias, h] if bias_first else [h, bias])

    def erf_gelu(self, x: str) -> str:
        """Gelu as exporters write it: x * (erf(x / sqrt 2) + 1) * 0.5, nodes gelu_div, gelu_erf,
        gelu_add, gelu_mul, gelu_half."""
        e = self.node("Div", "gelu_div", [x, self.const("sqrt2", np.array(math.sqrt(2.0), np.float32))])
        e = self.node("Erf", "gelu_erf", [e])
        e = self.node("Add", "gelu_add", [e, self.const("one", np.array(1.0, np.float32))])
        f = self.node("Mul", "gelu_mul", [x, e])
        return self.node("Mul", "gelu_half", [f, self.const("half", np.array(0.5, np.float32))])

    def node(self, op: str, name: str, inputs: list[str], **attrs) -> str:
        """Add a single-output node whose output tensor is named after the node."""
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def model(self, name: str, inp: onnx.ValueInfoProto | list[onnx.ValueInfoProto],
              out: onnx.ValueInfoProto) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inp if isinstance(inp, list) else [inp], [out], self.inits)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="layerbisect-tests"
        )
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model


def make_cnn(seed: int = 0, batch: int = 1, size: int = 16) -> onnx.ModelProto:
    """Small residual CNN: input "x" [batch,3,size,size] -> output "y" [batch,10].

    Nodes: conv1 bn1 relu1 conv2 bn2 relu2 add1 relu3 pool1 conv3 relu4 gap
    flatten fc (the tensor produced by each node carries the node's name).
    """
    g = _Graph(seed)

    def conv(name: str, x: str, cin: int, cout: int, stride: int = 1, pad: int = 1) -> str:
        w = g.weight(f"{name}.weight", g.rng.standard_normal((cout, cin, 3, 3)) * math.sqrt(2.0 / (cin * 9)), (0,))
        b = g.randn(f"{name}.bias", (cout,), 0.05)
        return g.node("Conv", name, [x, w, b], kernel_shape=[3, 3], pads=[pad] * 4, strides=[stride] * 2)

    def bn(name: str, x: str, c: int) -> str:
        params = [
            g.weight(f"{name}.scale", g.rng.uniform(0.8, 1.2, c)),
            g.const(f"{name}.bias", g.rng.uniform(-0.1, 0.1, c).astype(np.float32)),
            g.const(f"{name}.mean", g.rng.uniform(-0.1, 0.1, c).astype(np.float32)),
            g.const(f"{name}.var", g.rng.uniform(0.6, 1.4, c).astype(np.float32)),
        ]
        return g.node("BatchNormalization", name, [x, *params], epsilon=1e-5)

    h1 = g.node("Relu", "relu1", [bn("bn1", conv("conv1", "x", 3, 8), 8)])
    h2 = g.node("Relu", "relu2", [bn("bn2", conv("conv2", h1, 8, 8), 8)])
    h = g.node("Relu", "relu3", [g.node("Add", "add1", [h2, h1])])
    h = g.node("MaxPool", "pool1", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = g.node("Relu", "relu4", [conv("conv3", h, 8, 16, stride=2, pad=0)])
    h = g.node("Flatten", "flatten", [g.node("GlobalAveragePool", "gap", [h])], axis=1)
    w = g.weight("fc.weight", g.rng.standard_normal((10, 16)) * math.sqrt(2.0 / 16), (0,))
    b = g.randn("fc.bias", (10,), 0.05)
    g.nodes.append(helper.make_node("Gemm", [h, w, b], ["y"], name="fc", transB=1))
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])
    model = g.model("cnn", inp, out)
    # Pooled ReLU features share a large input-independent mean that would make the
    # logits nearly constant (their cosine blind to faults). Fold 90% of it into the
    # fc bias: logits then track the input, while the rest keeps int8 noise small.
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("flatten", TensorProto.FLOAT, None))
    rng = np.random.default_rng([0xFC, seed])
    feats = np.concatenate([_run(probe, _feeds(model, rng))[1] for _ in range(16)])
    inits = {i.name: i for i in model.graph.initializer}
    fc_w, fc_b = numpy_helper.to_array(inits["fc.weight"]), numpy_helper.to_array(inits["fc.bias"])
    centered = (fc_b - 0.9 * fc_w @ feats.mean(axis=0)).astype(np.float32)
    inits["fc.bias"].CopyFrom(numpy_helper.from_array(centered, "fc.bias"))
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` on CPU with onnxruntime (quiet) and return all outputs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def make_transformer(seed: int = 0, seq: int = 8, hidden: int = 32, heads: int = 2) -> onnx.ModelProto:
    """One pre-norm transformer block: input "x" [1,seq,hidden] -> output "y".

    Nodes: ln1, {q,k,v}_proj (MatMul) + {q,k,v}_bias (Add), {q,k,v}_reshape,
    {q,k,v}_transpose, qk_matmul, qk_scale, softmax, attn_v, attn_transpose,
    attn_reshape, o_proj, o_bias, residual1, ln2, ffn1_proj, ffn1_bias, gelu_div,
    gelu_erf, gelu_add, gelu_mul, gelu_half, ffn2_proj, ffn2_bias, residual2
    (each node's output tensor carries its name, except residual2 -> "y").
    """
    if hidden % heads:
        raise ValueError("hidden must be divisible by heads")
    g = _Graph(seed)
    d = hidden // heads

    def ln(name: str, x: str) -> str:
        return g.layer_norm(name, x, hidden)

    linear = g.linear
    heads_shape = g.const("heads_shape", np.array([1, seq, heads, d], dtype=np.int64))
    flat_shape = g.const("flat_shape", np.array([1, seq, hidden], dtype=np.int64))
    h = ln("ln1", "x")
    split = {}
    for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        t = linear(p, h, hidden, hidden)
        t = g.node("Reshape", f"{p}_reshape", [t, heads_shape])
        split[p] = g.node("Transpose", f"{p}_transpose", [t], perm=perm)
    s = g.node("MatMul", "qk_matmul", [split["q"], split["k"]])
    s = g.node("Mul", "qk_scale", [s, g.const("inv_sqrt_d", np.array(1.0 / math.sqrt(d), np.float32))])
    a = g.node("MatMul", "attn_v", [g.node("Softmax", "softmax", [s], axis=-1), split["v"]])
    a = g.node("Transpose", "attn_transpose", [a], perm=[0, 2, 1, 3])
    a = g.node("Reshape", "attn_reshape", [a, flat_shape])
    r1 = g.node("Add", "residual1", ["x", linear("o", a, hidden, hidden)])
    f = linear("ffn1", ln("ln2", r1), hidden, 4 * hidden, gain=math.sqrt(2.0))
    f = linear("ffn2", g.erf_gelu(f), 4 * hidden, hidden)
    g.nodes.append(helper.make_node("Add", [r1, f], ["y"], name="residual2"))
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, hidden])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, hidden])
    return g.model("transformer", inp, out)


def make_bert(seed: int = 0, seq: int = 8, hidden: int = 64, heads: int = 2, vocab: int = 0) -> onnx.ModelProto:
    """One post-norm (BERT) encoder block: input "x" [1,seq,hidden] -> output "y", the pattern
    onnxruntime's transformers optimizer fuses into Attention, SkipLayerNormalization and
    BiasGelu. Nodes as ``make_transformer``'s, with LayerNormalization after each residual Add
    (ln1, ln2 -> "y"), bias Adds reading (bias, MatMul) and the attention scaled by a Div.

    With a ``vocab``, the block reads embeddings as BERT exporters write them: int64 inputs
    "input_ids" and "attention_mask" ["batch", "seq"]; word, token type (all zero) and position
    Gathers, their sum and LayerNormalization "emb_ln" -> "x"; the attention adds the
    additive mask (1 - mask) * -10000 ("mask_sub", "mask_scale") to its scores
    ("mask_add"). The optimizer fuses the embeddings into EmbedLayerNormalization, which
    passes the mask on to the Attention as a mask index."""
    g = _Graph(seed)
    d = hidden // heads
    mask = _bert_embeddings(g, seq, hidden, vocab) if vocab else None

    def ln(name: str, x: str) -> str:
        return g.layer_norm(name, x, hidden)

    def linear(name: str, x: str, fin: int, fout: int, gain: float = 1.0) -> str:
        return g.linear(name, x, fin, fout, gain, bias_first=True)

    heads_shape = g.const("heads_shape", np.array([0, 0, heads, d], dtype=np.int64))
    flat_shape = g.const("flat_shape", np.array([0, 0, hidden], dtype=np.int64))
    split = {}
    for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        t = linear(p, "x", hidden, hidden)
        t = g.node("Reshape", f"{p}_reshape", [t, heads_shape])
        split[p] = g.node("Transpose", f"{p}_transpose", [t], perm=perm)
    s = g.node("MatMul", "qk_matmul", [split["q"], split["k"]])
    s = g.node("Div", "qk_scale", [s, g.const("sqrt_d", np.array(math.sqrt(d), np.float32))])
    if mask is not None:
        s = g.node("Add", "mask_add", [s, mask])
    a = g.node("MatMul", "attn_v", [g.node("Softmax", "softmax", [s], axis=-1), split["v"]])
    a = g.node("Transpose", "attn_transpose", [a], perm=[0, 2, 1, 3])
    a = g.node("Reshape", "attn_reshape", [a, flat_shape])
    r1 = ln("ln1", g.node("Add", "residual1", [linear("o", a, hidden, hidden), "x"]))
    f = linear("ffn1", r1, hidden, 4 * hidden, gain=math.sqrt(2.0))
    f = linear("ffn2", g.erf_gelu(f), 4 * hidden, hidden)
    r2 = g.node("Add", "residual2", [f, r1])
    scale = g.weight("ln2.scale", g.rng.uniform(0.8, 1.2, hidden))
    shift = g.const("ln2.bias", g.rng.uniform(-0.1, 0.1, hidden).astype(np.float32))
    g.nodes.append(helper.make_node("LayerNormalization", [r2, scale, shift], ["y"], name="ln2", axis=-1, epsilon=1e-5))
    if vocab:
        inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"])
                  for name in ("input_ids", "attention_mask")]
        return g.model("bert", inputs, helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden]))
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, hidden])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, hidden])
    return g.model("bert", inp, out)


def _bert_embeddings(g: _Graph, seq: int, hidden: int, vocab: int) -> str:
    """BERT's embeddings as exporters write them, ending in "x", and the additive attention
    mask computed from "attention_mask"; returns the mask's name. The position ids are a
    [1, max] buffer sliced to the length of "input_ids", the token types a zero buffer, as
    Hugging Face exports have them (the patterns onnxruntime's EmbedLayerNormalization fusion
    looks for)."""
    max_positions = 2 * seq
    word = g.weight("word_embeddings", g.rng.standard_normal((vocab, hidden)) * 0.5)
    types = g.weight("token_type_embeddings", g.rng.standard_normal((2, hidden)) * 0.1)
    positions = g.weight("position_embeddings", g.rng.standard_normal((max_positions, hidden)) * 0.1)
    shape = g.node("Shape", "ids_shape", ["input_ids"])
    length = g.node("Gather", "ids_length", [shape, g.const("one_index", np.array(1, np.int64))], axis=0)
    end = g.node("Unsqueeze", "ids_end", [length, g.const("axis_zero", np.array([0], np.int64))])
    position_ids = g.node("Slice", "position_ids", [
        g.const("position_buffer", np.arange(max_positions, dtype=np.int64)[None]),
        g.const("slice_start", np.array([0], np.int64)), end,
        g.const("slice_axis", np.array([1], np.int64)), g.const("slice_step", np.array([1], np.int64)),
    ])
    type_ids = g.node("Mul", "type_ids", ["input_ids", g.const("zero_ids", np.array(0, np.int64))])
    summed = g.node("Add", "emb_add", [g.node("Gather", "word_gather", [word, "input_ids"]),
                                       g.node("Gather", "type_gather", [types, type_ids])])
    summed = g.node("Add", "emb_add_position", [summed, g.node("Gather", "position_gather", [positions, position_ids])])
    scale = g.weight("emb_ln.scale", g.rng.uniform(0.8, 1.2, hidden))
    shift = g.const("emb_ln.bias", g.rng.uniform(-0.1, 0.1, hidden).astype(np.float32))
    g.nodes.append(helper.make_node("LayerNormalization", [summed, scale, shift], ["x"], name="emb_ln", axis=-1,
                                    epsilon=1e-12))
    m = g.node("Unsqueeze", "mask_heads", ["attention_mask", g.const("axis_one", np.array([1], np.int64))])
    m = g.node("Unsqueeze", "mask_rows", [m, g.const("axis_two", np.array([2], np.int64))])
    m = g.node("Cast", "mask_float", [m], to=TensorProto.FLOAT)
    m = g.node("Sub", "mask_sub", [g.const("mask_one", np.array(1.0, np.float32)), m])
    return g.node("Mul", "mask_scale", [m, g.const("mask_min", np.array(-10000.0, np.float32))])


def make_decoder(seed: int = 0, hidden: int = 64, heads: int = 2) -> onnx.ModelProto:
    """One LLM decoder block with a KV cache: x [batch, seq, hidden] and past_key/past_value
    [batch, heads, past, hidden / heads] in; y and present_key/present_value (the past with
    this step's keys and values appended) out. RMSNorm decomposed (pow, mean, addeps, sqrt,
    div, rms), q/k/v_proj, attention (qk, qk_s, sm, av), o_proj, res1, a SiLU-gated MLP (gate,
    up, sig, silu, glu, down), y; each node's output tensor carries its name."""
    rng = np.random.default_rng(seed)
    d = hidden // heads
    inits, nodes = [], []

    def c(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def n(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def mm(name: str, x: str, fin: int, fout: int) -> str:
        weight = (rng.standard_normal((fin, fout)) / math.sqrt(fin)).astype(np.float32)
        return n("MatMul", [x, c(name + ".w", weight)], name)

    # RMSNorm decomposed
    p = n("Pow", ["x", c("two", np.array(2.0, np.float32))], "pow")
    m = n("ReduceMean", [p], "mean", axes=[-1])
    r = n("Sqrt", [n("Add", [m, c("eps", np.array(1e-6, np.float32))], "addeps")], "sqrt")
    h = n("Mul", [n("Div", ["x", r], "div"), c("g", np.ones(hidden, np.float32))], "rms")
    shp = c("hs", np.array([0, 0, heads, d], np.int64))
    q, k, v = (n("Transpose", [n("Reshape", [mm(f"{p}_proj", h, hidden, hidden), shp], f"{p}_r")], f"{p}_t",
                 perm=[0, 2, 1, 3]) for p in "qkv")
    kc = n("Concat", ["past_key", k], "present_key", axis=2)
    vc = n("Concat", ["past_value", v], "present_value", axis=2)
    scale = c("sc", np.array(1 / math.sqrt(d), np.float32))
    s = n("Mul", [n("MatMul", [q, n("Transpose", [kc], "k_T", perm=[0, 1, 3, 2])], "qk"), scale], "qk_s")
    a = n("MatMul", [n("Softmax", [s], "sm", axis=-1), vc], "av")
    a = n("Reshape", [n("Transpose", [a], "a_t", perm=[0, 2, 1, 3]), c("fs", np.array([0, 0, hidden], np.int64))],
          "a_r")
    x1 = n("Add", ["x", mm("o_proj", a, hidden, hidden)], "res1")
    gate = mm("gate", x1, hidden, 2 * hidden)
    up = mm("up", x1, hidden, 2 * hidden)
    act = n("Mul", [n("Mul", [gate, n("Sigmoid", [gate], "sig")], "silu"), up], "glu")
    n("Add", [x1, mm("down", act, 2 * hidden, hidden)], "y")
    graph = helper.make_graph(nodes, "decoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden]),
         helper.make_tensor_value_info("past_key", TensorProto.FLOAT, ["batch", heads, "past", d]),
         helper.make_tensor_value_info("past_value", TensorProto.FLOAT, ["batch", heads, "past", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden]),
         helper.make_tensor_value_info("present_key", TensorProto.FLOAT, ["batch", heads, "total", d]),
         helper.make_tensor_value_info("present_value", TensorProto.FLOAT, ["batch", heads, "total", d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def make_llama(
    seed: int = 0, *, vocab: int = 96, hidden: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 2,
    tied: bool = False, attention: str = "decomposed",
) -> onnx.ModelProto:
    """A Llama-architecture decoder with a KV cache, as ``torch.onnx.export`` writes one from
    Hugging Face's LlamaForCausalLM: input_ids, attention_mask [batch, total] and position_ids
    in, past_key_values.<i>.key/value [batch, kv_heads, past, head] of each layer in;
    logits [batch, seq, vocab] and present.<i>.key/value out.

    Per layer ``layers.<i>.``: RMSNorm (Pow, ReduceMean, Add eps, Sqrt, Div 1 by it, Mul,
    Mul weight; onnxruntime's optimizer fuses it into SimplifiedLayerNormalization), q/k/v_proj,
    rotary embeddings computed on the fly from position_ids (inv_freq @ positions, Concat,
    Cos/Sin; rotate_half by Slices of the half size read from the shape), the keys and values
    appended to the past, grouped-query heads repeated (Expand), a causal and padding mask
    from position_ids and attention_mask, o_proj and the residual, a SwiGLU MLP (gate_proj,
    up_proj, SiLU, down_proj). Then norm and lm_head (the embedding's weight when ``tied``).
    Weights are initializers named as in Hugging Face (``model.layers.0.self_attn.q_proj.weight``).

    ``attention="gqa"``: the same weights, each layer's attention as onnxruntime-genai's model
    builder writes it, one com.microsoft GroupQueryAttention of the projections (rotary
    embeddings from cos/sin caches, the past appended, the heads repeated, the causal mask
    from seqlens_k = sum(attention_mask) - 1 and the total length); position_ids is then
    declared and not read."""
    g = _Graph(seed)
    d = hidden // heads
    ffn = 2 * hidden

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        g.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def const(name: str, value) -> str:
        return g.const(name, np.asarray(value))

    def linear(name: str, x: str, fin: int, fout: int, weight: np.ndarray | None = None) -> str:
        if weight is None:
            weight = (g.rng.standard_normal((fin, fout)) / math.sqrt(fin)).astype(np.float32)
        return node("MatMul", [x, const(f"{name}.weight", weight)], name)

    def rms_norm(name: str, x: str) -> str:
        mean = node("ReduceMean", [node("Pow", [x, const(f"{name}.two", np.float32(2))], f"{name}.pow"),
                                   const(f"{name}.axes", np.array([-1], np.int64))], f"{name}.mean", keepdims=1)
        root = node("Sqrt", [node("Add", [mean, const(f"{name}.eps", np.float32(1e-6))], f"{name}.add_eps")],
                    f"{name}.sqrt")
        inverse = node("Div", [const(f"{name}.one", np.float32(1)), root], f"{name}.inv")
        weight = (1 + 0.1 * g.rng.standard_normal(hidden)).astype(np.float32)
        return node("Mul", [node("Mul", [x, inverse], f"{name}.normed"), const(f"{name}.weight", weight)], name)

    def heads_of(name: str, x: str, count: int) -> str:
        shaped = node("Reshape", [x, const(f"{name}.shape", np.array([0, 0, count, d], np.int64))], f"{name}.view")
        return node("Transpose", [shaped], f"{name}.t", perm=[0, 2, 1, 3])

    def rotary(name: str, x: str) -> str:
        half = node("Div", [node("Gather", [node("Shape", [x], f"{name}.shape"), const(f"{name}.last", np.int64(3))],
                                 f"{name}.dim"), const(f"{name}.two", np.int64(2))], f"{name}.half")
        upper = node("Unsqueeze", [half, const(f"{name}.ax0", np.array([0], np.int64))], f"{name}.half_end")
        lower = node("Unsqueeze", [half, const(f"{name}.ax0b", np.array([0], np.int64))], f"{name}.half_start")
        x1 = node("Slice", [x, const(f"{name}.zero", np.array([0], np.int64)), upper,
                            const(f"{name}.axes", np.array([3], np.int64))], f"{name}.x1")
        x2 = node("Slice", [x, lower, const(f"{name}.end", np.array([2**62], np.int64)),
                            const(f"{name}.axes_b", np.array([3], np.int64))], f"{name}.x2")
        rotated = node("Concat", [node("Neg", [x2], f"{name}.neg"), x1], f"{name}.rotate_half", axis=-1)
        return node("Add", [node("Mul", [x, cos], f"{name}.x_cos"), node("Mul", [rotated, sin], f"{name}.rot_sin")],
                    f"{name}.rope")

    def mlp(p: str, x: str) -> str:
        h = rms_norm(p + "post_attention_layernorm", x)
        gate = linear(p + "mlp.gate_proj", h, hidden, ffn)
        silu = node("Mul", [gate, node("Sigmoid", [gate], p + "mlp.sigmoid")], p + "mlp.silu")
        up = linear(p + "mlp.up_proj", h, hidden, ffn)
        return node("Add", [x, linear(p + "mlp.down_proj", node("Mul", [silu, up], p + "mlp.glu"), ffn, hidden)],
                    p + "residual_mlp")

    # embeddings, rotary tables (shared by the layers) and the mask
    embedding = (g.rng.standard_normal((vocab, hidden)) * 0.5).astype(np.float32)
    x = node("Gather", [const("model.embed_tokens.weight", embedding), "input_ids"], "model.embed_tokens")
    inv_freq = (1.0 / 10000 ** (np.arange(0, d, 2, dtype=np.float32) / d)).reshape(1, d // 2, 1)
    batch = node("Gather", [node("Shape", ["input_ids"], "rope.ids_shape"), const("rope.axis0", np.int64(0))],
                 "rope.batch")
    expand_to = node("Concat", [node("Unsqueeze", [batch, const("rope.ax0", np.array([0], np.int64))], "rope.batch1"),
                                const("rope.tail", np.array([1, 1], np.int64))], "rope.expand_shape", axis=0)
    freq = node("Expand", [const("model.rotary_emb.inv_freq", inv_freq.astype(np.float32)), expand_to],
                "rope.inv_freq_expanded")
    positions = node("Cast", [node("Unsqueeze", ["position_ids", const("rope.ax1", np.array([1], np.int64))],
                                   "rope.positions")], "rope.positions_f", to=TensorProto.FLOAT)
    freqs = node("Transpose", [node("MatMul", [freq, positions], "rope.freqs")], "rope.freqs_t", perm=[0, 2, 1])
    emb = node("Concat", [freqs, freqs], "rope.emb", axis=-1)
    scaling = const("rope.scaling", np.float32(1))
    cos = node("Unsqueeze", [node("Mul", [node("Cos", [emb], "rope.cos_raw"), scaling], "rope.cos_scaled"),
                             const("rope.ax1b", np.array([1], np.int64))], "rope.cos")
    sin = node("Unsqueeze", [node("Mul", [node("Sin", [emb], "rope.sin_raw"), scaling], "rope.sin_scaled"),
                             const("rope.ax1c", np.array([1], np.int64))], "rope.sin")
    total = node("Gather", [node("Shape", ["attention_mask"], "mask.shape"), const("mask.axis1", np.int64(1))],
                 "mask.total")
    if attention == "gqa":
        seqlens = node("Cast", [node("Sub", [node("ReduceSum", ["attention_mask", const("gqa.axes", np.array([1], np.int64))],
                                                  "gqa.lengths", keepdims=0), const("gqa.one", np.int64(1))],
                                     "gqa.last")], "gqa.seqlens_k", to=TensorProto.INT32)
        total_length = node("Cast", [total], "gqa.total_length", to=TensorProto.INT32)
        angles = np.arange(2048, dtype=np.float32)[:, None] * inv_freq.reshape(1, -1)
        cos_cache, sin_cache = const("gqa.cos_cache", np.cos(angles)), const("gqa.sin_cache", np.sin(angles))
    keys = node("Range", [const("mask.start", np.int64(0)), total, const("mask.step", np.int64(1))], "mask.keys")
    queries = node("Unsqueeze", ["position_ids", const("mask.axes_q", np.array([1, 3], np.int64))], "mask.queries")
    causal = node("LessOrEqual", [keys, queries], "mask.causal")
    padding = node("Unsqueeze", [node("Cast", ["attention_mask"], "mask.bool", to=TensorProto.BOOL),
                                 const("mask.axes_p", np.array([1, 2], np.int64))], "mask.padding")
    mask = node("Where", [node("And", [causal, padding], "mask.allowed"), const("mask.open", np.float32(0)),
                          const("mask.closed", np.float32(-1e9))], "mask.additive")

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab])]
    repeat = heads // kv_heads
    for i in range(layers):
        p = f"model.layers.{i}."
        h = rms_norm(p + "input_layernorm", x)
        past_k, past_v, present_k, present_v = (f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                                f"present.{i}.key", f"present.{i}.value")
        for name in (past_k, past_v):
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                        ["batch_size", kv_heads, "past_sequence_length", d]))
        for name in (present_k, present_v):
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                         ["batch_size", kv_heads, "total_sequence_length", d]))
        if attention == "gqa":
            projections = [linear(p + f"self_attn.{n}_proj", h, hidden, size)
                           for n, size in (("q", hidden), ("k", kv_heads * d), ("v", kv_heads * d))]
            g.nodes.append(helper.make_node(
                "GroupQueryAttention", [*projections, past_k, past_v, seqlens, total_length, cos_cache, sin_cache],
                [p + "self_attn.gqa", present_k, present_v], name=p + "self_attn.gqa", domain="com.microsoft",
                num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0, scale=1 / math.sqrt(d)))
            x = node("Add", [x, linear(p + "self_attn.o_proj", p + "self_attn.gqa", hidden, hidden)], p + "residual_attn")
            x = mlp(p, x)
            continue
        q = rotary(p + "self_attn.q_rot", heads_of(p + "self_attn.q", linear(p + "self_attn.q_proj", h, hidden, hidden),
                                                   heads))
        k = rotary(p + "self_attn.k_rot", heads_of(p + "self_attn.k",
                                                   linear(p + "self_attn.k_proj", h, hidden, kv_heads * d), kv_heads))
        v = heads_of(p + "self_attn.v", linear(p + "self_attn.v_proj", h, hidden, kv_heads * d), kv_heads)
        node("Concat", [past_k, k], present_k, axis=2)
        node("Concat", [past_v, v], present_v, axis=2)

        def repeated(name: str, value: str) -> str:
            if repeat == 1:
                return value
            grown = node("Expand", [node("Unsqueeze", [value, const(f"{name}.ax", np.array([2], np.int64))],
                                         f"{name}.unsqueeze"), const(f"{name}.rep", np.array([1, 1, repeat, 1, 1],
                                                                                            np.int64))], f"{name}.expand")
            return node("Reshape", [grown, const(f"{name}.shape", np.array([0, heads, -1, d], np.int64))], name)

        keys_all = repeated(p + "self_attn.repeat_k", present_k)
        values_all = repeated(p + "self_attn.repeat_v", present_v)
        scores = node("Mul", [node("MatMul", [q, node("Transpose", [keys_all], p + "self_attn.k_T", perm=[0, 1, 3, 2])],
                                   p + "self_attn.qk"), const(p + "self_attn.scale", np.float32(1 / math.sqrt(d)))],
                      p + "self_attn.qk_scaled")
        probs = node("Softmax", [node("Add", [scores, mask], p + "self_attn.masked")], p + "self_attn.softmax", axis=-1)
        attended = node("MatMul", [probs, values_all], p + "self_attn.av")
        merged = node("Reshape", [node("Transpose", [attended], p + "self_attn.av_t", perm=[0, 2, 1, 3]),
                                  const(p + "self_attn.merge", np.array([0, 0, hidden], np.int64))], p + "self_attn.merged")
        x = node("Add", [x, linear(p + "self_attn.o_proj", merged, hidden, hidden)], p + "residual_attn")
        x = mlp(p, x)
    h = rms_norm("model.norm", x)
    lm_head = np.ascontiguousarray(embedding.T) if tied else (g.rng.standard_normal((hidden, vocab)) / math.sqrt(hidden))
    g.nodes.append(helper.make_node("MatMul", [h, const("lm_head.weight", lm_head.astype(np.float32))], ["logits"],
                                    name="lm_head"))
    if attention == "gqa":  # the decomposed attention's rotary tables and mask: computed, read by nothing
        used = {name for n in g.nodes for name in n.input}
        while any(all(out not in used for out in n.output) for n in g.nodes if n.output[0] != "logits"):
            g.nodes = [n for n in g.nodes if n.output[0] == "logits" or any(out in used for out in n.output)]
            used = {name for n in g.nodes for name in n.input}
        g.inits = [i for i in g.inits if i.name in used]
    graph = helper.make_graph(g.nodes, "llama", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid("com.microsoft", 1)] if attention == "gqa" else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)


def random_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal float32 feeds for the model's declared inputs
    (dynamic or unknown dims become 1)."""
    return _feeds(model, np.random.default_rng(seed))


def _feeds(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


_QTYPES = {"int8": "QInt8", "uint8": "QUInt8", "int16": "QInt16", "uint16": "QUInt16", "int4": "QInt4"}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Python logging and stdout/stderr chatter from the ORT quantizer."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def scaled_columns(model: onnx.ModelProto, node_name: str, position: int, factor: float) -> onnx.ModelProto:
    """A copy whose initializer read at input ``position`` of node ``node_name`` has its first
    half of last-axis entries multiplied by ``factor``: a fault no rescaling explains."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    node = next(n for n in copy.graph.node if n.name == node_name)
    init = next(i for i in copy.graph.initializer if i.name == node.input[position])
    values = numpy_helper.to_array(init).copy()
    values[..., : values.shape[-1] // 2] *= factor
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    return copy


def quantize(
    model: onnx.ModelProto,
    fmt: str,
    *,
    activation_type: str = "int8",
    weight_type: str = "int8",
    per_channel: bool = False,
    calibration_inputs: list[dict[str, np.ndarray]] | None = None,
    seed: int = 0,
    num_samples: int = 128,
    nodes_to_exclude: list[str] | None = None,
    reduce_range: bool = False,
) -> onnx.ModelProto:
    """Quantize ``model`` with onnxruntime.quantization and return it in memory.

    ``fmt``: "qdq" / "qoperator" (quantize_static, MinMax calibration on
    ``calibration_inputs`` or ``num_samples`` seeded random samples) or "dynamic"
    (quantize_dynamic; ``activation_type`` and ``seed`` unused). Types: "int8",
    "uint8", "int16", "uint16", and "int4" for weights; ORT accepts 16-bit and int4
    only for "qdq" and then bumps the model to opset 21 (standard-domain Q/DQ, no
    contrib ops needed). ``reduce_range``: 7-bit weights, which onnxruntime's int8 kernels compute
    exactly on every CPU (full-range int8 weights clip on x86 without VNNI: layerbisect.kernels).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if fmt not in ("qdq", "qoperator", "dynamic"):
        raise ValueError(f"unknown quantization format {fmt!r}")
    wtype = getattr(QuantType, _QTYPES[weight_type])
    atype = getattr(QuantType, _QTYPES[activation_type])
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        src, dst = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "quant.onnx")
        onnx.save(model, src)
        if fmt == "dynamic":
            quantize_dynamic(src, dst, per_channel=per_channel, weight_type=wtype, reduce_range=reduce_range)
        else:
            # Own random stream, disjoint from random_inputs(model, <int>) used for testing.
            rng = np.random.default_rng([0xCA1B, seed])
            samples = calibration_inputs
            if samples is None:
                samples = [_feeds(model, rng) for _ in range(num_samples)]

            class _Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self._it = iter(samples)

                def get_next(self) -> dict[str, np.ndarray] | None:
                    return next(self._it, None)

            quantize_static(
                src, dst, _Reader(),
                quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                per_channel=per_channel, activation_type=atype, weight_type=wtype,
                nodes_to_exclude=nodes_to_exclude or [], reduce_range=reduce_range,
            )
        return onnx.load(dst)


def int4_weights(
    model: onnx.ModelProto, *, symmetric: bool = False, block_size: int = 32, quant_format: str = "QOperator",
    embeddings: bool = False,
) -> onnx.ModelProto:
    """``model`` with its MatMul weights in int4 blocks by onnxruntime's MatMulNBitsQuantizer:
    com.microsoft MatMulNBits ("QOperator"; zero points only when asymmetric) or blocked
    DequantizeLinear of int4 initializers ("QDQ"); with ``embeddings``, the embedding table's
    Gather too, as a GatherBlockQuantized (QOperator only, blocks along the hidden axis)."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=symmetric, quant_format=QuantFormat[quant_format],
        op_types_to_quantize=("MatMul", "Gather") if embeddings else ("MatMul",),
    )
    with _quiet():
        quantizer = MatMulNBitsQuantizer(copy, algo_config=config)
        quantizer.process()
    return quantizer.model.model


_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def quant_node_for(
    quant_model: onnx.ModelProto, float_node_name: str, float_model: onnx.ModelProto | None = None
) -> str:
    """Name of the node in ``quant_model`` that plays the role of the float node.

    Lookup order: same name (QDQ keeps names); ``<name>_quant`` (QOperator
    QLinear*/QGemm and dynamic MatMulInteger/ConvInteger); ``<name>_*_quant``
    (dynamic Gemm becomes ``<name>_MatMul_quant``); the node now producing the
    float node's output tensor (``<name>`` or ``<name>_quantized``: QDQ folds a
    Relu into its producer that way). If all fail and ``float_model`` is given,
    the float node was folded away entirely (QOperator Relu after QLinearAdd /
    QLinearConv) and the producer of its first input is looked up instead.
    """
    nodes = [n for n in quant_model.graph.node if n.op_type not in _QDQ_OPS]
    names = {n.name for n in nodes}
    for cand in (float_node_name, f"{float_node_name}_quant"):
        if cand in names:
            return cand
    for n in nodes:
        if n.name.startswith(f"{float_node_name}_") and n.name.endswith("_quant"):
            return n.name
    for n in nodes:
        if {float_node_name, f"{float_node_name}_quantized"} & set(n.output):
            return n.name
    if float_model is not None:
        fnode = next((n for n in float_model.graph.node if n.name == float_node_name), None)
        producer = {o: n for n in float_model.graph.node for o in n.output}
        if fnode is not None and fnode.input and fnode.input[0] in producer:
            return quant_node_for(quant_model, producer[fnode.input[0]].name, float_model)
    raise KeyError(f"no node corresponds to {float_node_name!r} in the quantized model")


def weight_initializer_of(quant_model: onnx.ModelProto, node_name: str) -> str:
    """Name of the integer weight initializer (rank >= 2, <= 16-bit) that the node
    consumes directly (QLinearConv w, QLinearMatMul b, QGemm B, MatMulInteger B,
    ConvInteger w) or through a DequantizeLinear (QDQ)."""
    inits = {i.name: i for i in quant_model.graph.initializer}
    producer = {o: n for n in quant_model.graph.node for o in n.output}
    node = next((n for n in quant_model.graph.node if n.name == node_name), None)
    if node is None:
        raise KeyError(f"node {node_name!r} not found")

    def is_int_weight(name: str) -> bool:
        if name not in inits:
            return False
        arr = numpy_helper.to_array(inits[name])
        return arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2 and arr.ndim >= 2

    for name in node.input:
        if is_int_weight(name):
            return name
        p = producer.get(name)
        if p is not None and p.op_type == "DequantizeLinear" and is_int_weight(p.input[0]):
            return p.input[0]
    raise ValueError(f"node {node_name!r} ({node.op_type}) has no integer weight initializer")


def corrupt_weights(quant_model: onnx.ModelProto, node_name: str, seed: int = 0) -> onnx.ModelProto:
    """Copy of ``quant_model`` whose integer weight for ``node_name`` is replaced by
    seeded random integers spanning the original values' range (structure destroyed,
    magnitude kept). The argument is not modified."""
    model = onnx.ModelProto()
    model.CopyFrom(quant_model)
    wname = weight_initializer_of(model, node_name)
    init = next(i for i in model.graph.initializer if i.name == wname)
    arr = numpy_helper.to_array(init)
    rng = np.random.default_rng(seed)
    lo, hi = int(arr.min()), int(arr.max())
    bad = rng.integers(lo, hi + 1, size=arr.shape).astype(arr.dtype)
    init.CopyFrom(numpy_helper.from_array(bad, wname))
    return model


def weight_only_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose Conv, MatMul and Gemm weights are int8 initializers dequantized in the
    graph by Cast(to float) then Mul by a scale initializer: per output channel for every
    other weight, per tensor for the rest, the scale first in every third Mul. The weights
    of ``make_cnn`` and ``make_transformer`` lie on an int8 grid: their values stay the same;
    others are rounded to it."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph, inits = copy.graph, {init.name: init for init in copy.graph.initializer}
    weighted = [node for node in graph.node if node.op_type in ("Conv", "MatMul", "Gemm") and node.input[1] in inits]
    for position, node in enumerate(weighted):
        name = node.input[1]
        weight = numpy_helper.to_array(inits[name])
        channel_axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and _int_attr(node, "transB")) else -1
        kept = tuple(a for a in range(weight.ndim) if a != channel_axis % weight.ndim)
        absmax = np.abs(weight).max(axis=kept, keepdims=True) if position % 2 == 0 else np.abs(weight).max()
        scale = (absmax / 127).astype(np.float32)
        graph.initializer.remove(inits[name])
        graph.initializer.extend([numpy_helper.from_array(np.round(weight / scale).astype(np.int8), f"{name}.int8"),
                                  numpy_helper.from_array(scale, f"{name}.scale")])
        cast = helper.make_node("Cast", [f"{name}.int8"], [f"{name}.cast"], name=f"{name}.Cast", to=TensorProto.FLOAT)
        factors = [f"{name}.cast", f"{name}.scale"][:: -1 if position % 3 == 2 else 1]
        mul = helper.make_node("Mul", factors, [name], name=f"{name}.Mul")
        graph.node.insert(list(graph.node).index(node), cast)
        graph.node.insert(list(graph.node).index(node), mul)
    onnx.checker.check_model(copy)
    return copy


def _int_attr(node: onnx.NodeProto, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)


def float16(model: onnx.ModelProto, kept_in_float32: list[str] | tuple[str, ...] = ()) -> onnx.ModelProto:
    """onnxconverter-common's fp16 conversion, inputs and outputs kept in float32, the
    operations of the types ``kept_in_float32`` too (Cast glue around each)."""
    import warnings

    from onnxconverter_common.float16 import convert_float_to_float16

    with warnings.catch_warnings():  # values below fp16's range are clamped, and said so
        warnings.simplefilter("ignore")
        return convert_float_to_float16(model, keep_io_types=True, op_block_list=list(kept_in_float32))


def quantization_left(model: onnx.ModelProto, freed) -> list[str]:
    """What still quantizes the tensors ``freed`` (a repaired model's ``FloatFallback.freed``):
    a QuantizeLinear reading one, or a DequantizeLinear of a constant or of a graph input read
    by a node computing one. Empty when they are all computed and handed on in float."""
    freed = set(freed)
    producer = {out: node for node in model.graph.node for out in node.output}
    unquantized = {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input} | {
        out for node in model.graph.node if node.op_type == "Constant" for out in node.output
    }
    left = [f"{node.name} quantizes {node.input[0]}" for node in model.graph.node
            if node.op_type == "QuantizeLinear" and node.input[0] in freed]
    for node in model.graph.node:
        if not freed & set(node.output):
            continue
        for name in node.input:
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if dq is not None and dq.op_type == "DequantizeLinear" and (
                dq.input[0] in unquantized or (q is not None and q.input[0] in unquantized)
            ):
                left.append(f"{node.name} reads {name} dequantized")
    return left


def output_cosines(float_model: onnx.ModelProto, model: onnx.ModelProto, feeds) -> dict[str, float]:
    """Cosine of each declared output of ``model`` with the float model's, both run by
    onnxruntime on ``feeds`` (flattened, in float64)."""
    import onnxruntime as ort

    def run(m):
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds)))

    reference, actual = run(float_model), run(model)
    cosines = {}
    for name, ref in reference.items():
        a, b = ref.astype(np.float64).ravel(), actual[name].astype(np.float64).ravel()
        norm = np.linalg.norm(a) * np.linalg.norm(b)
        cosines[name] = 1.0 if norm == 0 and not a.any() and not b.any() else float(a @ b / norm)
    return cosines


def save_user_files(folder: Path) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, np.ndarray]]:
    """Write a user's folder as the bad-input tests read it: fp32.onnx (the CNN), int8.onnx
    (its QDQ model with conv2's weights corrupted), transformer.onnx (another network),
    feeds.npz, wrong_keys.npz (the input under another name) and extra_key.npz (one input too
    many). Return the float model, its QDQ model and the feeds."""
    float_model = make_cnn()
    quant = quantize(float_model, "qdq")
    onnx.save(float_model, folder / "fp32.onnx")
    onnx.save(corrupt_weights(quant, quant_node_for(quant, "conv2")), folder / "int8.onnx")
    onnx.save(make_transformer(), folder / "transformer.onnx")
    feeds = random_inputs(float_model)
    np.savez(folder / "feeds.npz", **feeds)
    np.savez(folder / "wrong_keys.npz", image=feeds["x"])
    np.savez(folder / "extra_key.npz", **feeds, mask=np.ones(3))
    return float_model, quant, feeds
