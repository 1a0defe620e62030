"""The documentation's Python examples run: every ```python block of README.md and docs/**/*.md.

Each block runs in a fresh namespace holding the names the pages assume (`model`, `tokenizer`,
`input_ids`, `mask`, `spec`, `token_ids`, `kv`, `query_ids`, `system_prompt`, `question`): a tiny
random-weight Llama and a character-level tokenizer (tests/test_hf_dropin.py's, no download), in a temporary
working directory. A block that cannot run here (a hub model, a server) carries
`<!-- not-run: needs ... -->` on the line before it; it is compiled, not run, and a marker
without a reason, or one that is not followed by a block, fails.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from radixkv.integrations.hf import UncachedWarning  # noqa: E402
from test_hf_dropin import char_tokenizer, tiny_model  # noqa: E402  (the tiny chat model and tokenizer)

import radixkv  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    code: str
    not_run: str | None  # the marker's reason; None: the block runs

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The ```python blocks of a page, each with the not-run marker on the line before it, if any."""
    lines = page.read_text(encoding="utf-8").split("\n")
    found: list[Block] = []
    i = 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```"):
            start = i
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                i += 1
            if fence == "```python":
                before = lines[start - 1].strip() if start else ""
                marker = NOT_RUN.match(before)
                code = "\n".join(lines[start + 1 : i])
                found.append(Block(page, start + 1, code, marker.group(1) if marker else None))
        i += 1
    return found


BLOCKS = [b for page in PAGES for b in blocks_of(page)]


def names() -> dict[str, Any]:
    """What the pages' examples assume is already defined."""
    tokenizer = char_tokenizer()
    rows = ["The library opens at nine on weekdays. When does it open?", "The library opens at nine. Why?"]
    batch = tokenizer(rows, return_tensors="pt", padding=True)
    # The core's example: a spec, one prompt's KV for it, and a longer query over the same tokens.
    spec = radixkv.KVSpec(num_layers=2, num_kv_heads=4, head_dim=64, dtype=torch.float16)
    token_ids = list(range(100, 148))
    g = torch.Generator().manual_seed(0)
    shape = (1, spec.num_kv_heads, len(token_ids), spec.head_dim)
    kv = [(torch.randn(shape, generator=g).half(), torch.randn(shape, generator=g).half()) for _ in range(2)]
    return {
        "model": tiny_model(),
        "tokenizer": tokenizer,
        "input_ids": batch["input_ids"],
        "mask": batch["attention_mask"],
        "spec": spec,
        "token_ids": token_ids,
        "kv": kv,
        "query_ids": [*token_ids, 7, 8, 9],
        "system_prompt": "You are a careful assistant. Answer in one short line.",
        "question": "When does the library open?",
    }


def test_the_pages_have_examples() -> None:
    """The extraction finds the pages' blocks (an empty list would pass every test below)."""
    assert (ROOT / "docs" / "index.md").exists()
    assert len([b for b in BLOCKS if b.page.name == "README.md"]) >= 2
    assert len([b for b in BLOCKS if b.not_run is None]) >= 7


def test_every_not_run_marker_gives_a_reason_and_precedes_a_block() -> None:
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").split("\n")
        for i, line in enumerate(lines):
            if "not-run" in line:
                marker = NOT_RUN.match(line.strip())
                where = f"{page.relative_to(ROOT)}:{i + 1}"
                assert marker, f"{where}: write the marker as <!-- not-run: needs ... -->"
                assert marker.group(1).startswith("needs ") and len(marker.group(1)) > len("needs "), (
                    f"{where}: a not-run marker says what the block needs"
                )
                assert i + 1 < len(lines) and lines[i + 1].strip() == "```python", (
                    f"{where}: a not-run marker stands on the line right before a ```python block"
                )


RUNNABLE = [b for b in BLOCKS if b.not_run is None]
NOT_RUN_BLOCKS = [b for b in BLOCKS if b.not_run is not None]


@pytest.mark.parametrize("block", NOT_RUN_BLOCKS, ids=[b.id for b in NOT_RUN_BLOCKS])
def test_blocks_that_need_a_server_or_hub_model_still_compile(block: Block) -> None:
    """What cannot run here (its marker says why) is at least valid Python."""
    compile(block.code, block.id, "exec")


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_example_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the examples' relative paths (a disk tier) land here
    namespace = names()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncachedWarning)  # every example is served
        exec(compile(block.code, block.id, "exec"), namespace)
