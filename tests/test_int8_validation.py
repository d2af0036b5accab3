"""The int8 gate as users read it: worst and mean row cosine per output, and for logits top-1 agreement and
top-5 overlap with PyTorch fp32 on real positions (the new ids' columns included); a wrong scale on an
LM's MatMuls fails, and top-1 alone catches it."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from onnx import numpy_helper

from embdeploy.errors import ValidationFailed
from embdeploy.export import export_extension
from embdeploy.export import validate as validate_module
from embdeploy.export.validate import Check, Probe, Tolerance, ValidationReport, _compare, tolerance_for, validate

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def test_top_k_agreement_on_real_positions_counts_new_columns():
    V = 6  # columns 6 and 7 are the new ids
    probe = Probe("p", np.zeros((1, 3), np.int64), np.array([[1, 1, 0]]))
    want = np.zeros((1, 3, 8), np.float32)
    want[0, :, :] = np.arange(8)[::-1]  # top-1 is id 0, top 5 are ids 0..4
    got = want.copy()
    got[0, 1, V + 1] = 100.0  # position 1: the export puts a new id first
    got[0, 2, 5] = 1e6  # padding: not compared
    c = _compare(probe, "logits", got, want, Tolerance(float("inf"), 0, float("inf"), -1), logits=True)
    assert c.rows == 2 and c.top1 == 0.5
    assert c.top5 == pytest.approx((5 + 4) / 10)  # position 1 lost id 4 from its top 5 to the new id
    plain = _compare(probe, "hidden", got, want, Tolerance(float("inf"), 0, float("inf"), -1))
    assert plain.top1 is None and plain.top5 is None


def test_means_over_all_probes_gate_the_report():
    tol = Tolerance(atol=float("inf"), rtol=0.0, mean_atol=float("inf"), min_cosine=0.9, min_mean_cosine=0.99,
                    min_top1=0.9, min_top5=0.8)

    def check(probe, mean, rows, top1=None, top5=None):
        return Check(probe, "logits", [1, rows, 8], 0.1, 0.01, 0.95, 1.0, True, mean_cosine=mean, rows=rows,
                     top1=top1, top5=top5)

    # every check is within its own worst-row bound; the means over the rows of all probes decide
    good = ValidationReport("d", "swap", "int8", "cpu", tol, checks=[check("a", 0.999, 90, 1.0, 0.9),
                                                                     check("b", 0.95, 10, 0.5, 0.9)])
    w = good.to_json()["outputs"]["logits"]
    assert w["rows"] == 100 and w["mean_cosine"] == pytest.approx(0.9941) and w["top1"] == pytest.approx(0.95)
    assert good.passed, good.failures()
    bad = ValidationReport("d", "swap", "int8", "cpu", tol, checks=[check("a", 0.999, 50, 1.0, 0.9),
                                                                    check("b", 0.95, 50, 0.5, 0.6)])
    assert not bad.passed
    lines = bad.failures()
    assert any("mean cosine 0.974500 over 100 rows" in ln and "min 0.99" in ln for ln in lines), lines
    assert any("top-1 agreement with PyTorch 0.7500 over 100 real positions (min 0.9)" in ln for ln in lines), lines
    assert any("top-5 overlap with PyTorch 0.7500" in ln for ln in lines), lines
    assert bad.to_json()["outputs"]["logits"]["ok"] is False
    assert "top-1" in bad.render() and "mean cos" in bad.render()


def test_int8_row_gates_on_what_users_read():
    tol = tolerance_for("int8", "cpu")
    assert tol.min_mean_cosine > tol.min_cosine > 0.9
    assert 0 < tol.min_top5 <= 1 and 0 < tol.min_top1 <= 1
    assert tolerance_for("float32", "cpu").min_top1 == 0.0  # float rows are held by their distances


@pytest.fixture(scope="module")
def llama_int8(make_extension, export_cache, tmp_path_factory):
    ext = make_extension("llama")
    r = export_extension(ext, "swap", tmp_path_factory.mktemp("llama-int8") / "swap", cache_dir=export_cache,
                         quantize="int8")
    return ext, r


def test_an_int8_lm_reports_top_k_figures(llama_int8):
    ext, r = llama_int8
    logits = r.report.outputs()["logits"]
    assert r.report.passed
    assert logits["top1"] >= r.report.tolerance.min_top1 and logits["top5"] >= r.report.tolerance.min_top5
    # the real positions of every probe, the swapped-table run included, each position once
    assert logits["rows"] == sum(c.rows for c in r.report.checks if c.output == "logits")
    assert logits["rows"] > ext.K
    assert {"mean_cosine", "top1", "top5"} <= set(r.report.to_json()["checks"][0])


def _corrupt_scales(src, dst, factor):
    """A copy of export `src` with every per-channel weight scale times `factor` (the digests rewritten)."""
    from embdeploy.export.manifest import ExportManifest
    from embdeploy.onnx.io import load_model, save_model
    from embdeploy.onnx.rewrite import EXT_EMBED, EXT_HEAD

    shutil.copytree(src, dst)
    model = load_model(dst)
    changed = 0
    for t in model.graph.initializer:
        arr = numpy_helper.to_array(t)
        if t.name.endswith("_scale") and arr.size > 1:  # per channel: a weight's, not an activation's
            t.CopyFrom(numpy_helper.from_array(arr * np.float32(factor), t.name))
            changed += 1
    assert changed
    for f in dst.glob("*.onnx*"):
        f.unlink()
    names = {t.name for t in model.graph.initializer}
    save_model(model, dst, separate={n: "extension.onnx.data" for n in (EXT_EMBED, EXT_HEAD) if n in names})
    ExportManifest.read(dst).with_files(dst).write(dst)


def test_a_wrong_scale_on_an_lms_matmuls_fails_on_top1(llama_int8, tmp_path, monkeypatch):
    ext, r = llama_int8
    bad = tmp_path / "bad"
    _corrupt_scales(r.out, bad, 8.0)
    with pytest.raises(ValidationFailed) as info:
        validate(bad, ext)
    assert any("top-1 agreement" in ln for ln in info.value.report.failures())
    # and top-1 alone is enough: with the cosine thresholds switched off the export still fails
    tol = tolerance_for("int8", "cpu")
    only_top1 = dataclasses.replace(tol, min_cosine=-2.0, min_mean_cosine=-2.0, min_top5=0.0)
    monkeypatch.setitem(validate_module.TOLERANCES, ("int8", "cpu"), only_top1)
    with pytest.raises(ValidationFailed) as info:
        validate(bad, ext)
    assert [ln for ln in info.value.report.failures() if "top-1" in ln] == info.value.report.failures()
