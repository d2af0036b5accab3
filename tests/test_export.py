"""The export stage end to end: base exported once (cached), rewritten per mode, written atomically, validated.

Tiny random models (BERT, GPT-2 with a tied head, Llama with an untied head),
then the packaged MiniLM (slow). ONNX Runtime outputs are compared with each
other here; the number-by-number comparison with PyTorch is the validation
itself (tests/test_validate.py tests that it catches wrong exports).
"""

from __future__ import annotations

import copy
import inspect
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import NEW_TOKENS

from embdeploy.extend.merge import unwrap
from embdeploy.errors import EmbdeployError, FingerprintMismatch, ValidationFailed
from embdeploy.export import base as base_export
from embdeploy.export import export_base, export_extension, load_recipe, read_manifest, verify_dir
from embdeploy.export import validate as validate_module
from embdeploy.export.graph import input_roles, to_float16
from embdeploy.fsutil import PARTIAL_MARK
from embdeploy.onnx.rewrite import EXT_EMBED, EXT_HEAD
from embdeploy.ort import swap_session_options

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

MODES = ("merged", "split", "swap")
ARCHS = ("bert", "gpt2", "llama")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")


def session(onnx_dir, so=None):
    so = so or ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(onnx_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])


def run(onnx_dir, ids, so=None) -> dict[str, np.ndarray]:
    """Feed `ids` (B, S) with the companion inputs the graph declares; {output name: array}."""
    sess = session(onnx_dir, so)
    feeds = {}
    for i in sess.get_inputs():
        feeds[i.name] = ids if i.name == "input_ids" else (
            np.ones_like(ids) if i.name == "attention_mask" else np.zeros_like(ids)
        )
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


@pytest.fixture(scope="module")
def exported(make_extension, export_cache, tmp_path_factory):
    """{arch: (ext, {mode: ExportResult})}: every arch in every mode, on one cached base each."""
    root = tmp_path_factory.mktemp("exports")
    result = {}
    for arch in ARCHS:
        ext = make_extension(arch)
        result[arch] = (ext, {m: export_extension(ext, m, root / f"{arch}-{m}", cache_dir=export_cache) for m in MODES})
    return result


# --------------------------------------------------------------------------- end to end, tiny models


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_export_writes_a_validated_directory(exported, arch, mode):
    ext, results = exported[arch]
    res = results[mode]
    out = res.out
    assert res.report.passed and res.report.new_ids_checked == ext.K == len(NEW_TOKENS)
    assert res.report.max_abs_diff < 1e-4

    m = verify_dir(out).to_json()  # every file hashed at export is still there, unchanged
    assert m["mode"] == mode and m["kind"] == "embdeploy-onnx" and m["format_version"] == 1
    assert (m["V"], m["K"], m["H"]) == (ext.V, ext.K, ext.H)
    assert m["dtype"] == "float32" and m["head"] == ext.head_mode
    assert m["base_fingerprint"] == {"embed": ext.base_fingerprint, "head": ext.head_fingerprint}
    assert m["extension_fingerprint"] == ext.extension_fingerprint()
    assert m["tokens"] == [{"token": t, "id": i} for t, i in ext.token_ids.items()]
    assert m["validation"]["passed"] and m["validation"]["max_abs_diff"] == res.report.max_abs_diff
    assert m["base_onnx"] == str(res.base_onnx) and read_manifest(res.base_onnx).mode == "base"
    assert set(m["files"]) >= {"model.onnx", "model.onnx.data", "config.json", "tokenizer.json"}
    assert all(v.startswith("sha256:") for v in m["files"].values())
    assert m["inputs"][:2] == ["input_ids", "attention_mask"]
    assert m["outputs"] == (["last_hidden_state"] if arch == "bert" else ["logits"])

    untied = ext.head_mode == "untied"
    assert m["extension_initializers"] == {
        "embed": None if mode == "merged" else EXT_EMBED,
        "head": EXT_HEAD if mode != "merged" and untied else None,
    }
    assert (out / "extension.onnx.data").is_file() == (mode != "merged")
    if mode != "merged":
        rows = 2 if untied else 1  # K x H float32 per table
        assert (out / "extension.onnx.data").stat().st_size >= rows * ext.K * ext.H * 4
    assert json.loads((out / "config.json").read_text())["vocab_size"] == ext.V + ext.K
    assert oct((out).stat().st_mode & 0o777) != oct(0o700)  # a normal directory, not mkdtemp's private one

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert [tok.convert_tokens_to_ids(t) for t in NEW_TOKENS] == list(range(ext.V, ext.V + ext.K))


