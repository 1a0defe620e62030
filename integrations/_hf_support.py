"""Which `generate` calls the adapter may cache, and why the others go to `model.generate` as they are.

Two verdicts per call: a `CallPlan` (cache it), or a `Passthrough`. A passthrough with a
reason is a supported call that the cache cannot serve correctly (the adapter warns once with
that reason); one without a reason is a call `model.generate` itself rejects or treats in its
own way (bad arguments), so the adapter stays silent and lets it raise its own error.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.generation.configuration_utils import GenerationMode

__all__ = ["CallPlan", "Passthrough", "UncachedWarning", "analyze_call", "model_unsupported_reason"]

# Decoding loops that prefill once from a caller-given cache and never rewrite it: greedy and
# sampling (cache row r <-> returned row r), beam search (rows reordered per step).
CACHED_MODES = frozenset(
    {GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE, GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE}
)
BEAM_MODES = frozenset({GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE})
KV_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
# `generate` arguments that are popped before the generation config is built (see GenerationMixin.generate).
_MODE_KWARGS = ("tokenizer", "assistant_tokenizer", "trust_remote_code")


class UncachedWarning(UserWarning):
    """A `CachedModel.generate` call ran as plain `model.generate`, without the prefix cache; the message says why."""


@dataclass(frozen=True)
class Passthrough:
    """Call `model.generate` unchanged. `reason` None: bad input, let transformers raise its own error."""

    reason: str | None


@dataclass(frozen=True)
class CallPlan:
    """A call the cache can serve.

    input_ids / attention_mask: `[B, T]`, the mask 0/1 with left padding only (inferred the way
    `generate` infers it when the caller gave none). expand: rows per input row inside
    generate (max of num_beams and num_return_sequences). beam: beam search, whose final cache
    rows cannot be mapped to returned sequences. eos_token_ids: where generated rows end.
    """

    bound: inspect.BoundArguments
    var_kwargs: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    expand: int
    beam: bool
    eos_token_ids: tuple[int, ...]


def model_unsupported_reason(model: Any) -> str | None:
    """Why `model` cannot use a per-layer KV prefix cache, or None when it can. Cost: no forward pass."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported (their cache also holds per-input cross-attention state)"
    supports_dynamic = getattr(type(model), "_supports_default_dynamic_cache", None)
    if supports_dynamic is not None and not supports_dynamic():
        return f"{type(model).__name__} keeps a recurrent state, not a per-layer KV cache"
    try:
        layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except Exception as exc:  # any config transformers cannot describe layer by layer
        return f"cannot read the model's attention layer types ({exc})"
    other = sorted(set(layer_types) - KV_LAYER_TYPES)
    if other:
        return f"the model has {', '.join(other)} layers, which are not per-layer KV attention"
    forward_params = inspect.signature(model.forward).parameters
    if "position_ids" not in forward_params or "attention_mask" not in forward_params:
        # Without mask-derived position ids a left-padded row's KV depends on its padding.
        return f"{type(model).__name__}.forward takes no position_ids or attention_mask"
    return None


