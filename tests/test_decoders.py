"""LLM decoders with a KV cache: generated inputs that agree with one another, and the standard
LLM paths (int4 MatMulNBits blocks, GatherBlockQuantized embeddings, onnxruntime's transformers
fusions) against a Llama-architecture float decoder, each with a planted fault named."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from layerbisect import LayerbisectError, find_first_bad_layer
from layerbisect.cli import main
from layerbisect.decoder import vocabularies
from layerbisect.inputs import InputSpec, plan_inputs
from layerbisect.load import declared_inputs

from models import _quiet, int4_weights, make_bert, make_llama, scaled_columns

VOCAB, KV_HEADS, HEAD = 96, 2, 16
PRESENTS = {f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")}
THRESHOLD = 0.95  # int4 blocks of random weights add up to 0.97 by the last MLP of two layers


@pytest.fixture(scope="module")
def llama():
    return make_llama()


def generated(model, **options):
    plan = plan_inputs(declared_inputs(model), declared_inputs(model), vocabulary=vocabularies(model), **options)
    return plan, plan.feeds(None, seed=0)[0]


def test_a_decoders_generated_inputs_agree_and_run(llama):
    plan, feeds = generated(llama, past_length=3)
    ids, mask, positions = feeds["input_ids"], feeds["attention_mask"], feeds["position_ids"]
    assert ids.shape == (1, 8) and ids.dtype == np.int64 and 0 <= ids.min() and ids.max() < VOCAB
    assert len(np.unique(ids)) > 4  # spread over the vocabulary, not 0..9
    assert mask.shape == (1, 11) and (mask == 1).all()
    assert positions.tolist() == [list(range(3, 11))]
    assert all(feeds[f"past_key_values.{i}.{kv}"].shape == (1, KV_HEADS, 3, HEAD) for i in range(2) for kv in ("key", "value"))
    session = ort.InferenceSession(llama.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    assert outputs["logits"].shape == (1, 8, VOCAB) and outputs["present.0.key"].shape == (1, KV_HEADS, 11, HEAD)
    assert plan.generated_notes == (
        "inputs generated for a KV-cache decoder: 1 sequence of 8 tokens after 3 past positions (input_ids below "
        "its vocabulary of 96; attention_mask all ones; position_ids 3..10; 4 past key/value inputs of shape "
        "[1, 2, 3, 16]); past_length= (--past-length) and shapes= (--shape) choose others",
    )


def test_shapes_choose_the_batch_and_tokens_and_a_mask_given_tells_the_past(llama):
    _, feeds = generated(llama, shapes={"input_ids": (2, 5)})
    assert feeds["attention_mask"].shape == (2, 13) and feeds["past_key_values.1.value"].shape == (2, KV_HEADS, 8, HEAD)
    assert feeds["position_ids"].tolist() == [list(range(8, 13))] * 2
    _, feeds = generated(llama, shapes={"input_ids": (1, 4), "attention_mask": (1, 10)})
    assert feeds["past_key_values.0.key"].shape == (1, KV_HEADS, 6, HEAD) and feeds["position_ids"].tolist() == [[6, 7, 8, 9]]


def test_the_vocabulary_is_read_through_a_gather_block_quantized_embedding(llama):
    quant = int4_weights(llama, embeddings=True)
    assert "GatherBlockQuantized" in {n.op_type for n in quant.graph.node}
    assert vocabularies(quant) == {"input_ids": VOCAB}


@pytest.mark.parametrize("past_length", [0, 5])
def test_a_decoder_step_with_and_without_past_compares_logits_by_token_and_every_present(llama, past_length):
    report = find_first_bad_layer(llama, int4_weights(llama), threshold=THRESHOLD, past_length=past_length)
    assert report.coverage == 1.0 and report.first_bad is None
    assert f"after {past_length} past positions" in " ".join(report.notes)
    by_tensor = {layer.float_tensor: layer for layer in report.layers}
    assert {name for name, _ in report.outputs} == {"logits", *PRESENTS} <= set(by_tensor)
    assert all(by_tensor[name].shape == (1, KV_HEADS, past_length + 8, HEAD) for name in PRESENTS)
    logits = by_tensor["logits"]
    assert logits.shape == (1, 8, VOCAB) and 0.9 < logits.token_cosine <= logits.cosine < 1.0
    assert 0 <= logits.worst_token[1] < 8 and f"(worst token {logits.token_cosine:.4f}" in report.verdict
    assert all(np.isnan(by_tensor[name].token_cosine) for name in PRESENTS)  # 4 axes: no token view


def test_inputs_a_decoder_cannot_size_or_that_disagree_are_named_with_the_fix(llama):
    with pytest.raises(LayerbisectError, match=r"past_length=2 but the past inputs hold 3 positions"):
        generated(llama, past_length=2, shapes={"past_key_values.0.key": (1, KV_HEADS, 3, HEAD)})
    with pytest.raises(LayerbisectError, match=r"'attention_mask' is given 9 positions, but the past \(8\) and the tokens"):
        generated(llama, past_length=8, shapes={"input_ids": (1, 4), "attention_mask": (1, 9)})
    with pytest.raises(LayerbisectError, match=r"neither model declares a past key/value input .*: leave it out"):
        find_first_bad_layer(make_bert(vocab=50), make_bert(vocab=50), past_length=4)
    with pytest.raises(LayerbisectError, match=r"past_length must be a whole number, 0 or more, got -1"):
        find_first_bad_layer(llama, llama, past_length=-1)
    with pytest.raises(LayerbisectError, match=r"the inputs given hold their own past: leave it out"):
        find_first_bad_layer(llama, llama, generated(llama)[1], past_length=4)
    past = InputSpec("past_key", np.dtype("float32"), ("batch", "heads", "past", "head_size"))
    ids = InputSpec("input_ids", np.dtype("int64"), ("batch", "seq"))
    plan = plan_inputs([ids, past], [ids, past])
    with pytest.raises(LayerbisectError, match=(
            r"^input 'past_key' \(float32\[batch,heads,past,head_size\]\) does not declare all its sizes \(the "
            r"heads and head size, fixed in an export\): random inputs need its full shape, e\.g\. "
            r"shapes=\{'past_key': \(1, HEADS, 8, HEAD_SIZE\)\} or --shape past_key=1,HEADS,8,HEAD_SIZE")):
        plan.feeds(None, seed=0)


def test_the_command_takes_the_past_length(llama, tmp_path):
    path, out = tmp_path / "llama.onnx", tmp_path / "report.json"
    onnx.save(llama, path)
    assert main([str(path), str(path), "--past-length", "0", "--json", str(out)]) == 0
    notes = json.loads(out.read_text())["notes"]
    assert any("1 sequence of 8 tokens after 0 past positions" in note for note in notes)


def shuffled(model: onnx.ModelProto, node_name: str, position: int = 1, flip: bool = False) -> onnx.ModelProto:
    """A copy with the initializer read at ``position`` by the node ``node_name`` (a weight, its
    packed int4 blocks, an embedding table) shuffled, through a DequantizeLinear to its
    integers; with ``flip``, its values' signs flipped at random instead (a norm's scale,
    whose values are all near 1)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    producers = {out: node for node in copy.graph.node for out in node.output}
    name = next(node for node in copy.graph.node if node.name == node_name).input[position]
    if name in producers:
        name = producers[name].input[0]
    init = next(i for i in copy.graph.initializer if i.name == name)
    values, rng = numpy_helper.to_array(init), np.random.default_rng(0)
    changed = values * rng.choice([-1, 1], values.shape) if flip else rng.permutation(values.reshape(-1))
    init.CopyFrom(numpy_helper.from_array(changed.reshape(values.shape).astype(values.dtype), name))
    return copy


