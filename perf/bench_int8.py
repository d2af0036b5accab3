"""int8 on the CPU: MiniLM with K = 1,000, quantized exports against the fp32 base and the int8 base.

    python perf/bench_int8.py                   # build (perf/work/int8/), validate, time, measure quality
    python perf/bench_int8.py --rounds 30

Builds an extension of the packaged MiniLM with K = 1,000 tokens (the 50 shipped clinical terms and
950 compound words, subword-mean init), exports it merged and swap in fp32 and with `--quantize int8`
(each validated against PyTorch fp32), then:
  1. one interleaved run (`embdeploy bench`), base = the fp32 base export, variants = int8 merged, int8 swap
     and fp32 merged; bench adds the int8 exports' own base (the int8 base) to the same rounds, so the run
     gives both the speed-up of int8 over fp32 and what the extension costs on top of the int8 base;
  3. quality: sentence embeddings of the int8 exports against the fp32 export (which validation holds
     to PyTorch fp32 within 3e-6) on held-out texts: the shipped held-out file and 500 compound sentences;
  4. file sizes and the validation figures.
Writes perf/results/int8-minilm-k1000-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "int8"
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def build_extension():
    """(the MiniLM extension with K = 1,000, the 650 held-out texts)."""
    from bench_train_k import HEADS, HELD_T, TAILS

    from embdeploy.extend.config import ExtensionConfig, read_token_file
    from embdeploy.extend.model import Extension
    from embdeploy.models import load_base
    from embdeploy.quickstart import data_file

    model, tok, info = load_base("minilm")
    ext = Extension(model, tok, info)
    terms = read_token_file(data_file("terms.txt"))
    compounds = sorted({h + t for h in HEADS for t in TAILS if h != t})
    compounds = [w for w in compounds if len(tok(w, add_special_tokens=False)["input_ids"]) >= 2][: 1000 - len(terms)]
    ext.add(ExtensionConfig(tokens=terms + compounds))
    held = [ln for ln in data_file("heldout.txt").read_text().splitlines() if ln.strip()]
    held += [HELD_T[i % len(HELD_T)].format(w=w) for i, w in enumerate(compounds[:500])]
    return ext, held


def build():
    from embdeploy.export import export_extension

    ext, held = build_extension()
    out, timings = {}, {}
    for q in (None, "int8"):
        for mode in ("merged", "swap"):
            name = f"{'int8' if q else 'fp32'}-{mode}"
            t = time.perf_counter()
            r = export_extension(ext, mode, WORK / name, cache_dir=WORK / "cache", overwrite=True, quantize=q)
            timings[name] = time.perf_counter() - t
            out[name] = r
    return ext, out, timings, held


def dir_mb(d: Path) -> float:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) / 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "int8-minilm-k1000-cpu.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from embdeploy.bench import run_bench
    from embdeploy.runtime import Session

    ext, exports, export_s, held = build()
    fp32_base = Path(exports["fp32-merged"].manifest.base_onnx)
    int8_base = Path(exports["int8-merged"].manifest.base_onnx)
    d = {k: WORK / k for k in exports}

    quality = {}
    ref = Session(d["fp32-merged"], providers="cpu", threads=1).encode(held, outputs="sentence_embedding")["sentence_embedding"]
    for name in ("int8-merged", "int8-swap"):
        got = Session(d[name], providers="cpu", threads=1).encode(held, outputs="sentence_embedding")["sentence_embedding"]
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        quality[name] = {"texts": len(held), "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                         "cos_p01": float(np.percentile(cos, 1))}
        print(name, quality[name], flush=True)

    shapes = ((1, 16), (1, 128), (8, 128))
    say = lambda m: print(m, flush=True)  # noqa: E731
    res = run_bench([d["int8-merged"], d["int8-swap"], d["fp32-merged"]], base_dir=fp32_base,
                    shapes=shapes, rounds=args.rounds, memory_cost=False, progress=say)
    assert any(r.reference for r in res.references), "bench did not time the int8 base in the same rounds"
    vs_fp32 = {f"{r.variant}/{r.shape}/{r.mix}": {"ratio": r.ratio_to_base, "q25": r.ratio_q25, "q75": r.ratio_q75,
                                                  "p50_ms": r.p50_ms} for r in res.latency}
    vs_int8 = {f"{r.variant}/{r.shape}/{r.mix}": {"ratio": r.ratio, "q25": r.ratio_q25, "q75": r.ratio_q75,
                                                  "reference": r.reference} for r in res.references}

    out = {
        "K": ext.K, "rounds": args.rounds, "threads": 1,
        "quantization": exports["int8-merged"].manifest.quantization,
        "validation": {k: {"passed": r.report.passed, "worst_cosine": min(c.min_cosine for c in r.report.checks),
                           "max_abs": r.report.max_abs_diff} for k, r in exports.items()},
        "export_s": export_s, "sizes_mb": {k: dir_mb(v) for k, v in d.items()} | {"fp32-base": dir_mb(fp32_base),
                                                                                   "int8-base": dir_mb(int8_base)},
        "quality_vs_fp32": quality,
        "latency_vs_fp32_base": vs_fp32, "latency_vs_int8_base": vs_int8, "one_run": True,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), **res.machine},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    md = ["| variant | reference | 1x16 | 1x128 | 8x128 |", "|---|---|---:|---:|---:|"]
    for ref_name, rows_of in (("fp32 base", [(r.variant, r.shape, r.mix, r.ratio_to_base, r.ratio_q25, r.ratio_q75)
                                             for r in res.latency]),
                              ("int8 base", [(r.variant, r.shape, r.mix, r.ratio, r.ratio_q25, r.ratio_q75)
                                             for r in res.references])):
        rows = {}
        for variant, shape, mix, ratio, q25, q75 in rows_of:
            if variant != "base" and mix == "base-ids":
                rows.setdefault(variant, {})[shape] = f"{ratio:.3f} [{q25:.3f}–{q75:.3f}]"
        for v, by in rows.items():
            md.append(f"| {v} | {ref_name} | {by.get('1x16', '-')} | {by.get('1x128', '-')} | {by.get('8x128', '-')} |")
    args.json.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
