"""One copy of a shared prefix's KV for many rows while `generate` decodes (cascade attention).

`SharedPrefixCache` is the `DynamicCache` the adapter hands `generate` when rows of a call share
a cached prefix (`_hf_share.share_groups`). Each group's prefix KV is held once per layer,
`[H, P, D]`; every cache row (input rows, beams, sampled sequences) keeps only its own tokens,
`[R, H, W, D]`, right-aligned, so beam reordering and the per-step concatenation touch only the
rows' own parts.

Attention splits exactly over the two parts. For one query, with scores s over the shared
prefix and s' over the row's own tokens:

    softmax([s, s']) @ [V_s; V_o] = (e^{m_s} l_s o_s + e^{m_o} l_o o_o) / (e^{m_s} l_s + e^{m_o} l_o)

where m is a part's maximum score, l its sum of exp(s - m) and o its normalised output. The
shared part is computed once per group for all of its rows' queries at once (one
matrix-matrix product over one copy of the prefix, not one matrix-vector product per row), the
own part as usual with the row's padding and causal mask, and the merge (log-sum-exp) in
float32, or float64 for float64 models.

transformers picks a layer's attention function by `config._attn_implementation`. The
adapter registers one more name, `ATTENTION_NAME` (an addition to transformers' registries that
no other model uses), and switches the wrapped model's config to it only for the duration of a
shared call (`shared_attention`). While switched, any other forward pass of that model (another
thread calling it directly) is handed to the model's own implementation unchanged; the shared
path runs only in the thread and call that set it up (a context variable).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from radixkv.core.pool import LayerKV
from radixkv.core.spec import KVSpec

from ._hf_kv import ModelKV, build_past
from ._hf_layout import BatchLayout

__all__ = ["ATTENTION_NAME", "SharedPrefixCache", "SharedPrefixLayer", "shared_attention"]

ATTENTION_NAME = "radixkv_shared_prefix"

_ACTIVE: ContextVar[SharedPrefixCache | None] = ContextVar("radixkv_shared_prefix", default=None)
_SWITCH_LOCK = threading.Lock()
_ORIGINAL: dict[int, str] = {}  # id(config) -> the implementation it had before the first switch
_USERS: dict[int, int] = {}  # id(config) -> shared calls running on it
_REGISTERED = False


class SharedPrefixLayer(DynamicLayer):
    """One layer of a `SharedPrefixCache`: the rows' own KV plus each group's prefix KV, once.

    keys / values: own tokens `[R, H, W, D]`, right-aligned (zeros before a row's first own
    token; those columns are masked). shared[g]: group g's prefix (K, V), each `[H, P_g, D]`.
    `offset`: caller columns that are not own columns, so `get_seq_length()` is what `generate`
    expects (the columns of the caller's padded prompt it need not compute).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, shared: list[LayerKV], offset: int) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self.shared = shared
        self.offset = offset
        self.owner: SharedPrefixCache | None = None  # set by the cache that holds the layer

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens to the own part and return the own part only ([R, H, W, D]).

        Only inside the shared call it was built for: anywhere else the model's own attention
        would read the own part without the shared prefix, so this raises instead.
        """
        if _ACTIVE.get() is not self.owner:
            raise RuntimeError(
                "a radixkv shared-prefix cache (e.g. `.past_key_values` of a cached generate) cannot be passed to "
                "another call: its rows hold only their own tokens"
            )
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] + self.offset

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a shared-prefix cache cannot be cropped (radixkv serves no decoding mode that does)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a shared-prefix cache is built with its rows already expanded")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a shared-prefix cache cannot drop rows (radixkv serves no decoding mode that does)")


class SharedPrefixCache(DynamicCache):
    """A `DynamicCache` whose rows attend to shared prefixes held once; see the module docstring.

    groups: per group, its cache rows (LongTensor on the KV device) and prefix length P_g.
    row_group[r]: group of cache row r, or -1. row_start[r]: caller column of row r's first real
    token. past_valid `[R, W0]` and suffix_valid `[R, S]` (bool): which own columns before the
    prefill and which of the S prefilled columns hold real tokens; every later column (one a
    generated token) is real, as `generate` extends the mask with ones.
    Contract: only `SharedPrefixLayer`s; used inside `shared_attention` (the attention of a
    layer reads its shared part from here); `reorder_cache` (beam search) reorders own parts
    and row metadata, never the shared prefixes, and must keep beams within their input row,
    as `generate` does. Cost per layer and step: one own-part attention as in eager attention,
    one shared-part product per group, one float32 merge.
    """

    def __init__(
        self,
        layers: list[SharedPrefixLayer],
        groups: list[tuple[torch.Tensor, int]],
        row_group: list[int],
        row_start: list[int],
        past_valid: torch.Tensor,
        suffix_valid: torch.Tensor,
    ) -> None:
        Cache.__init__(self, layers=list(layers))
        for layer in layers:
            layer.owner = self
        self.groups = groups
        self.row_group = row_group
        self.row_start = row_start
        self.past_valid = past_valid
        self.suffix_valid = suffix_valid
        self._valid: tuple[int, torch.Tensor] | None = None  # (own width, [R, W] bool) of the last step
        self.attention_calls = [0] * len(layers)
        self._configs: frozenset[int] = frozenset()

    def bind(self, configs: Sequence[Any]) -> None:
        """Serve the attention of modules whose config is one of `configs` (the wrapped model's)."""
        self._configs = frozenset(id(c) for c in configs)

    def serves(self, module: Any) -> bool:
        return id(getattr(module, "config", None)) in self._configs

    # ----- beam search ---------------------------------------------------------------------
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        order = beam_idx.tolist()
        if any(self.row_group[new] != self.row_group[old] for old, new in enumerate(order)):
            # generate keeps beams within their input row; a move across groups would pair a
            # row with another prefix, so refuse it rather than attend to the wrong tokens.
            raise RuntimeError("beam reordering moved a row to another shared prefix")
        idx = beam_idx.to(self.past_valid.device)
        self.past_valid = self.past_valid.index_select(0, idx)
        self.suffix_valid = self.suffix_valid.index_select(0, idx)
        self.row_start = [self.row_start[i] for i in order]
        self._valid = None
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    # ----- reading a row back for insertion ------------------------------------------------
    def row_kv(self, row: int, start: int, stop: int, spec: KVSpec) -> list[LayerKV]:
        """Per layer (K, V) `[1, H, stop - start, D]` of cache row `row`, caller columns [start, stop).

        `start` must be the row's first real column (the adapter inserts whole rows). The
        shared part and the own part are concatenated: a fresh copy on `spec.device`.
        """
        if start != self.row_start[row]:
            raise ValueError(f"start must be row {row}'s first real column {self.row_start[row]}, got {start}")
        group = self.row_group[row]
        tokens = self.groups[group][1] if group >= 0 else 0
        first = self.layers[0]
        lo, hi = start + tokens - first.offset, stop - first.offset  # own columns of [start + P, stop)
        out: list[LayerKV] = []
        for layer in self.layers:
            k_own = layer.keys[row : row + 1, :, lo:hi]  # [1, H, stop - start - P, D]
            v_own = layer.values[row : row + 1, :, lo:hi]
            if group >= 0:
                k_sh, v_sh = layer.shared[group]  # [H, P, D]
                k = torch.cat([k_sh.unsqueeze(0).to(k_own.device), k_own], dim=2)
                v = torch.cat([v_sh.unsqueeze(0).to(v_own.device), v_own], dim=2)
            else:
                k, v = k_own, v_own
            out.append((k.to(spec.device), v.to(spec.device)))
        return out

    # ----- attention -----------------------------------------------------------------------
    def _own_mask(self, width: int, queries: int) -> torch.Tensor:
        """`[R, queries, width]` bool: own column c is a real token at or before query j."""
        if self._valid is None or self._valid[0] != width:
            past_w, suffix_w = self.past_valid.shape[1], self.suffix_valid.shape[1]
            rows, device = self.past_valid.shape[0], self.past_valid.device
            parts = [self.past_valid, self.suffix_valid[:, : max(0, width - past_w)]]
            extra = width - past_w - suffix_w
            if extra > 0:
                parts.append(torch.ones((rows, extra), dtype=torch.bool, device=device))
            self._valid = (width, torch.cat(parts, dim=1))
        valid = self._valid[1]  # [R, W]
        if queries == 1:
            return valid.unsqueeze(1)
        cols = torch.arange(width, device=valid.device)
        last = torch.arange(width - queries, width, device=valid.device)
        causal = cols.unsqueeze(0) <= last.unsqueeze(1)  # [queries, W]
        return valid.unsqueeze(1) & causal.unsqueeze(0)

    def attend(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
    ) -> torch.Tensor:
        """Attention output `[R, n, Hq, D]` of `query` `[R, Hq, n, D]` over each row's shared prefix
        and its own `key` / `value` `[R, Hkv, W, D]` (what the layer's `update` returned)."""
        self.attention_calls[layer_idx] += 1
        layer = self.layers[layer_idx]
        rows, q_heads, n, dim = query.shape
        kv_heads, width = key.shape[1], key.shape[2]
        grp = q_heads // kv_heads
        work = torch.float64 if query.dtype == torch.float64 else torch.float32
        scale = dim**-0.5 if scaling is None else scaling
        # Query heads j * grp ... j * grp + grp - 1 read KV head j: [R, Hkv, grp * n, D].
        q = query.reshape(rows, kv_heads, grp * n, dim).to(work)
        scores = torch.matmul(q, key.to(work).transpose(-1, -2)) * scale  # [R, Hkv, grp * n, W]
        allowed = self._own_mask(width, n)  # [R, n, W]
        allowed = allowed.unsqueeze(1).unsqueeze(1).expand(rows, 1, grp, n, width).reshape(rows, 1, grp * n, width)
        scores = scores.masked_fill(~allowed, float("-inf"))
        m_own = scores.amax(dim=-1, keepdim=True)  # [R, Hkv, grp * n, 1]; -inf where nothing is allowed
        probs = torch.exp(scores - torch.where(torch.isfinite(m_own), m_own, 0.0))
        l_own = probs.sum(dim=-1, keepdim=True)
        o_own = torch.matmul(probs, value.to(work))  # unnormalised, [R, Hkv, grp * n, D]
        out = o_own / l_own.clamp_min(torch.finfo(work).tiny)  # a row with nothing allowed gets 0
        for g, (members, _tokens) in enumerate(self.groups):
            k_sh, v_sh = layer.shared[g]  # [Hkv, P, D], one copy for all members
            count = members.shape[0]
            qg = q.index_select(0, members).transpose(0, 1).reshape(kv_heads, count * grp * n, dim)
            s = torch.matmul(qg, k_sh.to(work).transpose(-1, -2)) * scale  # [Hkv, count * grp * n, P]
            m_sh = s.amax(dim=-1, keepdim=True)
            p = torch.exp(s - m_sh)
            l_sh = p.sum(dim=-1, keepdim=True)
            o_sh = torch.matmul(p, v_sh.to(work))  # unnormalised, [Hkv, count * grp * n, D]
            # Back to [count, Hkv, grp * n, .] and merge with the members' own parts.
            m_sh = m_sh.view(kv_heads, count, grp * n, 1).transpose(0, 1)
            l_sh = l_sh.view(kv_heads, count, grp * n, 1).transpose(0, 1)
            o_sh = o_sh.view(kv_heads, count, grp * n, dim).transpose(0, 1)
            m_o, l_o, o_o = (t.index_select(0, members) for t in (m_own, l_own, o_own))
            top = torch.maximum(m_o, m_sh)  # finite: the shared part is never empty
            a, b = torch.exp(m_o - top), torch.exp(m_sh - top)
            out.index_copy_(0, members, (o_o * a + o_sh * b) / (l_o * a + l_sh * b))
        # [R, Hkv, grp * n, D] -> [R, Hq, n, D] -> [R, n, Hq, D], as transformers' attention returns.
        return out.view(rows, q_heads, n, dim).transpose(1, 2).to(query.dtype)


def _attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    cache = _ACTIVE.get()
    if cache is None or not cache.serves(module):
        return _delegate_attention(module, query, key, value, attention_mask, *args, **kwargs)
    for name in ("sliding_window", "softcap"):
        if kwargs.get(name) is not None:  # excluded when the call was planned; never approximate
            raise RuntimeError(f"radixkv shared-prefix attention got {name}={kwargs[name]!r}, which it does not serve")
    if kwargs.get("dropout", 0.0):
        raise RuntimeError("radixkv shared-prefix attention does not serve dropout (the model is in training mode)")
    return cache.attend(module.layer_idx, query, key, value, kwargs.get("scaling")), None


def _delegate_attention(module: Any, *args: Any, **kwargs: Any) -> Any:
    """The model's own attention, for forward passes outside the shared call that switched it."""
    name = _ORIGINAL.get(id(module.config))
    if name is None:
        raise RuntimeError(f"{ATTENTION_NAME} is set on a model that radixkv did not switch")
    default = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, default)(module, *args, **kwargs)


def _mask(*args: Any, config: Any = None, **kwargs: Any) -> Any:
    if _ACTIVE.get() is not None:
        return None  # the shared path builds its own masks from the cache's row metadata
    name = _ORIGINAL.get(id(config))
    if name is None:
        raise RuntimeError(f"{ATTENTION_NAME} is set on a model that radixkv did not switch")
    return ALL_MASK_ATTENTION_FUNCTIONS[name](*args, config=config, **kwargs)


def _register() -> None:
    global _REGISTERED
    if not _REGISTERED:
        ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _mask)
        _REGISTERED = True


