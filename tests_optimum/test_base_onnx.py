"""`embdeploy export --base-onnx DIR` on what `optimum-cli export onnx` writes (optimum's main_export)."""

from __future__ import annotations

import onnx
import pytest

from conftest import MODES

# (arch, optimum task, optimum library): the exports a user would make of these models
CASES = [
    ("bert", None, None),
    ("bert-mlm", None, None),
    ("gpt2", None, None),
    ("minilm", None, "sentence_transformers"),  # token_embeddings + sentence_embedding, no token_type_ids
    ("minilm", None, "transformers"),  # the plain BertModel: last_hidden_state
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch,task,library", CASES, ids=["bert", "bert-mlm", "gpt2", "minilm-st", "minilm-plain"])
def test_optimum_cli_base_is_rewritten_and_validated(extensions, optimum_bases, tmp_path, arch, task, library, mode):
    from embdeploy.export import export_extension

    base = optimum_bases(arch, task, library)
    graph = onnx.load(str(base / "model.onnx"), load_external_data=False).graph
    base_outputs = [o.name for o in graph.output]
    ext, _ = extensions[arch]
    res = export_extension(ext, mode, tmp_path / "out", base_onnx=base)
    m = res.manifest
    assert res.report.passed and res.base_cached and m["base_onnx"] == str(base.resolve())
    assert m["outputs"] == base_outputs  # a user's base keeps its interface
    assert {c.output for c in res.report.checks} == set(base_outputs)  # and every output was compared
    assert res.report.new_ids_checked == ext.K
    assert set(m["inputs"]) == {i.name for i in graph.input} and set(m["input_roles"]) == set(m["inputs"])
    if library == "sentence_transformers":
        assert base_outputs == ["token_embeddings", "sentence_embedding"] and "token_type_ids" not in m["inputs"]
    if arch == "gpt2":
        assert m["input_roles"].get("position_ids") == "position_ids"


def test_decoder_with_past_is_refused_with_the_fix(extensions, optimum_bases, tmp_path):
    """A KV-cache decoder (optimum's text-generation-with-past) has inputs validation cannot fill; the
    error names them and the export to make instead, and nothing is written."""
    from embdeploy.errors import EmbdeployError
    from embdeploy.export import export_extension

    base = optimum_bases("gpt2", "text-generation-with-past")
    past = [i.name for i in onnx.load(str(base / "model.onnx"), load_external_data=False).graph.input
            if i.name.startswith("past_key_values")]
    assert past, "optimum exported no past_key_values inputs"
    ext, _ = extensions["gpt2"]
    with pytest.raises(EmbdeployError, match=r"inputs embdeploy cannot fill: .*past_key_values.*'text-generation', "
                                             r"not '-with-past'"):
        export_extension(ext, "merged", tmp_path / "out", base_onnx=base)
    assert not (tmp_path / "out").exists()


def test_optimum_base_of_another_model_is_refused(extensions, optimum_bases, tmp_path):
    """The rewrite finds the table by content: an optimum export of another model has no such table."""
    from embdeploy.errors import EmbdeployError
    from embdeploy.export import export_extension

    ext, _ = extensions["bert"]  # same shapes as bert-mlm's table (30522x32), other values
    with pytest.raises(EmbdeployError, match=r"does not contain this base table: no Gather reads an initializer equal "
                                             r"to the 30522x32 float32 base table.*Export the base model this extension"):
        export_extension(ext, "merged", tmp_path / "out", base_onnx=optimum_bases("bert-mlm"))
    assert not (tmp_path / "out").exists()


def test_rewrite_alone_handles_a_decoder_with_past(extensions, optimum_bases, tmp_path):
    """What is missing for KV-cache decoders is validation (it cannot fill past_key_values), not the rewrite:
    the merged rewrite of optimum's with-past GPT-2 matches PyTorch on new ids, in the prefill and in a
    decode step that feeds the cache back."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from embdeploy.onnx import rewrite as rw
    from embdeploy.onnx.io import load_model, save_model

    ext, _ = extensions["gpt2"]
    V, K = ext.V, ext.K
    new, _ = rw.rewrite_merged(load_model(optimum_bases("gpt2", "text-generation-with-past")),
                               ext.base_table().detach().numpy(), ext.embed_table().numpy())
    save_model(new, tmp_path / "m")
    sess = ort.InferenceSession(str(tmp_path / "m" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values")]

    def run(ids, cache, start):
        b, s = ids.shape
        feed = {"input_ids": ids, "attention_mask": np.ones((b, start + s), np.int64),
                "position_ids": np.arange(start, start + s, dtype=np.int64)[None].repeat(b, 0)}
        for i in past:
            feed[i.name] = cache[i.name.replace("past_key_values", "present")] if cache else \
                np.zeros((b, i.shape[1], 0, i.shape[3]), np.float32)
        return dict(zip(names, sess.run(None, feed)))

    prompt = np.array([[5] + list(range(V, V + K)) + [7]], dtype=np.int64)
    step = np.array([[V + K - 1]], dtype=np.int64)
    first = run(prompt, None, 0)
    second = run(step, first, prompt.shape[1])
    with torch.no_grad():
        ref1 = ext.model(input_ids=torch.from_numpy(prompt), use_cache=True)
        ref2 = ext.model(input_ids=torch.from_numpy(step), past_key_values=ref1.past_key_values, use_cache=True)
    assert first["logits"].shape[-1] == V + K
    np.testing.assert_allclose(first["logits"], ref1.logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(second["logits"], ref2.logits.numpy(), atol=1e-4)
