"""Cached scoring: log-probabilities of continuations given contexts, reusing cached context KV.

The evaluation workload (lm-evaluation-harness's `loglikelihood`): many (context, continuation)
pairs whose contexts share a long few-shot prefix, scored by a forward pass rather than
`generate`. `score_continuations` serves it with the same machinery as the generate path:

1. Validate every row first (a bad row raises before any lookup, so the cache is untouched).
2. Per chunk of rows: match each context's longest cached prefix, at most len(context) - 1
   tokens (the last context token's logits score the first continuation token, so it is always
   computed). Whole-block context prefixes that several rows of the chunk share and the cache
   lacks are prefilled once and stored first (`_hf_share`, as `generate` does), when that lowers
   the chunk's prefill positions; the rows then hit them.
3. One forward pass over the suffix-aligned layout of `_hf_layout`: rows left-padded to one
   width T, the last S = max(len_i - hit_i) columns computed on top of a pre-filled cache of the
   first T - S (`build_past`), explicit position ids (0 at each row's first real token). Left
   padding puts every row's scored positions in the last columns, so the vocabulary projection
   runs on the last max(n_i) columns only (`logits_to_keep`).
4. Log-softmax in float32, gather each continuation token's log-probability and whether it is
   the argmax; store each row's context (whole blocks), never its continuation: the other
   choices of the question and later questions hit the context, while continuations are rarely
   seen again and would only push contexts out of the pool.

Rows the cache cannot serve go to the plain forward pass (one unpadded row at a time), with
one `UncachedWarning` per call saying why.

Why a `score(contexts, continuations)` method and not a cached `forward(input_ids,
logits_to_keep=k)`: a forward that skips cached positions cannot return what a forward returns
there (logits, hidden states, attentions, a loss over `labels`, a `past_key_values` covering the
whole input), so `cached(input_ids)` would silently stop being the model's forward, which the
drop-in contract keeps it. The context / continuation split is also exactly what the cache needs
to know (the context is looked up and stored; the continuation is scored and not stored), and
the result is what callers compute from the logits anyway (log-softmax and gather, as
lm-evaluation-harness does). Token ids rather than text: harnesses tokenise the pair themselves
(jointly, moving trailing spaces into the continuation), so the method takes what they have.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from radixkv.cache import PrefixCache, PrefixMatch
from radixkv.core.hashing import namespace_key

from ._hf_kv import CACHE_KWARG, LayerKV, ModelKV, build_past, row_kv, weights_dtype_device
from ._hf_layout import plan_layout
from ._hf_share import BlockTrie
from ._hf_support import UncachedWarning


class ScoringHost(Protocol):
    """What scoring reads of the wrapper: `CachedModel` is one. A protocol, so that this module
    never imports hf.py (which imports this module for `CachedModel.score`)."""

    model: Any
    cache: PrefixCache | None
    unsupported_reason: str | None
    _model_kv: ModelKV | None
    _vocab_size: int | None
    _weights: tuple[torch.dtype, torch.device] | None
    _logits_to_keep: bool

    @property
    def share_prefixes(self) -> tuple[bool, bool]: ...

    def _namespace(self) -> object: ...

    def _match_sharing(
        self,
        prompts: Sequence[list[int]],
        lengths: Sequence[int],
        trie: BlockTrie,
        expand: int,
        compute_once: bool,
        namespace: object,
        tenant: object,
    ) -> list[PrefixMatch]: ...

    def _release_all(self, matches: Sequence[PrefixMatch]) -> None: ...

    def _insert_row(self, tokens: list[int], kv: list[LayerKV], namespace: object, tenant: object = None) -> None: ...


__all__ = ["ContinuationScore", "ScoreStats", "ScoringHost", "score_continuations"]

TokenRow = Sequence[int] | torch.Tensor


@dataclass(frozen=True)
class ContinuationScore:
    """One row's result.

    token_logprobs: float32 `[len(continuation)]` on the CPU, log P(continuation[j] | context +
    continuation[:j]). greedy: bool `[len(continuation)]`, whether continuation[j] is the argmax
    there (the first index among equal maxima, as `torch.argmax`).
    """

    token_logprobs: torch.Tensor
    greedy: torch.Tensor

    @property
    def logprob(self) -> float:
        """The continuation's log-likelihood: the sum of `token_logprobs`."""
        return float(self.token_logprobs.sum())

    @property
    def is_greedy(self) -> bool:
        """Whether greedy decoding from the context would produce the whole continuation."""
        return bool(self.greedy.all())