def _configs(model: Any) -> list[Any]:
    """The model's config and its sub-configs (each is switched and restored on its own)."""
    seen: dict[int, Any] = {}
    todo = [model.config]
    while todo:
        config = todo.pop()
        if id(config) in seen:
            continue
        seen[id(config)] = config
        todo.extend(c for key in getattr(config, "sub_configs", {}) if (c := getattr(config, key, None)) is not None)
    return list(seen.values())


@contextmanager
def shared_attention(model: Any, cache: SharedPrefixCache) -> Iterator[None]:
    """Run the body with `model`'s attention going through `cache` in this thread.

    The model's configs name `ATTENTION_NAME` only while at least one shared call runs on it;
    the last one to finish restores what they named before, on every path (finally).
    """
    _register()
    configs = _configs(model)
    cache.bind(configs)
    with _SWITCH_LOCK:
        for config in configs:
            key = id(config)
            if _USERS.get(key, 0) == 0:
                _ORIGINAL[key] = config._attn_implementation_internal
                config._attn_implementation_internal = ATTENTION_NAME
            _USERS[key] = _USERS.get(key, 0) + 1
    token = _ACTIVE.set(cache)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        with _SWITCH_LOCK:
            for config in configs:
                key = id(config)
                _USERS[key] -= 1
                if _USERS[key] == 0:
                    del _USERS[key]
                    config._attn_implementation_internal = _ORIGINAL.pop(key)


