"""`export --quantize int8`: ONNX Runtime's dynamic quantization of the base's MatMul weights.

The tables (base and extension) and the LM head stay in float; the quantized base is cached; the
export is validated against PyTorch fp32 with the int8 tolerance row (cosine), the swap check included;
a broken quantized export (a wrong scale, a corrupted table) fails; Session loads it unchanged.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from embdeploy.errors import EmbdeployError, ValidationFailed
from embdeploy.export import export_extension
from embdeploy.export.validate import validate
from embdeploy.onnx.rewrite import EXT_EMBED
from embdeploy.runtime import Session

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def quantized_ops(d) -> set[str]:
    g = onnx.load(str(d / "model.onnx"), load_external_data=False)
    return {n.op_type for n in g.graph.node}


@pytest.fixture(scope="module")
def bert_exports(make_extension, export_cache, tmp_path_factory):
    ext = make_extension("bert")
    root = tmp_path_factory.mktemp("int8")
    out = {m: export_extension(ext, m, root / m, cache_dir=export_cache, quantize="int8") for m in ("merged", "swap")}
    return ext, out, root


def test_int8_export_quantizes_matmuls_and_keeps_tables_float(bert_exports):
    ext, out, _ = bert_exports
    for mode, r in out.items():
        assert r.report.passed and r.report.dtype == "int8"
        assert {"MatMulInteger", "DynamicQuantizeLinear"} <= quantized_ops(r.out)
        m = json.loads((r.out / "embdeploy.json").read_text())
        assert m["quantization"]["precision"] == "int8" and m["quantization"]["per_channel"] is True
        assert m["dtype"] == "float32"
        model = onnx.load(str(r.out / "model.onnx"))
        tables = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                  if len(t.dims) == 2 and t.dims[-1] == ext.H and t.data_type == onnx.TensorProto.FLOAT}
        base = ext.base_table().numpy()
        new = ext.embed_table().numpy()
        if mode == "merged":
            merged = next(a for a in tables.values() if a.shape == (ext.V + ext.K, ext.H))
            np.testing.assert_array_equal(merged[: ext.V], base)  # exact: the tables were never quantized
            np.testing.assert_array_equal(merged[ext.V:], new)
        else:
            np.testing.assert_array_equal(tables[EXT_EMBED], new)
            assert any(a.shape == base.shape and np.array_equal(a, base) for a in tables.values())


def test_int8_outputs_stay_close_and_session_loads_it(bert_exports):
    ext, out, _ = bert_exports
    texts = ["the troponin rose", "hyperkalemia and zorblax", "a plain sentence"]
    fp32 = {}
    import torch

    enc = ext.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = ext.model(**enc).last_hidden_state.numpy()
    mask = enc["attention_mask"].numpy().astype(bool)
    for mode, r in out.items():
        got = Session(r.out, providers="cpu").encode(texts)["last_hidden_state"]
        a, b = got[mask], ref[mask]
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        assert cos.min() > 0.99, mode
        fp32[mode] = cos
    assert not np.array_equal(got[mask], ref[mask])  # it really is another computation


def test_the_quantized_base_is_cached(make_extension, export_cache, tmp_path, bert_exports, monkeypatch):
    from embdeploy.export import base as base_export
    from embdeploy.export import quantize as quantize_module

    calls = []
    for module, name in ((base_export, "_export_proto"), (quantize_module, "quantize_proto")):
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: calls.append(_n))
    ext, out, _ = bert_exports
    r = export_extension(ext, "merged", tmp_path / "again", cache_dir=export_cache, quantize="int8")
    assert r.base_cached and calls == []  # neither the torch export nor the quantization ran again
    assert str(r.base_onnx).endswith("-int8")


def test_a_broken_int8_export_fails_validation(bert_exports, tmp_path):
    """A weight's per-channel scales corrupted (the digests rewritten to match) or a corrupted extension row fails
    the gate."""
    import shutil

    from embdeploy.export.manifest import ExportManifest
    from embdeploy.onnx.io import load_model, save_model

    ext, out, _ = bert_exports
    for what in ("scale", "table"):
        d = tmp_path / what
        shutil.copytree(out["swap"].out, d)
        model = load_model(d)
        inits = {t.name: t for t in model.graph.initializer}
        if what == "scale":  # every weight's per-channel scales
            names = [n for n in inits if n.endswith("_scale") and numpy_helper.to_array(inits[n]).size > 1]
        else:
            names = [EXT_EMBED]
        for name in names:
            arr = numpy_helper.to_array(inits[name]).copy()
            if what == "scale":
                arr *= 100  # a scale in the wrong unit
            else:
                arr[1] = -arr[1][::-1]  # (a uniform shift would vanish in the LayerNorm)
            inits[name].CopyFrom(numpy_helper.from_array(arr, name))
        for f in d.glob("*.onnx*"):
            f.unlink()
        save_model(model, d, separate={EXT_EMBED: "extension.onnx.data"})
        ExportManifest.read(d).with_files(d).write(d)
        with pytest.raises(ValidationFailed):
            validate(d, ext)
        assert what in ("scale", "table")


def test_int8_refusals(make_extension, export_cache, tmp_path):
    ext = make_extension("bert")
    with pytest.raises(EmbdeployError, match="drop --dtype fp16"):
        export_extension(ext, "merged", tmp_path / "a", cache_dir=export_cache, quantize="int8", dtype="fp16")
    with pytest.raises(EmbdeployError, match="unknown quantization 'int4'"):
        export_extension(ext, "merged", tmp_path / "b", cache_dir=export_cache, quantize="int4")
    with pytest.raises(EmbdeployError, match="on the CPU provider"):
        export_extension(ext, "merged", tmp_path / "c", cache_dir=export_cache, quantize="int8", provider="cuda")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_int8_decoders_keep_their_head_in_float(arch, make_extension, export_cache, tmp_path):
    """Tied (GPT-2) and untied (Llama) heads: the head MatMul is not quantized, so the rewrite still finds it and
    new tokens' logits come from float rows."""
    ext = make_extension(arch)
    r = export_extension(ext, "swap", tmp_path / arch, cache_dir=export_cache, quantize="int8")
    assert r.report.passed
    logits = Session(r.out, providers="cpu").run({"input_ids": np.array([[1, ext.V, ext.V + ext.K - 1]])})["logits"]
    assert logits.shape[-1] == ext.V + ext.K


