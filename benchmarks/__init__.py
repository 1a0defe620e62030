"""radixkv's benchmarks (installed as `radixkv.benchmarks`, needs the `hf` extra); the `radixkv` command
that runs them is `radixkv.cli`.

One module per concept:

- `workloads`: what a model bench sends (conversations of token ids, synthetic and chat-template).
- `methods`: the methods compared (generate, prompt-reuse, continuous batching, radixkv), the one
  `BenchSettings` of a run, and the interleaved request loop that serves a workload.
- `runner`: methods side by side on one model, compared and written out (`radixkv bench`, `radixkv demo`).
- `report`: results.json, the markdown table and the plots.
- `trace`: the production trace through the cache alone: loader, block chains, replay, bounds, sweep.
- `generalize`: generated traces of nine families, every policy against LRU.
- `plan`: `radixkv plan`, the KV memory planner's report.
- `figures`: single-figure model benchmarks (TTFT on a hit, per tier, quantised reuse).
- `shared`: local Redis servers and the shared-tier figures.

Every `--model` (presets with random weights, GGUF files such as SmolLM2, checkpoints) is loaded
by `radixkv.integrations.models`, beside the adapter.
"""
