"""The rewrite passes on tiny torch.onnx dynamo exports, against the PyTorch model with the rows appended."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx_graphs import MODES, ort

from embdeploy.onnx.rewrite import find_embedding, find_lm_head, rewrite_swap
from embdeploy.ort import swap_session_options

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