def test_recipe_and_cli_take_quantize(tmp_path):
    from pathlib import Path

    from embdeploy.export import load_recipe

    args = load_recipe(Path(__file__).parent.parent / "export" / "minilm-int8-swap-cpu.json")
    assert args["quantize"] == "int8" and args["mode"] == "swap"


def _const_matmuls(d) -> dict[str, np.ndarray]:
    """{node name: weight} of the float MatMuls whose weight is a constant, in export `d`'s graph."""
    from embdeploy.onnx.io import load_model

    g = load_model(d).graph
    inits = {t.name: t for t in g.initializer}
    return {n.name: numpy_helper.to_array(inits[n.input[1]]) for n in g.node if n.op_type == "MatMul" and n.input[1] in inits}


def test_calibration_keeps_the_matmul_with_outlier_inputs_in_float(make_extension, tmp_path):
    """One intermediate feature of layer 0 made 60x larger (an outlier feature, as trained transformers have):
    the MatMul that reads it, the FFN output projection, is the one left in float and recorded."""
    import torch

    ext = make_extension("bert", seed=3)
    layer = ext.model.encoder.layer[0]
    with torch.no_grad():
        layer.intermediate.dense.weight[5] *= 60.0
        layer.intermediate.dense.bias[5] = 30.0
    r = export_extension(ext, "merged", tmp_path / "out", cache_dir=tmp_path / "cache", quantize="int8")
    assert r.report.passed
    kept = r.manifest.quantization["float_matmuls"]
    assert len(kept) == 1
    (name, ratio), = kept.items()
    floats = _const_matmuls(r.out)
    assert list(floats) == [name]  # every other constant-weight MatMul was quantized
    np.testing.assert_array_equal(floats[name], layer.output.dense.weight.detach().numpy().T)
    assert ratio > 10
    calib = r.manifest.quantization["keep_float"]["calibration"]
    assert calib["source"] == "embdeploy/data/train.txt" and calib["texts"] == 64


def test_calibration_texts_are_the_users_and_key_the_cache(make_extension, tmp_path):
    ext = make_extension("bert", seed=4)
    texts = tmp_path / "mine.txt"
    texts.write_text("\n".join(f"serum potassium {i} rose overnight" for i in range(10)) + "\n")
    cache = tmp_path / "cache"
    r = export_extension(ext, "swap", tmp_path / "a", cache_dir=cache, quantize="int8", calibration_texts=texts)
    calib = r.manifest.quantization["keep_float"]["calibration"]
    assert calib["source"] == str(texts) and calib["texts"] == 10 and r.report.passed
    default = export_extension(ext, "swap", tmp_path / "b", cache_dir=cache, quantize="int8")
    assert not default.base_cached and default.base_onnx != r.base_onnx  # other texts, another cache entry
    again = export_extension(ext, "merged", tmp_path / "c", cache_dir=cache, quantize="int8", calibration_texts=texts)
    assert again.base_cached and again.base_onnx == r.base_onnx
    with pytest.raises(EmbdeployError, match="--calibration-texts applies to --quantize int8 only"):
        export_extension(ext, "swap", tmp_path / "d", cache_dir=cache, calibration_texts=texts)
    with pytest.raises(EmbdeployError, match="is not a file"):
        export_extension(ext, "swap", tmp_path / "e", cache_dir=cache, quantize="int8",
                         calibration_texts=tmp_path / "missing.txt")
