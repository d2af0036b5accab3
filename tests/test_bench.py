"""embdeploy.bench on hand-written graphs: a Gather on a (V, H) table, then a MatMul.

Timing assertions use wide bands only (a model against an identical copy within
0.5-2x); the numbers themselves belong in perf/ reports.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from embdeploy.bench import (
    BenchResult, LatencyRow, VariantInfo, check_baseline, parse_shapes, render_memory_table, render_table,
    run_bench, save_baseline, write_markdown, write_plot,
)
from embdeploy.bench import memory
from embdeploy.bench.artifacts import load_artifact, resolve_artifacts
from embdeploy.bench.inputs import BASE_MIX, NEW_MIX, token_ids
from embdeploy.bench.sessions import cuda_unavailable_reason
from embdeploy.errors import EmbdeployError, RegressionDetected
from embdeploy.export.manifest import ExportManifest

V, K, H = 4096, 64, 64  # a 1 MiB base table: big enough for memory to show, small enough to be quick
SHAPES = ((1, 4), (2, 8))
PROVIDERS_HERE = ("cpu",) if cuda_unavailable_reason() else ("cpu", "cuda")  # what the `result` run can time

SIGNATURE = """
<ir_version: 8, opset_import: ["" : 17]>
g (int64[B, S] input_ids, int64[B, S] attention_mask) => (float[B, S, {H}] last_hidden_state)
"""
BODY = {
    "base": "emb = Gather(word_embeddings, input_ids)",
    "merged": "emb = Gather(word_embeddings, input_ids)",
    "split": """
        table = Concat<axis=0>(word_embeddings, embdeploy_ext_embed)
        emb = Gather(table, input_ids)""",
    "swap": """
        is_base = Less(input_ids, v)
        base_ids = Clip(input_ids, zero, v_last)
        shifted = Sub(input_ids, v)
        ext_ids = Clip(shifted, zero, k_last)
        base_rows = Gather(word_embeddings, base_ids)
        ext_rows = Gather(embdeploy_ext_embed, ext_ids)
        cond = Unsqueeze(is_base, last_axis)
        emb = Where(cond, base_rows, ext_rows)""",
}


def write_export(out: Path, mode: str, external: bool = True, base_dir: Path | None = None, seed: int = 0,
                 H: int = H, rows: int = V) -> Path:
    """An export directory as `embdeploy export` writes it: model.onnx (+ data) and embdeploy.json."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((rows, H), dtype=np.float32)
    ext = rng.standard_normal((K, H), dtype=np.float32)
    text = SIGNATURE.format(H=H) + "{" + BODY[mode] + "\n last_hidden_state = MatMul(emb, w)\n}"
    model = onnx.parser.parse_model(text)
    inits = {"w": rng.standard_normal((H, H), dtype=np.float32)}
    if mode == "merged":
        inits["word_embeddings"] = np.concatenate([table, ext])
    else:
        inits["word_embeddings"] = table
    if mode in ("split", "swap"):
        inits["embdeploy_ext_embed"] = ext
    if mode == "swap":
        inits.update(v=np.array(rows), zero=np.array(0), v_last=np.array(rows - 1), k_last=np.array(K - 1),
                     last_axis=np.array([-1]))
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(a), name) for name, a in inits.items())
    if mode == "swap":  # as rewrite_swap declares it: an overridable initializer, so a table can be fed per run
        model.graph.input.append(onnx.helper.make_tensor_value_info("embdeploy_ext_embed", onnx.TensorProto.FLOAT,
                                                                    ["ext_rows", H]))
    onnx.checker.check_model(model)
    out.mkdir(parents=True)
    if external:
        onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                        size_threshold=1024, all_tensors_to_one_file=True)
    else:
        onnx.save_model(model, str(out / "model.onnx"))
    extended = mode != "base"
    ExportManifest(
        mode=mode, task="feature-extraction", V=rows, K=K if extended else 0, H=H, dtype="float32",
        inputs=("input_ids", "attention_mask"), input_roles={"input_ids": "input_ids", "attention_mask": "attention_mask"},
        outputs=("last_hidden_state",), files={}, base_fingerprint={"embed": "sha256:" + "0" * 64, "head": None},
        tokens=tuple(f"tok{j}" for j in range(K)) if extended else (),
        extension_initializers={"embed": "embdeploy_ext_embed" if mode in ("split", "swap") else None, "head": None},
        base_onnx=str(base_dir) if base_dir else None,
        extension_fingerprint="sha256:" + "1" * 64 if extended else None,
        base_model={"ref": "synthetic"} if extended else None,
    ).with_files(out).write(out)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    base = write_export(root / "base", "base")
    dirs = {"base": base, "copy": root / "copy"}
    shutil.copytree(base, dirs["copy"])
    for mode in ("merged", "split", "swap"):
        dirs[mode] = write_export(root / mode, mode, base_dir=base)
    return dirs


