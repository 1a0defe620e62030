"""The tiny random-weight Llama the adapter tests share (built from its config class, no download)."""

from __future__ import annotations

from typing import Any

import torch
import transformers


def tiny_llama(
    *,
    dtype: torch.dtype = torch.float32,
    attention: str = "sdpa",
    device: torch.device | str = "cpu",
    seed: int = 0,
    vocab_size: int = 128,
    **config: Any,
) -> Any:
    """A seeded 2-layer Llama (hidden 64, 4 query / 2 KV heads) in eval mode on `device` in `dtype`,
    with `attention` as its attention implementation; `config` adds LlamaConfig fields (e.g. token
    ids). Greedy outputs run to max_new_tokens (no EOS) and pad with id 0."""
    torch.manual_seed(seed)
    llama = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=vocab_size,
        **config,
    )
    model = transformers.LlamaForCausalLM(llama).to(device=device, dtype=dtype).eval()
    model.config._attn_implementation = attention
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # random weights: fixed-length answers
    return model
