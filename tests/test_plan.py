"""The KV memory planner: published figures, the arithmetic, and the `radixkv plan` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from radixkv.integrations.models import PRESETS, config_shape, model_shape

from radixkv.cli import main
from radixkv.planner import (
    KVPlan,
    ModelShape,
    dtype_bytes,
    format_bytes,
    kv_bytes_per_token,
    parse_bytes,
    plan,
    plan_scenarios,
    quantized_bytes_per_token,
    shared_prefix_plan,
)

GiB = 2**30


def test_llama2_7b_fp16_is_512_kib_per_token_and_2_gib_at_4096() -> None:
    """Llama-2-7B (32 layers, 32 KV heads, head_dim 128), float16: 524,288 B/token, 2 GiB (2,048 MiB)
    per 4,096-token sequence (an often shared article prints 1,024 MB; its own formula gives this)."""
    per_token = kv_bytes_per_token(32, 32, 128, dtype_bytes("float16"))
    assert per_token == 524_288
    assert per_token * 4096 == 2 * GiB == 2048 * 2**20


def test_80_layers_64_kv_heads_is_2_6_mb_per_token_and_262_gb_at_100k() -> None:
    """80 layers x 64 KV heads x head_dim 128, float16: 2,621,440 B (~2.6 MB) per token, ~262 GB at 100K."""
    per_token = kv_bytes_per_token(80, 64, 128, 2)
    assert per_token == 2_621_440
    assert round(per_token * 100_000 / 1e9) == 262


def test_gqa_8_kv_heads_is_8x_less_and_43_gb_at_128k() -> None:
    """With 8 KV heads (GQA, as Llama-2-70B has) the same model needs 8x less: ~43 GB at 128K tokens."""
    per_token = kv_bytes_per_token(80, 8, 128, 2)
    assert per_token * 8 == kv_bytes_per_token(80, 64, 128, 2)
    assert round(per_token * 128 * 1024 / 1e9) == 43


def test_plan_counts_sequences_after_weights() -> None:
    """Sequences that fit = (memory - weights) // bytes per sequence, weights at their dtype."""
    shape = ModelShape("7b", 32, 32, 128, num_attention_heads=32, num_params=6_738_415_616)
    p = plan(shape, weight_bytes_per_element=2, context=4096, memory_bytes=80 * GiB)
    assert p.weight_bytes == 2 * 6_738_415_616
    assert p.kv_budget_bytes == 80 * GiB - 2 * 6_738_415_616
    assert p.max_sequences == (80 * GiB - 2 * 6_738_415_616) // (2 * GiB) == 33
    assert p.max_tokens == p.kv_budget_bytes // 524_288


def test_plan_weights_larger_than_memory_fit_nothing() -> None:
    """A budget smaller than the weights leaves 0 bytes for KV, not a negative count."""
    shape = ModelShape("70b", 80, 8, 128, num_params=68_976_648_192)
    p = plan(shape, weight_bytes_per_element=2, context=4096, memory_bytes=80 * GiB)
    assert p.kv_budget_bytes == 0 and p.max_sequences == 0 and p.max_tokens == 0


def test_scenarios_int8_halves_fp16_and_gqa_only_when_more_than_8_heads() -> None:
    """What-ifs: int8 halves a float16 cache; 'GQA 8' appears only for models with more than 8 KV heads;
    a GQA model also shows itself without GQA (80 layers x 64 KV heads: 2,621,440 B per token)."""
    mha = plan_scenarios(
        ModelShape("mha", 32, 32, 128), weight_bytes_per_element=2, context=4096, memory_bytes=80 * GiB
    )
    by_label = {p.label: p for p in mha}
    assert by_label["int8 KV cache"].bytes_per_token * 2 == by_label["as configured"].bytes_per_token
    assert by_label["GQA, 8 KV heads"].bytes_per_token * 4 == by_label["as configured"].bytes_per_token
    assert by_label["GQA 8 + int8"].bytes_per_token == 524_288 // 8
    gqa = plan_scenarios(
        ModelShape("gqa", 80, 8, 128, num_attention_heads=64), weight_bytes_per_element=2, context=1, memory_bytes=GiB
    )
    assert [p.label for p in gqa] == ["as configured", "int8 KV cache", "int4 KV cache", "without GQA (64 KV heads)"]
    assert gqa[3].bytes_per_token == 2_621_440 == 8 * gqa[0].bytes_per_token
    assert gqa[2].bytes_per_token * 4 == gqa[0].bytes_per_token  # int4: a quarter of float16