def paired_exactly(report, quant: onnx.ModelProto, weighted: int = 15) -> None:
    """Every float operation and weighted layer paired, and every MatMul with the quantized
    operation made from it (the quantizer keeps the output's name)."""
    assert report.coverage == 1.0 and report.weighted == report.weighted_paired == weighted
    producers = {out: node for node in quant.graph.node for out in node.output}
    for layer in report.layers:
        if layer.op_type == "MatMul" and layer.float_tensor.endswith(("proj", "logits")):
            assert layer.quant_tensor == layer.float_tensor
            assert producers[layer.quant_tensor].op_type in ("MatMulNBits", "MatMul")
    assert {name for name, _ in report.outputs} == {"logits", *PRESENTS}


INT4 = {
    "asymmetric, zero points": {},
    "symmetric, no zero points": {"symmetric": True},
    "blocks of 16": {"block_size": 16},
    "blocked DequantizeLinear": {"quant_format": "QDQ"},
    "blocked DequantizeLinear, symmetric": {"quant_format": "QDQ", "symmetric": True},
}


@pytest.mark.parametrize("options", INT4.values(), ids=INT4.keys())
def test_int4_weights_of_a_llama_decoder_pair_and_a_shuffled_block_is_named(llama, options):
    quant = int4_weights(llama, **options)
    kinds = {node.op_type for node in quant.graph.node}
    assert ("MatMulNBits" in kinds) == (options.get("quant_format") != "QDQ")
    clean = find_first_bad_layer(llama, quant, threshold=THRESHOLD)
    paired_exactly(clean, quant)
    assert all(layer.quant_tensor == layer.float_tensor for layer in clean.layers)  # the quantizer keeps every name
    assert clean.first_bad is None and min(layer.cosine for layer in clean.layers) > THRESHOLD
    node = next(n.name for n in quant.graph.node if n.output[0] == "model.layers.1.mlp.up_proj")
    faulty = find_first_bad_layer(llama, shuffled(quant, node), threshold=THRESHOLD)
    assert faulty.culprit.float_nodes == ("model.layers.1.mlp.up_proj",) and faulty.first_bad_cause == "introduced"


