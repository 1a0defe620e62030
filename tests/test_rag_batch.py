"""`radixkv bench rag-batch`: padded batches over shared leading documents, on the tiny preset.

The bench runs in-process with one torch thread at its smoke size (4 batches of 2 rows, 48-token
documents, 8-token questions, block 16); assertions are on results.json figures that a wrong
cache, a wrong count or a wrong batch would break.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from radixkv.benchmarks.workloads import RAG_BATCH_SMOKE, RagBatchParams, build_rag_batch, distinct_prefix_tokens

from radixkv.cli import main

BLOCK = 16


def _bench(out: Path, *extra: str) -> dict[str, Any]:
    argv = ["bench", "rag-batch", "--smoke", "--out", str(out), "--no-progress", "--threads", "1", *extra]
    assert main(argv) == 0
    return {**json.loads((out / "results.json").read_text()), "_out": str(out)}


@pytest.fixture(scope="module")
def doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """results.json of one smoke run with the default methods."""
    return _bench(tmp_path_factory.mktemp("rag-batch"))


def _methods(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["method"]: m for m in doc["methods"]}


def _rows(batch: dict[str, Any]) -> dict[str, list[int]]:
    return batch["generated"]


def test_radixkv_gives_plain_generates_tokens_on_every_row(doc: dict[str, Any]) -> None:
    """The default methods ran in order; radixkv's greedy tokens equal plain generate's on the same
    padded batches, row by row; continuous batching either ran and says whether it matched, or says why not."""
    methods = _methods(doc)
    assert list(methods) == ["generate", "radixkv", "continuous-batching"]
    plain, radix = methods["generate"], methods["radixkv"]
    assert plain["status"] == radix["status"] == "ok", radix["reason"]
    assert radix["same_tokens"] is True and not radix["mismatched_rows"]
    for p, r in zip(plain["per_batch"], radix["per_batch"], strict=True):
        assert _rows(p) == _rows(r)
        assert all(len(g) == RAG_BATCH_SMOKE.new_tokens for g in _rows(p).values())
    assert sum(len(p["generated"]) for p in plain["per_batch"]) == doc["workload"]["requests"] == 8
    cb = methods["continuous-batching"]
    assert cb["status"] == "ok" or cb["reason"]
    if cb["status"] == "ok":
        assert isinstance(cb["same_tokens"], bool)


def test_plain_generate_computes_every_padded_column(doc: dict[str, Any]) -> None:
    """The embedding counter sees plain generate prefill rows x padded width, and no prompt token reused."""
    plain = _methods(doc)["generate"]
    for b in plain["per_batch"]:
        assert b["rows"] == 2 and b["width"] > 0
        assert b["prefill_positions"] == b["rows"] * b["width"]
        assert b["computed_tokens"] == b["prompt_tokens"] < b["prefill_positions"]  # rows differ in length
    assert plain["hit_rate"] == 0 and plain["reused_tokens"] == 0


def test_radixkv_computes_only_the_questions_on_a_documents_second_batch(doc: dict[str, Any]) -> None:
    """A document's first batch: nothing cached leads with it, so radixkv computes at most what plain
    generate does and at least each distinct prefix of the batch once. Its second batch: every row
    reads its documents (whole blocks: 48 is 3 x 16) from the cache and computes only its question;
    the prefill then covers only the question columns of each row, below plain generate's."""
    plain = {b["name"]: b for b in _methods(doc)["generate"]["per_batch"]}
    radix = {b["name"]: b for b in _methods(doc)["radixkv"]["per_batch"]}
    floors = {b["name"]: b["distinct_prefix_tokens"] for b in doc["workload"]["batches"]}
    assert list(radix) == list(floors) == ["d0b0", "d0b1", "d1b0", "d1b1"]
    q = RAG_BATCH_SMOKE.question_tokens
    assert RAG_BATCH_SMOKE.doc_tokens % BLOCK == 0 and q < BLOCK
    for name in ("d0b0", "d1b0"):
        assert floors[name] < plain[name]["computed_tokens"]  # the rows share their leading document
        assert floors[name] <= radix[name]["computed_tokens"] <= plain[name]["computed_tokens"]
        assert radix[name]["computed_tokens"] <= radix[name]["prefill_positions"] <= plain[name]["prefill_positions"]
    for name in ("d0b1", "d1b1"):
        assert floors[name] == radix[name]["rows"] * q
        assert radix[name]["computed_tokens"] == radix[name]["rows"] * q < plain[name]["computed_tokens"]
        assert radix[name]["reused_tokens"] == radix[name]["prompt_tokens"] - radix[name]["rows"] * q
        assert radix[name]["prefill_positions"] == radix[name]["rows"] * q < plain[name]["prefill_positions"]
    r = _methods(doc)["radixkv"]
    assert r["hit_rate"] == pytest.approx(r["reused_tokens"] / r["prompt_tokens"])
    assert r["computed_tokens"] >= doc["workload"]["params"]["distinct_prefix_tokens"] == sum(floors.values())


