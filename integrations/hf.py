"""Drop-in Hugging Face `generate` that prefills only the uncached suffix of each prompt.

```python
cached = radixkv.wrap(model, capacity_tokens=200_000)
out = cached.generate(input_ids, attention_mask=mask, max_new_tokens=64, do_sample=False)
cached.cache.stats
```
"""

from __future__ import annotations

import inspect
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import get_layer_types_and_kwargs

from radixkv.cache import CacheOptions, PrefixCache, PrefixMatch
from radixkv.core.hashing import namespace_key
from radixkv.core.spec import KVSpec

from ._hf_fingerprint import model_fingerprint
from ._hf_kv import (
    CACHE_KWARG,
    LayerKV,
    ModelKV,
    UnsupportedKV,
    build_past,
    past_length,
    probe_model_kv,
    row_kv,
    weights_dtype_device,
)
from ._hf_layout import BatchLayout, plan_layout
from ._hf_score import ContinuationScore, ScoreStats, counter_of, score_continuations
from ._hf_share import BlockTrie, ShareGroup, prefill_saved, prefixes_to_compute, share_groups
from ._hf_shared_kv import SharedPrefixCache, build_shared_past, shared_attention
from ._hf_support import (
    CallPlan,
    Passthrough,
    UncachedWarning,
    analyze_call,
    generate_signature,
    model_unsupported_reason,
)
from ._hf_weights import WeightsWatch

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["CACHE_KWARG", "DEFAULT_CPU_MEMORY_FRACTION", "DEFAULT_CUDA_FREE_FRACTION", "DEFAULT_MIN_CAPACITY_TOKENS",
           "DEFAULT_WEIGHTS_FRACTION", "AdapterStats", "CachedModel", "ContinuationScore", "ScoreStats",
           "UncachedWarning", "default_capacity_tokens", "wrap"]  # fmt: skip

DEFAULT_WEIGHTS_FRACTION = 0.5
"""Default pool size: this share of the bytes of the model's parameters (the same number of
tokens in every dtype, since weights and KV scale together)..."""
DEFAULT_MIN_CAPACITY_TOKENS = 2_048
"""...but at least this many tokens (a tiny model still holds a few long conversations)..."""
DEFAULT_CPU_MEMORY_FRACTION = 0.25
"""...and off CUDA at most this share of physical memory..."""
DEFAULT_CUDA_FREE_FRACTION = 0.5
"""...and on CUDA at most this share of the device's free memory when `wrap` runs."""
SHARE_MIN_TOKENS = 256
"""Rows of a call attend to one copy of a common cached prefix only when it is at least this
long..."""
SHARE_MIN_ROWS = 2
"""...at least this many sequences (rows times beams or samples) share it..."""
SHARE_MIN_SAVED_TOKENS = 2_048
"""...and the one copy saves at least this many tokens of KV, (sequences - 1) x prefix. Below it
the extra products and the merge cost more decode time than the copies they save (measured on a
CPU: SmolLM2-135M decode steps 0.91-1.03x at 64-512 tokens x 2-8 rows below the line, 1.19-1.53x
above it; held out: a 4-layer Llama, 12 other shapes, every one on the right side; see the
docs/guide/sharing.md). Held once saves memory on either side."""


@dataclass(frozen=True)
class AdapterStats:
    """What the adapter did, in input rows (not beams) and tokens.

    calls: generate calls. uncached_calls: calls passed to `model.generate` unchanged.
    prompt_tokens: real (unpadded) prompt tokens of cached calls. reused_tokens: prompt tokens
    whose prefill was skipped. `cache.stats.hit_tokens` counts matched tokens, which exceed
    reused_tokens in batches where another row's longer uncached suffix had to be computed.
    weight_changes: times a call found the weights changed since the previous one (and dropped
    the cache). computed_once_tokens: prompt tokens that several sequences of one call shared and
    that were prefilled once for all of them before `generate` (see `share_prefixes`); the rows
    then reuse them, so they are in reused_tokens too. Prefill work of the cached calls is
    prompt_tokens - reused_tokens + computed_once_tokens (plus padding columns). held_once_tokens:
    tokens of KV that decoding did not duplicate: per shared call, the shared prefix's length times
    (sequences sharing it - 1).
    """

    calls: int
    uncached_calls: int
    prompt_tokens: int
    reused_tokens: int
    weight_changes: int = 0
    computed_once_tokens: int = 0
    held_once_tokens: int = 0


