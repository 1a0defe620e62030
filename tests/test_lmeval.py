"""The `radixkv-hf` lm-evaluation-harness model against lm-eval's own `HFLM` over the plain model.

Tiny random-weight Llama and a character tokenizer (tests/test_hf_dropin.py); tasks are built
from local data (a `datasets.Dataset` made here, no download). Every answer is compared with
HFLM's over the same plain model: log-likelihoods within 1e-4, the same greedy flags, the same
accuracy; reuse is read from the wrapper's counters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")
datasets = pytest.importorskip("datasets")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from radixkv.integrations.hf import CachedModel  # noqa: E402
from radixkv.integrations.lmeval import RadixHFLM  # noqa: E402
from test_hf_dropin import char_tokenizer, tiny_model  # noqa: E402

import radixkv  # noqa: E402

BLOCK = 4
TOL = 1e-4
SHOTS = "".join(f"Q: {a} + {a}?\nA: {2 * a}\n\n" for a in range(30, 37))


def docs(n: int = 6) -> list[dict[str, Any]]:
    return [
        {"question": f"{a} + {a}?", "choices": [f" {2 * a}", f" {2 * a + 1}", f" {a}", " no"], "answer": a % 4}
        for a in range(11, 11 + n)
    ]


def mc_requests(n: int = 6) -> list[Instance]:
    """loglikelihood requests as a multiple-choice task sends them: one per choice."""
    out = []
    for d in docs(n):
        context = f"{SHOTS}Q: {d['question']}\nA:"
        for choice in d["choices"]:
            out.append(Instance(request_type="loglikelihood", doc=d, arguments=(context, choice), idx=len(out)))
    return out


def assert_same_answers(got: list[tuple[float, bool]], want: list[tuple[float, bool]]) -> None:
    assert len(got) == len(want)
    for (g_ll, g_greedy), (w_ll, w_greedy) in zip(got, want, strict=True):
        assert abs(g_ll - w_ll) <= TOL, (g_ll, w_ll)
        assert g_greedy == w_greedy


def pair(**kwargs: Any) -> tuple[HFLM, RadixHFLM, CachedModel]:
    """HFLM over a plain model and RadixHFLM over the same model, with the same settings."""
    model, tok = tiny_model(), char_tokenizer()
    plain = HFLM(pretrained=model, tokenizer=tok, **kwargs)
    ours = RadixHFLM(pretrained=model, tokenizer=tok, capacity_tokens=4096, block_size=BLOCK, **kwargs)
    cached = ours.cached_model
    assert cached is not None and cached.model is model
    return plain, ours, cached


@pytest.mark.parametrize("batch_size", [1, 4])
def test_loglikelihood_equals_hflm_and_hits_the_few_shot_prefix(batch_size: int) -> None:
    plain, ours, cached = pair(batch_size=batch_size)
    reqs = mc_requests()
    want = plain.loglikelihood(reqs, disable_tqdm=True)
    got = ours.loglikelihood(reqs, disable_tqdm=True)
    assert_same_answers(got, want)
    stats = cached.score_stats
    assert stats.rows == len(reqs) and stats.uncached_rows == 0
    # All but the first pass reuse at least the few-shot prefix's whole blocks per row.
    assert stats.reused_tokens >= (len(reqs) - batch_size) * (len(SHOTS) // BLOCK * BLOCK)


def test_a_repeated_run_hits_every_context_and_answers_the_same() -> None:
    plain, ours, cached = pair(batch_size=4)
    reqs = mc_requests(3)
    want = plain.loglikelihood(reqs, disable_tqdm=True)
    assert_same_answers(ours.loglikelihood(reqs, disable_tqdm=True), want)
    before = cached.score_stats.reused_tokens
    assert_same_answers(ours.loglikelihood(reqs, disable_tqdm=True), want)
    contexts = [len(f"{SHOTS}Q: {d['question']}\nA:") for d in docs(3) for _ in range(4)]
    # Each row reuses its whole context but for the last, partial block.
    assert cached.score_stats.reused_tokens - before >= sum((n - 1) // BLOCK * BLOCK for n in contexts)


def test_loglikelihood_rolling_equals_hflm_across_several_windows() -> None:
    plain, ours, cached = pair(batch_size=2, max_length=48)
    texts = [SHOTS, SHOTS[:50], "short"]
    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i) for i, t in enumerate(texts)]
    want = plain.loglikelihood_rolling(reqs, disable_tqdm=True)
    got = ours.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert len(got) == len(want) == 3
    assert all(abs(g - w) <= TOL for g, w in zip(got, want, strict=True)), (got, want)
    assert cached.score_stats.rows > len(texts)  # SHOTS spans several 48-token windows


def test_generate_until_goes_through_the_cached_generate() -> None:
    plain, ours, cached = pair(batch_size=2)
    gen = {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}
    reqs = [
        Instance(request_type="generate_until", doc={}, arguments=(f"{SHOTS}Q: {a} + {a}?\nA:", dict(gen)), idx=i)
        for i, a in enumerate((21, 22, 23, 24))
    ]
    assert ours.generate_until(reqs, disable_tqdm=True) == plain.generate_until(reqs, disable_tqdm=True)
    assert cached.stats.calls == 2 and cached.stats.uncached_calls == 0 and cached.stats.reused_tokens > 0


# ----- bad input: HFLM's errors and HFLM's truncation ----------------------------------------
def test_an_empty_continuation_raises_hflms_assertion_before_anything_is_scored() -> None:
    plain, ours, cached = pair(batch_size=4)
    reqs = [*mc_requests(1), Instance(request_type="loglikelihood", doc={}, arguments=("Q: 1?\nA:", ""), idx=9)]
    with pytest.raises(AssertionError):
        plain.loglikelihood(reqs, disable_tqdm=True)
    assert cached.cache is not None
    before = cached.cache.stats
    with pytest.raises(AssertionError, match="continuation has no tokens"):
        ours.loglikelihood(reqs, disable_tqdm=True)
    assert cached.cache.stats == before and cached.score_stats.calls == 0


def test_a_continuation_longer_than_the_window_raises_as_hflm_does() -> None:
    plain, ours, _ = pair(batch_size=1, max_length=16)
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=("Q:", " " + "x" * 20), idx=0)]
    with pytest.raises(AssertionError):
        plain.loglikelihood(reqs, disable_tqdm=True)
    with pytest.raises(AssertionError, match="max_length=16"):
        ours.loglikelihood(reqs, disable_tqdm=True)


def test_contexts_longer_than_the_window_are_truncated_from_the_left_as_hflm_does() -> None:
    plain, ours, cached = pair(batch_size=4, max_length=40)  # every context here is longer than 40
    reqs = mc_requests(2)
    assert_same_answers(ours.loglikelihood(reqs, disable_tqdm=True), plain.loglikelihood(reqs, disable_tqdm=True))
    assert cached.score_stats.context_tokens <= len(reqs) * 40


# ----- simple_evaluate and the command line ------------------------------------------------
def local_task(name: str) -> dict[str, Any]:
    rows = docs()
    return {
        "task": name,
        "custom_dataset": lambda **_: {"test": datasets.Dataset.from_list(rows)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": SHOTS.replace("{", "{{").replace("}", "}}") + "Q: {{question}}\nA:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}],
    }


def test_simple_evaluate_by_name_equals_hf_on_a_local_task() -> None:
    model, tok = tiny_model(), char_tokenizer()
    runs = {}
    for name, extra in (("hf", {}), ("radixkv-hf", {"capacity_tokens": 4096, "block_size": BLOCK})):
        runs[name] = lm_eval.simple_evaluate(
            model=name,
            model_args={"pretrained": model, "tokenizer": tok, "batch_size": 4, **extra},
            tasks=[local_task("radixkv_local_mc")],
            log_samples=True,
            bootstrap_iters=0,
        )
    want, got = runs["hf"], runs["radixkv-hf"]
    assert got["results"]["radixkv_local_mc"]["acc,none"] == want["results"]["radixkv_local_mc"]["acc,none"]
    want_samples = sorted(want["samples"]["radixkv_local_mc"], key=lambda s: s["doc_id"])
    got_samples = sorted(got["samples"]["radixkv_local_mc"], key=lambda s: s["doc_id"])
    assert len(got_samples) == len(docs())
    for g, w in zip(got_samples, want_samples, strict=True):
        assert_same_answers([r[0] for r in g["resps"]], [r[0] for r in w["resps"]])
        assert g["acc"] == w["acc"]


TASK_YAML = """task: radixkv_cli_mc
custom_dataset: !function local_data.load
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{question}}\\nA:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""

