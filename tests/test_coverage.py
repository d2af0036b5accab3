"""Architecture coverage: the core families pass extend -> train -> export -> validate in every mode,
and docs/coverage.md is what the generator writes for docs/coverage.json (never edited by hand).

The other families (and the ones that fail, with their reasons) are in docs/coverage.md;
regenerate it with `python -m embdeploy.coverage --write docs/coverage.md`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embdeploy import coverage
from embdeploy.coverage import CORE, FAMILIES, HEADER, Record, render_markdown, run_family
from embdeploy.export.manifest import EXPORT_MODES as MODES

DOCS = Path(__file__).resolve().parent.parent / "docs"
REQUIRED = ("bert", "roberta", "distilbert", "xlm-roberta", "gpt2", "llama", "mistral", "gemma")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")


def test_core_families_are_the_required_ones():
    assert set(REQUIRED) <= set(CORE)


@pytest.mark.parametrize("family", CORE)
def test_family_passes_every_mode(family, tmp_path):
    records = run_family(family, tmp_path)
    assert [r.mode for r in records] == list(MODES)
    failed = [f"{r.mode}: [{r.stage}] {r.error}: {r.reason}" for r in records if not r.passed]
    assert not failed, "\n".join(failed)
    for r in records:
        assert r.K == len(coverage.NEW_TOKENS) and r.H > 0
        assert r.max_abs_diff is not None and r.max_abs_diff < 1e-4


def test_coverage_md_is_generated_from_coverage_json():
    data = json.loads((DOCS / "coverage.json").read_text())
    md = (DOCS / "coverage.md").read_text()
    assert md.startswith(HEADER)
    assert md == render_markdown(data), (
        "docs/coverage.md differs from what the generator writes for docs/coverage.json; "
        "regenerate it with `python -m embdeploy.coverage --write docs/coverage.md`, do not edit it"
    )


def test_int8_column_is_generated_from_the_int8_coverage_results():
    """docs/coverage.json's "int8" rows are perf/int8_coverage.py's results (pass/fail, worst cosine), and every
    family the float table lists as passing in swap mode has its int8 cell."""
    results = json.loads((DOCS.parent / "perf" / "results" / "int8-coverage.json").read_text())
    data = json.loads((DOCS / "coverage.json").read_text())
    assert data["int8"] == [{k: r[k] for k in ("family", "passed", "worst_cosine", "error") if k in r} for r in results]
    swap_passing = {r["family"] for r in data["records"] if r["mode"] == "swap" and r["passed"]}
    assert swap_passing <= {r["family"] for r in data["int8"]}
    md = (DOCS / "coverage.md").read_text()
    assert "| int8 swap |" in md
    for r in data["int8"]:
        if r["passed"]:
            label = FAMILIES[r["family"]].label
            row = next(line for line in md.splitlines() if line.startswith(f"| {label} | "))
            assert f"pass ({r['worst_cosine']:.6f})" in row


def test_write_keeps_the_int8_column(tmp_path):
    rec = [Record(family="gpt2", label="GPT-2", model_class="X", mode=m, passed=True, max_abs_diff=1e-7, head="tied",
                  V=10, K=4, H=32) for m in MODES]
    md = tmp_path / "cov.md"
    coverage.write(rec, md)
    assert "int8" not in md.read_text()
    coverage.write_int8([{"family": "gpt2", "passed": False, "worst_cosine": 0.5, "outputs": {}}], md)
    assert "| **FAIL** (0.500000) |" in md.read_text()
    coverage.write(rec, md)  # a float run again keeps the int8 column
    assert "| **FAIL** (0.500000) |" in md.read_text() and "int8 swap (0 of 1 families pass)" in md.read_text()


def test_genai_column_is_generated_from_the_genai_coverage_results():
    """docs/coverage.json's "genai" rows are perf/genai_coverage.py's results; every causal-LM family has a row;
    a family not built carries the builder's message, and a built family that fails does so because the
    builder's own output does not run in onnxruntime-genai (never because of the rewrite)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    results = json.loads((DOCS.parent / "perf" / "results" / "genai-coverage.json").read_text())["rows"]
    data = json.loads((DOCS / "coverage.json").read_text())
    keep = ("family", "label", "built", "base_generates", "stage", "reason", "error", "merged", "swap")
    assert data["genai"] == [{k: ({f: v for f, v in r[k].items() if f != "notes"} if k in ("merged", "swap") else r[k])
                              for k in keep if k in r} for r in results]
    causal = {n for n, f in FAMILIES.items() if f.model_class in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())}
    assert {r["family"] for r in data["genai"]} == causal
    md = (DOCS / "coverage.md").read_text()
    for r in data["genai"]:
        row = next(line for line in md.splitlines() if line.startswith(f"| {FAMILIES[r['family']].label} | "))
        if not r["built"]:
            assert "model builder could not build" in r["reason"] and "not built (builder)" in row
            assert "/tmp" not in r["reason"]
        elif all(r[m]["passed"] for m in ("merged", "swap")):
            assert "| pass / pass (" in row
            assert r["swap"]["new_ids_generated"] >= 1  # the arranged row: a new id was emitted and matched
        else:
            assert r["base_generates"] is not True, f"{r['family']}: the builder's base runs, the export fails"