def _seven_b(context: int = 4096, memory: int = 80 * GiB) -> KVPlan:
    """Llama-2-7B's shape and weight count, float16, planned at `context` within `memory` bytes."""
    shape = ModelShape("7b", 32, 32, 128, num_attention_heads=32, num_params=6_738_415_616)
    return plan(shape, weight_bytes_per_element=2, context=context, memory_bytes=memory)


def test_shared_prefix_holds_the_prefix_once() -> None:
    """Llama-2-7B float16, 4,096-token sequences whose first 3,072 are shared: one copy of 3,072 tokens
    (1.5 GiB) + 1,024 tokens (0.5 GiB) per sequence; 33 sequences fit unshared, 131 shared."""
    base = _seven_b()
    s = shared_prefix_plan(base, 3072)
    assert s.shared_bytes == 3072 * 524_288 == 3 * GiB // 2
    assert s.private_bytes_per_sequence == 1024 * 524_288 == GiB // 2
    assert s.max_sequences_unshared == base.max_sequences == 33
    assert s.max_sequences_shared == (base.kv_budget_bytes - 3 * GiB // 2) // (GiB // 2) == 131
    # The shared count is the largest n with P + n x (C - P) tokens inside the budget.
    n = s.max_sequences_shared
    assert s.shared_bytes + n * s.private_bytes_per_sequence <= base.kv_budget_bytes
    assert s.shared_bytes + (n + 1) * s.private_bytes_per_sequence > base.kv_budget_bytes


@pytest.mark.parametrize("context", [1, 7, 4096])
def test_shared_prefix_zero_changes_nothing(context: int) -> None:
    """P = 0: every token is per sequence, so as many sequences fit as without sharing."""
    base = _seven_b(context=context)
    s = shared_prefix_plan(base, 0)
    assert s.shared_bytes == 0
    assert s.private_bytes_per_sequence == base.bytes_per_sequence
    assert s.max_sequences_shared == s.max_sequences_unshared == base.max_sequences


@pytest.mark.parametrize("prefix", [1, 1000, 4000, 4095])
def test_shared_prefix_never_fits_fewer_and_one_sequence_costs_the_same(prefix: int) -> None:
    """Sharing fits at least as many sequences; with room for exactly one sequence, sharing fits one too."""
    base = _seven_b()
    assert shared_prefix_plan(base, prefix).max_sequences_shared >= base.max_sequences
    one = _seven_b(memory=base.weight_bytes + base.bytes_per_sequence)  # room for one whole sequence, not two
    assert one.max_sequences == 1
    assert shared_prefix_plan(one, prefix).max_sequences_shared == 1


def test_shared_prefix_larger_than_the_budget_fits_nothing() -> None:
    """A budget below the one shared copy fits 0 sequences (not a negative count); so does weights > memory."""
    base = _seven_b(memory=6_738_415_616 * 2 + 100 * 524_288)  # 100 tokens of KV after the weights
    assert shared_prefix_plan(base, 101).max_sequences_shared == 0  # the shared copy alone is over budget
    assert shared_prefix_plan(base, 99).max_sequences_shared == 0  # 99 + 3,997 per sequence > 100
    broke = _seven_b(memory=GiB)
    assert broke.kv_budget_bytes == 0 and shared_prefix_plan(broke, 2048).max_sequences_shared == 0


@pytest.mark.parametrize(("prefix", "needle"), [(4096, "less than context"), (5000, "less than context"),
                                               (-1, ">= 0"), (1.5, ">= 0")])  # fmt: skip
def test_shared_prefix_out_of_range_raises_naming_it(prefix: float, needle: str) -> None:
    """P >= context (no token left per sequence), negative or not an int: ValueError naming shared_prefix."""
    with pytest.raises(ValueError, match="shared_prefix") as exc:
        shared_prefix_plan(_seven_b(), prefix)  # type: ignore[arg-type]
    assert needle in str(exc.value)


def test_quantized_bytes_per_token_equals_the_real_pools() -> None:
    """The planner's int8 / int4 sizes (scales included) are what PrefixCache(kv_dtype=...) allocates."""
    torch = pytest.importorskip("torch")
    from radixkv import KVSpec, PrefixCache

    for layers, heads, head_dim in ((30, 3, 64), (32, 8, 128), (2, 1, 8)):
        shape = ModelShape("m", layers, heads, head_dim)
        spec = KVSpec(layers, heads, head_dim, dtype=torch.float16)
        for kind in ("int8", "int4"):
            cache = PrefixCache(spec, capacity_tokens=16, block_size=16, kv_dtype=kind)
            assert quantized_bytes_per_token(shape, kind) == cache.stats.bytes_per_token
            assert cache.stats.capacity_bytes == 16 * cache.stats.bytes_per_token
    with pytest.raises(ValueError, match="kv_dtype"):
        quantized_bytes_per_token(ModelShape("m", 1, 1, 8), "int2")


def test_parse_and_format_bytes_keep_decimal_and_binary_apart() -> None:
    """GB is 10**9, GiB 2**30; format_bytes prints both."""
    assert parse_bytes("80GiB") == 80 * GiB
    assert parse_bytes("24 GB") == 24 * 10**9
    assert parse_bytes("1.5MiB") == 1_572_864
    assert format_bytes(2 * GiB) == "2.15 GB (2.00 GiB)"


@pytest.mark.parametrize(
    ("call", "names"),
    [
        (lambda: dtype_bytes("float13"), "float13"),
        (lambda: parse_bytes("80 gigs"), "80 gigs"),
        (lambda: kv_bytes_per_token(0, 8, 128, 2), "num_layers"),
        (lambda: plan(ModelShape("m", 1, 1, 1), weight_bytes_per_element=2, context=0, memory_bytes=1), "context"),
    ],
)
def test_bad_input_raises_value_error_naming_it(call, names: str) -> None:
    """Bad planner input raises ValueError whose message names the argument or value."""
    with pytest.raises(ValueError, match=names):
        call()


def test_plan_command_prints_llama2_7b_figures(capsys: pytest.CaptureFixture[str]) -> None:
    """`radixkv plan --model llama-2-7b` prints 524,288 B per token and 2.00 GiB per 4,096-token sequence."""
    assert main(["plan", "--model", "llama-2-7b", "--memory", "80GiB", "--context", "4096"]) == 0
    out = capsys.readouterr().out
    assert "524,288 B per token" in out
    assert "one sequence of 4,096 tokens: 2.15 GB (2.00 GiB)" in out
    assert "6,738,415,616 params" in out
    assert "| as configured | 32 | 2 | 524,288 | 2.15 GB (2.00 GiB) |" in out


def test_plan_command_json_for_70b_at_128k(capsys: pytest.CaptureFixture[str]) -> None:
    """Llama-2-70B shape (8 KV heads), float16, 131,072 tokens: 327,680 B/token, ~43 GB per sequence;
    the int8 what-if halves it."""
    main(["plan", "--model", "llama-2-70b", "--context", "131072", "--memory", "160GB", "--json"])
    doc = json.loads(capsys.readouterr().out)
    base, int8, int4, mha = doc["plans"]
    assert doc["model"]["num_kv_heads"] == 8 and doc["model"]["num_params"] == 68_976_648_192
    assert base["bytes_per_token"] == 327_680
    assert round(base["bytes_per_sequence"] / 1e9) == 43
    assert int8["bytes_per_token"] == 163_840
    assert int4["bytes_per_token"] == 81_920 and int4["label"] == "int4 KV cache"
    assert mha["bytes_per_token"] == 2_621_440 and mha["label"] == "without GQA (64 KV heads)"
    assert base["max_sequences"] == (160 * 10**9 - 2 * 68_976_648_192) // (327_680 * 131_072)


def test_plan_command_reads_a_config_directory(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """--model accepts a directory holding config.json (shape read from it, weights counted on meta)."""
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
    ).save_pretrained(tmp_path)
    main(["plan", "--model", str(tmp_path), "--dtype", "float32", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["plans"][0]["bytes_per_token"] == 2 * 3 * 2 * 32 * 4


def test_plan_command_unknown_model_lists_presets(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown --model exits with status 2 and a message listing the presets."""
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--model", "no-such-model"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--model 'no-such-model'" in err and "llama-2-7b" in err and "tiny" in err


def test_plan_command_shared_prefix_row_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    """--shared-prefix adds a row (and a line) with the shared count, and the JSON carries the same figures;
    without the flag the JSON says null and the text has no such row."""
    argv = ["plan", "--model", "llama-2-7b", "--memory", "80GiB", "--context", "4096"]
    assert main([*argv, "--shared-prefix", "3072"]) == 0
    out = capsys.readouterr().out
    assert "| as configured, first 3,072 tokens held once | 32 | 2 | 524,288 |" in out
    assert "536.87 MB (512.00 MiB) + 1.61 GB (1.50 GiB) once" in out
    assert "131 sequences fit instead of 33." in out
    assert main([*argv, "--shared-prefix", "3072", "--kv-dtype", "int8", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    s = doc["shared_prefix"]
    assert s["bytes_per_token"] == doc["plans"][0]["bytes_per_token"] == 262_144  # the same kv_dtype as row 1
    assert s["max_sequences_unshared"] == doc["plans"][0]["max_sequences"]
    assert s["max_sequences_shared"] == (s["kv_budget_bytes"] - 3072 * 262_144) // (1024 * 262_144)
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shared_prefix"] is None
    assert main(argv) == 0
    assert "held once" not in capsys.readouterr().out


@pytest.mark.parametrize("prefix", ["4096", "9999", "-5"])
def test_plan_command_bad_shared_prefix_exits_2_naming_it(prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--shared-prefix >= --context or negative: exit 2 naming --shared-prefix and the context."""
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--model", "llama-2-7b", "--context", "4096", f"--shared-prefix={prefix}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--shared-prefix" in err and "--context (4,096)" in err


_NO_TRANSFORMERS = """
import sys
sys.modules["transformers"] = None  # any import of transformers now raises ImportError
{body}
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "matplotlib") and sys.modules[m])
assert not leaked, leaked
"""


def _run_without_transformers(body: str) -> str:
    code = _NO_TRANSFORMERS.format(body=body)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_plan_command_runs_without_transformers() -> None:
    """`radixkv plan` on a preset imports neither transformers nor matplotlib."""
    out = _run_without_transformers(
        "from radixkv.cli import main\n"
        "assert main(['plan', '--model', 'llama-2-7b', '--memory', '80GiB', '--context', '4096']) == 0"
    )
    assert "524,288" in out or "512" in out, out


def test_python_dash_m_radixkv_is_the_command() -> None:
    out = _run_without_transformers(
        "import runpy\n"
        "sys.argv = ['radixkv', 'plan', '--model', 'llama-3-8b', '--json']\n"
        "try:\n"
        "    runpy.run_module('radixkv', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
    )
    assert json.loads(out)["model"]["num_layers"] == 32


def test_plan_without_transformers_on_a_config_names_the_extra(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _run_without_transformers(
        "import pytest\n"
        "from radixkv.integrations.models import MissingDependency, model_shape\n"
        f"with pytest.raises(MissingDependency, match=r'radixkv\\[hf\\]'):\n"
        f"    model_shape({str(tmp_path)!r})\n"
    )


@pytest.mark.parametrize("preset", list(PRESETS))
def test_a_presets_shape_without_transformers_equals_the_built_models(preset: str) -> None:
    """The arithmetic shape of a preset (what `radixkv plan` uses) is the one transformers' config gives."""
    assert model_shape(preset) == config_shape(preset, PRESETS[preset].make_config())