@dataclass(frozen=True)
class ScoreStats:
    """What `CachedModel.score` did, in rows and tokens.

    calls: score calls. rows: rows scored; uncached_rows: those that went to the plain forward.
    context_tokens: context tokens of the cached rows. reused_tokens: context tokens taken from
    the cache instead of computed. Context prefixes that rows of one chunk share and that were
    prefilled once for them count in `CachedModel.stats.computed_once_tokens` (with generate's).
    """

    calls: int = 0
    rows: int = 0
    uncached_rows: int = 0
    context_tokens: int = 0
    reused_tokens: int = 0


class _Counter:
    """Thread-safe running totals behind `ScoreStats`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = ScoreStats()

    def add(self, **deltas: int) -> None:
        with self._lock:
            current = self._stats
            self._stats = ScoreStats(**{k: getattr(current, k) + deltas.get(k, 0) for k in ScoreStats.__annotations__})

    @property
    def stats(self) -> ScoreStats:
        with self._lock:
            return self._stats


def counter_of(cm: ScoringHost) -> _Counter:
    """The wrapper's score counter, created on first use (kept out of `CachedModel.__init__`)."""
    found = cm.__dict__.get("_score_counter")
    if found is None:
        found = cm.__dict__.setdefault("_score_counter", _Counter())
    return found


def _as_rows(value: object, name: str, vocab_size: int | None) -> list[list[int]]:
    """`value` as a list of non-empty token-id lists; raises TypeError / ValueError naming `name`."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, torch.Tensor)):
        raise TypeError(f"{name} must be a sequence of token-id sequences, got {type(value).__name__}")
    rows: list[list[int]] = []
    for i, row in enumerate(value):
        if isinstance(row, torch.Tensor):
            if row.dim() != 1 or row.dtype.is_floating_point or row.dtype.is_complex or row.dtype == torch.bool:
                shape = tuple(row.shape)
                raise TypeError(f"{name}[{i}] must be a 1-D integer tensor, got {row.dtype} of shape {shape}")
            ids = row.tolist()
        elif isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(f"{name}[{i}] must be a sequence of token ids, got {type(row).__name__}")
        else:
            ids = list(row)
            if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
                bad = next(t for t in ids if isinstance(t, bool) or not isinstance(t, int))
                raise TypeError(f"{name}[{i}] must hold int token ids, got {type(bad).__name__} {bad!r}")
        if not ids:
            raise ValueError(f"{name}[{i}] is empty: every row needs at least one token")
        low, high = min(ids), max(ids)
        if low < 0 or (vocab_size is not None and high >= vocab_size):
            bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise ValueError(f"{name}[{i}] holds token id {low if low < 0 else high}, outside {bound}")
        rows.append(ids)
    return rows


def score_continuations(
    cm: ScoringHost,
    contexts: Sequence[TokenRow],
    continuations: Sequence[TokenRow],
    *,
    batch_size: int | None = None,
    namespace: object = None,
) -> list[ContinuationScore]:
    """See `CachedModel.score`."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
    if namespace is not None:
        namespace_key(namespace, "namespace")
    ctx_rows = _as_rows(contexts, "contexts", cm._vocab_size)
    cont_rows = _as_rows(continuations, "continuations", cm._vocab_size)
    if len(ctx_rows) != len(cont_rows):
        raise ValueError(
            f"contexts and continuations must have the same length, got {len(ctx_rows)} and {len(cont_rows)}"
        )
    counter = counter_of(cm)
    counter.add(calls=1, rows=len(ctx_rows))
    if not ctx_rows:
        return []
    reason = _uncached_reason(cm)
    if reason is not None:
        warnings.warn(f"radixkv: score ran uncached: {reason}", UncachedWarning, stacklevel=3)
        counter.add(uncached_rows=len(ctx_rows))
        return [_score_plain(cm.model, c, k) for c, k in zip(ctx_rows, cont_rows, strict=True)]
    weights = weights_dtype_device(cm.model)
    if weights != cm._weights:
        raise RuntimeError(
            f"the model moved from {cm._weights} to {weights} since radixkv.wrap; wrap it again for a new cache"
        )
    # Rows in token order: rows sharing a context (the choices of one question) and rows sharing a
    # few-shot prefix land side by side, hence in one chunk, where their common part is computed once.
    order = sorted(range(len(ctx_rows)), key=lambda i: (ctx_rows[i], cont_rows[i]))
    size = batch_size or len(order)
    out: list[ContinuationScore | None] = [None] * len(order)
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        results = _score_chunk(cm, [ctx_rows[i] for i in chunk], [cont_rows[i] for i in chunk], namespace, counter)
        for i, result in zip(chunk, results, strict=True):
            out[i] = result
    return [r for r in out if r is not None]