@pytest.mark.parametrize("arch", ARCHS)
def test_new_rows_reach_the_outputs_and_base_inputs_agree_across_modes(exported, arch):
    ext, results = exported[arch]
    V, K = ext.V, ext.K
    base_ids = np.array([[1, 5, 9, 2, 7]])
    reference = run(results["merged"].base_onnx, base_ids)
    for mode, res in results.items():
        got = run(res.out, base_ids)
        for name, value in got.items():
            want = reference[name]
            if name == "logits":
                assert value.shape[-1] == V + K
                value = value[..., :V]
            # Same base rows and the same downstream graph: equal to the base export.
            np.testing.assert_allclose(value, want, rtol=0, atol=1e-6, err_msg=f"{mode} {name}")

        new_ids = base_ids.copy()
        new_ids[0, 2] = V + 1  # one base token replaced by a new one
        changed = run(res.out, new_ids)
        first = next(iter(changed))
        assert not np.allclose(changed[first][0, 2], got[first][0, 2], atol=1e-4), mode
        others = run(res.out, np.where(new_ids == V + 1, V + 2, new_ids))  # another new row, another output
        assert not np.allclose(changed[first][0, 2], others[first][0, 2], atol=1e-4), mode


@pytest.mark.parametrize("arch", ARCHS)
def test_swap_export_takes_another_table_per_session(exported, arch):
    ext, results = exported[arch]
    out = results["swap"].out
    V, K = ext.V, ext.K
    ids = np.array([[1, V, 4, V + K - 1]])
    table = ext.embed_table().numpy()
    head = ext.head_table().numpy() if ext.head_mode == "untied" else None
    same = swap_session_options(ort.SessionOptions(), table, head)
    default = run(out, ids)
    np.testing.assert_array_equal(run(out, ids, same)[next(iter(default))], default[next(iter(default))])
    def other():
        return swap_session_options(ort.SessionOptions(), table[::-1].copy(), None if head is None else head[::-1].copy())

    name = next(iter(default))
    assert not np.allclose(run(out, ids, other())[name][0, 1], default[name][0, 1], atol=1e-4)
    base_only = np.array([[1, 4, 5]])  # base rows, and the base logits columns, do not see the table
    np.testing.assert_array_equal(run(out, base_only, other())[name][..., :V], run(out, base_only)[name][..., :V])


def test_base_cache_is_reused_without_torch_onnx(exported, make_extension, export_cache, tmp_path, monkeypatch):
    calls = []
    original = base_export._torch_export

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(base_export, "_torch_export", counting)
    _, results = exported["bert"]
    entry = results["merged"].base_onnx
    # Another extension of the same base (exported by the fixture), another mode: only the rewrite runs.
    other = make_extension("bert", tokens=["zorblax", "plinthor"])
    res = export_extension(other, "swap", tmp_path / "b", cache_dir=export_cache)
    assert calls == [] and res.base_cached and res.base_onnx == entry
    assert export_base(other, cache_dir=export_cache).path == entry and calls == []

    # A changed cached file is not trusted: the base is exported again, into the same entry.
    cache = tmp_path / "cache"
    shutil.copytree(entry, cache / "base" / entry.name)
    data = cache / "base" / entry.name / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    res = export_extension(other, "split", tmp_path / "c", cache_dir=cache)
    assert calls == [1] and not res.base_cached and res.base_onnx == cache / "base" / entry.name
    verify_dir(res.base_onnx)

    # The same embedding table in a model with other weights does not hit the entry.
    source = read_manifest(entry).source
    changed = make_extension("bert")
    with torch.no_grad():
        changed.model.encoder.layer[0].output.dense.bias.add_(0.5)
    with base_export.plain_model(changed) as plain:
        changed_source = base_export._Base(changed, plain, None, None).source("fp32", "torch")
    assert changed_source["weights"] != source["weights"] and changed_source["task"] == source["task"]
    assert base_export._cache_hit(entry, source) and not base_export._cache_hit(entry, changed_source)


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBDEPLOY_CACHE", str(tmp_path / "env-cache"))
    assert base_export.cache_root() == tmp_path / "env-cache"
    assert base_export.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("EMBDEPLOY_CACHE")
    assert base_export.cache_root().parts[-2:] == (".cache", "embdeploy")


