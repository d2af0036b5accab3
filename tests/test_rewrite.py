"""Graph rewrites that attach an extension: hand-written graphs of 1-3 nodes, then tiny dynamo exports.

Gather and Concat copy values, so embedding outputs are compared exactly.
"""

from __future__ import annotations

import gc

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from embdeploy.errors import EmbdeployError
from embdeploy.onnx.rewrite import (
    EXT_EMBED,
    EXT_HEAD,
    EXT_ROWS_DIM,
    VOCAB_DIM,
    find_embedding,
    find_lm_head,
    rewrite_merged,
    rewrite_split,
    rewrite_swap,
)
from embdeploy.ort import swap_session_options

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


# --------------------------------------------------------------------------- embedding only

EMB = "emb = Gather(table, ids)"


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


# --------------------------------------------------------------------------- LM heads

# Tied heads, in the three forms exporters produce. h = emb, so logits = rows @ table.T.
TIED = {
    "transpose": ("emb = Gather(table, ids)\nwt = Transpose<perm=[1,0]>(table)\nlogits = MatMul(emb, wt)", {}),
    "pretransposed": ("emb = Gather(table, ids)\nlogits = MatMul(emb, table_t)", {"table_t": BASE.T.copy()}),
    "gemm": ("emb = Gather(table, ids)\nlogits = Gemm<transB=1>(emb, table)", {}),
}


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


# --------------------------------------------------------------------------- swap: other tables per session


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


# --------------------------------------------------------------------------- errors


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


def test_already_extended_models_are_refused():
    model = graph(EMB, table=BASE)
    merged, _ = rewrite_merged(model, BASE, EXT)
    with pytest.raises(EmbdeployError, match="'table' has 9 rows whose first 6 equal the base table: this model looks already extended"):
        rewrite_merged(merged, BASE, EXT)
    split, _ = rewrite_split(model, BASE, EXT)
    with pytest.raises(EmbdeployError, match="already has an embdeploy extension \\(embdeploy_ext_embed\\)"):
        rewrite_swap(split, BASE, EXT)


def test_other_readers_of_the_table_block_merged_and_split():
    model = graph("emb = Gather(table, ids)\nn = Shape(table)", outputs="float[B,S,4] emb, int64[2] n", table=BASE)
    for rewrite in (rewrite_merged, rewrite_split):
        with pytest.raises(EmbdeployError, match=r"(?s)use mode 'swap'.*'table' is also read by Shape node #1 \(unnamed\) -> 'n'"):
            rewrite(model, BASE, EXT)
    new, _ = rewrite_swap(model, BASE, EXT)  # swap leaves the table alone
    assert run(new, IDS)[1].tolist() == [V, H]


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


def test_swap_needs_opset_13():
    model = graph(EMB, opset=11, table=BASE)
    with pytest.raises(EmbdeployError, match="swap mode needs ONNX opset >= 13, the model uses opset 11"):
        rewrite_swap(model, BASE, EXT)
    assert rewrite_merged(model, BASE, EXT)[1]


def test_external_data_not_loaded():
    model = graph(EMB, table=BASE)
    t = model.graph.initializer[0]
    onnx.external_data_helper.set_external_data(t, "x.data")
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    with pytest.raises(EmbdeployError, match="'table' has its values in an external data file that was not loaded.*load_model"):
        find_embedding(model, BASE)


# --------------------------------------------------------------------------- torch.onnx dynamo exports

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TV, TK = 99, 4