def _uncached_reason(cm: ScoringHost) -> str | None:
    if cm.cache is None or cm._model_kv is None:
        return cm.unsupported_reason or "the model is not served by the cache"
    if getattr(cm.model, "training", False):
        return "the model is in training mode (dropout)"
    return None


def _score_chunk(
    cm: ScoringHost,
    contexts: list[list[int]],
    continuations: list[list[int]],
    tenant: object,
    counter: _Counter,
) -> list[ContinuationScore]:
    cache, model_kv = cm.cache, cm._model_kv
    assert cache is not None and model_kv is not None
    namespace = cm._namespace()
    # Row i's model input is context + continuation[:-1] (the last token is scored, never fed);
    # its scored positions are the last len(continuation) of them.
    inputs = [c + k[:-1] for c, k in zip(contexts, continuations, strict=True)]
    lengths = [len(x) for x in inputs]
    width = max(lengths)
    compute_once, _ = cm.share_prefixes
    trie = BlockTrie(contexts, cache.block_size, 1)  # blocks inside context[:-1]: what can be matched
    matches: list[PrefixMatch] = []
    try:
        matches = cm._match_sharing(contexts, lengths, trie, 1, compute_once, namespace, tenant)
        layout = plan_layout(width, lengths, [m.num_tokens for m in matches])
        bs = cache.block_size
        gathered: list[list[LayerKV] | None] = [
            cache.gather(m, stop=min(m.num_tokens, -(-n // bs) * bs)) if n > 0 else None
            for m, n in zip(matches, layout.reused, strict=True)
        ]
    finally:
        cm._release_all(matches)

    device = model_kv.layer_devices[0]
    past = build_past(layout, gathered, model_kv, 1)
    del gathered
    ids = torch.zeros((len(inputs), width), dtype=torch.long)
    mask = torch.zeros((len(inputs), width), dtype=torch.long)
    for row, x in enumerate(inputs):  # one slice assignment per row, not per token
        ids[row, width - len(x) :] = torch.tensor(x, dtype=torch.long)
        mask[row, width - len(x) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # 0 at each row's first real token
    suffix = layout.suffix
    keep = max(len(k) for k in continuations)  # <= suffix: every row computes its whole continuation
    kwargs: dict[str, Any] = {
        CACHE_KWARG: past,
        "use_cache": True,
        "attention_mask": mask,
        "position_ids": positions[:, width - suffix :],
    }
    if cm._logits_to_keep:
        kwargs["logits_to_keep"] = keep
    with torch.no_grad():
        logits = cm.model(input_ids=ids[:, width - suffix :], **kwargs).logits[:, -keep:]
    results = _gather_scores(logits, continuations)
    del logits
    for row, (context, x) in enumerate(zip(contexts, inputs, strict=True)):
        start = width - len(x)
        cm._insert_row(context, row_kv(past, row, start, start + len(context), model_kv.spec), namespace, tenant)
    counter.add(context_tokens=sum(len(c) for c in contexts), reused_tokens=layout.reused_tokens)
    return results


def _gather_scores(logits: torch.Tensor, continuations: Sequence[list[int]]) -> list[ContinuationScore]:
    """Per row, the log-probabilities and argmax flags of its continuation, right-aligned in the
    last `logits.shape[1]` columns. One batched log-softmax, gather and argmax; rows are sliced
    apart at the end."""
    rows, keep, _ = logits.shape
    targets = torch.zeros((rows, keep), dtype=torch.long)
    for row, k in enumerate(continuations):
        targets[row, keep - len(k) :] = torch.tensor(k, dtype=torch.long)
    targets = targets.to(logits.device)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
    greedy = (logprobs.argmax(dim=-1) == targets).cpu()
    return [
        ContinuationScore(token_logprobs=token_lp[row, keep - len(k) :], greedy=greedy[row, keep - len(k) :])
        for row, k in enumerate(continuations)
    ]


def _score_plain(model: Any, context: list[int], continuation: list[int]) -> ContinuationScore:
    """The plain forward pass over one unpadded row, as an evaluation harness runs it."""
    ids = torch.tensor([context + continuation[:-1]], dtype=torch.long, device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, -len(continuation) :]
    return _gather_scores(logits, [continuation])[0]
