"""A tiny Llama teacher written as a GGUF file (SmolLM2's tokenizer and metadata, small sizes) and
loaded the way ``smollm`` is: the causal-LM model for tests of GGUF reading and writing."""

from __future__ import annotations

import numpy as np
import torch

SIZES = {"block_count": 2, "embedding_length": 64, "feed_forward_length": 128,
         "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 16,
         "context_length": 256}  # fmt: skip


def write_tiny_gguf(path, blocks: int = 2) -> None:
    import gguf

    from compsearch.tasks.language import smollm_path

    reader = gguf.GGUFReader(smollm_path())
    writer = gguf.GGUFWriter(path, "llama")
    sizes = {**SIZES, "block_count": blocks}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        short = key.removeprefix("llama.")
        value = sizes.get(short, field.contents())
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub)
    rng = np.random.default_rng(0)
    hidden, inner, kv = 64, 128, 32

    def add(name, *shape):
        scale = 1.0 if len(shape) == 1 else 0.1
        writer.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    add("token_embd.weight", 49152, hidden)
    add("output_norm.weight", hidden)
    for block in range(blocks):
        for name, shape in [("attn_norm", (hidden,)), ("ffn_norm", (hidden,)),
                            ("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)),
                            ("attn_v", (kv, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (inner, hidden)), ("ffn_up", (inner, hidden)),
                            ("ffn_down", (hidden, inner))]:  # fmt: skip
            add(f"blk.{block}.{name}.weight", *shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_llama_task(folder, blocks: int = 2):
    """A ``CausalLMTask`` on a tiny GGUF written into ``folder``, with ``blocks`` decoder blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compsearch.tasks.language import CausalLMTask, _lee_text

    path = folder / "tiny.gguf"
    write_tiny_gguf(path, blocks)

    def load_tokenizer():
        return AutoTokenizer.from_pretrained(folder, gguf_file=path.name)

    def load():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name,
                                                     dtype=torch.float32)  # fmt: skip
        return model, load_tokenizer()

    task = CausalLMTask(load, "tiny-llama", "test", _lee_text("lee.cor"), _lee_text("lee.cor"),
                        load_tokenizer)  # fmt: skip
    task.gguf_file = path
    task.eval_tokens = 128
    return task
