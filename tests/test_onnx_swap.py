"""The swap pass (embdeploy/onnx/swap.py): other extension tables per session or per run, its opset.

Shared cases: test_onnx_passes.py; a dynamo GPT-2 with a table of another size: test_onnx_dynamo.py.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from onnx import numpy_helper
from onnx_graphs import BASE, EMB, EXT, H, HEAD, HEAD_EXT, IDS, K, RNG, TIED, V, graph, head_graph, ort, rows, run

from embdeploy.errors import EmbdeployError
from embdeploy.onnx.rewrite import EXT_EMBED, rewrite_merged, rewrite_swap
from embdeploy.ort import swap_session_options


def swap_model(untied=False):
    if untied:
        body, extra = "emb = Gather(table, ids)\nwt = Transpose<perm=[1,0]>(head)\nlogits = MatMul(emb, wt)", {"head": HEAD}
        model = head_graph(body, extra)
        return model, rewrite_swap(model, BASE, EXT, head_table=HEAD, head_ext=HEAD_EXT)[0]
    model = head_graph(*TIED["pretransposed"])
    return model, rewrite_swap(model, BASE, EXT)[0]


@pytest.mark.parametrize("k2", [K, 5, 1])
def test_swap_table_per_session(k2):
    _, new = swap_model()
    other = RNG.standard_normal((k2, H)).astype(np.float32)
    ids = np.array([[0, V - 1, V, V + k2 - 1]])
    emb, logits = run(new, ids, so=swap_session_options(ort.SessionOptions(), other))
    assert np.array_equal(emb, rows(ids, ext=other))
    assert logits.shape == (1, 4, V + k2)
    np.testing.assert_allclose(logits, emb @ np.concatenate([BASE, other]).T, rtol=1e-5, atol=1e-5)
    # A session without replacement still has the exported extension.
    assert np.array_equal(run(new, np.array([[V + K - 1]]))[0], EXT[None, -1:])


def test_swap_table_per_run_feed():
    _, new = swap_model()
    other = RNG.standard_normal((7, H)).astype(np.float32)
    emb, logits = run(new, np.array([[V + 6]]), **{EXT_EMBED: other})
    assert np.array_equal(emb[0, 0], other[6]) and logits.shape[-1] == V + 7


def test_swap_untied_head_per_session():
    _, new = swap_model(untied=True)
    ext2, head2 = (RNG.standard_normal((5, H)).astype(np.float32) for _ in range(2))
    ids = np.array([[1, V, V + 4]])
    emb, logits = run(new, ids, so=swap_session_options(ort.SessionOptions(), ext2, head2))
    assert np.array_equal(emb, rows(ids, ext=ext2))
    np.testing.assert_allclose(logits, emb @ np.concatenate([HEAD, head2]).T, rtol=1e-5, atol=1e-5)


def test_swap_tables_outlive_the_options():
    # ORT reads added initializers in place without a reference: without the keep-alive this
    # reads freed memory once `so` and the caller's table are gone.
    _, new = swap_model()
    table = np.full((4, H), 3.5, np.float32)
    so = swap_session_options(ort.SessionOptions(), table)
    so.log_severity_level = 3
    sess = ort.InferenceSession(new.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del so, table
    gc.collect()
    churn = [np.full((4, H), -1.0, np.float32) for _ in range(2000)]  # reuse freed blocks
    assert np.all(sess.run(None, {"ids": np.array([[V + 3]])})[0] == 3.5)
    del churn


def test_swap_session_options_rejects_bad_tables():
    with pytest.raises(EmbdeployError, match="0 rows"):
        swap_session_options(ort.SessionOptions(), np.zeros((0, H), np.float32))
    with pytest.raises(EmbdeployError, match=r"head_ext has shape \(2, 4\) but ext_table has \(3, 4\)"):
        swap_session_options(ort.SessionOptions(), EXT, HEAD_EXT[:2])
    so = swap_session_options(ort.SessionOptions(), EXT)
    with pytest.raises(EmbdeployError, match="refused initializer 'embdeploy_ext_embed' .*already been added.*fresh SessionOptions"):
        swap_session_options(so, EXT)


def test_swap_needs_opset_13():
    model = graph(EMB, opset=11, table=BASE)
    with pytest.raises(EmbdeployError, match="swap mode needs ONNX opset >= 13, the model uses opset 11"):
        rewrite_swap(model, BASE, EXT)
    assert rewrite_merged(model, BASE, EXT)[1]


@pytest.mark.parametrize("in_place", [False, True])
def test_base_table_is_kept_and_the_extension_added(in_place):
    model = graph(EMB, table=BASE)
    table = model.graph.initializer[0]
    new, changed = rewrite_swap(model, BASE, EXT, in_place=in_place)
    assert changed and [t.name for t in new.graph.initializer][:2] == ["table", EXT_EMBED]
    assert np.array_equal(numpy_helper.to_array(new.graph.initializer[0]), BASE)
    # The same Python object for the same protobuf message: in place the base tensor was not copied.
    assert (new.graph.initializer[0] is table) == in_place
    assert np.array_equal(run(new, IDS)[0], rows(IDS))
