"""lm-evaluation-harness over radixkv: the `radixkv-hf` model, HFLM with cached prefixes.

Needs lm-eval (`pip install 'radixkv[hf,eval]'`). Python (importing this module registers the name):

```python
import lm_eval
import radixkv.integrations.lmeval  # noqa: F401  registers "radixkv-hf"

lm_eval.simple_evaluate(model="radixkv-hf", model_args="pretrained=HuggingFaceTB/SmolLM2-135M", tasks=["arc_easy"])
```

Command line: lm-eval 0.4.13 finds models only in its own registry (no entry points, no plugin
import), so this module's launcher registers the class and then runs lm-eval's own command line
with the arguments unchanged:

    radixkv-lm-eval run --model radixkv-hf --model_args pretrained=HuggingFaceTB/SmolLM2-135M --tasks arc_easy
    python -m radixkv.integrations.lmeval run --model radixkv-hf ...    # the same

`RadixHFLM` is lm-eval's `HFLM` with the model behind `radixkv.wrap`:
- `loglikelihood` (and `loglikelihood_rolling`, which HFLM builds from the same method) goes
  through `CachedModel.score`: each request's context prefix comes from the cache where
  present, the choices of one question share their context, and later questions hit the
  few-shot prefix. Requests are prepared exactly as HFLM prepares them (left truncation to
  max_length + 1 tokens, the same assertions on empty or over-long continuations), and the
  answers are HFLM's: (sum of the continuation's log-probabilities, whether every token is
  the argmax).
- `generate_until` is HFLM's, over `CachedModel.generate`.
Extra model arguments `capacity_tokens`, `capacity_bytes`, `block_size`, `share_prefixes` go to
`radixkv.wrap`; everything else is HFLM's. Seq2seq backends and `mixed_precision_dtype`
(autocast) run HFLM's own path unchanged.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from .hf import CachedModel, wrap

__all__ = ["MODEL_NAME", "RadixHFLM", "main"]

logger = logging.getLogger(__name__)

MODEL_NAME = "radixkv-hf"
"""The name lm-eval knows the class by (`--model radixkv-hf`, `simple_evaluate(model="radixkv-hf")`)."""
WRAP_OPTIONS = ("capacity_tokens", "capacity_bytes", "block_size", "share_prefixes", "reuse_generated")

Request = tuple[tuple[str, str] | None, list[int], list[int]]


class RadixHFLM(HFLM):
    """HFLM whose model is a `radixkv.wrap`ped one; see the module docstring.

    `pretrained`: what HFLM takes (a hub id or path, or a loaded model), or a `CachedModel`
    (then used as it is, and no wrap options may be given). Costs: those of `CachedModel.score`
    per batch of `batch_size` requests ("auto" uses `max_batch_size`: the cached path computes
    only the uncached suffixes, so HFLM's probe of the longest full request would under-fill).
    """

    def __init__(self, pretrained: Any, **kwargs: Any) -> None:
        options = {name: kwargs.pop(name) for name in WRAP_OPTIONS if name in kwargs}
        super().__init__(pretrained=pretrained, **kwargs)
        if type(self._model) is CachedModel:
            if options:
                raise TypeError(f"pretrained is already a CachedModel; {sorted(options)} apply only when wrapping")
        elif self.backend == "causal":
            self._model = wrap(self._model, **options)

    @property
    def cached_model(self) -> CachedModel | None:
        """The wrapped model, None where HFLM's own path runs (seq2seq)."""
        model = self._model
        return model if type(model) is CachedModel else None

    def _loglikelihood_tokens(  # type: ignore[override]
        self,
        requests: list[Request],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        cached = self.cached_model
        if cached is None or self.backend != "causal" or self.mixed_precision_dtype is not None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        max_length = self.max_length
        contexts: list[list[int]] = []
        continuations: list[list[int]] = []
        for i, (_, context_enc, continuation_enc) in enumerate(requests):
            # HFLM's checks with HFLM's exception type (AssertionError), but all of them before any
            # request is scored, and raised explicitly so that `python -O` keeps them.
            if not context_enc:
                raise AssertionError(f"requests[{i}]: the context has no tokens")
            if not continuation_enc:
                raise AssertionError(f"requests[{i}]: the continuation has no tokens")
            if len(continuation_enc) > max_length:
                raise AssertionError(
                    f"requests[{i}]: the continuation has {len(continuation_enc)} tokens, over max_length={max_length}"
                )
            # HFLM's left truncation: the model sees the last max_length tokens of
            # context + continuation[:-1]; what is left of the context stays the context.
            total = len(context_enc) + len(continuation_enc)
            if total > max_length + 1:
                logger.warning(
                    "requests[%d]: context (%d) and continuation (%d) exceed max_length=%d; truncating %d tokens "
                    "from the left, as HFLM does",
                    i, len(context_enc), len(continuation_enc), max_length, total - max_length - 1,
                )  # fmt: skip
            whole = (context_enc + continuation_enc)[-(max_length + 1) :]
            contexts.append(whole[: len(whole) - len(continuation_enc)])
            continuations.append(list(continuation_enc))
        size = self._score_batch_size(override_bs)
        # Token order keeps the choices of a question, and questions sharing a few-shot prefix, together.
        order = sorted(range(len(requests)), key=lambda i: (contexts[i], continuations[i]))
        answers: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="radixkv loglikelihood") as bar:
            for start in range(0, len(order), size):
                chunk = order[start : start + size]
                scores = cached.score([contexts[i] for i in chunk], [continuations[i] for i in chunk])
                for i, score in zip(chunk, scores, strict=True):
                    answer = (score.logprob, score.is_greedy)
                    answers[i] = answer
                    key = requests[i][0]
                    if key is not None:  # rolling windows have no key; HFLM's rolling loop adds theirs
                        self.cache_hook.add_partial("loglikelihood", key, answer)
                bar.update(len(chunk))
        return answers

    def _score_batch_size(self, override_bs: int | None) -> int:
        if override_bs:
            return int(override_bs)
        size = self.batch_size
        if isinstance(size, int) or str(size).isdigit():
            return int(size)
        return int(self.max_batch_size or 64)


# Registered by its import path, not by the class object: under `python -m radixkv.integrations.lmeval`
# this file also runs as `__main__`, and both copies then register the same target.
model_registry.register(MODEL_NAME, target="radixkv.integrations.lmeval:RadixHFLM")


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with `radixkv-hf` registered (the `radixkv-lm-eval` command)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
