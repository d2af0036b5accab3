"""Decode tokens/s of genai exports (merged, swap) against the genai base on the CPU, interleaved in one process.

    python perf/bench_genai.py                      # tiny and small; writes perf/results/genai-{size}-cpu.json and .md
    python perf/bench_genai.py --sizes tiny --rounds 5 --new-tokens 16 --smoke    # a quick check, nothing written

The issue's goal: decode tokens/s of merged within 2% and swap within 5% of the genai base, on tiny
and small models. For each size a random Llama (untied head, built from a config: no download) gets
the 50 shipped clinical terms (K = 50) with a byte-level BPE trained on the shipped corpus, is exported
with `export --format genai` in merged and swap mode (each through the validation gate: greedy
generation equal to transformers'), then `embdeploy.bench.run_bench` times the genai base, merged and
swap interleaved: prefill of the prompt and `--new-tokens` greedy decode steps (EOS ignored), base-ids
and new-ids prompts. The verdict reads the decode rows' ratio to the base (median of per-round
ratios); the 25th-75th percentile is printed beside it, because on a shared machine a spread wider
than the margin means the run says nothing either way.

Sizes (V = table rows, H, layers, heads / KV heads, MLP):
    tiny    V 4096,  H 64,  2 layers,  4/2 heads, MLP 256
    small   V 32000, H 512, 8 layers,  8/4 heads, MLP 1408   (about 50M parameters, 128M for the tables)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "work" / "genai"
sys.path.insert(0, str(ROOT))

SIZES = {
    "tiny": dict(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256),
    "small": dict(vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, intermediate_size=1408),
}
GOAL = {"merged": 0.02, "swap": 0.05}  # decode time per token above the base, at most


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = (ROOT / "embdeploy" / "data" / "train.txt").read_text().splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build(size: str, work: Path, cache: Path) -> tuple[Path, Path]:
    """The merged and swap genai exports of `size` (built once, reused while their embdeploy.json is there)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from embdeploy.export.genai import export_genai
    from embdeploy.extend.model import extend_model

    merged, swap = work / size / "merged", work / size / "swap"
    if (merged / "embdeploy.json").is_file() and (swap / "embdeploy.json").is_file():
        return merged, swap
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False,
                                         bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
    terms = (ROOT / "embdeploy" / "data" / "terms.txt").read_text().split()
    ext = extend_model(model, tokenizer(), terms, init="normal", seed=0)
    for mode, out in (("merged", merged), ("swap", swap)):
        print(f"{size}: export --format genai --mode {mode} (the gate runs)", flush=True)
        export_genai(ext, mode, out, overwrite=True, cache_dir=cache, progress=lambda m: print(f"  {m}", flush=True))
    return merged, swap


def verdict(result) -> list[dict]:
    rows = []
    for r in result.latency:
        if r.variant == "base" or not r.shape.startswith("decode:"):
            continue
        limit = 1 + GOAL[r.mode]
        spread = r.ratio_q75 - r.ratio_q25
        rows.append({"shape": r.shape, "variant": r.variant, "ids": r.mix, "ratio": r.ratio_to_base,
                     "q25": r.ratio_q25, "q75": r.ratio_q75, "limit": limit, "met": r.ratio_to_base <= limit,
                     "readable": spread <= GOAL[r.mode] * 2})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,small", help="comma-separated: tiny, small [default: both]")
    ap.add_argument("--shapes", default="1x32,1x256", help="prompt shapes BxS [default: 1x32,1x256]")
    ap.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per timed generation [128]")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="write nothing to perf/results (exports in a temp dir)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from embdeploy.bench import run_bench, write_markdown

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        sys.exit(f"unknown size(s) {unknown}; choose from {', '.join(SIZES)}")
    tmp = tempfile.TemporaryDirectory(prefix="bench-genai-") if args.smoke else None
    work = Path(tmp.name) if tmp else WORK
    failed = False
    for size in sizes:
        merged, swap = build(size, work, work / "cache")
        result = run_bench([merged, swap], shapes=args.shapes, threads=args.threads, rounds=args.rounds,
                           warmup=args.warmup, new_tokens=args.new_tokens,
                           progress=lambda m: print(f"  {m}", flush=True))
        rows = verdict(result)
        result.settings["goal"] = {"decode ratio at most": {k: 1 + v for k, v in GOAL.items()}, "verdict": rows}
        print(f"\n{size}: decode time per token / genai base (median of {args.rounds} interleaved rounds, IQR)")
        for v in rows:
            mark = "met" if v["met"] else "MISSED"
            note = "" if v["readable"] else "  (IQR wider than the margin: not conclusive)"
            print(f"  {v['shape']:>16} {v['variant']:>6} {v['ids']:>8}: {v['ratio']:.3f} "
                  f"[{v['q25']:.3f}-{v['q75']:.3f}] limit {v['limit']:.2f} {mark}{note}")
            failed |= not v["met"]
        if not args.smoke:
            out = HERE / "results" / f"genai-{size}-cpu"
            out.parent.mkdir(parents=True, exist_ok=True)
            Path(f"{out}.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
            write_markdown(result, f"{out}.md")
            print(f"wrote {out}.json and .md")
    if tmp:
        tmp.cleanup()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