def test_continuous_batching_counts_no_padding(doc: dict[str, Any]) -> None:
    """generate_batch packs its requests: its prefill positions equal the prompt tokens it computed,
    and its prefix hits make a document's second batch cheaper than its first."""
    cb = _methods(doc)["continuous-batching"]
    if cb["status"] != "ok":
        pytest.fail(f"continuous batching did not run: {cb['reason']}")
    for b in cb["per_batch"]:
        assert b["prefill_positions"] == b["computed_tokens"] == b["prompt_tokens"] - b["reused_tokens"]
    first, second = cb["per_batch"][:2]
    assert second["computed_tokens"] < first["computed_tokens"]


def test_report_has_both_tables_and_the_plot(doc: dict[str, Any]) -> None:
    """table.md holds the per-method and per-batch tables; methods.png is written."""
    out = Path(doc["_out"])
    table = (out / "table.md").read_text()
    assert "| method | total (s) | time / reference | prefill positions |" in table
    assert "| batch | rows | prompt tokens | fewest | generate | radixkv | continuous-batching |" in table
    d0b1 = next(b for b in _methods(doc)["radixkv"]["per_batch"] if b["name"] == "d0b1")
    cell = f"{d0b1['computed_tokens']:,} / {d0b1['prefill_positions']:,}"
    assert f"| d0b1 | 2 | {d0b1['prompt_tokens']:,} | {d0b1['rows'] * RAG_BATCH_SMOKE.question_tokens} |" in table
    assert cell in table
    assert (out / "methods.png").stat().st_size > 10_000


def test_other_methods_run_or_say_why_not(tmp_path: Path) -> None:
    """radixkv with reuse_generated=True also gives plain generate's tokens; the per-request recipe is n/a."""
    doc = _bench(tmp_path, "--methods", "generate,radixkv-reuse-generated,prompt-reuse")
    m = _methods(doc)
    assert m["radixkv-reuse-generated"]["same_tokens"] is True
    assert m["radixkv-reuse-generated"]["extra"]["reuse_generated"] is True
    assert m["prompt-reuse"]["status"] == "n/a" and "padded batches" in m["prompt-reuse"]["reason"]


def test_workload_batches_rows_sharing_their_leading_document() -> None:
    """Batches hold batch_size rows of one leading document, in document order; one question in
    second_doc_every adds a second document, so the rows of a batch differ in length."""
    p = RagBatchParams(docs=3, questions=5, batch_size=2, doc_tokens=20, question_tokens=4, second_doc_every=2)
    w = build_rag_batch(p, vocab_size=50_000, seed=1, block_size=BLOCK)  # no chance repeats
    assert w.batch_names == ("d0b0", "d0b1", "d0b2", "d1b0", "d1b1", "d1b2", "d2b0", "d2b1", "d2b2")
    assert [len(b) for b in w.batches] == [2, 2, 1] * 3
    for k, name in enumerate(w.batch_names):
        lead = w.batch_prompts(k)[0][1][:20]
        for cid, prompt in w.batch_prompts(k):
            assert cid.startswith(name[:2]) and prompt[:20] == lead
            j = int(cid.split("q")[1].split("[")[0])
            assert len(prompt) == (44 if (j + 1) % 2 == 0 else 24)
    assert w.params["distinct_prefix_tokens"] == sum(distinct_prefix_tokens(c.turns[0] for c in w.conversations))
    assert sum(w.batch_floors) == w.params["distinct_prefix_tokens"]
    assert w.batch_floors[1] == 2 * 4 and w.batch_floors[2] == 4  # later batches of d0: the questions alone


def test_distinct_prefix_tokens_counts_each_prefix_once() -> None:
    """Each prompt counts the tokens past its longest prefix shared with an earlier prompt."""
    assert distinct_prefix_tokens([(1, 2, 3), (1, 2, 4), (1, 2, 3), (5,), (1, 2, 3, 4)]) == [3, 1, 0, 1, 1]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--doc-tokens", "-3"], "--doc-tokens must be positive"),
        (["--second-doc-every", "-1"], "--second-doc-every must be >= 0"),
        (["--docs", "1"], "--second-doc-every 2 needs --docs >= 2"),
        (["--methods", "generate,vllm"], "--methods: unknown vllm"),
    ],
)
def test_bad_arguments_exit_2_naming_the_flag(
    flags: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad rag-batch arguments exit with status 2 and a message naming the flag."""
    with pytest.raises(SystemExit) as exc:
        main(["bench", "rag-batch", *flags, "--out", str(tmp_path), "--no-progress"])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
