"""Validation is a gate: wrong numbers, tampered files and mismatched extensions are caught, with clear messages."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from onnx.external_data_helper import ExternalDataInfo

from embdeploy.errors import EmbdeployError, FingerprintMismatch, ValidationFailed
from embdeploy.export import export_extension, read_manifest, validate_dir, verify_dir
from embdeploy.export.manifest import MANIFEST
from embdeploy.export.validate import (
    PROVIDERS,
    TOLERANCES,
    Check,
    Probe,
    Tolerance,
    _compare,
    _extension_rows,
    _match_outputs,
    build_probes,
    tolerance_for,
    validate,
)
from embdeploy.fingerprint import file_digest
from embdeploy.onnx.rewrite import EXT_EMBED

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def split_export(make_extension, export_cache, tmp_path_factory):
    ext = make_extension("llama")  # untied head: the extension table feeds the inputs only
    res = export_extension(ext, "split", tmp_path_factory.mktemp("v") / "split", cache_dir=export_cache)
    return ext, res.out


def _copy(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _corrupt_extension_rows(onnx_dir) -> None:
    """Overwrite the (K, H) extension table inside extension.onnx.data with other values."""
    import onnx

    model = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    (tensor,) = [t for t in model.graph.initializer if t.name == EXT_EMBED]
    info = ExternalDataInfo(tensor)
    assert info.location == "extension.onnx.data"
    data = onnx_dir / info.location
    raw = bytearray(data.read_bytes())
    start, length = int(info.offset or 0), int(info.length)
    rows = np.frombuffer(bytes(raw[start : start + length]), dtype=np.float32)
    raw[start : start + length] = (rows[::-1] + 0.5).astype(np.float32).tobytes()
    data.write_bytes(bytes(raw))


def _redigest(onnx_dir, name) -> None:
    m = json.loads((onnx_dir / MANIFEST).read_text())
    m["files"][name] = file_digest(onnx_dir / name)
    (onnx_dir / MANIFEST).write_text(json.dumps(m))


def test_tampered_file_is_refused_by_digest(split_export, tmp_path):
    ext, out = split_export
    d = _copy(out, tmp_path)
    _corrupt_extension_rows(d)
    with pytest.raises(EmbdeployError, match=r"does not match its embdeploy.json.*\n  - extension.onnx.data: its sha256 differs"):
        verify_dir(d)
    with pytest.raises(EmbdeployError, match="extension.onnx.data: its sha256 differs"):
        validate(d, ext)
    (d / "tokenizer.json").unlink()
    with pytest.raises(EmbdeployError) as info:
        verify_dir(d)
    assert "extension.onnx.data: its sha256 differs" in str(info.value) and "tokenizer.json: missing" in str(info.value)


def test_wrong_extension_rows_fail_validation(split_export, tmp_path):
    # Digests updated as a careless copy would: only the numbers can tell.
    ext, out = split_export
    d = _copy(out, tmp_path)
    _corrupt_extension_rows(d)
    _redigest(d, "extension.onnx.data")
    verify_dir(d)
    with pytest.raises(ValidationFailed, match=r"validation of .* failed \(\d+ problem\(s\)\):\n  - new tokens \(text\) / logits: max \|diff\|") as info:
        validate(d, ext)
    err = info.value
    assert err.exit_code == 3 and not err.report.passed
    failed = {c.probe for c in err.report.checks if not c.ok}
    passed = {c.probe for c in err.report.checks if c.ok}
    assert {"new tokens (text)", "new ids (direct)", "one token"} <= failed
    assert "base only" in passed  # base rows and head untouched: the report shows where the fault is


def test_another_extension_of_the_same_base_fails_with_a_hint(split_export, make_extension):
    ext, out = split_export
    other = make_extension("llama", seed=0, init="mean")  # same base model and tokens, other rows
    assert other.base_fingerprint == ext.base_fingerprint and other.extension_fingerprint() != ext.extension_fingerprint()
    with pytest.raises(ValidationFailed, match="The extension given differs from the one exported") as info:
        validate(out, other)
    assert not info.value.report.extension_fingerprint_matches


def test_extension_of_another_base_is_refused(split_export, make_extension):
    _, out = split_export
    with pytest.raises(FingerprintMismatch, match="exported from a base with embedding fingerprint"):
        validate(out, make_extension("llama", seed=3))
    with pytest.raises(EmbdeployError, match="holds V=.*K=4.*but the extension has .*K=2"):
        validate(out, make_extension("llama", tokens=["zorblax", "qwertyx"]))


def test_validate_dir_uses_the_recorded_extension_dir(tmp_path, export_cache, wordpiece_tokenizer):
    """From directories, as the CLI runs it: ext dir -> export -> `embdeploy validate ONNX_DIR`."""
    import copy

    from conftest import tiny_bert

    from embdeploy.extend.config import ExtensionConfig
    from embdeploy.extend.model import Extension
    from embdeploy.models import load_base

    tiny_bert(seed=21).save_pretrained(tmp_path / "base")
    copy.deepcopy(wordpiece_tokenizer).save_pretrained(tmp_path / "base")
    model, tok, info = load_base(tmp_path / "base")
    ext = Extension(model, tok, info)
    ext.add(ExtensionConfig(tokens=["hyperkalemia", "troponin"], init="normal"))
    ext.save(tmp_path / "ext")

    res = export_extension(tmp_path / "ext", "swap", tmp_path / "onnx", cache_dir=export_cache)
    assert res.manifest.extension_dir == str((tmp_path / "ext").resolve())
    assert res.manifest.base_model["task"] == "feature-extraction"
    report = validate_dir(tmp_path / "onnx")
    assert report.passed and report.new_ids_checked == 2
    j = report.to_json()
    assert json.loads(json.dumps(j)) == j  # JSON-able as it is
    assert j["passed"] and set(j["outputs"]) == {"last_hidden_state"} and j["tolerance"]["atol"] == 1e-4
    assert any(c["probe"].startswith("swapped table") for c in j["checks"])
    text = report.render()
    assert "validation passed: swap float32 on cpu" in text and "2 new ids checked" in text

    moved = read_manifest(tmp_path / "onnx").extension_dir
    shutil.move(moved, tmp_path / "ext-moved")
    with pytest.raises(EmbdeployError, match="does not exist any more; pass it with --ext EXT_DIR"):
        validate_dir(tmp_path / "onnx")
    assert validate_dir(tmp_path / "onnx", tmp_path / "ext-moved").passed


def test_validate_dir_without_a_recorded_extension(split_export):
    _, out = split_export
    with pytest.raises(EmbdeployError, match="does not record the extension it was exported from; pass it with --ext"):
        validate_dir(out)
    with pytest.raises(EmbdeployError, match="no embdeploy.json"):
        validate_dir(out.parent)


# --------------------------------------------------------------------------- probes and comparisons


def test_probes_hit_every_new_id_and_other_shapes(wordpiece_tokenizer):
    import copy

    tok = copy.deepcopy(wordpiece_tokenizer)
    V = len(tok)
    tokens = [f"qzx{i:03d}vort" for i in range(40)]
    tok.add_tokens(tokens)
    probes, notes = build_probes(tok, V, len(tokens), max_len=64)
    names = [p.name for p in probes]
    seen = set()
    for p in probes:
        assert p.input_ids.shape == p.attention_mask.shape and p.input_ids.shape[1] <= 64
        seen.update(int(i) for i in p.input_ids[p.attention_mask.astype(bool)] if i >= V)
    assert seen == set(range(V, V + len(tokens)))
    text_ids = {int(i) for p in probes if p.name.startswith("new tokens") for i in p.input_ids.ravel() if i >= V}
    assert text_ids == seen and notes == []  # the tokenizer itself produces every new id
    direct = next(p for p in probes if p.name.startswith("new ids"))
    assert list(direct.input_ids[0, 1:3]) == [V + len(tokens) - 1, V]  # the ends of the range first
    base = next(p for p in probes if p.name == "base only")
    assert (base.input_ids < V).all()
    pad = next(p for p in probes if p.name == "padding")
    lengths = pad.attention_mask.sum(1)
    assert len(set(lengths)) == 3 and (pad.input_ids[pad.attention_mask == 0] == tok.pad_token_id).all()
    assert next(p for p in probes if p.name == "one token").input_ids.shape == (1, 1)
    assert any(p.input_ids.shape[0] != 2 and p.input_ids.shape[1] != 16 for p in probes)
    assert len([n for n in names if n.startswith("new tokens")]) == 1  # 40 tokens / 16 per text: 3 texts, one batch


def test_compare_masks_padding_and_measures():
    tol = Tolerance(atol=1e-3, rtol=0.0, mean_atol=1e-3, min_cosine=0.999)
    probe = Probe("p", np.array([[1, 2, 0]]), np.array([[1, 1, 0]]))
    want = np.ones((1, 3, 4), np.float32)
    got = want.copy()
    got[0, 2] = 100.0  # a padding position: not compared
    check = _compare(probe, "h", got, want, tol)
    assert check.ok and check.max_abs == 0.0 and check.min_cosine == pytest.approx(1.0)
    got[0, 1, 0] = -1.0
    check = _compare(probe, "h", got, want, tol)
    assert not check.ok and check.max_abs == 2.0 and check.min_cosine == pytest.approx(0.5)
    got[0, 0, 0] = np.nan
    assert "NaN or Inf" in _compare(probe, "h", got, want, tol).problem
    bad = _compare(probe, "h", got[:, :2], want, tol)
    assert not bad.ok and "ONNX shape [1, 2, 4], PyTorch shape [1, 3, 4]" in bad.problem


def test_output_matching_by_name_alias_and_shape():
    ref = {"last_hidden_state": np.zeros((2, 5, 8)), "pooler_output": np.zeros((2, 8)), "sentence_embedding": np.zeros((2, 8))}
    mapping, problems = _match_outputs(
        ["token_embeddings", "sentence_embedding"], [np.zeros((2, 5, 8)), np.zeros((2, 8))], ref
    )
    assert mapping == {"token_embeddings": "last_hidden_state", "sentence_embedding": "sentence_embedding"}
    assert problems == []
    mapping, problems = _match_outputs(["hidden"], [np.zeros((2, 5, 8))], ref)  # one reference of that shape
    assert mapping == {"hidden": "last_hidden_state"} and problems == []
    mapping, problems = _match_outputs(["pooled"], [np.zeros((2, 8))], ref)  # two of that shape: ambiguous
    assert mapping == {} and "ONNX output 'pooled' [2, 8] has no PyTorch counterpart" in problems[0]


def test_tolerances_are_one_table_keyed_by_dtype_and_provider():
    # int8 (dynamic quantization) runs on the CPU provider only
    assert set(TOLERANCES) == {(d, p) for d in ("float32", "float16") for p in PROVIDERS} | {("int8", "cpu")}
    assert tolerance_for("float32", "cpu").atol <= 1e-4
    assert tolerance_for("float16", "cuda").atol > tolerance_for("float32", "cpu").atol
    with pytest.raises(EmbdeployError, match="no tolerance for dtype float32 on provider 'tpu'"):
        tolerance_for("float32", "tpu")


def test_cuda_provider_needs_onnxruntime_gpu(split_export):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    ext, out = split_export
    with pytest.raises(EmbdeployError, match="no CUDAExecutionProvider.*install onnxruntime-gpu"):
        validate(out, ext, provider="cuda")


def test_swapped_rows_are_restored(split_export):
    ext, _ = split_export
    before = ext.embed_table().clone()
    with _extension_rows(ext, np.zeros((ext.K, ext.H), np.float32), None):
        assert torch.count_nonzero(ext.embed_table()) == 0
    assert torch.equal(ext.embed_table(), before)


def test_report_lists_failures_readably():
    from embdeploy.export.validate import ValidationReport

    r = ValidationReport("d", "merged", "float32", "cpu", TOLERANCES[("float32", "cpu")])
    r.checks.append(Check("new ids (direct)", "logits", [1, 2, 3], 0.5, 0.1, 0.9, 1.0, False))
    assert not r.passed and r.max_abs_diff == 0.5
    assert "new ids (direct) / logits: max |diff| 0.5 (allowed 0.0002)" in r.failures()[0]
    assert "FAIL" in r.render()


def test_base_export_validates_on_base_probes(split_export):
    from pathlib import Path

    ext, out = split_export
    base = Path(read_manifest(out).base_onnx)
    ext.model.train()  # validation compares in eval mode and gives the mode back
    report = validate(base, ext)
    assert ext.model.training
    ext.model.eval()
    assert report.passed and report.mode == "base" and report.new_ids_checked == 0
    assert {c.probe for c in report.checks} == {"base only", "padding", "one token"}
    assert all(c.shape[-1] == ext.V for c in report.checks)  # logits over the base vocabulary


def test_a_session_that_fell_back_to_cpu_is_refused():
    # ORT only logs a warning when CUDA cannot start and runs on the CPU; a "CUDA validation" must not pass that way.
    from embdeploy.ort import require_provider, wants_cuda

    class FellBack:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    with pytest.raises(EmbdeployError, match=r"could not start CUDAExecutionProvider for m.onnx \(the session would "
                                             r"run on CPUExecutionProvider\).*onnxruntime-gpu\[cuda,cudnn\]"):
        require_provider(FellBack(), "CUDAExecutionProvider", "m.onnx")
    require_provider(FellBack(), "CPUExecutionProvider", "m.onnx")
    assert wants_cuda([("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"])
    assert not wants_cuda(["CPUExecutionProvider"])
