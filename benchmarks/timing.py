"""Time to first token for `generate`, measured with a streamer.

`generate` calls ``streamer.put`` once with the prompt, then once per generated token, so the
second `put` marks the first generated token. TTFT here = that moment minus the call's start,
which includes any prefix lookup, KV gather and prefill the method does for the request.
Batch size 1 only (transformers streamers require it).
"""

from __future__ import annotations

from time import perf_counter

from transformers.generation.streamers import BaseStreamer

__all__ = ["FirstTokenTimer"]


class FirstTokenTimer(BaseStreamer):
    """A streamer that records when the first generated token arrives.

    Create it right before the generate call (the start time is taken at construction), pass
    it as `streamer=`, then read `ttft_s` (None if no token was generated).
    """

    def __init__(self) -> None:
        self.start = perf_counter()
        self.first_token_at: float | None = None
        self._puts = 0

    def put(self, value: object) -> None:
        """Called by generate: first with the prompt, then with each new token."""
        self._puts += 1
        if self._puts == 2 and self.first_token_at is None:
            self.first_token_at = perf_counter()

    def end(self) -> None:
        """Called by generate when it finishes; nothing to do."""

    @property
    def ttft_s(self) -> float | None:
        """Seconds from construction to the first generated token."""
        return None if self.first_token_at is None else self.first_token_at - self.start
