"""Validation of token-id sequences: one C-level pass, no per-token Python loop."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any

import torch

TokenIds = Sequence[int] | torch.Tensor | Any  # Any: a numpy array (numpy is optional)


def as_token_list(token_ids: TokenIds, name: str = "token_ids") -> tuple[list[int], array]:
    """Return `token_ids` as a list of ints and as an `array('Q')`, or raise naming `name`.

    Accepts a list or tuple of ints, a 1-D integer torch tensor or a 1-D integer numpy array.
    Values must lie in [0, 2**64). The array doubles as the bytes that block hashes are taken
    over. Cost: O(n) in C.
    """
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got a tensor of shape {tuple(token_ids.shape)}")
        if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got a tensor of dtype {token_ids.dtype}")
        ids = token_ids.tolist()
    elif type(token_ids).__module__ == "numpy" and hasattr(token_ids, "dtype"):
        if token_ids.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got an array of shape {token_ids.shape}")
        if token_ids.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got an array of dtype {token_ids.dtype}")
        ids = token_ids.tolist()
    elif isinstance(token_ids, list):
        ids = token_ids
    elif isinstance(token_ids, tuple):
        ids = list(token_ids)
    else:
        raise TypeError(
            f"{name} must be a list, tuple, 1-D tensor or 1-D array of ints, got {type(token_ids).__name__}"
        )
    try:
        # 'Q' (unsigned 64-bit) rejects non-ints with TypeError and negatives with OverflowError.
        packed = array("Q", ids)
    except OverflowError as exc:
        raise ValueError(f"{name} must be non-negative ints below 2**64: {exc}") from None
    except TypeError as exc:
        raise TypeError(f"{name} must contain only ints: {exc}") from None
    return ids, packed
