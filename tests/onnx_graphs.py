"""Hand-written graphs of 1-3 nodes for the tests of the rewrite passes, and how those tests run and read them.

Gather and Concat copy values, so embedding outputs are compared exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from embdeploy.onnx.rewrite import EXT_EMBED, EXT_ROWS_DIM, rewrite_merged, rewrite_split, rewrite_swap

ort = pytest.importorskip("onnxruntime")

V, H, K = 6, 4, 3
RNG = np.random.default_rng(0)
BASE = RNG.standard_normal((V, H)).astype(np.float32)
EXT = RNG.standard_normal((K, H)).astype(np.float32)
HEAD = RNG.standard_normal((V, H)).astype(np.float32)
HEAD_EXT = RNG.standard_normal((K, H)).astype(np.float32)
BIAS = RNG.standard_normal((V,)).astype(np.float32)

MODES = {"merged": rewrite_merged, "split": rewrite_split, "swap": rewrite_swap}
# Every base id, then V and V+K-1 (the ends of the new range) and one in between.
IDS = np.array([[0, 5, 6, 8, 7, 1], [3, 2, 4, 6, 8, 0]])
EMB = "emb = Gather(table, ids)"

# Tied heads, in the three forms exporters produce. h = emb, so logits = rows @ table.T.
TIED = {
    "transpose": ("emb = Gather(table, ids)\nwt = Transpose<perm=[1,0]>(table)\nlogits = MatMul(emb, wt)", {}),
    "pretransposed": ("emb = Gather(table, ids)\nlogits = MatMul(emb, table_t)", {"table_t": BASE.T.copy()}),
    "gemm": ("emb = Gather(table, ids)\nlogits = Gemm<transB=1>(emb, table)", {}),
}



def graph(body: str, inputs="int64[B,S] ids", outputs="float[B,S,4] emb", opset=18, **tables) -> onnx.ModelProto:
    model = onnx.parser.parse_model(
        f'<ir_version: 9, opset_import: ["" : {opset}]>\ng ({inputs}) => ({outputs}) {{\n{body}\n}}'
    )
    model.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in tables.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, ids, so=None, **feeds) -> list[np.ndarray]:
    so = so or ort.SessionOptions()
    so.log_severity_level = 3  # the overridable-initializer notice of swap models
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"ids": ids, **feeds})


def rows(ids, base=BASE, ext=EXT):
    return np.concatenate([base, ext])[ids]


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def ops(model):
    return [n.op_type for n in model.graph.node]


def check_structure(mode, new):
    got = inits(new)
    if mode == "merged":
        assert got["table"].shape == (V + K, H)
        assert np.array_equal(got["table"], np.concatenate([BASE, EXT]))
        assert not any(n.startswith("embdeploy_ext") for n in got)
    else:
        assert np.array_equal(got["table"], BASE), "split/swap keep the base table bit-identical"
        assert np.array_equal(got[EXT_EMBED], EXT)
    if mode == "split":
        assert "Concat" in ops(new)
    if mode == "swap":
        assert {"Less", "Clip", "Where", "Unsqueeze"} <= set(ops(new))
        assert ops(new).count("Clip") == 2
        (vi,) = [i for i in new.graph.input if i.name == EXT_EMBED]
        assert [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim] == [EXT_ROWS_DIM, H]


def head_graph(body, extra, v=V):
    gemm = "Gemm" in body
    inputs = "int64[N] ids" if gemm else "int64[B,S] ids"
    outputs = f"float[N,4] emb, float[N,{v}] logits" if gemm else f"float[B,S,4] emb, float[B,S,{v}] logits"
    return graph(body, inputs=inputs, outputs=outputs, table=BASE, **extra)


def check_logits(model, new, ids, head=BASE, head_ext=EXT, bias=None):
    emb, logits = run(new, ids)
    assert np.array_equal(emb, rows(ids))
    assert logits.shape[-1] == V + len(head_ext)
    base_ids = ids[ids < V][None] if ids.ndim == 2 else ids[ids < V]
    new_emb, new_logits = run(new, base_ids)
    old_emb, old_logits = run(model, base_ids)
    assert np.array_equal(new_emb, old_emb)
    assert np.array_equal(new_logits[..., :V], old_logits), "base-vocabulary logits must not move"
    expected = emb @ np.concatenate([head, head_ext]).T
    if bias is not None:
        expected[..., :V] += bias  # new columns carry no bias
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