def build_shared_past(
    *,
    own: Sequence[Sequence[LayerKV] | None],
    own_tokens: Sequence[int],
    shared: Sequence[Sequence[LayerKV]],
    groups: Sequence[tuple[Sequence[int], int]],
    expand: int,
    past_width: int,
    row_start: Sequence[int],
    suffix_valid: torch.Tensor,
    model_kv: ModelKV,
) -> SharedPrefixCache:
    """Lay out a `SharedPrefixCache` for B input rows, each repeated `expand` times.

    own[i]: input row i's gathered KV after its group's prefix, per layer `[1, H, >= own_tokens[i], D]`
    (None when it reuses nothing of its own). shared[g]: group g's prefix KV, per layer
    `[1, H, P_g, D]`. groups[g]: (cache rows, P_g). past_width: T - S, the caller columns
    `generate` skips. row_start: per input row, its first real caller column. suffix_valid:
    `[B, S]` mask of the prefilled columns. The own parts are laid out as `build_past` lays out
    any past (right-aligned, zeros before, repeated per sequence): one copy of them, none of the
    shared parts (views of the gathered tensors).
    """
    spec = model_kv.spec
    batch = len(own_tokens)
    rows = batch * expand
    width = max(own_tokens, default=0)
    row_group = [-1] * rows
    for g, (members, _tokens) in enumerate(groups):
        for r in members:
            row_group[r] = g
    device = spec.device
    cols = torch.arange(width, device=device)
    starts = torch.tensor([width - n for n in own_tokens], device=device)
    past_valid = (cols.unsqueeze(0) >= starts.unsqueeze(1)).repeat_interleave(expand, dim=0)  # [R, W0]
    group_rows = [
        torch.tensor(list(members), dtype=torch.long, device=model_kv.layer_devices[0]) for members, _ in groups
    ]
    own_layout = BatchLayout(width=width, suffix=0, lengths=tuple(own_tokens), reused=tuple(own_tokens))
    own_past = build_past(own_layout, own, model_kv, expand).layers  # empty when no row owns a token
    layers: list[SharedPrefixLayer] = []
    for layer, dev in enumerate(model_kv.layer_devices):
        if own_past:
            k, v = own_past[layer].keys, own_past[layer].values  # [R, H, W0, D]
        else:
            k = torch.zeros((rows, spec.num_kv_heads, 0, spec.head_dim), dtype=spec.dtype, device=dev)
            v = torch.zeros_like(k)
        prefix = [(kv[layer][0][0].to(dev), kv[layer][1][0].to(dev)) for kv in shared]  # [H, P_g, D] each
        layers.append(SharedPrefixLayer(k, v, prefix, past_width - width))
    return SharedPrefixCache(
        layers,
        [(rows_t, tokens) for rows_t, (_, tokens) in zip(group_rows, groups, strict=True)],
        row_group,
        [s for s in row_start for _ in range(expand)],
        past_valid,
        suffix_valid.to(device=device, dtype=torch.bool).repeat_interleave(expand, dim=0),
    )
