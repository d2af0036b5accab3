"""The CUDA paths: export validated on the CUDA provider (fp32 and fp16), the
runtime on the device, bench with IO binding and GPU memory, training on the GPU.

Each test needs a CUDA device and is skipped with the reason without one (CI has
none). They run on a GPU machine with onnxruntime-gpu installed; perf/cuda_run.sh
is the command that ran them there (see perf/README.md for the last results).
"""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from embdeploy.errors import ValidationFailed

ORT_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
TORCH_CUDA = torch.cuda.is_available()
ORT_REASON = "needs onnxruntime-gpu with CUDAExecutionProvider and an NVIDIA GPU"
TORCH_REASON = "needs a CUDA build of torch and an NVIDIA GPU"

TEXTS = ["troponin and hyperkalemia", "the zorblax qwertyx was high", "plain words only", "troponin"]


# --------------------------------------------------------------------------- export + validation on CUDA


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["merged", "split", "swap"])
@pytest.mark.parametrize("arch", ["bert", "bert-mlm", "gpt2", "llama"])
@pytest.mark.cuda
@pytest.mark.skipif(not ORT_CUDA, reason=ORT_REASON)
def test_export_validates_on_cuda(make_extension, export_cache, tmp_path, arch, mode, dtype):
    from embdeploy.export import export_extension

    ext = make_extension(arch)
    res = export_extension(ext, mode, tmp_path / "out", cache_dir=export_cache, dtype=dtype, provider="cuda")
    report = res.report
    assert report.passed and report.provider == "cuda" and report.dtype == ("float16" if dtype == "fp16" else "float32")
    # every output was compared, on probes that include the new ids
    assert {c.output for c in report.checks} == set(res.manifest.outputs)
    assert report.max_abs_diff > 0  # a real device computation, not the CPU numbers again


@pytest.mark.cuda
@pytest.mark.skipif(not ORT_CUDA, reason=ORT_REASON)
def test_corrupted_table_fails_validation_on_cuda(make_extension, export_cache, tmp_path):
    from test_validate import _corrupt_extension_rows, _redigest

    from embdeploy.export import export_extension
    from embdeploy.export.validate import validate

    ext = make_extension("llama")
    out = export_extension(ext, "split", tmp_path / "split", cache_dir=export_cache, provider="cuda").out
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    _corrupt_extension_rows(bad)
    _redigest(bad, "extension.onnx.data")
    with pytest.raises(ValidationFailed) as info:
        validate(bad, ext, provider="cuda")
    assert info.value.report.provider == "cuda"
    assert {"new tokens (text)", "new ids (direct)"} <= {c.probe for c in info.value.report.checks if not c.ok}
    assert validate(out, ext, provider="cuda").passed


# --------------------------------------------------------------------------- runtime on the device