def test_export_base_to_a_directory(exported, export_cache, tmp_path):
    ext, results = exported["gpt2"]
    made = export_base(ext, cache_dir=export_cache, out=tmp_path / "base")
    assert made.cached  # the fixture exported this base: only the copy to `out` happened
    m = verify_dir(made.path).to_json()
    assert m["mode"] == "base" and m["K"] == 0 and m["task"] == "text-generation" and m["head"] == "tied"
    assert m["extension_initializers"] == {"embed": None, "head": None}
    assert m["files"] == read_manifest(results["merged"].base_onnx).files


# --------------------------------------------------------------------------- atomicity


def test_failed_validation_leaves_no_directory(exported, export_cache, tmp_path, monkeypatch):
    ext, _ = exported["bert"]
    impossible = validate_module.Tolerance(atol=-1.0, rtol=0.0, mean_atol=-1.0, min_cosine=2.0)
    monkeypatch.setitem(validate_module.TOLERANCES, ("float32", "cpu"), impossible)
    out = tmp_path / "onnx"
    with pytest.raises(ValidationFailed, match=r"validation of .*onnx failed") as info:
        export_extension(ext, "split", out, cache_dir=export_cache)
    assert info.value.exit_code == 3 and not info.value.report.passed
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no .onnx.partial-* left either


def test_partial_directory_is_not_a_finished_export(exported, export_cache, tmp_path):
    ext, results = exported["bert"]
    partial = tmp_path / f".onnx{PARTIAL_MARK}abc123"
    shutil.copytree(results["merged"].out, partial)  # what a killed run leaves: complete-looking files
    with pytest.raises(EmbdeployError, match="unfinished export"):
        verify_dir(partial)
    from embdeploy.export import validate_dir

    with pytest.raises(EmbdeployError, match="unfinished export"):
        validate_dir(partial)
    out = tmp_path / "onnx"
    assert not out.exists()
    export_extension(ext, "merged", out, cache_dir=export_cache)
    assert verify_dir(out).mode == "merged" and not partial.exists()  # the stale partial was cleared

    # In the cache too: a partial entry is not a cache hit.
    entry = results["merged"].base_onnx
    cache = tmp_path / "cache"
    (cache / "base").mkdir(parents=True)
    shutil.copytree(entry, cache / "base" / f".{entry.name}{PARTIAL_MARK}xyz")
    assert not base_export._cache_hit(cache / "base" / entry.name, read_manifest(entry).source)


def test_existing_output_needs_overwrite(exported, export_cache, tmp_path, monkeypatch):
    ext, _ = exported["bert"]
    out = tmp_path / "onnx"
    out.mkdir()
    monkeypatch.setattr(base_export, "export_base", lambda *a, **k: pytest.fail("checked after the export"))
    with pytest.raises(EmbdeployError, match="already exists; pass --overwrite"):
        export_extension(ext, "merged", out, cache_dir=export_cache)
    monkeypatch.undo()
    res = export_extension(ext, "merged", out, cache_dir=export_cache, overwrite=True)
    assert verify_dir(res.out).mode == "merged"


# --------------------------------------------------------------------------- other bases, dtypes, errors


def _foreign_bert_onnx(model, path):
    """A base made differently: TorchScript exporter, opset 14, other input and output names."""

    class Foreign(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask, segment_ids):
            return self.m(input_ids=ids, attention_mask=mask, token_type_ids=segment_ids).last_hidden_state

    ids = torch.randint(0, 1000, (1, 7))
    axes = {n: {0: "b", 1: "s"} for n in ("ids", "mask", "segment_ids", "hidden")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Foreign(model).eval(), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(path),
                          dynamo=False, opset_version=14, input_names=["ids", "mask", "segment_ids"],
                          output_names=["hidden"], dynamic_axes=axes)
    return path


