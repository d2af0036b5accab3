"""The runtime Session: the same numbers as plain ONNX Runtime and PyTorch, id checks, swap, threads.

Exports are made once per test session from tiny random BERTs (vocab 30522 with
the packaged MiniLM tokenizer, hidden 32) with `export_extension`; their base
export is cached under the session's temp dir, so `test_serve.py` reuses it.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import tiny_bert

from embdeploy.errors import EmbdeployError, FingerprintMismatch
from embdeploy.runtime import Session, check_ids, resolve_providers

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

V = 30522
TOKENS_A = ["hyperkalemia", "troponin", "embdeploy"]
TOKENS_B = ["cardiomyopathy", "zzyzx"]  # another tenant, another K
POOLING = {"mode": "mean", "normalize": True}
TEXTS = [
    "troponin rose overnight and hyperkalemia was treated",
    "the patient had a fever",
    "embdeploy ships new rows; cardiomyopathy and zzyzx are words of the other tenant",
    "a",
    "the doctor ordered a blood test and an x ray of the chest, results came back normal and the patient went home",
]
BASE_ONLY = "the patient had a fever and a cough for three days"
CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def _extension(tokens, seed=0, hidden=32, masked_lm=False, tokenizer=None):
    from transformers import AutoTokenizer

    from embdeploy.extend.config import ExtensionConfig
    from embdeploy.extend.model import Extension
    from embdeploy.models import BaseInfo, packaged_minilm_dir

    model = tiny_bert(hidden=hidden, seed=seed, masked_lm=masked_lm)
    tok = AutoTokenizer.from_pretrained(str(packaged_minilm_dir()))
    task = "fill-mask" if masked_lm else "feature-extraction"
    info = BaseInfo(ref="tiny-bert", path="", task=task, model_class=type(model).__name__,
                    pooling=None if masked_lm else POOLING)
    ext = Extension(model, tok, info)
    ext.add(ExtensionConfig(tokens=list(tokens), name="tenant", init="normal", seed=seed + 1))
    with torch.no_grad():  # rows far from their init, so a wrong table cannot pass for the right one
        for p in ext.embed_tables.values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 7)))
    return ext


def build_exports(root: Path, cache: Path, masked_lm: bool = True) -> SimpleNamespace:
    """Extension dirs A (K=3), B (K=2), a foreign base, and swap/merged exports of A."""
    from embdeploy.export import export_extension

    a, b = _extension(TOKENS_A), _extension(TOKENS_B)
    foreign = _extension(TOKENS_B, seed=1)
    out = SimpleNamespace(ext_a=a, ext_b=b)
    for name, ext in (("a", a), ("b", b), ("foreign", foreign)):
        setattr(out, f"dir_{name}", ext.save(root / f"ext-{name}"))
    for mode in ("swap", "merged"):
        setattr(out, mode, export_extension(a, mode, root / f"onnx-{mode}", cache_dir=cache).out)
    if masked_lm:
        out.mlm_a = _extension(TOKENS_A, masked_lm=True)
        out.mlm_b = _extension(TOKENS_B, masked_lm=True)
        out.mlm_dir_b = out.mlm_b.save(root / "ext-mlm-b")
        out.mlm_swap = export_extension(out.mlm_a, "swap", root / "onnx-mlm-swap", cache_dir=cache).out
    return out


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    return build_exports(tmp_path_factory.mktemp("runtime"), tmp_path_factory.getbasetemp() / "embdeploy-cache")


@pytest.fixture(scope="module")
def swap(exports):
    return Session(exports.swap, providers="cpu")


def reference(ext, enc: dict, task="feature-extraction") -> dict:
    """The extended PyTorch model on the same ids."""
    from embdeploy.export.wrapper import task_outputs

    inputs = {k: torch.from_numpy(v) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        out = task_outputs(ext.model, task, POOLING if task == "feature-extraction" else None, inputs)
    return {k: v.numpy() for k, v in out.items()}


def plain_ort(onnx_dir, feeds: dict, so=None) -> dict:
    so = so or ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(Path(onnx_dir) / "model.onnx"), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def assert_close_on_tokens(got: dict, want: dict, mask: np.ndarray, atol=1e-4):
    for name, value in want.items():
        g = got[name]
        if g.ndim == 3:
            g, value = g[mask.astype(bool)], value[mask.astype(bool)]
        np.testing.assert_allclose(g, value, atol=atol, rtol=0, err_msg=name)


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("mode", ["swap", "merged"])
def test_outputs_equal_plain_ort_and_match_torch(exports, mode):
    session = Session(getattr(exports, mode), providers="cpu")
    assert session.mode == mode and session.K == 3 and session.tokens == tuple(TOKENS_A)
    got = session.encode(TEXTS)
    assert set(got) == {"last_hidden_state", "sentence_embedding", "attention_mask"}

    tok = exports.ext_a.tokenizer
    enc = {k: np.asarray(v, dtype=np.int64) for k, v in tok(TEXTS, padding=True, return_tensors="np").items()}
    assert enc["input_ids"].max() >= V, "the texts must hit new ids"
    np.testing.assert_array_equal(got["attention_mask"], enc["attention_mask"])
    by_hand = plain_ort(session.path, enc)
    for name in ("last_hidden_state", "sentence_embedding"):
        np.testing.assert_array_equal(got[name], by_hand[name], err_msg=name)
    assert_close_on_tokens(got, reference(exports.ext_a, enc), enc["attention_mask"])


def test_batches_pad_and_run_pre_tokenized(swap):
    whole = swap.encode(TEXTS)
    parts = swap.encode(TEXTS, batch_size=2)
    mask = whole["attention_mask"]
    np.testing.assert_array_equal(parts["attention_mask"], mask)
    assert_close_on_tokens(parts, {k: whole[k] for k in ("last_hidden_state", "sentence_embedding")}, mask, atol=1e-5)
    first = int(mask[:2].sum(1).max())  # the first batch's own length; the call's longest text is in the last
    assert first < mask.shape[1] and not parts["last_hidden_state"][:2, first:].any(), "zeros past a batch's length"

    enc = swap.tokenize(TEXTS)
    ran = swap.run(enc)
    for name in ("last_hidden_state", "sentence_embedding"):
        np.testing.assert_array_equal(ran[name], whole[name])
    only = swap.encode("troponin", outputs="sentence_embedding")
    assert set(only) == {"sentence_embedding", "attention_mask"} and only["sentence_embedding"].shape == (1, 32)
    with pytest.raises(EmbdeployError, match="unknown output.*'pooler'.*exports last_hidden_state, sentence_embedding"):
        swap.encode("x", outputs="pooler")


def test_truncation_to_the_position_table(swap):
    assert swap.max_length == 128  # MiniLM's tokenizer says 512, the tiny model has 128 positions
    long = " ".join(["word"] * 400)
    out = swap.encode([long, "short"])
    assert out["attention_mask"].shape == (2, 128)
    assert swap.encode(long, max_length=16)["attention_mask"].shape == (1, 16)
    with pytest.raises(EmbdeployError, match="max_length 129 is more than the model's 128 positions"):
        swap.encode("x", max_length=129)


def test_fill_mask_logits_with_a_swapped_table(exports):
    session = Session(exports.mlm_swap, providers="cpu")
    enc = session.tokenize(TEXTS[:2])
    got = session.run(enc)
    assert got["logits"].shape[-1] == V + 3
    assert_close_on_tokens(got, reference(exports.mlm_a, enc, "fill-mask"), enc["attention_mask"])
    tenant = session.fork(extension=exports.mlm_dir_b)
    enc_b = tenant.tokenize(TEXTS[2:3])
    got_b = tenant.run(enc_b)
    assert got_b["logits"].shape[-1] == V + 2, "the logits widen with the tenant's K"
    assert_close_on_tokens(got_b, reference(exports.mlm_b, enc_b, "fill-mask"), enc_b["attention_mask"])


# --------------------------------------------------------------------------- checks before a run


def test_id_range_errors(swap):
    ids = np.array([[101, 2000, V + 2, 102], [101, V + 3, -1, V + 9]])
    with pytest.raises(EmbdeployError) as e:
        swap.run({"input_ids": ids})
    assert str(e.value).startswith("input_ids[1, 1] = 30525 is too large: valid values are 0..30524 "
                                   "(V=30522 base rows + K=3 extension rows) (and 2 more).")
    with pytest.raises(EmbdeployError, match=r"input_ids\[0, 1\] = -5 is negative: valid values are 0\.\.30524"):
        swap.run({"input_ids": np.array([[101, -5, 102]])})
    with pytest.raises(EmbdeployError, match="input_ids must be an integer array .* got dtype float32"):
        swap.run({"input_ids": np.array([[101.0, 102.0]], dtype=np.float32)})
    with pytest.raises(EmbdeployError, match=r"input_ids must have shape \(batch, sequence\), got shape \(3,\)"):
        swap.run({"input_ids": np.array([101, 7, 102])})
    with pytest.raises(EmbdeployError, match=r"token_type_ids\[0, 2\] = 2 is too large: valid values are 0\.\.1"):
        swap.run({"input_ids": np.array([[101, 7, 102]]), "token_type_ids": np.array([[0, 0, 2]])})
    with pytest.raises(EmbdeployError, match="input_ids has 129 positions, the model only 128"):
        swap.run({"input_ids": np.full((1, 129), 7)})
    with pytest.raises(EmbdeployError, match=r"attention_mask has shape \(1, 2\), input_ids \(1, 3\)"):
        swap.run({"input_ids": np.array([[101, 7, 102]]), "attention_mask": np.array([[1, 1]])})
    with pytest.raises(EmbdeployError, match="'embdeploy_ext_embed' is the extension table: use swap_extension"):
        swap.run({"input_ids": np.array([[101]]), "embdeploy_ext_embed": np.zeros((3, 32), np.float32)})
    with pytest.raises(EmbdeployError, match="unknown input 'pixels'"):
        swap.run({"input_ids": np.array([[101]]), "pixels": np.zeros(3)})
    swap.run({"input_ids": np.array([[V + 2]], dtype=np.int32)})  # the last new id is fine, int32 too
    assert check_ids([[0, 4]], 5).dtype.kind == "i"


def test_texts_are_checked(swap):
    with pytest.raises(EmbdeployError, match="texts is empty"):
        swap.encode([])
    with pytest.raises(EmbdeployError, match=r"texts\[1\] is a int, not a string"):
        swap.encode(["a", 3])
    with pytest.raises(EmbdeployError, match="batch_size must be a positive integer"):
        swap.encode(["a"], batch_size=0)


def test_providers_and_digests(exports, tmp_path):
    with pytest.raises(EmbdeployError) as e:
        Session(exports.swap, providers=["tpu"])
    assert "execution provider(s) 'tpu' not available" in str(e.value)
    assert "available: " + ", ".join(ort.get_available_providers()) in str(e.value)
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers(None)[0] == ("CUDAExecutionProvider" if CUDA else "CPUExecutionProvider")

    broken = tmp_path / "broken"
    shutil.copytree(exports.swap, broken)
    data = bytearray((broken / "extension.onnx.data").read_bytes())
    data[0] ^= 0xFF
    (broken / "extension.onnx.data").write_bytes(bytes(data))
    with pytest.raises(EmbdeployError, match="extension.onnx.data: its sha256 differs"):
        Session(broken)


# --------------------------------------------------------------------------- swap


def test_two_tenants_over_one_base(exports, swap):
    tenant_b = swap.fork(extension=exports.dir_b)
    assert (swap.K, tenant_b.K) == (3, 2) and tenant_b.tokens == tuple(TOKENS_B)
    assert tenant_b._state.sess is swap._state.sess, "feed binding: one ORT session for every tenant"
    a, b = swap.encode(TEXTS), tenant_b.encode(TEXTS)
    for i, text in enumerate(TEXTS):
        same = not any(t in text for t in TOKENS_A + TOKENS_B)
        assert np.array_equal(a["sentence_embedding"][i], b["sentence_embedding"][i]) == same, text
    base_a, base_b = swap.encode(BASE_ONLY), tenant_b.encode(BASE_ONLY)
    for name in ("last_hidden_state", "sentence_embedding"):
        np.testing.assert_array_equal(base_a[name], base_b[name])
    enc = tenant_b.tokenize(TEXTS)
    assert enc["input_ids"].max() == V + 1
    assert_close_on_tokens(tenant_b.encode(TEXTS), reference(exports.ext_b, enc), enc["attention_mask"])
    with pytest.raises(EmbdeployError, match=r"input_ids\[0, 0\] = 30524 is too large: valid values are 0\.\.30523"):
        tenant_b.run({"input_ids": np.array([[V + 2]])})  # A's last id does not exist for B


def test_swap_extension_in_place(exports):
    session = Session(exports.swap, providers="cpu")
    before = session.encode(TEXTS)
    fp_a = session.metadata()["extension_fingerprint"]
    session.swap_extension(exports.dir_b)
    meta = session.metadata()
    assert meta["K"] == 2 and meta["extension"] == str(Path(exports.dir_b).resolve())
    assert meta["extension_fingerprint"] == exports.ext_b.extension_fingerprint() != fp_a
    assert [t["id"] for t in meta["tokens"]] == [V, V + 1]
    after = session.encode(TEXTS)
    fresh = Session(exports.swap, providers="cpu", extension=exports.dir_b).encode(TEXTS)
    for name in ("last_hidden_state", "sentence_embedding"):
        np.testing.assert_array_equal(after[name], fresh[name])
    session.swap_extension(exports.dir_a)  # A's own directory: back to the exported numbers
    assert session.metadata()["extension_fingerprint"] == fp_a
    for name in ("last_hidden_state", "sentence_embedding"):
        np.testing.assert_array_equal(session.encode(TEXTS)[name], before[name])


def test_table_binding_session_gives_the_same_numbers(exports, swap):
    by_session = Session(exports.swap, providers="cpu", extension=exports.dir_b, table_binding="session")
    assert by_session._rt._sess is None, "one ORT session, the tenant's own: the exported table's is never built"
    by_feed = swap.fork(extension=exports.dir_b)
    for name in ("last_hidden_state", "sentence_embedding"):
        np.testing.assert_array_equal(by_session.encode(TEXTS)[name], by_feed.encode(TEXTS)[name])


def test_swap_refusals(exports, swap, tmp_path):
    with pytest.raises(FingerprintMismatch, match="made for a base whose embedding table has fingerprint"):
        swap.fork(extension=exports.dir_foreign)
    wrong_h = tmp_path / "wrong-h"
    shutil.copytree(exports.dir_b, wrong_h)
    manifest = json.loads((wrong_h / "extension.json").read_text())
    manifest["H"] = 48
    (wrong_h / "extension.json").write_text(json.dumps(manifest))
    session = Session(exports.swap, providers="cpu")
    with pytest.raises(EmbdeployError) as e:
        session.swap_extension(wrong_h)
    assert "does not fit the export (K may differ, V and H may not)" in str(e.value)
    assert "H: the extension's rows have hidden size 48, the export's 32" in str(e.value)
    assert session.K == 3 and session.encode("troponin")["sentence_embedding"].shape == (1, 32), "still serving A"

    merged = Session(exports.merged, providers="cpu")
    with pytest.raises(EmbdeployError, match="is a 'merged' export: it has its extension rows built into the graph"):
        merged.swap_extension(exports.dir_b)
    with pytest.raises(EmbdeployError, match="Export with `--mode swap`"):
        Session(exports.merged, providers="cpu", extension=exports.dir_b)
    assert Session(exports.merged, providers="cpu", extension=exports.dir_a).K == 3  # its own rows: fine


# --------------------------------------------------------------------------- IO binding


def test_io_binding_path_on_cpu(exports, swap):
    bound = Session(exports.swap, providers="cpu", io_binding=True, extension=exports.dir_b)
    plain = swap.fork(extension=exports.dir_b)
    for name in ("last_hidden_state", "sentence_embedding"):
        np.testing.assert_array_equal(bound.encode(TEXTS)[name], plain.encode(TEXTS)[name])
    values = bound.encode(TEXTS[:2], device_outputs=True)
    assert isinstance(values["sentence_embedding"], ort.OrtValue) and values["sentence_embedding"].device_name() == "cpu"
    np.testing.assert_array_equal(values["sentence_embedding"].numpy(), plain.encode(TEXTS[:2])["sentence_embedding"])
    with pytest.raises(EmbdeployError, match="device_outputs returns one batch"):
        bound.encode(TEXTS, batch_size=2, device_outputs=True)
    with pytest.raises(EmbdeployError, match="device_outputs=True needs a session opened with io_binding=True"):
        swap.encode("x", device_outputs=True)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs onnxruntime-gpu with CUDAExecutionProvider and an NVIDIA GPU")
def test_cuda_device_outputs_and_swap(exports):
    gpu = Session(exports.swap, providers="cuda", io_binding=True)
    assert gpu.providers[0] == "CUDAExecutionProvider"
    cpu = Session(exports.swap, providers="cpu")
    values = gpu.encode(TEXTS, device_outputs=True)
    assert values["sentence_embedding"].device_name().lower() == "cuda"
    np.testing.assert_allclose(values["sentence_embedding"].numpy(), cpu.encode(TEXTS)["sentence_embedding"], atol=1e-3)
    for io_binding in (True, False):  # "feed": the table goes in from GPU memory with every run either way
        tenant = Session(exports.swap, providers="cuda", io_binding=io_binding, extension=exports.dir_b)
        enc = tenant.tokenize(TEXTS)
        assert_close_on_tokens(tenant.encode(TEXTS), reference(exports.ext_b, enc), enc["attention_mask"], atol=1e-3)
    # A CUDA session ignores or refuses tables given through the session options: said plainly, not served wrong.
    with pytest.raises(EmbdeployError, match="table_binding='session' works on the CPU provider only"):
        Session(exports.swap, providers="cuda", extension=exports.dir_b, table_binding="session").encode(TEXTS)
    with pytest.raises(EmbdeployError, match="is too large"):
        gpu.run({"input_ids": np.array([[V + 3]])})


# --------------------------------------------------------------------------- threads


def _hammer(work, threads: int, seconds: float, max_calls: int):
    """Run work(i) from `threads` threads until max_calls calls or `seconds`; (calls, errors, elapsed)."""
    counter, errors, lock = iter(range(max_calls)), [], threading.Lock()
    deadline = time.perf_counter() + seconds

    def loop():
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                work(i)
            except Exception as e:  # collected: the test reports every failure
                errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    pool = [threading.Thread(target=loop) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(seconds + 30)
    return max_calls - len(list(counter)), errors, time.perf_counter() - t0


def test_many_threads_one_session(exports):
    session = Session(exports.swap, providers="cpu")
    inputs = [TEXTS[i % len(TEXTS):] + TEXTS[: i % 3] for i in range(8)]
    expected = [session.encode(t)["sentence_embedding"] for t in inputs]
    calls, errors, elapsed = _hammer(
        lambda i: np.testing.assert_array_equal(session.encode(inputs[i % 8])["sentence_embedding"], expected[i % 8]),
        threads=8, seconds=300, max_calls=400,  # the deadline only guards a hang; the count is what matters
    )
    texts = sum(len(inputs[i % 8]) for i in range(calls))
    print(f"\nSession, 8 threads: {calls} calls, {texts} texts in {elapsed:.2f}s = {calls / elapsed:.0f} calls/s, "
          f"{texts / elapsed:.0f} texts/s")
    assert errors == [] and calls == 400


def test_swaps_under_load_never_mix_tables(exports):
    session = Session(exports.swap, providers="cpu")
    tenants = {}
    for ext_dir in (exports.dir_a, exports.dir_b):
        t = session.fork(extension=ext_dir)
        tenants[t.metadata()["extension_fingerprint"]] = {text: t.encode(text)["sentence_embedding"] for text in TEXTS}
    stop = threading.Event()

    swaps = []  # one entry per swap done

    def swapper():
        dirs = [exports.dir_b, exports.dir_a]
        while not stop.is_set():
            session.swap_extension(dirs[len(swaps) % 2])
            swaps.append(1)

    def work(i):
        if i >= 150:  # the second half of the calls starts only once several swaps happened, however loaded the machine
            deadline = time.perf_counter() + 120
            while len(swaps) < 3 and time.perf_counter() < deadline:
                time.sleep(0.01)
        pinned = session.snapshot()
        text = TEXTS[i % len(TEXTS)]
        got = pinned.encode(text)["sentence_embedding"]
        np.testing.assert_array_equal(got, tenants[pinned.metadata()["extension_fingerprint"]][text])

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        calls, errors, _ = _hammer(work, threads=6, seconds=300, max_calls=300)  # deadline: a hang guard only
    finally:
        stop.set()
        thread.join(30)
    assert errors == [] and calls == 300 and len(swaps) > 2
