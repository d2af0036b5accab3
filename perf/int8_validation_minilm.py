"""The int8 validation figures on the real model: the packaged MiniLM with K = 1,000, merged and swap.

    python perf/int8_validation_minilm.py

The extension of perf/bench_int8.py (the 50 shipped clinical terms and 950 compound words,
subword-mean init), exported with `--quantize int8` and validated against PyTorch fp32 with the
held-out texts of bench_int8 (the shipped held-out file and 500 compound sentences) as the user's
texts (`validate --texts`). Gating is off while measuring (every threshold at its loosest), so the
figures are recorded whatever the tolerance row says; `passed` is then judged with the row as it is.
Per output: worst and mean row cosine over every probe, and over the user's texts alone.
Writes perf/results/int8-validation-minilm.json; with perf/int8_coverage.py it is the measurement
behind the ("int8", "cpu") tolerance row.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
import unittest.mock
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def figures(checks) -> dict:
    out = {}
    for c in checks:
        o = out.setdefault(c.output, {"min_cosine": 1.0, "rows": 0, "_sum": 0.0})
        o["min_cosine"] = min(o["min_cosine"], c.min_cosine)
        o["rows"] += c.rows
        o["_sum"] += c.mean_cosine * c.rows
    return {k: {"min_cosine": round(v["min_cosine"], 6), "mean_cosine": round(v["_sum"] / max(v["rows"], 1), 6),
                "rows": v["rows"]} for k, v in out.items()}


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bench_int8 import build_extension  # the extension and texts of perf/bench_int8.py

    from embdeploy.errors import ValidationFailed
    from embdeploy.export import export_extension
    from embdeploy.export import validate as v

    ext, held = build_extension()

    tol = v.TOLERANCES[("int8", "cpu")]
    off = dataclasses.replace(tol, min_cosine=-2.0, min_mean_cosine=-2.0, min_top1=0.0, min_top5=0.0)
    result = {"K": ext.K, "texts": len(held), "modes": {}}
    with tempfile.TemporaryDirectory(prefix="int8-val-") as tmp, \
            unittest.mock.patch.dict(v.TOLERANCES, {("int8", "cpu"): off}):
        for mode in ("merged", "swap"):
            t = time.perf_counter()
            r = export_extension(ext, mode, Path(tmp) / mode, cache_dir=HERE / "work" / "int8-validation" / "cache",
                                 quantize="int8", validate=False)
            try:
                report = v.validate(r.out, ext, texts=held)
            except ValidationFailed as e:
                report = e.report
            report.tolerance = tol
            result["quantization"] = r.manifest.quantization
            result["modes"][mode] = {
                "passed": report.passed, "problems": report.failures()[:5],
                "all_probes": figures(report.checks),
                "your_texts": figures([c for c in report.checks if c.probe.startswith(v.USER)]),
                "built_in_probes": figures([c for c in report.checks if not c.probe.startswith(v.USER)]),
                "texts": report.texts, "seconds": round(time.perf_counter() - t, 1),
            }
            print(mode, json.dumps(result["modes"][mode]), flush=True)
    out = HERE / "results" / "int8-validation-minilm.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
