"""Property-based tests of the id mapping against a plain reference implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from embdeploy.errors import EmbdeployError
from embdeploy.extend.config import token_list_problems
from embdeploy.extend.layer import ExtendedEmbedding, ExtendedLMHead


def reference_lookup(base: np.ndarray, ext: np.ndarray, ids: np.ndarray, scale: float) -> np.ndarray:
    V = base.shape[0]
    out = np.empty(ids.shape + (base.shape[1],), dtype=np.float32)
    for idx in np.ndindex(ids.shape):
        i = int(ids[idx])
        out[idx] = base[i] * scale if i < V else ext[i - V] * scale
    return out


class Scaled(nn.Embedding):
    def __init__(self, *a, scale=1.0, **k):
        super().__init__(*a, **k)
        self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


@settings(max_examples=60, deadline=None)
@given(
    V=st.integers(1, 40), groups=st.lists(st.integers(1, 6), min_size=1, max_size=3), H=st.integers(1, 9),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 7)), scaled=st.booleans(), seed=st.integers(0, 2**16),
)
def test_lookup_matches_reference(V, groups, H, shape, scaled, seed):
    g = torch.Generator().manual_seed(seed)
    scale = 2.5 if scaled else 1.0
    base = Scaled(V, H, scale=scale) if scaled else nn.Embedding(V, H)
    with torch.no_grad():
        base.weight.copy_(torch.randn(V, H, generator=g))
    tables = nn.ParameterDict({f"g{i}": nn.Parameter(torch.randn(k, H, generator=g)) for i, k in enumerate(groups)})
    emb = ExtendedEmbedding(base, tables)
    K = sum(groups)
    ids = torch.randint(0, V + K, shape, generator=g)
    got = emb(ids).detach().numpy()
    ext = torch.cat(list(tables.values())).detach().numpy()
    want = reference_lookup(base.weight.detach().numpy(), ext, ids.numpy(), scale)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    base_only = ids.clamp(max=V - 1)
    assert torch.equal(emb(base_only), base(base_only))


@settings(max_examples=40, deadline=None)
@given(V=st.integers(1, 30), K=st.integers(1, 6), H=st.integers(1, 8), seed=st.integers(0, 2**16), bias=st.booleans())
def test_head_matches_reference(V, K, H, seed, bias):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(H, V, bias=bias)
    tables = nn.ParameterDict({"a": nn.Parameter(torch.randn(K, H, generator=g))})
    ext_head = ExtendedLMHead(head, tables, tied=False)
    h = torch.randn(2, 3, H, generator=g)
    got = ext_head(h).detach().numpy()
    want = np.concatenate([head(h).detach().numpy(), h.numpy() @ tables["a"].detach().numpy().T], -1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert got.shape[-1] == V + K


@given(st.lists(st.text(min_size=0, max_size=12), max_size=20))
def test_token_list_problems_agree_with_reference(tokens):
    import unicodedata

    def invisible(c):  # control, format (but the zero-width joiners), line and paragraph separators
        cat = unicodedata.category(c)
        return cat in ("Cc", "Zl", "Zp") or (cat == "Cf" and c not in "\u200c\u200d")

    problems = token_list_problems(tokens)
    bad = (
        not tokens
        or any(not t.strip() or t != t.strip() or any(invisible(c) for c in t) for t in tokens)
        or len(set(tokens)) != len(tokens)
    )
    assert bool(problems) == bad


def test_non_lookup_embedding_refused():
    class Normed(nn.Embedding):
        def forward(self, ids):
            return nn.functional.normalize(super().forward(ids), dim=-1)

    with pytest.raises(EmbdeployError, match="does more than a row lookup"):
        ExtendedEmbedding(Normed(10, 4), nn.ParameterDict())


def test_pickle_weights_refused(tmp_path):
    from transformers import BertConfig

    from embdeploy.models import load_base

    BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 this would be unpickled")
    with pytest.raises(EmbdeployError, match="pickle files, which embdeploy never loads"):
        load_base(str(tmp_path))


def _gather_head_graph(V: int, H: int, base: np.ndarray, tied_head: bool):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"])]
    outputs = [helper.make_tensor_value_info("emb", TensorProto.FLOAT, None)]
    inits = [numpy_helper.from_array(base, "table")]
    if tied_head:
        nodes += [helper.make_node("Transpose", ["table"], ["tableT"], perm=[1, 0]),
                  helper.make_node("MatMul", ["emb", "tableT"], ["logits"])]
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])], outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


@settings(max_examples=25, deadline=None)
@given(V=st.integers(2, 30), K=st.integers(1, 8), H=st.integers(1, 6), seed=st.integers(0, 2**16),
       mode=st.sampled_from(["merged", "split", "swap"]), tied=st.booleans(),
       shape=st.tuples(st.integers(1, 3), st.integers(1, 6)))
def test_rewrites_match_reference(V, K, H, seed, mode, tied, shape):
    """Every rewrite, on random tables and ids, gives exactly the reference rows (and logits) in ONNX Runtime."""
    import onnxruntime as ort

    from embdeploy.onnx import rewrite as rw

    rng = np.random.default_rng(seed)
    base = rng.standard_normal((V, H)).astype(np.float32)
    ext = rng.standard_normal((K, H)).astype(np.float32)
    model = _gather_head_graph(V, H, base, tied)
    new, changed = {"merged": rw.rewrite_merged, "split": rw.rewrite_split, "swap": rw.rewrite_swap}[mode](model, base, ext)
    assert changed
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(new.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ids = rng.integers(0, V + K, size=shape, dtype=np.int64)
    ids.flat[0] = V + K - 1
    got = sess.run(None, {"ids": ids})
    full = np.concatenate([base, ext])
    want = full[ids]
    assert np.array_equal(got[0], want)  # Gather/Concat/Where copy values: exactly equal
    if tied:
        np.testing.assert_allclose(got[1], want @ full.T, rtol=1e-5, atol=1e-5)