def analyze_call(
    model: Any,
    signature: inspect.Signature,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    vocab_size: int | None,
) -> CallPlan | Passthrough:
    """Decide whether one `generate(*args, **kwargs)` call can be served from the cache.

    Bad input returns `Passthrough(None)` so that `model.generate` raises its own error, except
    where that error is obscure: `input_ids` that is not a tensor (transformers: AttributeError
    on `.shape`) and `num_beams` < 1 (ZeroDivisionError deep in its loop) raise a TypeError /
    ValueError naming the argument instead. Cost: O(B * T) tensor checks; no forward pass.
    """
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return Passthrough(None)
    params = signature.parameters
    var_kwargs = next(name for name, p in params.items() if p.kind is inspect.Parameter.VAR_KEYWORD)
    arguments = bound.arguments
    extra: dict[str, Any] = arguments.get(var_kwargs, {})

    for name in ("custom_generate", "assistant_model"):
        if arguments.get(name) is not None:
            return Passthrough(f"{name} was passed (it runs its own decoding loop)")
    for name in ("past_key_values", "cache"):
        if extra.get(name) is not None:
            return Passthrough(f"{name} was passed (the caller manages that cache)")
    if extra.get("inputs_embeds") is not None:
        return Passthrough("inputs_embeds was passed (the cache is keyed by token ids)")

    inputs = arguments.get("inputs")
    if inputs is not None and extra.get("input_ids") is not None:
        return Passthrough(None)
    input_ids = inputs if inputs is not None else extra.get("input_ids")
    if input_ids is not None and not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"input_ids must be a torch.Tensor of token ids, shape [batch, sequence], got {type(input_ids).__name__}"
        )
    if not _is_token_matrix(input_ids, vocab_size):
        return Passthrough(None)

    config_kwargs = {k: v for k, v in extra.items() if k not in _MODE_KWARGS}
    mode_kwargs = {k: v for k in ("tokenizer", "streamer") if (v := arguments.get(k, extra.get(k))) is not None}
    try:
        # The checks generate runs before its first forward pass, so that bad input raises
        # before anything is looked up (the cache's lookup counters stay unchanged too).
        generation_config, model_kwargs = model._prepare_generation_config(
            arguments.get("generation_config"), **config_kwargs
        )
        model._validate_model_kwargs(dict(model_kwargs))
        mode = generation_config.get_generation_mode(None)
        model._validate_generation_mode(mode, generation_config, mode_kwargs)
    except Exception:  # transformers raises its own error for this call
        return Passthrough(None)
    num_beams = 1 if generation_config.num_beams is None else generation_config.num_beams
    num_return = 1 if generation_config.num_return_sequences is None else generation_config.num_return_sequences
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if num_return < 1:  # plain generate accepts it and returns no rows
        return Passthrough(None)

    reason = _config_reason(generation_config, mode)
    if reason is not None:
        return Passthrough(reason)
    unknown = sorted(k for k, v in model_kwargs.items() if v is not None and k not in ("input_ids", "attention_mask"))
    if unknown:
        return Passthrough(f"model input(s) {', '.join(unknown)} may change the KV of the same tokens")
    if model.training:
        return Passthrough("the model is in training mode (dropout makes cached KV differ from recomputed KV)")
    device = getattr(model, "device", None)
    if isinstance(device, torch.device) and torch.is_autocast_enabled(device.type):
        # Autocast computes in its own dtype: its KV differs from what a call without it computes.
        return Passthrough(f"autocast is enabled on {device.type} (KV would differ from the model's own precision)")

    mask = model_kwargs.get("attention_mask")
    if mask is None:
        mask = _infer_attention_mask(input_ids, generation_config)
    elif not (isinstance(mask, torch.Tensor) and mask.shape == input_ids.shape and _is_binary(mask)):
        return Passthrough(None)
    keep = mask != 0  # [B, T] bool
    # Left padding only: every row is 0...0 1...1 with its last column real.
    if not (bool(keep[:, -1].all()) and bool((keep[:, 1:] >= keep[:, :-1]).all())):
        return Passthrough("attention_mask is not left-padded (right padding or holes in a row)")

    return CallPlan(
        bound=bound,
        var_kwargs=var_kwargs,
        input_ids=input_ids,
        attention_mask=mask,
        expand=max(num_beams, num_return),
        beam=mode in BEAM_MODES,
        eos_token_ids=_token_ids(generation_config.eos_token_id),
    )


def _config_reason(generation_config: GenerationConfig, mode: GenerationMode) -> str | None:
    if generation_config.use_cache is False:
        return "use_cache=False"
    if generation_config.cache_implementation is not None:
        return f"cache_implementation={generation_config.cache_implementation!r} (a cache of its own kind)"
    if generation_config.token_healing:
        return "token_healing rewrites the prompt inside generate"
    if generation_config.output_attentions or generation_config.output_hidden_states:
        return "output_attentions / output_hidden_states would cover only the uncached suffix"
    if mode not in CACHED_MODES:
        return f"{mode.value} decoding is not supported by the cache"
    return None


def _is_token_matrix(ids: object, vocab_size: int | None) -> bool:
    """A non-empty [B, T] integer tensor whose ids the embedding accepts."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
        return False
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        return False
    lo, hi = int(ids.min()), int(ids.max())
    return lo >= 0 and (vocab_size is None or hi < vocab_size)


def _is_binary(mask: torch.Tensor) -> bool:
    return bool(((mask == 0) | (mask == 1)).all())


def _token_ids(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(t) for t in torch.as_tensor(value).flatten().tolist())


def _infer_attention_mask(input_ids: torch.Tensor, generation_config: GenerationConfig) -> torch.Tensor:
    """The mask `generate` builds when none is given (GenerationMixin._prepare_attention_mask_for_generation).

    The pad token (or the first EOS when no pad is set) marks padding, unless it is also an EOS.
    """
    eos = _token_ids(generation_config.eos_token_id)
    pad: int | None = generation_config.pad_token_id
    if pad is None and eos:
        pad = eos[0]
    if pad is not None and pad not in eos and bool((input_ids == pad).any()):
        return (input_ids != pad).long()
    return torch.ones_like(input_ids, dtype=torch.long)


def generate_signature(generate: Callable[..., Any]) -> inspect.Signature:
    """The signature of a bound `model.generate`; it must take **kwargs (all transformers models do)."""
    signature = inspect.signature(generate)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        raise TypeError("model.generate must accept **kwargs (a transformers GenerationMixin.generate)")
    return signature
