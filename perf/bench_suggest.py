"""Benchmark `embdeploy suggest`: MB of corpus per minute, and how time grows with corpus size.

    python perf/bench_suggest.py                      # 4, 16 and 64 MB corpora, MiniLM's tokenizer
    python perf/bench_suggest.py --sizes 2,8 --json out.json

The corpora are generated here, deterministically (seeded): sentences of 6-24 words
drawn from a Zipf distribution over a vocabulary of common words and 120,000
invented domain words built from syllables (so, like a real domain corpus, many
words are cut into several pieces and the number of distinct words keeps growing
with the corpus). Each size is timed as the whole `suggest()` call (counting,
scoring, the reachability check), in one process, after a warm-up on a small file.
Writes perf/results/suggest-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "suggest"

COMMON = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no more out up into do any your what can "
    "some other time only new could these two may first then than them its also after well over such patient "
    "result level dose day week report test study treatment blood value normal high low increased decreased risk"
).split()
SYLLABLES = (
    "ka lo mi ne ra to pe chi zu ban dor fel gri hal jun kir lem nos par quin rus sil tar ven wol xen yar zol "
    "ane bro cyt derm eph gast hep ile kar lyt myo neph oste phag rhin sclr thro uro vasc"
).split()


def vocabulary(rng: random.Random, n_domain: int) -> list[str]:
    words = set()
    while len(words) < n_domain:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 5))))
    return COMMON + sorted(words)


def write_corpus(path: Path, mb: float, seed: int = 0) -> Path:
    if path.is_file() and path.stat().st_size >= mb * 1e6:
        return path
    rng = random.Random(seed)
    vocab = vocabulary(rng, 120_000)
    weights = [1.0 / (r + 1) ** 1.05 for r in range(len(vocab))]  # Zipf over the whole vocabulary
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < mb * 1e6:
            block = rng.choices(vocab, weights, k=20_000)
            i = 0
            lines = []
            while i < len(block):
                n = rng.randint(6, 24)
                s = " ".join(block[i:i + n])
                lines.append(s[:1].upper() + s[1:] + ".")
                i += n
            text = "\n".join(lines) + "\n"
            f.write(text)
            written += len(text.encode())
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4,16,64", help="corpus sizes in MB, comma-separated")
    ap.add_argument("--top", type=int, default=1000)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "suggest-cpu.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(HERE.parent))
    from embdeploy.suggest import SuggestConfig, load_suggest_tokenizer, suggest

    tok = load_suggest_tokenizer("minilm")
    sizes = [float(s) for s in args.sizes.split(",")]
    corpora = [write_corpus(WORK / f"corpus-{s:g}mb.txt", s) for s in sizes]
    suggest([write_corpus(WORK / "warmup.txt", 0.5)], tok, SuggestConfig(top=100))  # warm-up
    rows = []
    for s, c in zip(sizes, corpora):
        t = time.perf_counter()
        res = suggest([c], tok, SuggestConfig(top=args.top))
        sec = time.perf_counter() - t
        rows.append({
            "mb": c.stat().st_size / 1e6, "seconds": sec, "mb_per_minute": c.stat().st_size / 1e6 / (sec / 60),
            "texts": res.corpus_texts, "words": res.corpus_words, "distinct_words": res.distinct_words,
            "corpus_tokens": res.corpus_tokens, "suggested": len(res.candidates), "share_saved": res.share_saved,
            "unreachable": len(res.unreachable), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        })
        print(f"{rows[-1]['mb']:.1f} MB: {sec:.1f}s, {rows[-1]['mb_per_minute']:.1f} MB/min, "
              f"{res.distinct_words} distinct words, top {len(res.candidates)} save {res.share_saved:.1%}", flush=True)
    base = rows[0]
    for r in rows:
        r["time_ratio_to_smallest"] = r["seconds"] / base["seconds"]
        r["size_ratio_to_smallest"] = r["mb"] / base["mb"]
    out = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
           "tokenizer": "packaged all-MiniLM-L6-v2 (WordPiece, uncased)", "top": args.top, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    md = ["| corpus MB | seconds | MB/min | texts | distinct words | time ÷ smallest | size ÷ smallest | top-K share saved |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['mb']:.1f} | {r['seconds']:.1f} | {r['mb_per_minute']:.1f} | {r['texts']} | {r['distinct_words']} "
                  f"| {r['time_ratio_to_smallest']:.2f} | {r['size_ratio_to_smallest']:.2f} | {r['share_saved']:.1%} |")
    args.json.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