@pytest.mark.parametrize("mode", MODES)
def test_user_base_onnx_with_other_names(make_extension, tmp_path, mode):
    ext = make_extension("bert", seed=7)
    plain = copy.deepcopy(ext.model)
    unwrap(plain)
    path = _foreign_bert_onnx(plain, tmp_path / "mine.onnx")
    assert onnx.load(str(path)).opset_import[0].version == 14
    res = export_extension(ext, mode, tmp_path / "out", base_onnx=path)
    m = res.manifest.to_json()
    assert res.report.passed and res.base_cached and m["base_onnx"] == str(path.resolve())
    assert m["inputs"] == ["ids", "mask", "segment_ids"] and m["outputs"] == ["hidden"]
    assert m["input_roles"] == {"ids": "input_ids", "mask": "attention_mask", "segment_ids": "token_type_ids"}
    assert {c.output for c in res.report.checks} == {"hidden"}


def test_base_onnx_of_another_model_is_refused(exported, make_extension, tmp_path):
    _, results = exported["bert"]
    other = make_extension("bert", seed=11)  # same shapes, other table
    with pytest.raises(FingerprintMismatch, match="exported from another base"):
        export_extension(other, "merged", tmp_path / "a", base_onnx=results["merged"].base_onnx)
    with pytest.raises(EmbdeployError, match="does not contain this base table"):
        export_extension(other, "merged", tmp_path / "b", base_onnx=results["merged"].base_onnx / "model.onnx")
    ext, _ = exported["bert"]
    with pytest.raises(EmbdeployError, match="is a 'merged' export \\(already extended\\)"):
        export_extension(ext, "swap", tmp_path / "c", base_onnx=results["merged"].out)
    with pytest.raises(EmbdeployError, match="does not exist"):
        export_extension(ext, "swap", tmp_path / "d", base_onnx=tmp_path / "nope.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bad_arguments_are_refused_before_any_work(exported, tmp_path):
    ext, _ = exported["bert"]
    with pytest.raises(EmbdeployError, match="unknown mode 'fused'; choose one of merged, split, swap; unknown dtype 'int8'"
                       ".*; unknown provider 'tpu'; choose one of cpu, cuda"):
        export_extension(ext, "fused", tmp_path / "x", dtype="int8", provider="tpu")
    with pytest.raises(EmbdeployError, match="unknown backend 'tf'"):
        export_base(ext, backend="tf", cache_dir=tmp_path)


@pytest.mark.parametrize("mode", ["merged", "swap"])
def test_fp16_export(exported, export_cache, tmp_path, mode):
    ext, _ = exported["llama"]
    res = export_extension(ext, mode, tmp_path / "fp16", dtype="fp16", cache_dir=export_cache)
    m = res.manifest.to_json()
    assert m["dtype"] == "float16" and res.report.tolerance == validate_module.TOLERANCES[("float16", "cpu")]
    assert read_manifest(res.base_onnx).dtype == "float16" and res.base_onnx.name.endswith("-fp16")
    graph = onnx.load(str(res.out / "model.onnx"), load_external_data=False).graph
    inits = {t.name: t.data_type for t in graph.initializer}
    assert inits[next(n for n in inits if "embed" in n)] == onnx.TensorProto.FLOAT16
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in graph.output)  # float32 io kept
    assert res.report.passed and 0 < res.report.max_abs_diff < 0.03


def test_optimum_output_rename_follows_every_use():
    """optimum's sentence-transformers export calls the per-token output token_embeddings; the optimum
    backend renames it last_hidden_state, also where the pooling reads it."""
    import onnxruntime as ort
    from onnx import parser

    from embdeploy.export.base import _OPTIMUM_RENAMES, _rename_outputs

    model = parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[B, S, 4] x) => (float[B, S, 4] token_embeddings, float[B, 4] sentence_embedding) {
            token_embeddings = Relu(x)
            axis = Constant<value = int64[1] {1}>()
            sentence_embedding = ReduceMean<keepdims = 0>(token_embeddings, axis)
        }
    """)
    renamed = _rename_outputs(model, _OPTIMUM_RENAMES)
    assert [o.name for o in renamed.graph.output] == ["last_hidden_state", "sentence_embedding"]
    assert [list(n.input) for n in renamed.graph.node] == [["x"], [], ["last_hidden_state", "axis"]]
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    hidden, pooled = ort.InferenceSession(renamed.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(hidden, np.maximum(x, 0))
    np.testing.assert_allclose(pooled, np.maximum(x, 0).mean(1), rtol=1e-6)
    clash = parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[2] last_hidden_state) => (float[2] token_embeddings) { token_embeddings = Relu(last_hidden_state) }
    """)
    with pytest.raises(EmbdeployError, match="already uses those names"):
        _rename_outputs(clash, _OPTIMUM_RENAMES)


