"""int8 across the coverage families: the worst validation cosine of each family's int8 swap export.

    python perf/int8_coverage.py            # every family of embdeploy.coverage, tiny random models

Each family is built from its config (random weights, as the coverage run does), extended with the
coverage run's new tokens (subword-mean), exported `--mode swap --quantize int8` and validated against
PyTorch fp32. What is recorded per family: passed (with the int8 tolerance row), the worst row cosine
over all probes and outputs, the MatMuls quantized. Writes perf/results/int8-coverage.{json,md}; it
is the measurement behind the ("int8", "cpu") tolerance row.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main() -> int:
    import onnx

    from embdeploy.coverage import FAMILIES, NEW_TOKENS, build
    from embdeploy.errors import ValidationFailed
    from embdeploy.export import export_extension
    from embdeploy.extend.model import extend_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="int8-cov-") as tmp:
        for name, family in FAMILIES.items():
            t = time.perf_counter()
            row = {"family": name}
            try:
                model, tok = build(family, 0)
                ext = extend_model(model, tok, list(NEW_TOKENS), init="subword-mean", seed=0)
                try:
                    r = export_extension(ext, "swap", Path(tmp) / name, cache_dir=Path(tmp) / "cache", quantize="int8")
                    report, row["passed"] = r.report, True
                    g = onnx.load(str(r.out / "model.onnx"), load_external_data=False)
                    row["quantized_matmuls"] = sum(n.op_type == "MatMulInteger" for n in g.graph.node)
                except ValidationFailed as e:
                    report, row["passed"] = e.report, False
                checks = [c for c in report.checks if c.min_cosine >= -1]
                worst = min(checks, key=lambda c: c.min_cosine)
                row.update(worst_cosine=round(worst.min_cosine, 6), worst_output=worst.output, worst_probe=worst.probe)
            except Exception as e:  # a family that cannot be quantized: recorded, not fatal
                row.update(passed=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            row["seconds"] = round(time.perf_counter() - t, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = HERE / "results" / "int8-coverage.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    md = ["| family | int8 swap | worst row cosine | output | MatMuls quantized |", "|---|---|---:|---|---:|"]
    for r in rows:
        md.append(f"| {r['family']} | {'pass' if r.get('passed') else 'FAIL'} | {r.get('worst_cosine', '-')} | "
                  f"{r.get('worst_output', r.get('error', '-'))} | {r.get('quantized_matmuls', '-')} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