def test_a_gather_block_quantized_embedding_pairs_with_the_gather_and_a_shuffled_table_is_named(llama):
    quant = int4_weights(llama, embeddings=True)
    clean = find_first_bad_layer(llama, quant, threshold=THRESHOLD)
    paired_exactly(clean, quant)
    embedding = clean.layers[0]
    assert embedding.float_nodes == ("model.embed_tokens",) and embedding.op_type == "Gather"
    assert embedding.quant_tensor == "model.embed_tokens" and embedding.cosine > 0.99
    gather = next(n.name for n in quant.graph.node if n.op_type == "GatherBlockQuantized")
    faulty = find_first_bad_layer(llama, shuffled(quant, gather, position=0), threshold=THRESHOLD)
    assert faulty.culprit.float_nodes == ("model.embed_tokens",) and faulty.first_bad.index == 0
    assert faulty.first_bad_cause == "introduced"


def fused(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` after onnxruntime's transformers optimizer (model type gpt2, the one its Llama
    tooling uses): RMSNorms into (Skip)SimplifiedLayerNormalization, rotary embeddings into
    RotaryEmbedding with cos/sin caches indexed by the position ids."""
    from onnxruntime.transformers.optimizer import optimize_model

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with _quiet():
        return optimize_model(copy, model_type="gpt2", num_heads=4, hidden_size=64, opt_level=0).model


def test_onnxruntimes_llama_fusions_pair_exactly_and_a_fault_in_a_fused_norm_is_named(llama):
    optimized = fused(llama)
    counts = {op: sum(n.op_type == op for n in optimized.graph.node)
              for op in ("RotaryEmbedding", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization")}
    assert counts == {"RotaryEmbedding": 4, "SkipSimplifiedLayerNormalization": 4, "SimplifiedLayerNormalization": 1}
    clean = find_first_bad_layer(llama, optimized)
    paired_exactly(clean, optimized)
    assert min(layer.cosine for layer in clean.layers) > 0.9999  # the fusions compute the same: every pair is true
    rotary = [layer for layer in clean.layers if any(n.startswith("RotaryEmbedding") for n in layer.quant_nodes)]
    assert len(rotary) == 4 and all(layer.float_tensor.endswith("_rot.rope") for layer in rotary)
    norm = next(n for n in optimized.graph.node
                if n.op_type == "SkipSimplifiedLayerNormalization" and n.output[0] == "model.layers.1.post_attention_layernorm")
    faulty = find_first_bad_layer(llama, shuffled(optimized, norm.name, position=2, flip=True))
    assert "model.layers.1.post_attention_layernorm" in faulty.culprit.float_nodes
    assert faulty.first_bad_cause == "introduced"


def test_int4_after_the_fusions_pairs_and_a_shuffled_block_before_a_rotary_embedding_is_named(llama):
    quant = int4_weights(fused(llama))
    clean = find_first_bad_layer(llama, quant, threshold=THRESHOLD)
    paired_exactly(clean, quant)
    assert clean.first_bad is None
    node = next(n.name for n in quant.graph.node if n.output[0] == "model.layers.0.self_attn.k_proj")
    faulty = find_first_bad_layer(llama, shuffled(quant, node), threshold=THRESHOLD)
    assert faulty.culprit.float_nodes == ("model.layers.0.self_attn.k_proj",) and faulty.first_bad_cause == "introduced"


def test_a_tied_lm_head_pairs_with_its_int4_blocks_and_a_shuffled_one_is_named():
    """The lm_head reading the embedding's table, transposed (tie_word_embeddings), with the
    table itself in GatherBlockQuantized blocks and the head in MatMulNBits blocks."""
    tied = make_llama(tied=True)
    table = numpy_helper.to_array(next(i for i in tied.graph.initializer if i.name == "model.embed_tokens.weight"))
    head = numpy_helper.to_array(next(i for i in tied.graph.initializer if i.name == "lm_head.weight"))
    assert np.array_equal(table.T, head)
    quant = int4_weights(tied, embeddings=True)
    clean = find_first_bad_layer(tied, quant, threshold=THRESHOLD)
    paired_exactly(clean, quant)
    assert clean.first_bad is None
    node = next(n.name for n in quant.graph.node if n.output[0] == "logits")
    faulty = find_first_bad_layer(tied, shuffled(quant, node), threshold=THRESHOLD)
    assert faulty.culprit.float_nodes == ("lm_head",) and faulty.first_bad_cause == "introduced"


@pytest.mark.parametrize("target", ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.o_proj",
                                    "model.layers.1.mlp.up_proj", "gqa.sin_cache"])
def test_a_group_query_attention_decoder_in_int4_pairs_every_op_and_names_a_fault(llama, target):
    """onnxruntime-genai's model builder form: each layer's attention one GroupQueryAttention
    (rotary embeddings from cos/sin caches, the past appended, the heads repeated and the mask
    from seqlens_k, all inside), weights in int4 blocks. The float attention (36 operations,
    from the heads' views to their merge) pairs with the GroupQueryAttention, the rotary and
    mask values it computes from position_ids and attention_mask in its own form are compared
    with nothing, and the o_proj after it (an anchor) stays its own layer; a fault in a weight
    or in the rotary caches is named."""
    gqa = make_llama(attention="gqa")
    assert sum(node.op_type == "GroupQueryAttention" for node in gqa.graph.node) == 2
    quant = int4_weights(gqa)
    clean = find_first_bad_layer(llama, quant, threshold=THRESHOLD)
    assert clean.coverage == 1.0 and clean.weighted == clean.weighted_paired == 15 and clean.first_bad is None
    attention = [layer for layer in clean.layers if layer.quant_nodes[-1].endswith(".self_attn.gqa")]
    assert [layer.float_nodes[-1] for layer in attention] == [f"model.layers.{i}.self_attn.merged" for i in (0, 1)]
    assert all(len(layer.float_nodes) == 36 for layer in attention)
    assert all(layer.quant_tensor == layer.float_tensor for layer in clean.layers if layer not in attention)
    if target == "gqa.sin_cache":
        faulty_model = scaled_columns(quant, "model.layers.0.self_attn.gqa", 8, -1.0)
        expected = ("model.layers.0.self_attn.gqa",)
    else:
        node = next(n.name for n in quant.graph.node if n.output[0] == target)
        faulty_model, expected = shuffled(quant, node), (node,)
    faulty = find_first_bad_layer(llama, faulty_model, threshold=THRESHOLD)
    assert faulty.culprit.quant_nodes == expected and faulty.first_bad_cause == "introduced"