TASK_DATA = """import datasets


def load(**_):
    rows = {rows!r}
    return {{"test": datasets.Dataset.from_list(rows)}}
"""


def test_the_command_line_finds_radixkv_hf_and_equals_hf(tmp_path: Path) -> None:
    model, tok = tiny_model(), char_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "radixkv_cli_mc.yaml").write_text(TASK_YAML)
    (tasks / "local_data.py").write_text(TASK_DATA.format(rows=docs()))
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "radixkv.integrations.lmeval", "run", "--model", "radixkv-hf",
        "--model_args", f"pretrained={tmp_path / 'model'},dtype=float32,block_size={BLOCK}", "--device", "cpu",
        "--tasks", "radixkv_cli_mc", "--include_path", str(tasks), "--batch_size", "4",
        "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (result_file,) = out.rglob("results_*.json")
    got = json.loads(result_file.read_text())
    assert got["config"]["model"] == "radixkv-hf"
    (samples_file,) = out.rglob("samples_radixkv_cli_mc_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])

    plain = HFLM(pretrained=str(tmp_path / "model"), device="cpu", dtype=torch.float32, batch_size=4)
    reqs = [
        Instance(request_type="loglikelihood", doc=d, arguments=(f"Q: {d['question']}\nA:", c), idx=0)
        for d in docs()
        for c in d["choices"]
    ]
    want = plain.loglikelihood(reqs, disable_tqdm=True)
    got_answers = [(float(r[0][0]), r[0][1] in (True, "True")) for s in samples for r in s["resps"]]
    assert_same_answers(got_answers, want)
    accuracy = sum(max(range(4), key=lambda j: want[4 * i + j][0]) == d["answer"] for i, d in enumerate(docs()))
    assert abs(got["results"]["radixkv_cli_mc"]["acc,none"] - accuracy / len(docs())) < 1e-9


def test_a_cached_model_is_taken_as_it_is_and_wrap_options_then_refused() -> None:
    model, tok = tiny_model(), char_tokenizer()
    cached = radixkv.wrap(model, capacity_tokens=256, block_size=BLOCK)
    assert RadixHFLM(pretrained=cached, tokenizer=tok).cached_model is cached
    with pytest.raises(TypeError, match="capacity_tokens"):
        RadixHFLM(pretrained=cached, tokenizer=tok, capacity_tokens=512)
