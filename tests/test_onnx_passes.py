"""What every rewrite pass (merged, split, swap) does alike: rows, heads, biases, refusals, `in_place`.

Hand-written graphs of 1-3 nodes (tests/onnx_graphs.py); the passes on dynamo exports are in
test_onnx_dynamo.py, what one pass alone does in test_onnx_<pass>.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx_graphs import (
    BASE, BIAS, EMB, EXT, H, HEAD, HEAD_EXT, IDS, K, MODES, TIED, V, check_logits, check_structure, graph, head_graph,
    inits, rows, run,
)

from embdeploy.errors import EmbdeployError
from embdeploy.onnx.rewrite import (
    EXT_HEAD, VOCAB_DIM, find_embedding, find_lm_head, rewrite_merged, rewrite_split, rewrite_swap,
)


@pytest.mark.parametrize("id_type", ["int64", "int32"])
@pytest.mark.parametrize("mode", MODES)
def test_embedding_rows(mode, id_type):
    model = graph(EMB, inputs=f"{id_type}[B,S] ids", table=BASE)
    before = model.SerializeToString()
    ids = IDS.astype(id_type)
    new, changed = MODES[mode](model, BASE, EXT)
    assert changed and model.SerializeToString() == before, "the input model must not change"
    onnx.checker.check_model(new, full_check=True)
    check_structure(mode, new)
    (emb,) = run(new, ids)
    assert np.array_equal(emb, rows(IDS))
    base_ids = ids[:, [0, 1, 5]]
    assert np.array_equal(run(new, base_ids)[0], run(model, base_ids)[0])


@pytest.mark.parametrize("mode", MODES)
def test_table_shared_by_two_gathers(mode):
    model = graph(
        "a = Gather(table, ids)\nb = Gather(table, ids2)",
        inputs="int64[B,S] ids, int64[B,T] ids2",
        outputs="float[B,S,4] a, float[B,T,4] b",
        table=BASE,
    )
    assert find_embedding(model, BASE).gathers == (0, 1)
    new, _ = MODES[mode](model, BASE, EXT)
    onnx.checker.check_model(new, full_check=True)
    a, b = run(new, IDS, ids2=IDS[:, ::-1].copy())
    assert np.array_equal(a, rows(IDS)) and np.array_equal(b, rows(IDS[:, ::-1]))
    if mode == "merged":
        assert list(inits(new)) == ["table"]


@pytest.mark.parametrize("mode", MODES)
def test_fp16_table_matches_the_cast_base(mode):
    model = graph(EMB, outputs="float16[B,S,4] emb", table=BASE.astype(np.float16))
    match = find_embedding(model, BASE)
    assert match.dtype == np.float16 and (match.vocab_size, match.hidden_size) == (V, H)
    new, _ = MODES[mode](model, BASE, EXT)
    onnx.checker.check_model(new, full_check=True)
    (emb,) = run(new, IDS)
    assert emb.dtype == np.float16 and np.array_equal(emb, rows(IDS).astype(np.float16))


@pytest.mark.parametrize("mode", MODES)
def test_table_in_a_constant_node(mode):
    model = graph("table = Constant<value = float[6,4] {" + ",".join(map(str, BASE.ravel().tolist())) + "}>()\n" + EMB)
    assert find_embedding(model, BASE).table == "table"
    new, _ = MODES[mode](model, BASE, EXT)
    onnx.checker.check_model(new, full_check=True)
    assert np.array_equal(run(new, IDS)[0], rows(IDS))


@pytest.mark.parametrize("mode", MODES)
def test_empty_extension_changes_nothing(mode):
    model = graph(EMB, table=BASE)
    new, changed = MODES[mode](model, BASE, EXT[:0])
    assert not changed and new.SerializeToString() == model.SerializeToString() and new is not model


@pytest.mark.parametrize("form", TIED)
@pytest.mark.parametrize("mode", MODES)
def test_tied_head(mode, form):
    body, extra = TIED[form]
    model = head_graph(body, extra)
    head = find_lm_head(model, BASE)
    assert head.layout == ("HV" if form == "pretransposed" else "VH")
    assert head.weight == ("table_t" if form == "pretransposed" else "table")
    new, _ = MODES[mode](model, BASE, EXT)
    onnx.checker.check_model(new, full_check=True)
    check_structure(mode, new)
    ids = IDS.ravel() if form == "gemm" else IDS
    check_logits(model, new, ids)
    got = inits(new)
    if mode == "merged":
        expected = {"table"} | ({"table_t"} if form == "pretransposed" else set())
        assert set(got) == expected, "a table shared by Gather and head stays one initializer"
        if form == "pretransposed":
            assert got["table_t"].shape == (H, V + K)
    else:
        assert EXT_HEAD not in got, "a tied head reuses the embedding extension"
    dim = new.graph.output[1].type.tensor_type.shape.dim[-1]
    assert (dim.dim_param or dim.dim_value) == (VOCAB_DIM if mode == "swap" else V + K)


@pytest.mark.parametrize("layout", ["transpose", "pretransposed"])
@pytest.mark.parametrize("mode", MODES)
def test_untied_head(mode, layout):
    if layout == "transpose":
        body, extra = "emb = Gather(table, ids)\nwt = Transpose<perm=[1,0]>(head)\nlogits = MatMul(emb, wt)", {"head": HEAD}
    else:
        body, extra = "emb = Gather(table, ids)\nlogits = MatMul(emb, head_t)", {"head_t": HEAD.T.copy()}
    model = head_graph(body, extra)
    assert find_lm_head(model, BASE) is None
    new, _ = MODES[mode](model, BASE, EXT, head_table=HEAD, head_ext=HEAD_EXT)
    onnx.checker.check_model(new, full_check=True)
    check_structure(mode, new)
    check_logits(model, new, IDS, head=HEAD, head_ext=HEAD_EXT)
    got = inits(new)
    if mode != "merged":
        assert np.array_equal(got[EXT_HEAD], HEAD_EXT), "extension rows are stored (K, H) whatever the head layout"
        assert np.array_equal(got[next(iter(extra))], next(iter(extra.values())))


@pytest.mark.parametrize("form", ["add", "gemm"])
@pytest.mark.parametrize("mode", MODES)
def test_head_bias_gets_zeros_for_new_columns(mode, form):
    if form == "add":
        body = "emb = Gather(table, ids)\nwt = Transpose<perm=[1,0]>(table)\nz = MatMul(emb, wt)\nlogits = Add(z, bias)"
        ids = IDS
    else:
        body = "emb = Gather(table, ids)\nlogits = Gemm<transB=1>(emb, table, bias)"
        ids = IDS.ravel()
    model = head_graph(body, {"bias": BIAS})
    new, _ = MODES[mode](model, BASE, EXT)
    onnx.checker.check_model(new, full_check=True)
    check_logits(model, new, ids, bias=BIAS)


def test_already_extended_models_are_refused():
    model = graph(EMB, table=BASE)
    merged, _ = rewrite_merged(model, BASE, EXT)
    with pytest.raises(EmbdeployError, match="'table' has 9 rows whose first 6 equal the base table: this model looks already extended"):
        rewrite_merged(merged, BASE, EXT)
    split, _ = rewrite_split(model, BASE, EXT)
    with pytest.raises(EmbdeployError, match="already has an embdeploy extension \\(embdeploy_ext_embed\\)"):
        rewrite_swap(split, BASE, EXT)


def test_untied_head_not_found():
    model = graph(EMB, table=BASE)
    with pytest.raises(EmbdeployError, match="no MatMul/Gemm in the graph uses head_table.*pass head_table=None"):
        rewrite_merged(model, BASE, EXT, head_table=HEAD, head_ext=HEAD_EXT)


def test_argument_errors():
    model = graph(EMB, table=BASE)
    with pytest.raises(EmbdeployError, match="ext_table has hidden size 5 but the base table has 4"):
        rewrite_merged(model, BASE, np.zeros((2, 5), np.float32))
    with pytest.raises(EmbdeployError, match="head_table and head_ext go together"):
        rewrite_merged(model, BASE, EXT, head_table=HEAD)


def test_tied_graph_with_different_head_rows():
    body, extra = TIED["transpose"]
    model = head_graph(body, extra)
    with pytest.raises(EmbdeployError, match="'table' is both the input embedding and the LM head.*pass head_table=None"):
        rewrite_split(model, BASE, EXT, head_table=BASE, head_ext=HEAD_EXT)


# Graphs covering each kind of edit: replaced tables, a Constant dropped, heads, a bias, value_info.
IN_PLACE_CASES = {
    "embedding": lambda: graph(EMB, table=BASE),
    "constant": lambda: graph("table = Constant<value = float[6,4] {" + ",".join(map(str, BASE.ravel().tolist()))
                              + "}>()\n" + EMB),
    **{f"tied-{form}": (lambda form=form: head_graph(*TIED[form])) for form in TIED},
    "bias": lambda: head_graph("emb = Gather(table, ids)\nlogits = Gemm<transB=1>(emb, table, bias)", {"bias": BIAS}),
}


@pytest.mark.parametrize("case", IN_PLACE_CASES)
@pytest.mark.parametrize("mode", MODES)
def test_in_place_rewrites_the_input_into_what_a_copy_gets(mode, case):
    kept, model = IN_PLACE_CASES[case](), IN_PLACE_CASES[case]()
    copied, changed = MODES[mode](kept, BASE, EXT)
    new, changed_in_place = MODES[mode](model, BASE, EXT, in_place=True)
    assert changed and changed_in_place and new is model
    assert new.SerializeToString() == copied.SerializeToString()
    assert kept.SerializeToString() == IN_PLACE_CASES[case]().SerializeToString(), "without in_place the input stays"


@pytest.mark.parametrize("mode", MODES)
def test_in_place_empty_extension_returns_the_input(mode):
    model = graph(EMB, table=BASE)
    before = model.SerializeToString()
    new, changed = MODES[mode](model, BASE, EXT[:0], in_place=True)
    assert new is model and not changed and new.SerializeToString() == before
