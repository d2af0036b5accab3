"""int8 across the coverage families: the worst validation cosine of each family's int8 swap export.

    python perf/int8_coverage.py            # every family of embdeploy.coverage, tiny random models

Each family is built from its config (random weights, as the coverage run does), extended with the
coverage run's new tokens (subword-mean), exported `--mode swap --quantize int8` and validated against
PyTorch fp32. What is recorded per family: passed (with the int8 tolerance row), the worst row cosine
over all probes and outputs, the MatMuls quantized, and per output (over every probe, the swapped-table
run included): worst and mean row cosine, and for logits top-1 agreement and top-5 overlap on real
positions. Gating is switched off while measuring (`--measure`, the default) so a family's figures are
recorded whatever the thresholds are; `--gate` records pass/fail with the tolerance row as it is.
Writes perf/results/int8-coverage.{json,md} and the int8 column of docs/coverage.md (through
embdeploy.coverage.write_int8); it is the measurement behind the ("int8", "cpu") tolerance row.

    python perf/int8_coverage.py --families bert,gpt2    # some of them (the others keep their rows)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def measure(name: str, tmp: Path, gate: bool) -> dict:
    """One family's row: exported swap int8 and validated (every threshold but the gate's own kept off
    unless `gate`), its figures per output."""
    import dataclasses
    import unittest.mock

    import onnx

    from embdeploy.coverage import FAMILIES, NEW_TOKENS, build
    from embdeploy.errors import ValidationFailed
    from embdeploy.export import export_extension
    from embdeploy.export import validate as validate_module
    from embdeploy.extend.model import extend_model

    row = {"family": name}
    tol = validate_module.TOLERANCES[("int8", "cpu")]
    # Measuring: a tolerance that passes anything finite, so every family's numbers are recorded.
    off = dataclasses.replace(tol, min_cosine=-2.0, min_mean_cosine=-2.0, min_top1=0.0, min_top5=0.0)
    try:
        model, tok = build(FAMILIES[name], 0)
        ext = extend_model(model, tok, list(NEW_TOKENS), init="subword-mean", seed=0)
        with unittest.mock.patch.dict(validate_module.TOLERANCES, {} if gate else {("int8", "cpu"): off}):
            try:
                r = export_extension(ext, "swap", tmp / name, cache_dir=tmp / "cache", quantize="int8")
                report = r.report
                g = onnx.load(str(r.out / "model.onnx"), load_external_data=False)
                row["quantized_matmuls"] = sum(n.op_type == "MatMulInteger" for n in g.graph.node)
            except ValidationFailed as e:
                report = e.report
        checks = [c for c in report.checks if c.min_cosine >= -1]
        worst = min(checks, key=lambda c: c.min_cosine)
        # passed: with the tolerance row as it is now (what export would say), measured or gated
        report.tolerance = tol
        row.update(passed=report.passed, worst_cosine=round(worst.min_cosine, 6), worst_output=worst.output,
                   worst_probe=worst.probe, problems=report.failures()[:3])
        row["outputs"] = {k: {"min_cosine": round(w["min_cosine"], 6), "mean_cosine": round(w["mean_cosine"], 6),
                              "rows": w["rows"], **({"top1": round(w["top1"], 4), "top5": round(w["top5"], 4)}
                                                    if w["top1"] is not None else {})}
                          for k, w in report.outputs().items()}
    except Exception as e:  # a family that cannot be quantized: recorded, not fatal
        row.update(passed=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return row


def main(argv=None) -> int:
    import argparse

    from embdeploy.coverage import FAMILIES, write_int8

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", help="comma-separated subset (default: every family)")
    p.add_argument("--gate", action="store_true", help="validate with the int8 tolerance row as it is (no measuring)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.families.split(",")] if args.families else list(FAMILIES)
    out = HERE / "results" / "int8-coverage.json"
    old = {r["family"]: r for r in json.loads(out.read_text())} if out.is_file() and args.families else {}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="int8-cov-") as tmp:
        for name in names:
            t = time.perf_counter()
            row = measure(name, Path(tmp), args.gate)
            row["seconds"] = round(time.perf_counter() - t, 1)
            rows[name] = row
            print(json.dumps(row), flush=True)
    merged = [rows.get(n) or old[n] for n in FAMILIES if n in rows or n in old]
    out.write_text(json.dumps(merged, indent=2) + "\n")
    md = ["| family | int8 swap | worst row cosine | mean cosine (worst output) | logits top-1 | top-5 | output | "
          "MatMuls quantized |", "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in merged:
        outs = r.get("outputs", {})
        mean = min((o["mean_cosine"] for o in outs.values()), default="-")
        lg = outs.get("logits", {})
        md.append(f"| {r['family']} | {'pass' if r.get('passed') else 'FAIL'} | {r.get('worst_cosine', '-')} | {mean} | "
                  f"{lg.get('top1', '-')} | {lg.get('top5', '-')} | {r.get('worst_output', r.get('error', '-'))} | "
                  f"{r.get('quantized_matmuls', '-')} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    write_int8(merged, HERE.parent / "docs" / "coverage.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