class CachedModel:
    """A Hugging Face decoder-only model whose `generate` reuses KV of previously seen prefixes.

    Contract of `generate(*args, **kwargs)`: same arguments and same return value as
    `model.generate` (tensor, or the `Generate*Output` with `return_dict_in_generate=True`).
    The rules are numbered as the tests in tests/test_hf_generate.py name them (`test_ruleN_*`).
    Everything else is the model's: attributes (`device`, `dtype`, `config`, `generation_config`,
    `can_generate()`, ...), calls (`cached(input_ids)` is the forward pass), `isinstance` and
    `__class__`, so the wrapper goes wherever the model goes (`pipeline("text-generation",
    model=cached)`, lm-evaluation-harness's `HFLM(pretrained=cached)`); `to` / `eval` / `train`
    return the wrapper, and a `to` that moves the weights to another dtype or device starts a new
    cache (tests/test_hf_dropin.py).
      1. Each row's real tokens (padding excluded) are matched against the cache, at most
         len - 1 tokens, and only the uncached suffix is prefilled. One row: all of its hit.
      2. A batch is prefilled on its last S = max(len_i - hit_i) columns and each row reuses
         max(0, len_i - S) cached tokens (see `_hf_layout`: suffix-aligned, so the model sees
         exactly the caller's input_ids and mask): each row gets its own hit, not the minimum.
      3. After generate, each row's prompt and, where `reuse_generated` is true, its generated
         tokens (up to the first EOS) are inserted, whole blocks only, never padding.
      4. Match locks are released right after the KV is gathered, in a `finally`, so any
         exception (stopping criteria, streamers, the model, KeyboardInterrupt) leaves no lock;
         an exception inside generate inserts nothing.
      5. Beam search and `num_return_sequences` > 1 are served and match plain `generate`; beam
         search inserts prompts only (its final cache rows belong to running beams, not to the
         returned sequences).
      6. Sliding-window layers are served (they keep all tokens during the call: O(T) memory,
         not O(window)). What the cache cannot serve is passed unchanged to `model.generate`,
         with one `UncachedWarning` saying why: unsupported models (encoder-decoder, recurrent /
         linear-attention or other non-KV layers, no position_ids), `past_key_values` or
         `cache`, `use_cache=False`, `inputs_embeds`, `assistant_model` and other assisted / hub
         decoding modes, `cache_implementation`, `token_healing`, `output_attentions` /
         `output_hidden_states`, extra model inputs (e.g. `position_ids`, `token_type_ids`),
         masks that are not left padding, training mode.
      7. Bad input goes to `model.generate` silently and gets its own error. What transformers
         rejects before decoding (ids, masks, unknown kwargs, generation config values) is
         caught before any lookup; what only its decoding loop finds (e.g. temperature < 0)
         costs one counted lookup. Either way nothing is inserted and no lock is left.
         A model whose weights changed dtype or device since `wrap` raises RuntimeError.
      8. Weights: each cached call first checks every parameter's and buffer's identity,
         storage and in-place version counter (optimizer steps, `load_state_dict`, `p.add_()`
         under no_grad, a replaced module); on a change it drops the cache and keys new entries
         by a new weights epoch, so KV computed by old weights is never reused, even when a call
         that was already running inserts after the change. Adapter layers (PEFT LoRA etc.:
         active adapters, disabled, merged) pick the namespace instead: switching adapters keeps
         each adapter's entries apart and warm. Not seen: in-place edits through `p.data`; call
         `cache.clear()` after those.
      9. Sharing inside a call (`share_prefixes`, tests in tests/test_hf_sharing.py): uncached
         whole-block prefixes that several sequences share (beams and samples count once each)
         are prefilled once and stored before `generate` when that lowers the call's prefill
         positions; rows sharing a cached prefix past the break-even rule (SHARE_MIN_*) attend to
         one copy of it through `SharedPrefixCache` and get the same output. The model's
         attention implementation names the shared one only during such a call.
    Exactness: greedy tokens equal plain `generate`'s, float32 scores within 1e-4. In float16
    and bfloat16 this holds because only prefill-computed KV is stored by default (decode-step
    KV of the same tokens differs by up to 1 ulp; `reuse_generated=True` trades that for hits
    on the latest answer), provided the attention kernel gives a prefix the same KV whatever
    follows it: eager attention on CPU does; torch's fused CPU sdpa kernel rounds the last rows
    of a half-precision prefill by prefill length (1 ulp), so near-ties can still flip (docs/guide/exactness.md).
    Costs per cached call: one `match` per row (O(tokens) hashing), one copy of the reused KV
    (none extra for a single unpadded row), one insert per returned row (copies new blocks).
    Lower tiers (`host_capacity_tokens`, `disk_path`): entries are keyed by a fingerprint of the
    model (class, config, every weight's bytes; one pass over the weights at wrap and after each
    weight change) instead of the epoch, so disk entries serve later processes of the same
    weights only. The config's JSON includes the transformers version: an upgrade starts afresh.
    Thread safety: the cache is thread-safe; the model's own thread safety is unchanged.
    """

    def __init__(
        self,
        model: Any,
        *,
        reuse_generated: bool | None = None,
        share_prefixes: bool | None = None,
        **options: Unpack[CacheOptions],
    ) -> None:
        if reuse_generated is not None and not isinstance(reuse_generated, bool):
            raise TypeError(f"reuse_generated must be None, True or False, got {reuse_generated!r}")
        if share_prefixes is not None and not isinstance(share_prefixes, bool):
            raise TypeError(f"share_prefixes must be None, True or False, got {share_prefixes!r}")
        unknown = sorted(set(options) - set(CacheOptions.__annotations__))
        if unknown:
            raise TypeError(
                f"unexpected keyword arguments {unknown}: wrap takes reuse_generated, share_prefixes and PrefixCache's"
            )
        if isinstance(model, CachedModel):
            raise TypeError("model is already a CachedModel; wrap the underlying model once")
        if not callable(getattr(model, "generate", None)) or getattr(model, "config", None) is None:
            raise TypeError(f"model must be a transformers model with generate() and a config, got {type(model)!r}")
        self._wrap_options: dict[str, Any] = dict(options)  # as given: `to()` builds a new cache from them
        self.model = model
        self._reuse_generated = reuse_generated
        self._share_prefixes = share_prefixes
        self._signature = generate_signature(model.generate)
        self._lock = threading.Lock()
        self._calls = self._uncached_calls = self._prompt_tokens = self._reused_tokens = 0
        self._computed_once_tokens = self._held_once_tokens = 0
        self._epoch = 0  # weight changes seen so far: each one drops the cache and keys entries anew
        self.unsupported_reason: str | None = model_unsupported_reason(model)
        self._model_kv: ModelKV | None = None
        self._weights = weights_dtype_device(model)
        self.cache: PrefixCache | None = None
        fingerprint: bytes | None = None
        if self.unsupported_reason is None:
            try:
                self._model_kv = probe_model_kv(model)
            except UnsupportedKV as exc:
                self.unsupported_reason = str(exc)
        if self._model_kv is not None:
            spec = self._model_kv.spec
            if options.get("capacity_tokens") is None and options.get("capacity_bytes") is None:
                options["capacity_tokens"] = default_capacity_tokens(model, spec)
            # With lower tiers, entries are keyed by what the weights are, not by this process's
            # epoch count: disk and Redis entries outlive the process (and Redis entries are read
            # by other replicas), and no one may mistake another model's (or changed weights')
            # KV for its own. The Redis keys also carry the fingerprint as wrapped.
            shared = options.get("shared")
            if options.get("host_capacity_tokens") or options.get("disk_path") is not None or shared is not None:
                fingerprint = model_fingerprint(model)
            if shared is not None and options.get("shared_model") is None:
                options["shared_model"] = f"radixkv-hf:{fingerprint.hex()}"
            self.cache = PrefixCache(spec, **options)
        self._fingerprint: bytes | None = fingerprint if self.cache is not None else None
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self._vocab_size: int | None = getattr(embeddings, "num_embeddings", None)
        self._watch = WeightsWatch(model)  # after the probe's forward pass, which may add buffers
        self.hold_once_reason: str | None = _hold_once_reason(model) if self.cache is not None else None
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._tensors_version, _ = self._watch.look()

    def __repr__(self) -> str:
        state = repr(self.cache) if self.cache is not None else f"uncached: {self.unsupported_reason}"
        return f"CachedModel({type(self.model).__name__}, {state})"

    # ----- standing in for the model ----------------------------------------------------
    # Pipelines, evaluation harnesses and other libraries take a model object, read `device`,
    # `dtype`, `config`, `generation_config`, `can_generate()`, `__class__.__name__` and call
    # `generate`, `to`, `eval` or the model itself. The wrapper answers all of that as the model
    # does, so it can be handed to them in its place; only `generate` (and `to` / `eval` /
    # `train`, which return the wrapper) are its own.
    def __getattr__(self, name: str) -> Any:
        # Called only for names the wrapper lacks. Dunder lookups (copy, pickle) are not forwarded.
        model = self.__dict__.get("model")
        if model is None or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(model, name)

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        """The model's class, so that `isinstance(cached, PreTrainedModel)` and the class-name
        checks of pipelines (which pick per-model prompt prefixes by it) see the model, as with
        any object proxy; `type(cached)` is still CachedModel."""
        return type(self.__dict__["model"]) if "model" in self.__dict__ else CachedModel

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward pass, unchanged (the cache serves `generate` only)."""
        return self.model(*args, **kwargs)

    def to(self, *args: Any, **kwargs: Any) -> CachedModel:
        """`model.to(...)`, returning the wrapper. If the weights' dtype or device changed, the
        cache starts afresh for them (as `wrap` would build it, from the same options): KV that
        the model computed before the move is not what it computes now."""
        before = weights_dtype_device(self.model)
        self.model.to(*args, **kwargs)
        if weights_dtype_device(self.model) != before:
            self._restart()
        return self

    def cpu(self) -> CachedModel:
        return self.to("cpu")

    def cuda(self, device: int | str | torch.device | None = None) -> CachedModel:
        if isinstance(device, int):
            return self.to(torch.device("cuda", device))
        return self.to("cuda" if device is None else device)

    def eval(self) -> CachedModel:
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> CachedModel:
        """`model.train(mode)`; calls in training mode run uncached (dropout), see rule 6."""
        self.model.train(mode)
        return self

    def _restart(self) -> None:
        """A new, empty cache for the model as it is now; the old one stops using its shared tier."""
        old = self.cache
        CachedModel.__init__(
            self,
            self.model,
            reuse_generated=self._reuse_generated,
            share_prefixes=self._share_prefixes,
            **self._wrap_options,
        )
        if old is not None:
            old.close()

    @property
    def reuse_generated(self) -> bool:
        """Whether a call finishing now stores the KV of the tokens it generated, not only its prompt's.

        True or False as given to `wrap`. With the default (None): True only where decode-step KV
        reproduces plain `generate`, i.e. float64 KV, or float32 KV computed by full-precision
        ("ieee") float32 matmuls on the KV's device, read at each call from torch's per-backend
        setting (see `_float32_matmul_precision`; TF32 or bfloat16 matmuls round like half precision).
        """
        if self._reuse_generated is not None:
            return self._reuse_generated
        if self._model_kv is None:
            return False
        spec = self._model_kv.spec
        return _decode_kv_is_exact(spec.dtype, spec.device)

    @property
    def share_prefixes(self) -> tuple[bool, bool]:
        """(computed once, held once) for a call starting now; see `wrap`'s `share_prefixes`.

        Computed once: prefixes several sequences of a call share are prefilled once (one row)
        and stored before `generate`, so the rows hit them. Held once: rows attend to one copy of
        the shared prefix, merging two partial softmaxes in float32, where `hold_once_reason` is
        None. By default both are on where the result stays within float32 rounding of plain
        `generate`: float32 / float64 KV with full-precision matmuls (as `reuse_generated`) and
        an exact pool. In half precision a prefix prefilled alone rounds differently from the
        same prefix inside a padded batch (the matmul kernels depend on the batch's shape; measured
        on SmolLM2-135M in bfloat16 with eager attention: 1 of 8 rows' greedy text changed), so
        there it is opt-in. True: both wherever the model allows, also in half precision and with
        a quantised pool; False: neither.
        """
        if self._model_kv is None or self._share_prefixes is False:
            return False, False
        holdable = self.hold_once_reason is None
        if self._share_prefixes:
            return True, holdable
        assert self.cache is not None
        spec = self._model_kv.spec
        exact = self.cache.kv_dtype is None and _decode_kv_is_exact(spec.dtype, spec.device)
        return exact, exact and holdable

    @property
    def stats(self) -> AdapterStats:
        with self._lock:
            return AdapterStats(
                self._calls,
                self._uncached_calls,
                self._prompt_tokens,
                self._reused_tokens,
                self._epoch,
                self._computed_once_tokens,
                self._held_once_tokens,
            )

    def generate(self, *args: Any, namespace: object = None, **kwargs: Any) -> Any:
        """`model.generate(*args, **kwargs)` with prefix reuse; see the class docstring for the contract.

        `namespace` (None, str, bytes, int or tuples of those) is the tenant of this call: its
        entries are apart from other tenants' (on top of the weights and adapter keys) and count
        against its share (`wrap(model, shares=...)`); None is the shared default tenant."""
        if namespace is not None:
            namespace_key(namespace, "namespace")  # a bad namespace raises before any work
        if self.cache is None:
            verdict: CallPlan | Passthrough = Passthrough(self.unsupported_reason)
        else:
            verdict = analyze_call(self.model, self._signature, args, kwargs, self._vocab_size)
        if isinstance(verdict, Passthrough):
            self._count(uncached=True)
            if verdict.reason is not None:
                warnings.warn(f"radixkv: generate ran uncached: {verdict.reason}", UncachedWarning, stacklevel=2)
            return self.model.generate(*args, **kwargs)
        return self._generate_cached(verdict, namespace)

    # ----- scoring: log-likelihoods over cached prefixes (integrations/_hf_score.py) ----
    def score(
        self,
        contexts: Sequence[Sequence[int] | torch.Tensor],
        continuations: Sequence[Sequence[int] | torch.Tensor],
        *,
        batch_size: int | None = None,
        namespace: object = None,
    ) -> list[ContinuationScore]:
        """Log-probabilities of each continuation given its context, reusing cached context KV.

        Row i scores `continuations[i]` after `contexts[i]` (token ids: lists, tuples or 1-D
        integer tensors) and returns a `ContinuationScore`: float32 per-token log-probabilities
        and argmax flags (`.logprob` their sum, `.is_greedy` all flags), in the order given.
        Equal to the plain forward pass over context + continuation (float32: within 1e-4, same
        argmax) because each row's cached context prefix (at most len(context) - 1 tokens) is the
        KV that pass computes, and the rest is computed as in `generate` (rules 1, 2, 8, 9:
        suffix-aligned batch, explicit position ids, weights watched, prefixes shared by rows of
        one chunk prefilled once). Each row's context is stored (whole blocks), its continuation
        is not, so the other choices of a question and later questions sharing its few-shot
        prefix hit.
        `batch_size`: rows per forward pass (None: all in one). Rows are processed in token order,
        so rows sharing a context fall into the same pass. `namespace`: the tenant, as in
        `generate`. Models the cache cannot serve, and training mode, go to the plain forward
        pass one row at a time with one `UncachedWarning`.
        Errors: a context or continuation that is empty, not token ids or outside the
        vocabulary, unequal lengths, or a bad `batch_size` / `namespace` raise ValueError or
        TypeError naming the argument before any lookup (the cache is left as it was); a model
        whose weights moved to another dtype or device raises RuntimeError. Match locks are
        released before the forward pass, in a `finally`; an exception in the forward pass stores
        nothing of that chunk's rows (only shared prefixes prefilled before it, complete KV).
        Half precision: scores differ from the plain forward's by the dtype's rounding (a cached
        prefix was computed in another batch shape), as in `generate`. Thread-safe as `generate`.
        No length check: a sequence longer than the model's window gets
        whatever the plain forward pass gives (lm-eval's adapter truncates first, as HFLM).
        Costs per chunk: one match per row, one copy of the reused KV, one forward pass over
        S = max(len_i - hit_i) columns with the vocabulary projection on the last
        max(len(continuation)) columns only, one float32 log-softmax over those, one insert per row.
        """
        return score_continuations(self, contexts, continuations, batch_size=batch_size, namespace=namespace)

    @property
    def score_stats(self) -> ScoreStats:
        """Totals of `score` calls (rows, reused context tokens); see `ScoreStats`."""
        return counter_of(self).stats

    # ----- the cached path ------------------------------------------------------------
    def _generate_cached(self, plan: CallPlan, tenant: object = None) -> Any:
        cache, model_kv = self.cache, self._model_kv
        assert cache is not None and model_kv is not None
        weights = weights_dtype_device(self.model)
        if weights != self._weights:
            # Cached KV was computed by the weights as they were; mixing it in would be silently wrong.
            raise RuntimeError(
                f"the model moved from {self._weights} to {weights} since radixkv.wrap; wrap it again for a new cache"
            )
        namespace = self._namespace()
        ids, mask = plan.input_ids, plan.attention_mask
        width = ids.shape[1]
        lengths: list[int] = (mask != 0).sum(dim=1).tolist()
        rows: list[list[int]] = ids.tolist()
        prompts = [row[width - n :] for row, n in zip(rows, lengths, strict=True)]

        compute_once, hold_once = self.share_prefixes
        expand = plan.expand
        trie = BlockTrie(prompts, cache.block_size, expand)
        matches: list[PrefixMatch] = []
        groups: list[ShareGroup] = []
        shared: list[list[LayerKV]] = []
        try:
            matches = self._match_sharing(prompts, lengths, trie, expand, compute_once, namespace, tenant)
            layout = plan_layout(width, lengths, [m.num_tokens for m in matches])
            if hold_once:
                groups = share_groups(
                    trie,
                    layout.reused,
                    expand,
                    min_tokens=SHARE_MIN_TOKENS,
                    min_rows=SHARE_MIN_ROWS,
                    min_saved=SHARE_MIN_SAVED_TOKENS,
                )
            held = [0] * len(prompts)  # per input row: tokens its group holds once
            for g in groups:
                for r in g.rows[::expand]:
                    held[r // expand] = g.tokens
            # Rows gather only what they hold themselves; each group's prefix is gathered once.
            bs = cache.block_size
            gathered = [
                cache.gather(m, start=h, stop=min(m.num_tokens, -(-n // bs) * bs)) if n > h else None
                for m, n, h in zip(matches, layout.reused, held, strict=True)
            ]
            shared = [cache.gather(matches[g.source], stop=g.tokens) for g in groups]
        finally:
            self._release_all(matches)

        if groups:
            past: Any = build_shared_past(
                own=gathered,
                own_tokens=[n - h for n, h in zip(layout.reused, held, strict=True)],
                shared=shared,
                groups=[(g.rows, g.tokens) for g in groups],
                expand=expand,
                past_width=layout.past_width,
                row_start=[width - n for n in lengths],
                suffix_valid=mask[:, layout.past_width :],
                model_kv=model_kv,
            )
        else:
            past = build_past(layout, gathered, model_kv, expand)
        del gathered, shared
        extra = plan.bound.arguments.setdefault(plan.var_kwargs, {})
        extra[CACHE_KWARG] = past
        extra["attention_mask"] = mask
        if groups:
            with shared_attention(self.model, past):
                out = self.model.generate(*plan.bound.args, **plan.bound.kwargs)
            _check_all_layers_shared(past)
        else:
            out = self.model.generate(*plan.bound.args, **plan.bound.kwargs)
        held_tokens = sum(g.tokens * (len(g.rows) - 1) for g in groups)
        self._count(uncached=False, prompt_tokens=sum(lengths), reused_tokens=layout.reused_tokens, held=held_tokens)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        self._insert(plan, layout, prompts, sequences, past, namespace, tenant)
        return out

    def _match_sharing(
        self,
        prompts: Sequence[list[int]],
        lengths: Sequence[int],
        trie: BlockTrie,
        expand: int,
        compute_once: bool,
        namespace: object,
        tenant: object,
    ) -> list[PrefixMatch]:
        """`_match_all`, after computing once the prefixes the rows share (when `compute_once` and
        that lowers the batch's prefill positions, `lengths[i]` being row i's input length).

        Each such prefix is stored and the rows are looked up again: they hit it like a prefix an
        earlier call stored (the same prefill KV). The caller releases the matches returned.
        """
        matches = self._match_all(prompts, namespace, tenant)
        if compute_once:
            hits = [m.num_tokens for m in matches]
            todo = prefixes_to_compute(trie, hits)
            if todo and prefill_saved(trie, lengths, hits, todo, expand) > 0:
                self._release_all(matches)
                self._compute_prefixes([prompts[row][:n] for row, n in todo], namespace, tenant)
                matches = self._match_all(prompts, namespace, tenant)
        return matches

    def _match_all(self, prompts: Sequence[list[int]], namespace: object, tenant: object) -> list[PrefixMatch]:
        """Each prompt's longest cached prefix, at most len - 1 tokens (generate must compute at
        least one prompt token). On an exception, the matches taken so far are released."""
        cache = self.cache
        assert cache is not None
        matches: list[PrefixMatch] = []
        try:
            for prompt in prompts:
                matches.append(cache.match(prompt[:-1], namespace=namespace, tenant=tenant))
        except BaseException:
            self._release_all(matches)
            raise
        return matches

    def _release_all(self, matches: Sequence[PrefixMatch]) -> None:
        assert self.cache is not None
        for m in matches:
            if not m.released:
                self.cache.release(m)

    def _compute_prefixes(self, prefixes: Sequence[list[int]], namespace: object, tenant: object) -> None:
        """Prefill each of `prefixes` (whole blocks, shortest first) on top of its cached part and store it.

        One single-row forward pass per prefix over its uncached tokens, positions as in a
        left-padded batch (0 at the first real token), only the last position's logits. What is
        stored is complete prefill KV: an exception leaves at most fewer prefixes stored.
        """
        cache, model_kv = self.cache, self._model_kv
        assert cache is not None and model_kv is not None
        spec = model_kv.spec
        device = self.model.device
        for tokens in prefixes:
            match = cache.match(tokens, namespace=namespace, tenant=tenant)
            try:
                hit = match.num_tokens
                if hit >= len(tokens):  # another call stored it meanwhile
                    continue
                layout = plan_layout(len(tokens), [len(tokens)], [hit])
                gathered = [cache.gather(match)] if hit else [None]
            finally:
                cache.release(match)
            past = build_past(layout, gathered, model_kv, 1)
            del gathered
            rest = torch.tensor([tokens[hit:]], dtype=torch.long, device=device)
            kwargs: dict[str, Any] = {
                CACHE_KWARG: past,
                "use_cache": True,
                "attention_mask": torch.ones((1, len(tokens)), dtype=torch.long, device=device),
                "position_ids": torch.arange(hit, len(tokens), device=device).unsqueeze(0),
            }
            if self._logits_to_keep:
                kwargs["logits_to_keep"] = 1  # the logits are not used: skip the vocabulary projection
            with torch.no_grad():
                self.model(input_ids=rest, **kwargs)
            cache.insert(tokens, row_kv(past, 0, 0, len(tokens), spec), namespace=namespace, tenant=tenant)
            with self._lock:
                self._computed_once_tokens += len(tokens) - hit

    def _namespace(self) -> object:
        """The cache namespace for a call starting now: (weights epoch, adapter state), None for
        the weights as wrapped without adapters. A changed weight tensor starts a new epoch and
        drops the cache (entries of older epochs are never matched)."""
        with self._lock:
            tensors, adapters = self._watch.look()
            if tensors != self._tensors_version:
                self._tensors_version = tensors
                self._epoch += 1
                assert self.cache is not None
                self.cache.clear()
                if self._fingerprint is not None:
                    self._fingerprint = model_fingerprint(self.model)
            if self._fingerprint is not None:
                return ("weights", self._fingerprint, adapters)
            return (self._epoch, adapters) if self._epoch or adapters else None

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until KV queued for the shared tier is written (see `PrefixCache.flush`)."""
        return self.cache.flush(timeout) if self.cache is not None else True

    def _insert(
        self,
        plan: CallPlan,
        layout: BatchLayout,
        prompts: Sequence[list[int]],
        sequences: torch.Tensor,
        past: Any,
        namespace: object,
        tenant: object = None,
    ) -> None:
        """Store each returned row's prompt + output KV; prompts only for beam search and where
        `reuse_generated` is False (their KV comes from the prefill, as plain `generate` computes it)."""
        cache = self.cache
        assert cache is not None and self._model_kv is not None
        spec = self._model_kv.spec
        width, expand = layout.width, plan.expand
        kv_columns = past_length(past)
        if plan.beam or not self.reuse_generated or kv_columns != sequences.shape[1] - 1:
            # Beam rows were reordered every step; any cache row of input i still holds its prompt.
            # Generated tokens' KV was computed one token at a time; in half precision it differs
            # from the prefill's KV of the same tokens (by up to 1 ulp in K, e.g. 0.25 in bfloat16),
            # and reusing it can change greedy tokens. The next turn's prefill computes them anew.
            # (A length mismatch in a non-beam call means generate changed its cache contract:
            # then only the prompt columns, filled by the prefill, are known to be right.)
            for i, prompt in enumerate(prompts):
                start = width - len(prompt)
                self._insert_row(prompt, row_kv(past, i * expand, start, width, spec), namespace, tenant)
            return
        generated = sequences[:, width:]  # [B * expand, N]
        n_keep = _lengths_to_eos(generated, plan.eos_token_ids)
        for r, keep in enumerate(n_keep):
            prompt = prompts[r // expand]
            start = width - len(prompt)
            # Column j of the cache holds the KV of sequences[:, j]; the last token has none.
            stop = min(width + keep, kv_columns)
            tokens = prompt + generated[r, : stop - width].tolist()
            self._insert_row(tokens, row_kv(past, r, start, stop, spec), namespace, tenant)

    def _insert_row(self, tokens: list[int], kv: list[LayerKV], namespace: object, tenant: object = None) -> None:
        assert self.cache is not None
        if len(tokens) >= self.cache.block_size:
            self.cache.insert(tokens, kv, namespace=namespace, tenant=tenant)

    def _count(self, *, uncached: bool, prompt_tokens: int = 0, reused_tokens: int = 0, held: int = 0) -> None:
        with self._lock:
            self._calls += 1
            self._held_once_tokens += held
            self._uncached_calls += int(uncached)
            self._prompt_tokens += prompt_tokens
            self._reused_tokens += reused_tokens


def _decode_kv_is_exact(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether KV computed one token at a time matches a prefill's closely enough to keep greedy
    output identical: float64, or float32 with full-precision float32 matmuls on `device`."""
    if dtype == torch.float64:
        return True
    return dtype == torch.float32 and _float32_matmul_precision(torch.device(device).type) == "ieee"


def _float32_matmul_precision(device_type: str) -> str:
    """The float32 matmul precision in effect on a device type: "ieee" (full), "tf32" or "bf16".

    Read from torch's per-backend settings, which both of its APIs set: CUDA (and ROCm):
    `torch.backends.cuda.matmul.fp32_precision`; CPU: `torch.backends.mkldnn.matmul.fp32_precision`,
    then `torch.backends.mkldnn.fp32_precision`; a "none" falls back to `torch.backends.fp32_precision`,
    and "none" there means "ieee". `torch.set_float32_matmul_precision("high")` sets both backends
    to "tf32", "medium" sets the CPU's to "bf16"; `torch.backends.cuda.matmul.allow_tf32 = True`
    sets CUDA's only, and so does `torch.backends.cudnn.fp32_precision` (CUDA's backend-wide value,
    which torch reports through the matmul one). Any other device type gets the least precise of
    the two. The legacy getters
    (`torch.get_float32_matmul_precision()`, `allow_tf32`) are never read: they raise RuntimeError
    once the new API has set a value.
    """
    backends = torch.backends
    root = _precision_value(backends, "fp32_precision") or "ieee"
    cuda = _precision_value(backends.cuda.matmul, "fp32_precision") or root
    mkldnn = getattr(backends, "mkldnn", None)
    cpu = _precision_value(getattr(mkldnn, "matmul", None), "fp32_precision") or _precision_value(
        mkldnn, "fp32_precision"
    )
    cpu = cpu or root
    if device_type == "cuda":
        return cuda
    if device_type == "cpu":
        return cpu
    return cuda if cuda != "ieee" else cpu


def _precision_value(holder: object, name: str) -> str | None:
    """A backend's fp32_precision, None when it is "none" (inherit) or the torch build lacks it."""
    value = getattr(holder, name, None) if holder is not None else None
    return value if isinstance(value, str) and value != "none" else None


def _hold_once_reason(model: Any) -> str | None:
    """Why rows of `model` cannot attend to one copy of a shared prefix, or None when they can.

    The shared path replaces the model's attention function (transformers' attention
    interface) and computes plain softmax attention without windows: models whose attention
    does not go through that interface, or that use sliding windows, logit soft-capping or an
    upcast-and-reorder variant, keep a private copy per row (today's path, same output).
    """
    if not getattr(type(model), "_supports_attention_backend", False):
        return f"{type(model).__name__} does not route its attention through transformers' attention interface"
    config = model.config
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ("eager", "sdpa"):
        return f"attention implementation {implementation!r} (shared prefixes are served over eager and sdpa)"
    try:
        layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except Exception as exc:  # any config transformers cannot describe layer by layer
        return f"cannot read the model's attention layer types ({exc})"
    if any(t != "full_attention" for t in layer_types):
        return "the model has sliding-window layers (a shared prefix may fall outside a row's window)"
    for name in ("attn_logit_softcapping", "reorder_and_upcast_attn"):
        if getattr(config, name, None):
            return f"the model's config sets {name}"
    return None


def _check_all_layers_shared(past: SharedPrefixCache) -> None:
    """Every layer's attention must have gone through the shared path; a layer that bypassed it
    would have attended to its own tokens only. Raises rather than return such output."""
    missed = [i for i, calls in enumerate(past.attention_calls) if calls == 0]
    if missed:
        raise RuntimeError(f"radixkv: layers {missed} did not use the shared-prefix attention; output is not valid")


def _lengths_to_eos(generated: torch.Tensor, eos_token_ids: tuple[int, ...]) -> list[int]:
    """Per row, generated tokens up to and including the first EOS (all of them without one)."""
    rows, n = generated.shape
    if not eos_token_ids or n == 0:
        return [n] * rows
    eos = torch.tensor(eos_token_ids, dtype=generated.dtype, device=generated.device)
    is_eos = torch.isin(generated, eos)  # [R, N]
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, n)
    return first.tolist()


def default_capacity_tokens(model: Any, spec: KVSpec) -> int:
    """The pool size `wrap` picks when given no capacity, in tokens.

    DEFAULT_WEIGHTS_FRACTION of the parameters' bytes, at least DEFAULT_MIN_CAPACITY_TOKENS,
    then capped by the machine: DEFAULT_CUDA_FREE_FRACTION of the free memory of a CUDA device
    now, else DEFAULT_CPU_MEMORY_FRACTION of physical memory (no cap where that is unknown).
    For SmolLM2-135M (30 layers, 3 KV heads of 64): a pool of 5,824 tokens in 16-token blocks,
    256 MiB in float32, 128 MiB in bfloat16. Cost: one pass over the parameters.
    """
    per_token = spec.bytes_per_token
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) if hasattr(model, "parameters") else 0
    tokens = max(int(weights * DEFAULT_WEIGHTS_FRACTION) // per_token, DEFAULT_MIN_CAPACITY_TOKENS)
    device = torch.device(spec.device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        limit: int | None = int(free * DEFAULT_CUDA_FREE_FRACTION)
    else:
        physical = _physical_memory()
        limit = None if physical is None else int(physical * DEFAULT_CPU_MEMORY_FRACTION)
    if limit is not None:
        tokens = min(tokens, limit // per_token)
    return max(1, tokens)


def _physical_memory() -> int | None:
    """Bytes of physical memory, None where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def wrap(
    model: Any,
    *,
    reuse_generated: bool | None = None,
    share_prefixes: bool | None = None,
    **options: Unpack[CacheOptions],
) -> CachedModel:
    """Wrap a Hugging Face decoder-only model so that `generate` reuses cached prefixes.

    Give at most one of `capacity_tokens` / `capacity_bytes`; the pool is allocated and zeroed
    here, once, so no call pays for page faults. With neither, `default_capacity_tokens`: half
    the parameters' bytes, at least 2,048 tokens, at most a quarter of physical memory (half of
    the free memory on CUDA). `block_size`, `eviction`, `shares` ({namespace: fraction}, the
    namespaces of `generate(..., namespace=)`) and the lower tiers (`host_capacity_tokens`,
    `disk_path`, `disk_capacity_bytes`) go to `PrefixCache`; with a
    tier, entries are keyed by a fingerprint of the model (class, config, dtype and a checksum
    of the weights, recomputed when the weights change), so a restarted process reuses its disk
    entries and a different model or changed weights never do.
    `reuse_generated`: whether the KV of generated tokens is stored too, so that the next chat
    turn hits on the previous answer without computing it. None (default): only where that KV
    reproduces plain `generate` (float32 / float64, see `CachedModel.reuse_generated`); in half
    precision only the prompt's KV is stored, so the next turn's prefill computes each answer
    once, as plain `generate` does, and later turns hit on it. True: always (greedy output may
    differ slightly from plain `generate` in half precision). False: never. Anything else
    raises TypeError.
    `share_prefixes`: sharing inside one call. Prefixes (whole blocks) that several rows, beams
    or sampled sequences of a call share are prefilled once and stored before `generate`
    (computed once), and rows sharing a cached prefix of at least SHARE_MIN_TOKENS tokens attend
    to one copy of its KV while decoding (held once; exact log-sum-exp merge). None (default):
    both in float32 / float64 with an exact pool (`CachedModel.share_prefixes`), where outputs
    stay within float32 rounding of plain `generate`. True: both wherever the model allows
    (`hold_once_reason`), half precision included (outputs may then differ slightly from plain
    `generate`). False: neither (each row computes and holds its own copy, as plain `generate`).
    `kv_dtype="int8"` / `"int4"` (PrefixCache's) stores reused KV quantised (about 1.9x / 3.5x
    the tokens of float16 per byte); outputs then differ from plain `generate`. The default
    (None) keeps them equal. The host, disk and shared tiers store the same quantised blocks;
    with `exact_pool=True` only they do, and the device pool stays exact.
    The KVSpec is read from one 1-token forward pass (layers, KV heads, head_dim, dtype,
    device). Models the cache cannot serve are still wrapped: their calls run uncached with an
    `UncachedWarning`, `cache` is None and `unsupported_reason` says why.
    `shared="redis://[:password@]host:port/db"` (or RedisOptions) adds the shared Redis tier:
    replicas wrapping the same model reuse each other's prefixes. Entries are keyed by the
    weights fingerprint as above (and the keys by `shared_model`, by default that fingerprint
    at wrap), so replicas with other weights never read each other's KV. A refused password
    raises SharedTierError here; an unreachable server warns once and the local cache serves
    alone until it is back.
    """
    return CachedModel(model, reuse_generated=reuse_generated, share_prefixes=share_prefixes, **options)
