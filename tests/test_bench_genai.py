"""embdeploy bench on genai exports: prefill and decode rows against the genai base, real onnxruntime-genai.

A tiny random Llama through the real builder (the export cache of the session), merged and swap. Timings
are only checked for sanity (positive, ratios within a wide band); what is checked exactly is what was
run: which rows, how many decode steps, that EOS does not cut a timed generation short.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (the genai extra)")

SHAPE = (1, 8)
NEW = 6
ROUNDS = 3


@pytest.fixture(scope="module")
def exports(make_extension, export_cache, tmp_path_factory):
    from embdeploy.export.genai import export_genai

    ext = make_extension("llama")
    d = tmp_path_factory.mktemp("bench-genai")
    merged = export_genai(ext, "merged", d / "merged", cache_dir=export_cache)
    swap = export_genai(ext, "swap", d / "swap", cache_dir=export_cache)
    return ext, merged, swap


@pytest.fixture(scope="module")
def result(exports):
    from embdeploy.bench import run_bench

    _, merged, swap = exports
    return run_bench([merged.out, swap.out], shapes=(SHAPE,), rounds=ROUNDS, warmup=0, new_tokens=NEW)


def test_rows_for_prefill_and_decode_of_every_variant_against_the_genai_base(exports, result):
    _, merged, _ = exports
    assert result.base.path == str(merged.base_onnx)
    got = {(r.shape, r.variant, r.mix) for r in result.latency}
    want = {(shape, v, mix) for shape in ("prefill:1x8", "decode:1x8+6")
            for v, mix in (("base", "base-ids"), ("merged", "base-ids"), ("merged", "new-ids"), ("swap", "base-ids"),
                           ("swap", "new-ids"))}
    assert got == want
    inner = result.settings["inner"]["cpu/prefill:1x8"]
    for r in result.latency:
        # every timed generation ran all NEW tokens: NEW - 1 decode steps per round, `inner` prefills per round
        assert r.calls == ROUNDS * ((NEW - 1) if r.shape.startswith("decode") else inner)
        assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms and r.throughput_seq_s > 0
        assert 0.2 < r.ratio_to_base < 5 and r.ratio_q25 <= r.ratio_to_base <= r.ratio_q75
    assert result.settings["shapes"] == ["prefill:1x8", "decode:1x8+6"]
    assert result.settings["genai"]["new_tokens"] == NEW
    assert any(s.what == "session memory" for s in result.skipped)


def test_result_reads_back_and_reports_like_other_runs(result, tmp_path):
    from embdeploy.bench import BenchResult, check_baseline, save_baseline, write_markdown

    again = BenchResult.from_json(result.to_json())
    assert [(r.shape, r.variant, r.mix, r.ratio_to_base) for r in again.latency] == \
           [(r.shape, r.variant, r.mix, r.ratio_to_base) for r in result.latency]
    md = write_markdown(result, tmp_path / "bench.md").read_text()
    assert "| decode:1x8+6 | swap | new-ids |" in md and "tokens/s" in md
    save_baseline(result, tmp_path / "baseline.json")
    comps = check_baseline(result, tmp_path / "baseline.json", 0.05)
    assert {c.shape for c in comps} == {"prefill:1x8", "decode:1x8+6"}


def test_timed_generation_runs_past_eos(exports):
    """A model whose first greedy token is its EOS: genai stops at once, the bench's generation does not."""
    from embdeploy.bench.genai import generation
    from embdeploy.export.validate_genai import genai_generate

    _, merged, _ = exports
    ids = np.arange(5, 5 + SHAPE[1], dtype=np.int32)
    first = genai_generate(og, og.Model(str(merged.out)), ids.tolist(), 1, {})[0]
    cfg = og.Config(str(merged.out))
    cfg.overlay(json.dumps({"model": {"eos_token_id": int(first)}}))
    model = og.Model(cfg)
    assert genai_generate(og, model, ids.tolist(), NEW, {}) == [first]  # EOS first: genai stops there
    pre, steps = generation(og, model, ids[None], {}, NEW, prefills=2)
    assert len(pre) == 2 and len(steps) == NEW - 1


def test_cli_bench_prints_genai_rows(exports):
    from typer.testing import CliRunner

    from embdeploy.cli import app

    _, merged, _ = exports
    r = CliRunner().invoke(app, ["bench", str(merged.out), "--shapes", "1x8", "--new-tokens", "3", "--rounds", "3",
                                 "--warmup", "0", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output[r.output.index("{"):])
    assert {row["shape"] for row in doc["latency"]} == {"prefill:1x8", "decode:1x8+3"}


def test_cuda_is_skipped_with_its_reason_when_genai_has_none(exports):
    from embdeploy.bench import run_bench

    if og.is_cuda_available():
        pytest.skip("this onnxruntime-genai has CUDA: the skip path is not taken")
    _, merged, _ = exports
    res = run_bench([merged.out], shapes=(SHAPE,), rounds=3, warmup=0, new_tokens=2, providers=("cpu", "cuda"))
    assert {r.provider for r in res.latency} == {"cpu"}
    assert any(s.what == "cuda" and "onnxruntime-genai-cuda" in s.reason for s in res.skipped)


def test_what_a_genai_run_cannot_measure_is_refused(exports, make_extension, export_cache, tmp_path):
    from embdeploy.bench import run_bench
    from embdeploy.errors import EmbdeployError
    from embdeploy.export import export_extension

    _, merged, swap = exports
    with pytest.raises(EmbdeployError, match=r"exceed the context of 128 tokens .*genai_config.json"):
        run_bench([merged.out], shapes=((1, 120),), rounds=3, new_tokens=16)
    with pytest.raises(EmbdeployError, match="drop --sessions"):
        run_bench([merged.out, swap.out], shapes=(SHAPE,), rounds=3, sessions=2)
    with pytest.raises(EmbdeployError, match="new_tokens=1"):
        run_bench([merged.out], shapes=(SHAPE,), rounds=3, new_tokens=1)
    onnx = export_extension(make_extension("llama"), "merged", tmp_path / "onnx", cache_dir=export_cache, validate=False)
    with pytest.raises(EmbdeployError, match="genai and ONNX exports in one run"):
        run_bench([merged.out, onnx.out], base_dir=merged.base_onnx, shapes=(SHAPE,), rounds=3)
