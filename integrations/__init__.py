"""Framework adapters for radixkv, imported lazily so that the core needs no framework.

- `radixkv.integrations.hf`: `CachedModel` / `wrap`, a drop-in Hugging Face `generate` that
  prefills only the uncached suffix of each prompt (needs the `hf` extra: transformers).
"""
