"""Finding the embedding table and the LM head by content (embdeploy/onnx/match.py), and what is refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx_graphs import BASE, EMB, EXT, graph

from embdeploy.errors import EmbdeployError
from embdeploy.onnx.rewrite import find_embedding, find_lm_head, rewrite_split


def test_no_matching_table():
    model = graph(EMB, table=BASE + 1)
    with pytest.raises(EmbdeployError, match=r"does not contain this base table.*'table' \[6, 4\].*another model, or quantized"):
        find_embedding(model, BASE)
    with pytest.raises(EmbdeployError, match="does not contain this base table"):
        rewrite_split(model, BASE, EXT)


def test_quantized_table_does_not_match():
    model = graph(EMB.replace("table", "q"), outputs="int8[B,S,4] emb", q=BASE.astype(np.int8))
    with pytest.raises(EmbdeployError, match="quantized"):
        find_embedding(model, BASE)


def test_two_distinct_initializers_hold_the_table():
    model = graph(
        "a = Gather(t1, ids)\nb = Gather(t2, ids)", outputs="float[B,S,4] a, float[B,S,4] b", t1=BASE, t2=BASE.copy()
    )
    with pytest.raises(EmbdeployError, match=r"several distinct initializers hold the base embedding table: 't1' \(read by Gather node #0.*'t2'"):
        find_embedding(model, BASE)


def test_two_distinct_head_weights():
    model = graph(
        "emb = Gather(table, ids)\na = MatMul(emb, w1)\nb = MatMul(emb, w2)",
        outputs="float[B,S,6] a, float[B,S,6] b",
        table=BASE, w1=BASE.T.copy(), w2=BASE.T.copy(),
    )
    with pytest.raises(EmbdeployError, match="several distinct initializers hold the LM head table: 'w1'.*'w2'"):
        find_lm_head(model, BASE)


def test_external_data_not_loaded():
    model = graph(EMB, table=BASE)
    t = model.graph.initializer[0]
    onnx.external_data_helper.set_external_data(t, "x.data")
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    with pytest.raises(EmbdeployError, match="'table' has its values in an external data file that was not loaded.*load_model"):
        find_embedding(model, BASE)