class _Logits(torch.nn.Module):
    """(input_ids, attention_mask) -> logits, without GPT-2's cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        extra = {"use_cache": False} if self.model.config.model_type == "gpt2" else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


def _export(module, input_names, output_names):
    ids = torch.randint(0, TV, (2, 5))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.onnx.export(
        module, (ids, torch.ones_like(ids)), None, dynamo=True, verbose=False,
        input_names=input_names, output_names=output_names,
        dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
    )
    return program.model_proto


def _extended(model, ext: torch.Tensor):
    """The PyTorch reference: the same model with ext rows appended to its (tied) table.

    A head bias gets zeros for the new columns, as the rewrites do.
    """
    import copy

    ref = copy.deepcopy(model)
    base = ref.get_input_embeddings().weight.detach()
    emb = torch.nn.Embedding(base.shape[0] + len(ext), base.shape[1])
    emb.weight.data = torch.cat([base, ext])
    ref.set_input_embeddings(emb)
    old_head = ref.get_output_embeddings()
    if old_head is not None:
        head = torch.nn.Linear(base.shape[1], emb.num_embeddings, bias=old_head.bias is not None)
        head.weight = emb.weight
        if old_head.bias is not None:
            head.bias.data = torch.cat([old_head.bias.detach(), torch.zeros(len(ext))])
        ref.set_output_embeddings(head)
    return ref


@pytest.fixture(scope="module")
def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=TV, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    model = transformers.BertModel(cfg).eval()
    proto = _export(model, ["input_ids", "attention_mask"], ["last_hidden_state", "pooler_output"])
    return model, proto


@pytest.fixture(scope="module")
def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=TV, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    proto = _export(_Logits(model).eval(), ["input_ids", "attention_mask"], ["logits"])
    return model, proto


def _probe_ids():
    # Every new id, V and V+K-1 included, next to base ids; a second shape unlike the export's.
    return [
        np.array([[1, TV, TV + 1, 5, TV + 2, TV + TK - 1, 98], [TV + TK - 1, 0, 7, TV, 3, 2, 1]]),
        np.array([[TV + 2, 4, TV]]),
    ]


def _ort(proto, ids):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})


DYNAMO_WARNINGS = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@DYNAMO_WARNINGS
def test_dynamo_bert(tiny_bert):
    model, proto = tiny_bert
    base = model.get_input_embeddings().weight.detach()
    ext = torch.randn(TK, base.shape[1])
    match = find_embedding(proto, base.numpy())
    assert match.table == "embeddings.word_embeddings.weight" and len(match.gathers) == 1
    assert find_lm_head(proto, base.numpy()) is None
    ref = _extended(model, ext)
    for mode, rewrite in MODES.items():
        new, _ = rewrite(proto, base.numpy(), ext.numpy())
        onnx.checker.check_model(new, full_check=True)
        for ids in _probe_ids():
            with torch.no_grad():
                out = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long))
            hidden, pooled = _ort(new, ids)
            np.testing.assert_allclose(hidden, out.last_hidden_state.numpy(), atol=1e-4, err_msg=mode)
            np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-4, err_msg=mode)
        base_ids = np.array([[1, 98, 5, 0]])
        assert all(np.array_equal(a, b) for a, b in zip(_ort(new, base_ids), _ort(proto, base_ids))), mode


@pytest.fixture(scope="module")
def tiny_bert_mlm():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=TV, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    model = transformers.BertForMaskedLM(cfg).eval()
    return model, _export(_Logits(model).eval(), ["input_ids", "attention_mask"], ["logits"])


@DYNAMO_WARNINGS
@pytest.mark.parametrize("exported", ["tiny_gpt2", "tiny_bert_mlm"])
def test_dynamo_tied_head(exported, request):
    model, proto = request.getfixturevalue(exported)
    base = model.get_input_embeddings().weight.detach()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ext = torch.randn(TK, base.shape[1])
    # dynamo names the shared table after the head (model.lm_head.weight,
    # model.cls.predictions.decoder.weight) and folds the head's transpose into a separate
    # (H, V) initializer (val_*): two initializers, found by content. The MLM head adds its
    # bias with an Add after the MatMul.
    match = find_embedding(proto, base.numpy())
    head = find_lm_head(proto, base.numpy())
    assert match.table.startswith("model.") and match.table.endswith(("lm_head.weight", "decoder.weight"))
    assert head.layout == "HV" and head.weight != match.table and head.transposes == ()
    ref = _extended(model, ext)
    for mode, rewrite in MODES.items():
        new, _ = rewrite(proto, base.numpy(), ext.numpy())
        onnx.checker.check_model(new, full_check=True)
        for ids in _probe_ids():
            with torch.no_grad():
                expected = _Logits(ref)(torch.from_numpy(ids), torch.ones(ids.shape, dtype=torch.long))
            (logits,) = _ort(new, ids)
            assert logits.shape[-1] == TV + TK
            np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, err_msg=mode)
        base_ids = np.array([[1, 98, 5, 0]])
        np.testing.assert_array_equal(_ort(new, base_ids)[0][..., :TV], _ort(proto, base_ids)[0], err_msg=mode)


@DYNAMO_WARNINGS
def test_dynamo_gpt2_swap_table_of_another_size(tiny_gpt2):
    model, proto = tiny_gpt2
    base = model.get_input_embeddings().weight.detach()
    new, _ = rewrite_swap(proto, base.numpy(), torch.randn(TK, base.shape[1]).numpy())
    other = torch.randn(2, base.shape[1])
    so = swap_session_options(ort.SessionOptions(), other.numpy())
    so.log_severity_level = 3
    sess = ort.InferenceSession(new.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ids = np.array([[3, TV + 1, TV, 97]])
    (logits,) = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    with torch.no_grad():
        expected = _Logits(_extended(model, other))(torch.from_numpy(ids), torch.ones(ids.shape, dtype=torch.long))
    assert logits.shape == (1, 4, TV + 2)
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4)