@pytest.fixture(scope="module")
def result(exports):
    """One short run with everything on: both providers asked for, memory, and 2 sessions."""
    return run_bench([exports["copy"], exports["merged"], exports["split"], exports["swap"]],
                     base_dir=exports["base"], shapes=SHAPES, providers=("cpu", "cuda"), rounds=9, warmup=1,
                     sessions=2)


# --------------------------------------------------------------------------- the run


def test_every_variant_shape_and_mix_is_timed(result):
    keys = {(r.provider, r.shape, r.variant, r.mix) for r in result.latency}
    expected = set()
    for provider in PROVIDERS_HERE:
        for shape in ("1x4", "2x8"):
            expected |= {(provider, shape, "base", BASE_MIX), (provider, shape, "base:copy", BASE_MIX)}
            for variant in ("merged", "split", "swap"):
                expected |= {(provider, shape, variant, BASE_MIX), (provider, shape, variant, NEW_MIX)}
    assert keys == expected
    assert [v.label for v in result.variants] == ["base:copy", "merged", "split", "swap"]
    for r in result.latency:
        assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms
        assert r.throughput_seq_s > 0 and r.calls >= 3
        assert r.ratio_q25 <= r.ratio_to_base <= r.ratio_q75


def test_base_ratio_is_one_and_identical_copy_is_close(result):
    for r in result.latency:
        if r.variant == "base":
            assert r.ratio_to_base == 1.0
        if r.variant == "base:copy":
            assert 0.5 < r.ratio_to_base < 2.0, r


def test_settings_record_threads_and_method(result):
    s = result.settings
    assert s["threads"] == 1 and s["inter_op_threads"] == 1 and s["execution_mode"] == "sequential"
    assert s["rounds"] == 9 and s["shapes"] == ["1x4", "2x8"]
    assert set(s["inner"]) == {f"{p}/{shape}" for p in PROVIDERS_HERE for shape in ("1x4", "2x8")}
    assert result.machine["onnxruntime"]


def test_result_round_trips_through_json(result):
    again = BenchResult.from_json(result.to_json())
    assert again == result
    assert json.loads(result.to_json())["kind"] == "embdeploy-bench"


def test_cuda_skipped_with_reason_when_unavailable(result):
    if cuda_unavailable_reason() is None:
        pytest.skip("CUDA is available here; the skip path cannot be shown")
    assert not any(r.provider == "cuda" for r in result.latency)
    [skip] = [s for s in result.skipped if s.what == "cuda"]
    assert "CUDAExecutionProvider" in skip.reason and "embdeploy[gpu]" in skip.reason


def test_session_cost_is_measured_per_variant_in_a_child(result):
    cpu = [c for c in result.sessions if c.provider == "cpu"]
    assert [c.variant for c in cpu] == ["base", "base:copy", "merged", "split", "swap"]
    for c in cpu:
        assert c.create_s > 0 and c.peak_mb > 0 and c.rss_mb > 0
        assert c.gpu_mb is None
    # split folds Concat(base, ext) into a private (V+K, H) table; the others map the file.
    split = next(c for c in cpu if c.variant == "split")
    merged = next(c for c in cpu if c.variant == "merged")
    assert split.private_mb > merged.private_mb + 0.5 * (V + K) * H * 4 / 2**20


def test_n_swap_sessions_share_one_base(result):
    rows = {r.config: r for r in result.multi if r.provider == "cpu"}
    assert set(rows) == {"swap", "merged", "swap (no prepacking)", "merged (no prepacking)"}
    swap, merged = rows["swap"], rows["merged"]
    assert swap.n == merged.n == 2
    assert swap.tables_mb == pytest.approx(2 * K * H * 4 / 2**20)
    assert merged.tables_mb == pytest.approx(2 * (V + K) * H * 4 / 2**20)
    assert swap.shared_mb == pytest.approx(V * H * 4 / 2**20)
    assert swap.footprint_mb > 0 and merged.footprint_mb > 0
    assert swap.sharing == "mmap of the external data file"


