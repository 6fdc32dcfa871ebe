"""Export a tiny Llama-architecture decoder, random weights from a ``transformers`` LlamaConfig,
to ONNX with its KV cache: the float model of ``bench_large.py --kind llama``.

Needs torch and transformers, which layerbisect never depends on: run it with the Python of a
separate environment, e.g.

    python3 -m venv /tmp/llama-venv
    /tmp/llama-venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch
    /tmp/llama-venv/bin/pip install transformers onnx
    /tmp/llama-venv/bin/python benchmarks/export_tiny_llama.py /tmp/tiny_llama.onnx

Inputs as Hugging Face's exports name them: input_ids, attention_mask [batch, total],
position_ids, past_key_values.<i>.key/value [batch, kv_heads, past, head]; outputs logits and
present.<i>.key/value. Exported by torch.onnx's TorchScript exporter, opset 17, one file.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache


class Step(torch.nn.Module):
    """One decoder step over flat tensors: the past keys and values in, logits and the
    presents out (the exporter takes no cache object)."""

    def __init__(self, model: LlamaForCausalLM, layers: int) -> None:
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        presents = [t for layer in out.past_key_values.layers[: self.layers] for t in (layer.keys, layer.values)]
        return (out.logits, *presents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="the .onnx file to write")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=(8 * args.hidden) // 3,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    head = args.hidden // config.num_attention_heads
    batch, seq, past = 1, 4, 3
    example = (torch.randint(0, args.vocab, (batch, seq)), torch.ones(batch, past + seq, dtype=torch.int64),
               torch.arange(past, past + seq)[None],
               *[torch.randn(batch, config.num_key_value_heads, past, head) for _ in range(2 * args.layers)])
    pasts = [f"past_key_values.{i}.{kv}" for i in range(args.layers) for kv in ("key", "value")]
    presents = [f"present.{i}.{kv}" for i in range(args.layers) for kv in ("key", "value")]
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"},
            **{name: {0: "batch_size", 2: "past_sequence_length"} for name in pasts},
            **{name: {0: "batch_size", 2: "total_sequence_length"} for name in presents}}
    with torch.no_grad():
        torch.onnx.export(Step(model, args.layers), example, args.output,
                          input_names=["input_ids", "attention_mask", "position_ids", *pasts],
                          output_names=["logits", *presents], dynamic_axes=axes, opset_version=17, dynamo=False)
    print(f"wrote {args.output}: {args.layers} layers, hidden {args.hidden}, vocabulary {args.vocab}")


if __name__ == "__main__":
    main()