def test_optimum_backend_without_optimum(exported, tmp_path):
    pytest.importorskip("torch")
    try:
        import optimum.exporters.onnx  # noqa: F401

        pytest.skip("optimum is installed here")
    except ImportError:
        pass
    ext, _ = exported["gpt2"]
    with pytest.raises(EmbdeployError, match="Install optimum-onnx in an environment with transformers<4.58"):
        export_extension(ext, "merged", tmp_path / "o", backend="optimum", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_names_the_fixes(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    class DataDependentBertModel(BertModel):
        """A Python branch on a tensor value: torch.export cannot trace it."""

        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kw):
            if int(input_ids.max()) > 50:
                input_ids = input_ids.flip(1)
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, **kw)

    cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    model = DataDependentBertModel(cfg).eval()
    with pytest.raises(EmbdeployError, match=r"torch.onnx could not export DataDependentBertModel \(GuardOnDataDependent"
                       r".*--base-onnx PATH.*--backend optimum"):
        export_base(model, cache_dir=tmp_path)
    assert not any((tmp_path / "base").glob("*")) if (tmp_path / "base").exists() else True
    captured = capsys.readouterr()
    assert "def forward" not in captured.out + captured.err  # torch's graph dump is not shown


# --------------------------------------------------------------------------- graph helpers


def test_input_roles_refuses_inputs_it_cannot_fill():
    model = onnx.parser.parse_model(
        """<ir_version: 9, opset_import: ["" : 18]>
        g (int64[B,S] tokens, int64[B,S] attention_mask, float[B,3,H,W] pixel_values) => (float[B,S,4] y) {
            y = Gather(table, tokens)
        }"""
    )
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((5, 4), np.float32), "table"))
    with pytest.raises(EmbdeployError, match="inputs embdeploy cannot fill: 'pixel_values'.*'text-generation-with-past'"):
        input_roles(model, (0,))
    del model.graph.input[2]
    assert input_roles(model, (0,)) == {"tokens": "input_ids", "attention_mask": "attention_mask"}


def _with_past(past_shape: list, present: str = "present.0.key"):
    # helper, not onnx.parser: optimum's names have dots, which ONNX text does not allow
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["y"]),
         helper.make_node("Identity", ["past_key_values.0.key"], [present])],
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
         helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, past_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 4]),
         helper.make_tensor_value_info(present, TensorProto.FLOAT, past_shape)],
        [onnx.numpy_helper.from_array(np.zeros((5, 4), np.float32), "table")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_input_roles_and_cache_outputs_of_a_decoder_with_past():
    from embdeploy.export.graph import PAST, cache_outputs

    model = _with_past(["B", 2, "P", 4])
    roles = input_roles(model, (0,))
    assert roles == {"input_ids": "input_ids", "attention_mask": "attention_mask", "past_key_values.0.key": PAST}
    assert cache_outputs(model, roles) == {"past_key_values.0.key": "present.0.key"}
    assert cache_outputs(model, {"input_ids": "input_ids"}) == {}  # no cache, nothing to pair
    renamed = _with_past(["B", 2, "P", 4], present="next_cache")
    with pytest.raises(EmbdeployError, match=r"KV-cache inputs without a matching present.\* output: "
                                             r"'past_key_values.0.key' \(no output 'present.0.key'\)"):
        cache_outputs(renamed, input_roles(renamed, (0,)))
    with pytest.raises(EmbdeployError, match=r"'past_key_values.0.key' \(a KV cache must be a 4-D float tensor.*"
                                             r"heads and head_dim fixed\)"):
        input_roles(_with_past(["B", "N", "P", 4]), (0,))  # heads not fixed: validation could not build an empty past


def test_to_float16_keeps_the_mask_fill_finite():
    # (1 - mask) * finfo(float32).min: cast naively to float16 the constant is -inf and 0 * -inf = NaN.
    model = onnx.parser.parse_model(
        """<ir_version: 9, opset_import: ["" : 18]>
        g (int64[B,S] mask, float[B,S] x) => (float[B,S] y) {
            m = Cast<to = 1>(mask)
            one = Constant<value = float {1.0}>()
            inv = Sub(one, m)
            fill = Constant<value = float {-3.4028234663852886e+38}>()
            bias = Mul(inv, fill)
            y = Add(x, bias)
        }"""
    )
    half = to_float16(model)
    onnx.checker.check_model(half, full_check=True)
    assert half.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    sess = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"mask": np.array([[1, 0]]), "x": np.array([[0.5, 0.25]], np.float32)})
    assert y.dtype == np.float32 and y[0, 0] == 0.5 and np.isfinite(y).all() and y[0, 1] < -6e4


