"""Framework adapters for radixkv, imported lazily so that the core needs no framework.

- `radixkv.integrations.hf`: `CachedModel` / `wrap`, a drop-in Hugging Face `generate` that
  prefills only the uncached suffix of each prompt (needs the `hf` extra: transformers).
- `radixkv.integrations.models`: the model loader (`load`, `load_model`, presets, GGUF, the
  planner's `model_shape`) that the benchmarks, the examples and the tests share.
"""