def test_n_swap_sessions_cost_one_base_table_n_merged_cost_n(tmp_path):
    wide = 512  # an 8 MiB base table, so copies of it stand out from session overhead
    base = write_export(tmp_path / "base", "base", H=wide)
    swap = memory.multi_session(load_artifact(write_export(tmp_path / "swap", "swap", base_dir=base, H=wide)),
                                n=3, threads=1, prepacking=True)
    merged = memory.multi_session(load_artifact(write_export(tmp_path / "merged", "merged", base_dir=base, H=wide)),
                                  n=3, threads=1, prepacking=True)
    table_mb = V * wide * 4 / 2**20
    assert swap.sharing == "mmap of the external data file"
    assert swap.private_mb < table_mb  # no private copy of the base in any of the 3 sessions
    assert swap.mapped_mb >= table_mb  # the base, mapped once
    assert merged.footprint_mb > swap.footprint_mb + 1.5 * table_mb


def test_multi_session_with_embedded_base_hands_sessions_one_ortvalue(tmp_path):
    base = write_export(tmp_path / "base", "base", external=False)
    swap = write_export(tmp_path / "swap", "swap", external=False, base_dir=base)
    row = memory.multi_session(load_artifact(swap), n=2, threads=1, prepacking=True)
    assert row.sharing.startswith("one OrtValue for all sessions")
    assert row.mapped_mb == 0 and row.footprint_mb > 0


def test_session_cost_child_reports_positive_numbers(exports):
    cost = memory.session_cost(load_artifact(exports["merged"]), "merged", "cpu", threads=1)
    assert cost.create_s > 0 and cost.peak_mb > 0 and cost.rss_mb > 0 and cost.mapped_mb >= 0


# --------------------------------------------------------------------------- reports