# --------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("mode", MODES)
def test_shipped_recipes_load(mode):
    path = Path(__file__).parent.parent / "export" / f"minilm-{mode}-cpu.json"
    args = load_recipe(path)
    assert args == {"mode": mode, "dtype": "fp32", "backend": "torch", "provider": "cpu", "validate": True}
    assert set(args) <= set(inspect.signature(export_extension).parameters)


def test_recipe_errors_list_every_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mode": "fused", "dtype": "int8", "validate": "yes", "opset": 17, "recipe_version": 2}))
    with pytest.raises(EmbdeployError) as info:
        load_recipe(bad)
    msg = str(info.value)
    for part in ("unknown key(s) 'opset'; allowed:", "mode is 'fused'", "dtype is 'int8'", "validate is 'yes'",
                 "recipe_version is 2"):
        assert part in msg
    (tmp_path / "broken.json").write_text("{mode: merged")
    with pytest.raises(EmbdeployError, match="is not valid JSON"):
        load_recipe(tmp_path / "broken.json")
    with pytest.raises(EmbdeployError, match="does not exist"):
        load_recipe(tmp_path / "missing.json")
    (tmp_path / "sub").mkdir()
    ok = tmp_path / "sub" / "r.json"
    ok.write_text(json.dumps({"mode": "swap", "base_onnx": "../base/model.onnx", "out": "onnx/x"}))
    args = load_recipe(ok)
    assert args == {"mode": "swap", "base_onnx": str((tmp_path / "base" / "model.onnx").resolve()), "out": "onnx/x"}


# --------------------------------------------------------------------------- the packaged MiniLM


@pytest.fixture(scope="module")
def minilm_exports(export_cache, tmp_path_factory):
    from embdeploy.extend.config import ExtensionConfig
    from embdeploy.extend.model import Extension
    from embdeploy.models import load_base

    model, tok, info = load_base("minilm")
    ext = Extension(model, tok, info)
    ext.add(ExtensionConfig(tokens=["hyperkalemia", "troponin", "nephrolithiasis", "qzxvort"], init="normal"))
    root = tmp_path_factory.mktemp("minilm")
    return ext, {m: export_extension(ext, m, root / m, cache_dir=export_cache) for m in MODES}


@pytest.mark.slow
def test_minilm_every_mode(minilm_exports):
    ext, results = minilm_exports
    assert ext.base_info.pooling == {"mode": "mean", "normalize": True}
    tok = ext.tokenizer
    enc = tok(["the patient has hyperkalemia", "a plain sentence"], padding=True, return_tensors="np")
    outs = {}
    for mode, res in results.items():
        assert res.report.passed and list(res.manifest.outputs) == ["last_hidden_state", "sentence_embedding"]
        assert res.report.max_abs_diff < 1e-4
        sess = session(res.out)
        outs[mode] = dict(zip(["last_hidden_state", "sentence_embedding"],
                              sess.run(None, {k: enc[k].astype(np.int64) for k in res.manifest.inputs})))
    for mode in ("split", "swap"):
        for name in outs["merged"]:
            np.testing.assert_allclose(outs[mode][name], outs["merged"][name], atol=1e-5, err_msg=mode)
    emb = outs["merged"]["sentence_embedding"]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_minilm_matches_sentence_transformers_on_base_text(minilm_exports, minilm_dir):
    st = pytest.importorskip("sentence_transformers")
    _, results = minilm_exports
    texts = ["a plain sentence about the weather", "short"]
    want = st.SentenceTransformer(str(minilm_dir), device="cpu").encode(texts, convert_to_numpy=True)
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(str(results["swap"].out))(texts, padding=True, return_tensors="np")
    sess = session(results["swap"].out)
    _, got = sess.run(None, {k: enc[k].astype(np.int64) for k in results["swap"].manifest.inputs})
    np.testing.assert_allclose(got, want, atol=1e-5)
