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
    m = res.manifest.to_json()
    assert res.report.passed and res.base_cached and m["base_onnx"] == str(base.resolve())
    assert m["outputs"] == base_outputs  # a user's base keeps its interface
    assert {c.output for c in res.report.checks} == set(base_outputs)  # and every output was compared
    assert res.report.new_ids_checked == ext.K
    assert set(m["inputs"]) == {i.name for i in graph.input} and set(m["input_roles"]) == set(m["inputs"])
    if library == "sentence_transformers":
        assert base_outputs == ["token_embeddings", "sentence_embedding"] and "token_type_ids" not in m["inputs"]
    if arch == "gpt2":
        assert m["input_roles"].get("position_ids") == "position_ids"


WITH_PAST = ("gpt2", "llama")  # tied head; untied head (head rows in the extension), grouped-query attention


def _with_past(optimum_bases, arch):
    base = optimum_bases(arch, "text-generation-with-past")
    graph = onnx.load(str(base / "model.onnx"), load_external_data=False).graph
    past = [i.name for i in graph.input if i.name.startswith("past_key_values")]
    assert past, "optimum exported no past_key_values inputs"
    return base, graph, past


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", WITH_PAST)
def test_decoder_with_past_base_is_rewritten_and_validated(extensions, optimum_bases, tmp_path, arch, mode):
    """optimum's text-generation-with-past export as --base-onnx: every probe runs with an empty cache, then
    one decode step feeds present.* back with a new id; both compared with PyTorch in every mode."""
    from embdeploy.export import export_extension

    base, graph, past = _with_past(optimum_bases, arch)
    ext, _ = extensions[arch]
    res = export_extension(ext, mode, tmp_path / "out", base_onnx=base)
    m, report = res.manifest.to_json(), res.report
    assert report.passed and report.new_ids_checked == ext.K
    assert m["outputs"] == [o.name for o in graph.output]
    assert m["kv_cache"] == {p: p.replace("past_key_values", "present") for p in past}
    assert {m["input_roles"][p] for p in past} == {"past_key_values"} and set(m["inputs"]) == set(m["input_roles"])
    assert {c.output for c in report.checks} == {"logits"}  # present.* are proven by the decode step
    probes = {c.probe for c in report.checks}
    prefill = {p for p in probes if "decode step" not in p and not p.startswith("swapped")}
    assert {"new ids (direct)", "padding", "one token"} <= prefill
    assert {f"decode step after {p}" for p in prefill} <= probes
    if mode == "swap":
        assert "swapped table: decode step after new ids (direct)" in probes
    assert any("KV-cache decoder" in n for n in report.notes)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _redigest(d, name):
    import json

    from embdeploy.export.manifest import MANIFEST
    from embdeploy.fingerprint import file_digest

    m = json.loads((d / MANIFEST).read_text())
    m["files"][name] = file_digest(d / name)
    (d / MANIFEST).write_text(json.dumps(m))
    return m


@pytest.fixture(scope="module")
def split_with_past(extensions, optimum_bases, tmp_path_factory):
    from embdeploy.export import export_extension

    base, _, _ = _with_past(optimum_bases, "gpt2")
    ext, _ = extensions["gpt2"]
    return ext, export_extension(ext, "split", tmp_path_factory.mktemp("past") / "split", base_onnx=base).out


def test_corrupted_extension_table_of_a_with_past_export_fails_validation(split_with_past, tmp_path):
    import numpy as np
    from onnx.external_data_helper import ExternalDataInfo

    from embdeploy.errors import ValidationFailed
    from embdeploy.export.validate import validate
    from embdeploy.onnx.rewrite import EXT_EMBED

    ext, out = split_with_past
    d = _copy(out, tmp_path / "d")
    model = onnx.load(str(d / "model.onnx"), load_external_data=False)
    (tensor,) = [t for t in model.graph.initializer if t.name == EXT_EMBED]
    info = ExternalDataInfo(tensor)
    raw = bytearray((d / info.location).read_bytes())
    start, length = int(info.offset or 0), int(info.length)
    rows = np.frombuffer(bytes(raw[start : start + length]), dtype=np.float32)
    raw[start : start + length] = (rows[::-1] + 0.5).astype(np.float32).tobytes()
    (d / info.location).write_bytes(bytes(raw))
    _redigest(d, info.location)  # as a careless copy would: only the numbers can tell
    with pytest.raises(ValidationFailed, match=r"new tokens \(text\) / logits: max \|diff\|") as err:
        validate(d, ext)
    failed = {c.probe for c in err.value.report.checks if not c.ok}
    assert {"new ids (direct)", "one token", "decode step after new ids (direct)", "decode step after base only"} <= failed


def test_a_wrong_cache_fed_back_fails_the_decode_step_only(split_with_past, tmp_path):
    """The decode step is a check of its own: a cache fed back wrongly (keys and values crossed) passes every
    prefill and fails every decode step."""
    import json

    from embdeploy.errors import ValidationFailed
    from embdeploy.export.manifest import MANIFEST
    from embdeploy.export.validate import validate

    ext, out = split_with_past
    d = _copy(out, tmp_path / "d")
    m = json.loads((d / MANIFEST).read_text())
    crossed = {p: m["kv_cache"][p.replace(".key", ".value") if p.endswith(".key") else p.replace(".value", ".key")]
               for p in m["kv_cache"]}
    assert crossed != m["kv_cache"]
    m["kv_cache"] = crossed
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValidationFailed) as err:
        validate(d, ext)
    checks = err.value.report.checks
    assert {c.probe for c in checks if not c.ok} == {c.probe for c in checks if c.probe.startswith("decode step")}
    assert any(not c.ok for c in checks)


def test_bench_feeds_a_with_past_export_an_empty_cache(split_with_past):
    """The benchmark's feed (bench.inputs.session_feed, shared with validation) runs the with-past graph."""
    import onnxruntime as ort

    from embdeploy.bench.inputs import NEW_MIX, session_feed, token_ids

    ext, out = split_with_past
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = session_feed(sess, token_ids(2, 5, ext.V, ext.K, NEW_MIX, 0.25, seed=0))
    past = [n for n in feed if n.startswith("past_key_values")]
    assert past and all(feed[n].shape[0] == 2 and feed[n].shape[2] == 0 for n in past)
    logits = sess.run(["logits"], feed)[0]
    assert logits.shape == (2, 5, ext.V + ext.K)


def test_runtime_session_refuses_a_with_past_export_with_the_fix(split_with_past):
    from embdeploy.errors import EmbdeployError
    from embdeploy.runtime import Session

    _, out = split_with_past
    with pytest.raises(EmbdeployError, match=r"KV cache \(2 inputs: past_key_values\.0\.key.*keeps no cache.*"
                                             r"'text-generation'"):
        Session(out, providers="cpu")


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
    """The merged rewrite alone, against PyTorch's own cache (use_cache=True, not the full-sequence logits that
    validation compares with): optimum's with-past GPT-2 matches on new ids, in the prefill and in a decode
    step that feeds the cache back."""
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
