"""What operators mean in float terms: the tables to extend for an operator not met yet.

The graph builder (``layerbisect.graph``) gives every operation a *role*, the float operator
it stands for, so that the aligner compares like with like: a QLinearConv is a Conv, a
MatMulNBits a MatMul. A fused operator that outputs a value its float form computes on the
way (SkipLayerNormalization's residual sum) is split into one operation per such value.

Adding an operator is adding a line here; what the aligner folds and replaces lives in
``layerbisect.align``.
"""

# Quantized and fused operators, and the float operator they stand for.
ROLES = {
    "QLinearConv": "Conv",
    "ConvInteger": "Conv",
    "QLinearMatMul": "MatMul",
    "MatMulInteger": "MatMul",
    "MatMulIntegerToFloat": "MatMul",
    "DynamicQuantizeMatMul": "MatMul",
    "MatMulNBits": "MatMul",  # int4/int8 weight-only blocks (onnxruntime's int4 quantizer, LLM builders)
    "GatherBlockQuantized": "Gather",  # int4 blocks of an embedding table (the same quantizer, LLM builders)
    "QGemm": "Gemm",
    "QLinearAdd": "Add",
    "QLinearMul": "Mul",
    "QLinearGlobalAveragePool": "GlobalAveragePool",
    "QLinearAveragePool": "AveragePool",
    "QLinearSigmoid": "Sigmoid",
    "QLinearLeakyRelu": "LeakyRelu",
    "QLinearSoftmax": "Softmax",
    "QLinearConcat": "Concat",
    "QLinearReduceMean": "ReduceMean",
    "QLinearWhere": "Where",
    "QAttention": "Attention",
    "QEmbedLayerNormalization": "LayerNormalization",
    # onnxruntime's fusions (com.microsoft): the activation they carry is a float span's tail.
    "FusedConv": "Conv",
    "FusedGemm": "Gemm",
    "FusedMatMul": "MatMul",
    "NhwcFusedConv": "Conv",
    "NhwcConv": "Conv",
    "NhwcMaxPool": "MaxPool",
    # the normalization of input + skip (+ bias); the sum itself is an intermediate (below)
    "EmbedLayerNormalization": "LayerNormalization",  # of the embeddings' sum (a region before it)
    "SkipLayerNormalization": "LayerNormalization",
    "SkipSimplifiedLayerNormalization": "SimplifiedLayerNormalization",
}

# Fused operators with an output holding a value their float form computes on the way: that
# output's index and the value's role. It becomes an operation of its own, computed from the
# fused operator's inputs, and the fused operator computes its other outputs from it.
INTERMEDIATES = {
    "SkipLayerNormalization": (3, "Add"),  # input + skip (+ bias), before the normalization
    "SkipSimplifiedLayerNormalization": (3, "Add"),
}

# Inputs of fused attention operators that carry the attention mask in the operator's own
# form (a mask index, sequence lengths, a key padding mask), where a float graph adds to the
# scores an additive mask that it computes itself ((1 - mask) * a large negative): positions.
MASK_INPUTS = {
    "Attention": (3,), "QAttention": (5,), "MultiHeadAttention": (4,), "GroupQueryAttention": (5, 6),
    "EmbedLayerNormalization": (7,), "QEmbedLayerNormalization": (7,),
    # position ids, which RotaryEmbedding reads to index its cos/sin caches where a float graph
    # computes cos and sin from them (inv_freq @ positions, or a Gather of its own tables)
    "RotaryEmbedding": (1,),
}
# Outputs from which on a fused operator passes such a mask on: EmbedLayerNormalization's
# mask index (output 1; its optional embedding sum, output 2, is then no value either).
MASK_OUTPUTS = {"EmbedLayerNormalization": 1, "QEmbedLayerNormalization": 1}

# Operators that only a quantized model holds: the float side holding some and the quantized
# side none means the two models were given the wrong way round.
QUANTIZATION_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "ConvInteger",
    "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits",
    "QGemm", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearConcat", "QLinearReduceMean",
    "QLinearWhere", "QAttention", "QEmbedLayerNormalization", "GatherBlockQuantized",
}
