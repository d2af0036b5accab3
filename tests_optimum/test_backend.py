"""`embdeploy export --backend optimum`: optimum-onnx exports the base, embdeploy rewrites it and validates it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ARCHS, MODES

# What each arch's export gives, by the README's contract (not read back from the code under test).
OUTPUTS = {
    "bert": ["last_hidden_state"],
    "bert-mlm": ["logits"],
    "gpt2": ["logits"],
    "minilm": ["last_hidden_state", "sentence_embedding"],
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_optimum_backend_export_is_validated(extensions, export_cache, tmp_path, monkeypatch, arch, mode):
    from embdeploy.export import base as base_export
    from embdeploy.export import export_extension, read_manifest

    def no_torch(*args, **kwargs):
        raise AssertionError("--backend optimum ran torch.onnx")

    monkeypatch.setattr(base_export, "_torch_export", no_torch)
    ext, _ = extensions[arch]
    res = export_extension(ext, mode, tmp_path / "out", backend="optimum", cache_dir=export_cache)

    base = read_manifest(res.base_onnx)
    assert base.source["backend"] == "optimum" and res.base_onnx.name.endswith("-optimum")
    assert res.report.passed and res.report.new_ids_checked == ext.K == 4
    assert list(res.manifest.outputs) == OUTPUTS[arch] == list(base.outputs)
    assert {c.output for c in res.report.checks} == set(OUTPUTS[arch])  # every output compared with PyTorch
    probes = {c.probe for c in res.report.checks}
    assert {"new ids (direct)", "padding", "one token"} <= probes
    if mode == "swap":
        assert any(p.startswith("swapped table: ") for p in probes)
    if arch == "gpt2":  # optimum feeds position_ids to decoders; validation must fill them
        assert res.manifest.input_roles.get("position_ids") == "position_ids"


def test_optimum_backend_and_torch_backend_agree(extensions, export_cache, tmp_path):
    """The same extension through both exporters gives the same numbers on new tokens."""
    import numpy as np
    import onnxruntime as ort

    from embdeploy.export import export_extension

    ext, _ = extensions["minilm"]
    outs = {}
    for backend in ("torch", "optimum"):
        res = export_extension(ext, "swap", tmp_path / backend, backend=backend, cache_dir=export_cache)
        sess = ort.InferenceSession(str(res.out / "model.onnx"), providers=["CPUExecutionProvider"])
        enc = ext.tokenizer(["the troponin and hyperkalemia results", "zorblax"], padding=True, return_tensors="np")
        assert (enc["input_ids"] >= ext.V).sum() == 3
        feeds = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs() if i.name in enc}
        outs[backend] = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    assert set(outs["torch"]) == set(outs["optimum"]) == {"last_hidden_state", "sentence_embedding"}
    np.testing.assert_allclose(outs["optimum"]["sentence_embedding"], outs["torch"]["sentence_embedding"], atol=1e-5)
    keep = enc["attention_mask"].astype(bool)
    np.testing.assert_allclose(outs["optimum"]["last_hidden_state"][keep], outs["torch"]["last_hidden_state"][keep],
                               atol=1e-4)


def test_cli_export_backend_optimum(extensions, tmp_path):
    """As users run it: exit 0, the validation summary, a directory `embdeploy validate` accepts again."""
    _, ext_dir = extensions["gpt2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", EMBDEPLOY_CACHE=str(tmp_path / "cache"))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "embdeploy.cli", *map(str, args)], capture_output=True,
                              text=True, timeout=600, env=env)

    p = cli("export", ext_dir, "--backend", "optimum", "--mode", "swap", "--out", tmp_path / "onnx")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "validation passed" in p.stdout and "base exported" in p.stdout
    m = json.loads((tmp_path / "onnx" / "embdeploy.json").read_text())
    assert m["mode"] == "swap" and m["validation"]["passed"] and m["validation"]["new_ids_checked"] == 4
    assert [p.name for p in (tmp_path / "cache" / "base").iterdir()][0].endswith("-optimum")
    p = cli("validate", tmp_path / "onnx")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
