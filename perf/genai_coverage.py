"""onnxruntime-genai across the coverage families: each causal LM through the model builder, merged and swap, gated.

    python perf/genai_coverage.py                          # every causal-LM family of embdeploy.coverage
    python perf/genai_coverage.py --families llama,qwen2   # some of them (the others keep their rows)

A family is a causal LM when transformers lists its model class among its causal-LM classes
(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES); which of those the builder builds is the builder's call, not a
list kept here. Per family: the tiny random model of embdeploy.coverage (its config, tokenizer and new
tokens, subword-mean init, no training), its genai base built once by onnxruntime-genai's model builder
(`genai_base`), then `export_genai` in merged and swap mode, each through the genai gate: prefill and
decode-step logits against PyTorch, greedy generation through onnxruntime-genai equal to transformers'
`generate` token for token, prompts where PyTorch's next token is a new id when the rows make one, and
in swap mode a replacement table with an arranged row (so a new id is emitted). A family the builder
does not build is recorded with the builder's own message, as `embdeploy export --format genai` shows it.

Writes perf/results/genai-coverage.{json,md} and the genai column of docs/coverage.md (through
embdeploy.coverage.write_genai, kept in docs/coverage.json under "genai").
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

MODES = ("merged", "swap")


def causal_families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from embdeploy.coverage import FAMILIES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return [name for name, f in FAMILIES.items() if f.model_class in causal]


def measure(name: str, tmp: Path) -> dict:
    """One family's row: built by the builder or its reason why not; per mode the gate's verdict and figures."""
    from embdeploy.coverage import FAMILIES, NEW_TOKENS, _error_name, _quiet, _reason, build
    from embdeploy.errors import EmbdeployError, ValidationFailed
    from embdeploy.export.genai import export_genai, genai_base
    from embdeploy.extend.model import extend_model

    family = FAMILIES[name]
    row = {"family": name, "label": family.label, "model_class": family.model_class}
    t0 = time.perf_counter()
    with _quiet():
        try:
            model, tok = build(family, 0)
            ext = extend_model(model, tok, list(NEW_TOKENS), init="subword-mean", seed=0)
            row.update(head=ext.head_mode, V=ext.V, K=ext.K, H=ext.H)
        except Exception as e:  # the float coverage run records this family's failure; here it is only noted
            row.update(built=False, stage="extend", reason=_reason(e, tmp), error=_error_name(e))
            return row
        try:
            base = genai_base(ext, cache_dir=tmp / "cache")
        except EmbdeployError as e:
            row.update(built=False, stage="builder", reason=_reason(e, tmp, head=600), error=_error_name(e))
            row["seconds"] = round(time.perf_counter() - t0, 1)
            return row
        except Exception as e:  # a bug in embdeploy: users would see a traceback
            row.update(built=False, stage="builder", reason=_reason(e, tmp), error=_error_name(e))
            return row
        row["built"] = True
        row["base_generates"] = base_generates(base.path)
        for mode in MODES:
            out = tmp / f"{name}-{mode}"
            cell = {"passed": False}
            try:
                report = export_genai(ext, mode, out, cache_dir=tmp / "cache", overwrite=True).report
            except ValidationFailed as e:
                report = getattr(e, "report", None)
                cell.update(stage="validate", reason=_reason(e, out, tmp), error=_error_name(e))
            except Exception as e:
                report = None
                cell.update(stage="export", reason=_reason(e, out, tmp), error=_error_name(e))
            if report is not None:
                generation = [n for n in report.notes if ": " in n and "generated [" in n]
                cell.update(
                    passed=report.passed, max_abs_diff=report.max_abs_diff if report.checks else None,
                    checks=len(report.checks), generations=len(generation),
                    next_token_new=sum("next token new" in n for n in generation),
                    new_ids_generated=sum("new id(s)" in n for n in generation),
                    notes=[n for n in report.notes if n not in generation])
            row[mode] = cell
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def base_generates(path: Path) -> bool | str:
    """True when onnxruntime-genai generates from the builder's own output (no extension), else its error:
    tells a base the builder made unrunnable from a rewrite that broke it."""
    import onnxruntime_genai as og

    from embdeploy.export.validate_genai import genai_generate

    try:
        genai_generate(og, og.Model(str(path)), [1, 2, 3, 4], 2, {})
        return True
    except Exception as e:  # genai raises RuntimeError with ORT's message
        return " ".join(str(e).split())[:300]


def markdown(rows: list[dict], env: dict) -> str:
    lines = ["# onnxruntime-genai across the coverage families", "",
             "Written by `python perf/genai_coverage.py` (module docstring: what runs). Environment: "
             + ", ".join(f"{k} {v}" for k, v in env.items()) + ".", "",
             "| family | built | merged | swap | generations checked (merged / swap) | new id emitted | s |",
             "|---|---|---|---|---|---|---:|"]
    for r in rows:
        if not r.get("built"):
            lines.append(f"| {r['label']} | no ({r['stage']}) | – | – | – | – | {r.get('seconds', '')} |")
            continue
        cells = []
        for m in MODES:
            c = r[m]
            cells.append(("pass" if c["passed"] else f"**FAIL** ({c.get('stage', 'validate')})")
                         + (f" ({c['max_abs_diff']:.1e})" if c.get("max_abs_diff") is not None else ""))
        gens = " / ".join(str(r[m].get("generations", "–")) for m in MODES)
        emitted = "; ".join(f"{m}: {r[m].get('new_ids_generated', 0)}" for m in MODES)
        lines.append(f"| {r['label']} | yes | {cells[0]} | {cells[1]} | {gens} | {emitted} | {r['seconds']} |")
    failed = [r for r in rows if r.get("built") and not all(r[m]["passed"] for m in MODES)]
    if failed:
        lines += ["", "## Built, failed", "", "base generates: whether onnxruntime-genai generates from the builder's "
                  "own output, before any rewrite.", "", "| family | mode | stage | base generates | message |",
                  "|---|---|---|---|---|"]
        for r in failed:
            for m in MODES:
                if not r[m]["passed"]:
                    base = "yes" if r.get("base_generates") is True else f"no: {r.get('base_generates')}"
                    lines.append(f"| {r['label']} | {m} | {r[m].get('stage')} | {base.replace('|', '/')} | "
                                 f"{r[m].get('reason', '').replace('|', '/')} |")
    refused = [r for r in rows if not r.get("built")]
    if refused:
        lines += ["", "## Not built", "", "| family | stage | message |", "|---|---|---|"]
        for r in refused:
            lines.append(f"| {r['label']} | {r['stage']} | {r['reason'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import onnxruntime
    import onnxruntime_genai
    import torch
    import transformers

    from embdeploy.coverage import write_genai

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", help="comma-separated subset of the causal-LM families (default: all of them)")
    p.add_argument("--no-docs", action="store_true", help="leave docs/coverage.md as it is")
    args = p.parse_args(argv)
    causal = causal_families()
    names = [n.strip() for n in args.families.split(",")] if args.families else causal
    unknown = [n for n in names if n not in causal]
    if unknown:
        print(f"not causal-LM families of embdeploy.coverage: {', '.join(unknown)}; choose from {', '.join(causal)}",
              file=sys.stderr)
        return 2
    results = HERE / "results" / "genai-coverage.json"
    kept = {}
    if results.is_file():  # families not run this time keep their rows
        kept = {r["family"]: r for r in json.loads(results.read_text())["rows"] if r["family"] not in names}
    rows = []
    with tempfile.TemporaryDirectory(prefix="genai-coverage-") as tmp:
        for name in names:
            print(f"{name} ...", file=sys.stderr, flush=True)
            row = measure(name, Path(tmp))
            shown = (", ".join(f"{m} {'passed' if row[m]['passed'] else 'FAILED'}" for m in MODES) if row.get("built")
                     else f"not built: {row['reason'][:200]}")
            print(f"  {shown} ({row.get('seconds')} s)", file=sys.stderr, flush=True)
            rows.append(row)
    order = {n: i for i, n in enumerate(causal)}
    rows = sorted(list(kept.values()) + rows, key=lambda r: order.get(r["family"], len(order)))
    env = {"onnxruntime-genai": onnxruntime_genai.__version__, "onnxruntime": onnxruntime.__version__,
           "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"environment": env, "rows": rows}, indent=1, ensure_ascii=False) + "\n")
    results.with_suffix(".md").write_text(markdown(rows, env))
    print(f"wrote {results} and .md", file=sys.stderr)
    if not args.no_docs:
        print(f"wrote {write_genai(rows, HERE.parent / 'docs' / 'coverage.md')}", file=sys.stderr)
    failed = [r["family"] for r in rows if r.get("built") and not all(r[m]["passed"] for m in MODES)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
