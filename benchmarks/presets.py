"""Model presets and loading: random-weight configs built locally, checkpoint paths, hub ids.

Runnable presets (built with seeded random weights, nothing downloaded):

- ``tiny``: 4-layer Llama (hidden 128, 4 query / 2 KV heads, vocab 512), ~0.7M params; tests and
  `radixkv demo`.
- ``llama-100m``: 12-layer Llama (hidden 768, 12 query / 4 KV heads, vocab 32,000, tied
  embeddings), ~100M params; realistic CPU timing.

Shape-only presets for `radixkv plan` (their real weight counts, never built with weights):
``llama-2-7b``, ``llama-2-70b``, ``llama-3-8b``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel

from radixkv.planner import ModelShape

__all__ = [
    "PRESETS",
    "Preset",
    "load_config",
    "load_model",
    "model_shape",
    "resolve_dtype",
]


@dataclass(frozen=True)
class Preset:
    """A named model config; `runnable` presets may be built with random weights by `load_model`."""

    name: str
    description: str
    make_config: Callable[[], PretrainedConfig]
    runnable: bool


def _llama(**kwargs: int | bool) -> Callable[[], PretrainedConfig]:
    def make() -> PretrainedConfig:
        return LlamaConfig(max_position_embeddings=8192, **kwargs)

    return make


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "tiny",
            "4-layer Llama, hidden 128, 4 query / 2 KV heads, vocab 512 (~0.7M params, random weights)",
            _llama(
                vocab_size=512,
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
            ),
            runnable=True,
        ),
        Preset(
            "llama-100m",
            "12-layer Llama, hidden 768, 12 query / 4 KV heads, vocab 32000, tied embeddings "
            "(~100M params, random weights)",
            _llama(
                vocab_size=32000,
                hidden_size=768,
                intermediate_size=2048,
                num_hidden_layers=12,
                num_attention_heads=12,
                num_key_value_heads=4,
                tie_word_embeddings=True,
            ),
            runnable=True,
        ),
        Preset(
            "llama-2-7b",
            "Llama-2-7B shape: 32 layers, 32 KV heads, head_dim 128 (plan only)",
            _llama(
                vocab_size=32000,
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
            ),
            runnable=False,
        ),
        Preset(
            "llama-2-70b",
            "Llama-2-70B shape: 80 layers, 8 KV heads (GQA), head_dim 128 (plan only)",
            _llama(
                vocab_size=32000,
                hidden_size=8192,
                intermediate_size=28672,
                num_hidden_layers=80,
                num_attention_heads=64,
                num_key_value_heads=8,
            ),
            runnable=False,
        ),
        Preset(
            "llama-3-8b",
            "Llama-3-8B shape: 32 layers, 8 KV heads (GQA), head_dim 128 (plan only)",
            _llama(
                vocab_size=128256,
                hidden_size=4096,
                intermediate_size=14336,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
            ),
            runnable=False,
        ),
    )
}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(name: str) -> torch.dtype:
    """torch dtype for `name` (float32, float16, bfloat16); ValueError listing the valid ones otherwise."""
    if name not in _DTYPES:
        raise ValueError(f"--dtype {name!r} is not supported; choose one of: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _unknown(spec: str) -> ValueError:
    return ValueError(
        f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}, smollm2) nor an existing local path "
        "(a GGUF file or a folder holding one, a directory with config.json, or a config.json file)"
    )


def _looks_like_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~"))


def load_config(spec: str) -> PretrainedConfig:
    """Config for a preset name, a directory holding config.json, a config.json file, or a hub id.

    `smollm2`, a GGUF file or a folder holding one: the GGUF's config (see `loader.load_gguf_config`).
    Raises ValueError listing the presets when `spec` is none of these.
    """
    if spec in PRESETS:
        return PRESETS[spec].make_config()
    from .loader import gguf_location, load_gguf_config

    gguf = gguf_location(spec)
    if gguf is not None:
        return load_gguf_config(gguf)
    path = Path(spec).expanduser()
    if path.is_dir():
        return AutoConfig.from_pretrained(str(path))
    if path.is_file():
        data = json.loads(path.read_text())
        if "model_type" not in data:
            raise ValueError(f"--model {spec!r}: config file has no 'model_type' field")
        return AutoConfig.for_model(**data)
    if _looks_like_hub_id(spec):
        return AutoConfig.from_pretrained(spec)
    raise _unknown(spec)


def _count_params(config: PretrainedConfig) -> int | None:
    """Weight count from building the model on the meta device (no memory); None if that fails."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:
        return None
    return sum(p.numel() for p in model.parameters())


def model_shape(spec: str) -> ModelShape:
    """The planner's view of `spec` (see `load_config`): layers, KV heads, head_dim, weight count."""
    config = load_config(spec)
    text = config.get_text_config()
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelShape(
        name=spec,
        num_layers=int(text.num_hidden_layers),
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        num_attention_heads=heads,
        num_params=_count_params(config),
    )


def load_model(spec: str, *, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> PreTrainedModel:
    """Build or load a causal LM in eval mode on `device` with `dtype`.

    - a runnable preset: built from its config with weights drawn after `torch.manual_seed(seed)`,
      so two calls give identical models;
    - a local directory: `from_pretrained` when it holds weights (*.safetensors / *.bin), else
      `from_config` with seeded random weights;
    - `owner/name`: `from_pretrained` from the hub (needs network);
    - `smollm2`, a GGUF file or a folder holding one: its trained weights (see `loader.load`).

    Raises ValueError naming `--model` for a shape-only preset or an unknown spec.
    """
    torch_dtype = resolve_dtype(dtype)
    from .loader import gguf_location, load

    if spec not in PRESETS and gguf_location(spec) is not None:
        return load(spec, device=device, dtype=dtype, seed=seed).model
    if spec in PRESETS and not PRESETS[spec].runnable:
        runnable = [p.name for p in PRESETS.values() if p.runnable]
        raise ValueError(
            f"--model {spec!r} is a shape-only preset for `radixkv plan`; runnable presets: {', '.join(runnable)}"
        )
    path = Path(spec).expanduser()
    has_weights = path.is_dir() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))
    if spec in PRESETS or (path.is_dir() and not has_weights) or path.is_file():
        config = load_config(spec)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    elif path.is_dir() or _looks_like_hub_id(spec):
        model = AutoModelForCausalLM.from_pretrained(str(path) if path.is_dir() else spec, dtype=torch_dtype)
    else:
        raise _unknown(spec)
    return model.to(device).eval()
