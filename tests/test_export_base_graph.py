"""The torch backend's base graph is made for ONNX Runtime speed: eager attention, no declared intermediate shapes.

Why (perf/results/optimum-vs-embdeploy-cpu.md): with torch.onnx's value_info, ORT fuses Add + LayerNormalization
into SkipLayerNormalization, slower on CPU than the two ops; SDPA exports into more nodes than eager attention.
"""

from __future__ import annotations

import onnx
import pytest
from conftest import tiny_bert

from embdeploy.export import base as base_export
from embdeploy.export import export_base
from embdeploy.export.manifest import ExportManifest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")


def test_torch_base_graph_declares_no_intermediate_shapes_and_model_keeps_its_attention(tmp_path):
    model = tiny_bert()
    model.set_attn_implementation("sdpa")
    made = export_base(model, cache_dir=tmp_path)
    assert not made.cached
    entry = made.path
    assert model.config._attn_implementation == "sdpa"  # switched to eager for the export only

    proto = onnx.load(str(entry / "model.onnx"), load_external_data=False)
    assert len(proto.graph.value_info) == 0
    ops = {n.op_type for n in proto.graph.node}
    assert "IsNaN" not in ops  # SDPA's guard for fully masked rows: attention was not exported as SDPA

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(entry / "model.onnx"), so, providers=["CPUExecutionProvider"])
    optimized = {n.op_type for n in onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node}
    assert "SkipLayerNormalization" not in optimized and "LayerNormalization" in optimized

    manifest = ExportManifest.verify(entry)
    assert manifest.source["recipe"] == base_export.TORCH_RECIPE  # a cache made before the recipe is rebuilt