def test_markdown_and_plot_are_written(result, tmp_path):
    md = write_markdown(result, tmp_path / "r" / "bench.md").read_text()
    assert "## Latency (cpu)" in md and "| 2x8 | swap | new-ids |" in md
    assert "## 2 sessions in one process" in md and ("## Skipped" in md) == bool(result.skipped)
    png = write_plot(result, tmp_path / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_rich_tables_render(result):
    from rich.console import Console

    console = Console(record=True, width=200)
    table = render_table(result)
    assert table.row_count == len(result.latency)
    console.print(table)
    console.print(render_memory_table(result))
    text = console.export_text()
    assert "ratio to base" in text and "swap" in text and "mmap of the external data file" in text


# --------------------------------------------------------------------------- the gate


def _result(ratios: dict[tuple[str, str], float], threads: int = 1) -> BenchResult:
    info = VariantInfo(label="base", mode="base", path="/x/base", V=V, K=0, H=H)
    rows = [
        LatencyRow(provider="cpu", shape=shape, variant=variant, mode=variant, mix=BASE_MIX, p50_ms=1.0, p90_ms=1.0,
                   p99_ms=1.0, mean_ms=1.0, throughput_seq_s=1.0, ratio_to_base=ratio, ratio_q25=ratio,
                   ratio_q75=ratio, calls=3)
        for (variant, shape), ratio in ratios.items()
    ]
    return BenchResult(settings={"threads": threads}, machine={}, base=info, variants=[], latency=rows)


def _baseline(path: Path, ratios: dict[tuple[str, str], float], threads: int = 1) -> Path:
    doc = {"kind": "embdeploy-bench-baseline", "format_version": 1, "threads": threads,
           "ratios": [{"provider": "cpu", "shape": s, "variant": v, "mix": BASE_MIX, "ratio": r}
                      for (v, s), r in ratios.items()]}
    path.write_text(json.dumps(doc))
    return path


def test_gate_passes_within_margin(tmp_path):
    baseline = _baseline(tmp_path / "b.json", {("swap", "1x16"): 1.00, ("merged", "1x16"): 1.00})
    comparisons = check_baseline(_result({("swap", "1x16"): 1.04, ("merged", "1x16"): 0.90}), baseline, 0.05)
    assert len(comparisons) == 2 and not any(c.regressed for c in comparisons)


def test_gate_raises_listing_every_regression(tmp_path):
    baseline = _baseline(tmp_path / "b.json", {("swap", "1x16"): 0.50, ("swap", "8x128"): 0.60,
                                               ("merged", "1x16"): 1.00})
    current = _result({("swap", "1x16"): 1.00, ("swap", "8x128"): 1.00, ("merged", "1x16"): 1.01})
    with pytest.raises(RegressionDetected) as err:
        check_baseline(current, baseline, 0.05)
    msg = str(err.value)
    assert "2 of 3 ratios regressed by more than 5%" in msg
    assert "swap base-ids 1x16 on cpu: ratio 1.000 vs baseline 0.500 (+100.0%" in msg
    assert "swap base-ids 8x128" in msg and "merged" not in msg.split("\n", 1)[1].split("fix the")[0]
    assert "--save-baseline" in msg
    assert err.value.exit_code == 4 and isinstance(err.value, EmbdeployError)


def test_saved_baseline_gates_its_own_run(result, tmp_path):
    path = save_baseline(result, tmp_path / "baselines" / "cpu.json")
    comparisons = check_baseline(result, path, 0.0)
    assert len(comparisons) == len([r for r in result.latency if r.variant != "base"])


@pytest.mark.parametrize("doc, needle", [
    (None, "does not exist; create it with --save-baseline"),
    ("not json", "is not valid JSON"),
    ({"kind": "other"}, "is not an embdeploy bench baseline"),
])
def test_gate_refuses_bad_baseline_files(tmp_path, doc, needle):
    path = tmp_path / "b.json"
    if doc is not None:
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(EmbdeployError, match=needle):
        check_baseline(_result({("swap", "1x16"): 1.0}), path, 0.05)


def test_gate_refuses_other_threads_and_disjoint_keys(tmp_path):
    baseline = _baseline(tmp_path / "b.json", {("swap", "1x16"): 1.0}, threads=2)
    with pytest.raises(EmbdeployError, match=r"measured with 2 intra-op thread\(s\), this run with 1.*--threads 2"):
        check_baseline(_result({("swap", "1x16"): 1.0}), baseline, 0.05)
    baseline = _baseline(tmp_path / "c.json", {("swap", "8x128"): 1.0})
    with pytest.raises(EmbdeployError, match="nothing to compare"):
        check_baseline(_result({("swap", "1x16"): 1.0}), baseline, 0.05)


# --------------------------------------------------------------------------- bad input


def test_directory_without_manifest_is_refused(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(EmbdeployError, match="has no embdeploy.json.*written by `embdeploy export`"):
        run_bench([tmp_path])
    with pytest.raises(EmbdeployError, match="does not exist"):
        run_bench([tmp_path / "nope"])


def test_missing_base_is_refused_with_the_fix(exports, tmp_path):
    lonely = write_export(tmp_path / "swap", "swap")  # records no base_onnx
    with pytest.raises(EmbdeployError, match="no base to compare against.*pass --base DIR"):
        run_bench([lonely])
    gone = write_export(tmp_path / "swap2", "swap", base_dir=tmp_path / "deleted")
    with pytest.raises(EmbdeployError, match="deleted, which is missing.*pass --base DIR"):
        run_bench([gone])
    with pytest.raises(EmbdeployError, match="--base .* is a 'swap' export"):
        run_bench([exports["merged"]], base_dir=exports["swap"])


def test_recorded_base_is_found(exports):
    base, variants = resolve_artifacts([exports["swap"]])
    assert base.path == exports["base"].resolve() and [v.mode for v in variants] == ["swap"]


def test_broken_manifest_lists_every_problem(tmp_path):
    d = write_export(tmp_path / "x", "merged")
    meta = json.loads((d / "embdeploy.json").read_text())
    meta.update(mode="weird", V=-1, inputs=["attention_mask"])
    (d / "embdeploy.json").write_text(json.dumps(meta))
    with pytest.raises(EmbdeployError) as err:
        load_artifact(d)
    msg = str(err.value)
    assert "mode is 'weird'" in msg and "V is -1" in msg and "contains 'input_ids'" in msg


def test_mismatched_base_is_refused(exports, tmp_path):
    d = write_export(tmp_path / "x", "merged", rows=V + 1)
    with pytest.raises(EmbdeployError, match="do not extend this base"):
        run_bench([d], base_dir=exports["base"])


def test_bad_settings_are_refused_at_once(exports):
    with pytest.raises(EmbdeployError) as err:
        run_bench([exports["swap"]], threads=0, rounds=1, sessions=-1)
    msg = str(err.value)
    assert "threads=0" in msg and "rounds=1" in msg and "sessions=-1" in msg
    with pytest.raises(EmbdeployError, match="unknown provider 'tpu'"):
        run_bench([exports["swap"]], providers=("tpu",))


def test_parse_shapes():
    assert parse_shapes("1x16, 8X128") == ((1, 16), (8, 128))
    with pytest.raises(EmbdeployError, match="cannot read shapes 0x4, 16; write BATCHxSEQ"):
        parse_shapes("0x4,16")


def test_sessions_without_swap_export_are_skipped_with_reason(exports):
    r = run_bench([exports["merged"]], base_dir=exports["base"], shapes=((1, 4),), rounds=3, warmup=0,
                  memory_cost=False, sessions=2)
    assert r.multi == [] and "no swap export" in r.skipped[0].reason


# --------------------------------------------------------------------------- inputs


def test_token_mixes():
    base = token_ids(4, 32, V, K, BASE_MIX, 0.25, seed=1)
    assert base.max() < V
    new = token_ids(4, 32, V, K, NEW_MIX, 0.25, seed=1)
    is_new = new >= V
    assert is_new.sum() == 32 and new.max() == V + K - 1 and new[is_new].min() == V
    assert np.array_equal(token_ids(4, 32, V, K, NEW_MIX, 0.25, seed=1), new)


def test_gpu_memory_and_name_are_read_from_nvidia_smi(tmp_path, monkeypatch):
    import os

    from embdeploy.bench import procmem

    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f'  --query-compute-apps*) printf "{os.getpid()}, 700\\n12, 5000\\n{os.getpid()}, 80\\n" ;;\n'
        '  --query-gpu*) printf "NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04\\n" ;;\n'
        "esac\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert procmem.gpu_used_mb() == 780.0  # this process's two contexts, not the other process
    assert procmem.gpu_used_mb(pid=999_999) is None  # not seen: unknown, never 0
    assert procmem.gpu_description() == "NVIDIA H100 80GB HBM3, 81559 MiB, driver 580.159.04"
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert procmem.gpu_used_mb() is None and procmem.gpu_description() is None


def test_an_export_is_also_timed_against_its_own_base_of_another_precision(tmp_path):
    """An int8 export benched against the fp32 base: its own (int8) base joins the same rounds, and the run reports
    the export against it too (what the extension costs there); a base of the same precision adds nothing."""
    import dataclasses

    fp32 = write_export(tmp_path / "fp32-base", "base")
    own = write_export(tmp_path / "int8-base", "base", seed=1)
    m = ExportManifest.read(own)
    dataclasses.replace(m, quantization={"precision": "int8"}).write(own)
    variant = write_export(tmp_path / "int8-merged", "merged", base_dir=own, seed=1)
    same = write_export(tmp_path / "fp32-merged", "merged", base_dir=write_export(tmp_path / "copy", "base"))
    res = run_bench([variant, same], base_dir=fp32, shapes=((1, 4),), rounds=3, warmup=0, memory_cost=False)
    labels = {v.label: Path(v.path) for v in res.variants}
    assert own.resolve() in labels.values() and (tmp_path / "copy").resolve() not in labels.values()
    own_label = next(k for k, p in labels.items() if p == own.resolve())
    variant_label = next(k for k, p in labels.items() if p == variant.resolve())
    refs = {(r.variant, r.mix): r for r in res.references}
    assert set(refs) == {(variant_label, BASE_MIX), (variant_label, NEW_MIX)}
    assert all(r.reference == own_label and r.ratio > 0 and r.ratio_q25 <= r.ratio <= r.ratio_q75 for r in refs.values())
    again = type(res).from_json(res.to_json())
    assert again.references == res.references
    from embdeploy.bench.report import markdown

    assert "Against each export's own base" in markdown(res)


def test_the_result_records_each_exports_size_and_precision(exports, result):
    sizes = {v.label: v.size_mb for v in [result.base, *result.variants]}
    on_disk = sum(p.stat().st_size for p in exports["base"].rglob("*") if p.is_file() and p.name != "embdeploy.json")
    assert abs(sizes["base"] - on_disk / 1e6) < 0.01
    assert all(v.precision == "float32" for v in result.variants)
    from embdeploy.bench.report import markdown

    assert f"{result.base.size_mb:.1f} MB on disk" in markdown(result)