@pytest.mark.cuda
@pytest.mark.skipif(not ORT_CUDA, reason=ORT_REASON)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_session_on_cuda_matches_torch_and_swaps(make_extension, export_cache, tmp_path, dtype):
    from embdeploy.export import export_extension
    from embdeploy.export.validate import tolerance_for
    from embdeploy.export.wrapper import task_outputs
    from embdeploy.runtime import Session

    ext_a = make_extension("bert", seed=0)
    ext_b = make_extension("bert", tokens=["zorblax", "qwertyx"], seed=0)  # same base, K=2 instead of 4
    with torch.no_grad():  # B's rows far from A's, so a wrong table cannot pass for the right one
        for p in ext_b.embed_tables.values():
            p.add_(3.0)
    dir_b = ext_b.save(tmp_path / "ext-b")
    out = export_extension(ext_a, "swap", tmp_path / "swap", cache_dir=export_cache, dtype=dtype, provider="cuda").out
    tol = tolerance_for("float16" if dtype == "fp16" else "float32", "cuda")

    def assert_close(got, want):
        # The validation gate's own terms: per token, cosine and max |diff| (fp16 loses precision by design).
        cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
        assert cos.min() >= tol.min_cosine, cos.min()
        assert np.abs(got - want).max() <= tol.atol + tol.rtol * np.abs(want).max()

    def reference(ext, enc):
        inputs = {k: torch.from_numpy(v) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            return task_outputs(ext.model, "feature-extraction", None, inputs)["last_hidden_state"].numpy()

    for io_binding in (False, True):
        sess = Session(out, providers="cuda", io_binding=io_binding)
        assert sess.providers[0] == "CUDAExecutionProvider"
        enc = sess.tokenize(TEXTS)
        assert (enc["input_ids"] >= ext_a.V).any()
        got = sess.encode(TEXTS)["last_hidden_state"].astype(np.float32)
        mask = enc["attention_mask"].astype(bool)
        assert_close(got[mask], reference(ext_a, enc)[mask])
        sess.swap_extension(dir_b)
        enc_b = sess.tokenize(TEXTS)
        got_b = sess.encode(TEXTS)["last_hidden_state"].astype(np.float32)
        mask_b = enc_b["attention_mask"].astype(bool)
        assert_close(got_b[mask_b], reference(ext_b, enc_b)[mask_b])
        if io_binding:
            values = sess.encode(TEXTS[:2], device_outputs=True)
            assert values["last_hidden_state"].device_name().lower() == "cuda"


# --------------------------------------------------------------------------- bench on CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not ORT_CUDA, reason=ORT_REASON)
def test_bench_times_cuda_with_io_binding_and_reports_gpu_memory(tmp_path):
    from test_bench import write_export

    from embdeploy.bench import run_bench, write_markdown

    base = write_export(tmp_path / "base", "base")
    dirs = [write_export(tmp_path / m, m, base_dir=base) for m in ("merged", "split", "swap")]
    result = run_bench(dirs, base_dir=base, shapes=((1, 8), (4, 32)), providers="cuda", rounds=10, warmup=2,
                       sessions=3)
    assert not [s for s in result.skipped if s.what == "cuda"], result.skipped
    rows = [r for r in result.latency if r.provider == "cuda"]
    assert {(r.shape, r.variant) for r in rows} >= {(s, v) for s in ("1x8", "4x32") for v in ("merged", "split", "swap")}
    for r in rows:
        assert 0 < r.p50_ms <= r.p99_ms and np.isfinite(r.ratio_to_base)
    costs = [c for c in result.sessions if c.provider == "cuda"]
    assert len(costs) == 4
    if shutil.which("nvidia-smi"):
        assert all(c.gpu_mb is not None and c.gpu_mb > 0 for c in costs), costs
    multi = [m for m in result.multi if m.provider == "cuda"]
    cuda_skips = [s for s in result.skipped if s.what.startswith("cuda:")]
    assert len(multi) + len(cuda_skips) == 2
    assert any(m.config == "cuda: swap" for m in multi) and any(m.config == "cuda: merged" for m in multi)
    assert result.machine["gpu"]
    md = write_markdown(result, tmp_path / "bench.md").read_text()
    assert "## Latency (cuda)" in md and "On the GPU" in md


# --------------------------------------------------------------------------- training on the GPU


@pytest.mark.cuda
@pytest.mark.skipif(not TORCH_CUDA, reason=TORCH_REASON)
def test_distill_on_cuda_learns_what_cpu_learns(make_extension):
    from embdeploy.train import train

    texts = [f"the {t} level was {n}" for t in ("troponin", "hyperkalemia", "zorblax", "qwertyx") for n in range(6)]
    runs = {}
    for device in ("cpu", "cuda"):
        ext = make_extension("bert")
        init = ext.embed_table().clone()
        rec = train(ext, texts, steps=30, batch_size=8, device=device, progress=False, eval_texts=texts[:8])
        assert rec.device == ("cuda:0" if device == "cuda" else "cpu")
        assert ext.embed_table().device.type == "cpu"  # moved back after the run
        ext.verify_base()
        assert rec.eval_after is not None
        runs[device] = (init, ext.embed_table().clone(), rec)
    init, cpu_rows, cpu_rec = runs["cpu"]
    _, gpu_rows, gpu_rec = runs["cuda"]
    moved = (cpu_rows - init).norm()
    assert moved > 0
    assert (gpu_rows - cpu_rows).norm() < 0.1 * moved  # the same training, up to float rounding
    assert gpu_rec.final_loss == pytest.approx(cpu_rec.final_loss, rel=0.05)


@pytest.mark.cuda
@pytest.mark.skipif(not TORCH_CUDA, reason=TORCH_REASON)
@pytest.mark.parametrize("arch,objective", [("bert-mlm", "mlm"), ("gpt2", "clm"), ("llama", "distill")])
def test_lm_objectives_on_cuda(make_extension, arch, objective):
    from embdeploy.train import train

    ext = make_extension(arch)
    before = ext.embed_table().clone()
    texts = [f"the {t} level was {n}" for t in ("troponin", "hyperkalemia", "zorblax", "qwertyx") for n in range(4)]
    rec = train(ext, texts, objective=objective, steps=5, batch_size=4, device="cuda", progress=False)
    assert rec.device == "cuda:0" and np.isfinite(rec.final_loss)
    assert not torch.equal(before, ext.embed_table())
    ext.verify_base()
