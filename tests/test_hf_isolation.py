"""Wrapping a model changes nothing for any other model in the process, compiled or not, and
nothing of the wrapped model once the wrapper is gone; a wrapped model whose own `generate` runs
compiled passes through with its reason.

The compiled runs use a one-layer Llama and 3 new tokens: on the CPU each compiles in seconds
(torch's inductor needs a C compiler).
"""

from __future__ import annotations

import gc
import warnings
import weakref
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from radixkv.integrations.hf import UncachedWarning  # noqa: E402
from torch.nn.modules import module as nn_module  # noqa: E402

import radixkv  # noqa: E402

_SMALL = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 64,
    "vocab_size": 64,
}


def tiny(seed: int) -> Any:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SMALL)).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def compile_generate(model: Any) -> None:
    """What a user sets so that `generate` runs the forward pass compiled, also on the CPU."""
    compile_config = transformers.CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles on CUDA-like devices only otherwise
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = compile_config


def process_hooks() -> tuple[int, ...]:
    """How many process-wide module hooks torch holds (registration, forward, backward)."""
    return tuple(
        len(getattr(nn_module, name))
        for name in dir(nn_module)
        if name.startswith("_global_") and isinstance(getattr(nn_module, name), dict)
    )


def test_wrapping_installs_no_process_wide_hooks_and_leaves_the_model_as_it_was() -> None:
    model = tiny(0)
    hooks_before = process_hooks()
    state_before = {name: len(getattr(model, name)) for name in vars(model) if name.endswith("_hooks")}
    attrs_before = set(vars(model))
    cached = radixkv.wrap(model, capacity_tokens=64, block_size=4)
    cached.generate(torch.arange(1, 12)[None], max_new_tokens=2, do_sample=False)
    cached.generate(torch.arange(1, 14)[None], max_new_tokens=2, do_sample=False)
    assert cached.stats.reused_tokens > 0
    assert process_hooks() == hooks_before
    assert set(vars(model)) == attrs_before
    assert {name: len(getattr(model, name)) for name in state_before} == state_before
    # The wrapper and its cache are freed with the last reference: nothing of them stays behind.
    gone = weakref.ref(cached)
    del cached
    gc.collect()
    assert gone() is None


def test_another_models_compiled_generate_does_not_recompile_after_a_wrap() -> None:
    torch._dynamo.reset()
    wrapped, other = tiny(0), tiny(1)
    cached = radixkv.wrap(wrapped, capacity_tokens=64, block_size=4)
    cached.generate(torch.arange(1, 12)[None], max_new_tokens=2, do_sample=False)
    compile_generate(other)
    ids = torch.arange(1, 9)[None]
    outputs = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            outputs.append(other.generate(ids, max_new_tokens=3, do_sample=False))
            # A cached call between compiled ones: the wrapper's weights check runs again.
            cached.generate(torch.arange(1, 13)[None], max_new_tokens=2, do_sample=False)
    assert all(torch.equal(o, outputs[0]) for o in outputs)
    torch._dynamo.reset()


def test_a_wrapped_model_whose_generate_runs_compiled_passes_through_with_its_reason() -> None:
    torch._dynamo.reset()
    model = tiny(2)
    ids = torch.arange(1, 9)[None]
    want = model.generate(ids, max_new_tokens=3, do_sample=False)
    compile_generate(model)
    cached = radixkv.wrap(model, capacity_tokens=64, block_size=4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = cached.generate(ids, max_new_tokens=3, do_sample=False)
            uncached = [w for w in caught if issubclass(w.category, UncachedWarning)]
            assert len(uncached) == 1 and "cache_implementation='static'" in str(uncached[0].message)
            assert torch.equal(got, want)
    assert cached.stats.uncached_calls == 2 and cached.cache is not None and cached.cache.stats.cached_tokens == 0
    torch._dynamo.reset()