def test_write_keeps_the_genai_column(tmp_path):
    rec = [Record(family="llama", label="Llama", model_class="X", mode=m, passed=True, max_abs_diff=1e-7, head="tied",
                  V=10, K=4, H=32) for m in MODES]
    md = tmp_path / "cov.md"
    coverage.write(rec, md)
    ok = {"passed": True, "max_abs_diff": 2e-7}
    coverage.write_genai([{"family": "llama", "label": "Llama", "built": True, "base_generates": True,
                           "merged": {**ok, "notes": ["dropped"]}, "swap": ok},
                          {"family": "gpt2", "label": "GPT-2", "built": False, "stage": "builder",
                           "reason": "NotImplementedError: The GPT2LMHeadModel model is not currently supported."}], md)
    text = md.read_text()
    assert "| pass / pass (2.0e-07) |" in text and "genai merged / swap (1 of 1 families" in text
    assert "| GPT-2 | builder | NotImplementedError: The GPT2LMHeadModel model is not currently supported. |" in text
    assert "dropped" not in (tmp_path / "cov.json").read_text()
    coverage.write(rec, md)  # a float run again keeps the genai column
    assert "| pass / pass (2.0e-07) |" in md.read_text()


def test_the_builders_reason_names_the_model_not_a_temporary_directory(tmp_path):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (the genai extra)")
    from embdeploy.errors import EmbdeployError
    from embdeploy.export.genai import genai_base
    from embdeploy.extend.model import extend_model

    model, tok = coverage.build(FAMILIES["gpt2"])
    ext = extend_model(model, tok, list(coverage.NEW_TOKENS), init="subword-mean")
    with pytest.raises(EmbdeployError, match=r"The GPT2LMHeadModel model is not currently supported") as e:
        genai_base(ext, cache_dir=tmp_path)
    assert "embdeploy-genai-" not in str(e.value) and "--format onnx" in str(e.value)


def test_recorded_families_are_current():
    data = json.loads((DOCS / "coverage.json").read_text())
    recorded = {}
    for r in data["records"]:
        recorded.setdefault(r["family"], set()).add(r["mode"])
    assert set(recorded) <= set(FAMILIES), f"records of families no longer defined: {set(recorded) - set(FAMILIES)}"
    assert set(CORE) <= set(recorded), f"core families missing from docs/coverage.json: {set(CORE) - set(recorded)}"
    assert all(modes == set(MODES) for modes in recorded.values())
    for r in data["records"]:
        assert set(r) == set(Record.__dataclass_fields__), f"{r['family']}: stale record format"
        if r["family"] in CORE:
            assert r["passed"], f"docs/coverage.json records a failure of core family {r['family']} ({r['mode']})"
        if not r["passed"]:
            assert r["stage"] and r["reason"] and r["error"], f"{r['family']} {r['mode']}: a failure without its reason"


def test_write_keeps_families_not_run_and_renders_the_json(tmp_path):
    def recs(family, passed):
        return [Record(family=family, label=family.upper(), model_class="X", mode=m, passed=passed,
                       max_abs_diff=1e-7 if passed else None, stage=None if passed else "export",
                       reason=None if passed else "torch.onnx could not export X | pass --base-onnx PATH",
                       error=None if passed else "EmbdeployError", head="tied", V=10, K=4, H=32) for m in MODES]

    md = tmp_path / "cov.md"
    coverage.write(recs("gpt2", True), md)
    coverage.write(recs("bert", False), md)
    data = json.loads((tmp_path / "cov.json").read_text())
    assert [r["family"] for r in data["records"]] == ["bert"] * 3 + ["gpt2"] * 3  # in FAMILIES order
    text = md.read_text()
    assert text == render_markdown(data)
    assert "| BERT | all | export | `EmbdeployError` | torch.onnx could not export X \\| pass --base-onnx PATH |" in text
    assert "3 of 6 family × mode combinations pass" in text
    coverage.write(recs("bert", True), md)  # a family run again replaces its rows
    assert "## Failures" not in md.read_text()


def test_unknown_family_is_refused(capsys):
    assert coverage.main(["--families", "bert,nosuchmodel"]) == 2
    assert "unknown family nosuchmodel" in capsys.readouterr().err


@pytest.mark.slow
def test_a_family_torch_onnx_cannot_export_fails_with_the_fixes(tmp_path):
    """The default exporter fixes Funnel's sequence axis; that is refused at export, naming --base-onnx."""
    records = run_family("funnel", tmp_path)
    assert all(not r.passed and r.stage == "export" and r.error == "EmbdeployError" for r in records)
    assert "--base-onnx" in records[0].reason and "--backend optimum" in records[0].reason
    assert not list(tmp_path.glob("funnel-*"))  # nothing half-written
