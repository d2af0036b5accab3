"""`embdeploy quickstart`, the README's main command, run as a user runs it (fewer
training steps and bench rounds, so CI stays short; the stages are the same)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def quickstart(workdir, *extra):
    p = subprocess.run(
        [sys.executable, "-m", "embdeploy", "quickstart", "--workdir", str(workdir), "--steps", "30",
         "--bench-rounds", "3", *extra],
        capture_output=True, text=True, timeout=900,
        env={**_env(), "EMBDEPLOY_CACHE": str(workdir.parent / "cache")},  # the shared cache, kept out of $HOME
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def _env():
    import os

    return dict(os.environ, COLUMNS="200", HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("qs") / "work"
    return wd, quickstart(wd)


def test_every_stage_runs_and_the_summary_reports_it(first_run):
    wd, text = first_run
    for n, stage in enumerate(("suggest", "extend", "train", "export", "validation", "benchmark", "summary"), 1):
        assert re.search(rf"\b{n}/7\b.*{stage}", text), f"stage {n} ({stage}) missing"
    assert re.search(r"tokens saved .*cumulative", text) and "corpus tokens" in text  # suggest's table and summary
    assert re.search(r"tokens added\W+50\b", text)
    before, after = map(float, re.search(r"before training (\d\.\d+) / .*after (\d\.\d+) /", text).groups())
    assert after > before  # 30 steps already help
    for mode in ("merged", "split", "swap"):
        line = next(ln for ln in text.splitlines() if re.match(rf"\W*{mode}\W+max abs diff .*latency ratio", ln))
        diff = float(re.search(r"max abs diff (\S+);", line).group(1))
        assert 0 <= diff < 1e-3
        assert re.search(r"1x16 \d\.\d{3}, 1x128 \d\.\d{3}, 8x128 \d\.\d{3}", line)
        manifest = json.loads((wd / f"onnx-{mode}" / "embdeploy.json").read_text())
        assert manifest["mode"] == mode and manifest["validation"]["passed"]
    png = (wd / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    bench = json.loads((wd / "bench.json").read_text())
    assert {v["mode"] for v in bench["variants"]} == {"merged", "split", "swap"}
    # the value line: what the extension buys on the held-out texts, as the bench measured it
    m = re.search(r"on the held-out texts \(merged\)\W+(\d+)% fewer tokens, end-to-end latency ratio (\d\.\d+) at batch 1"
                  r".*fidelity (\d\.\d+) \(min (\d\.\d+)\)", " ".join(text.split()))
    assert m, "summary line on the held-out texts missing"
    merged = next(r for r in bench["texts"] if r["variant"] == "merged")
    assert int(m.group(1)) == round(100 * merged["token_reduction"]) and merged["token_reduction"] > 0.05
    assert float(m.group(3)) == pytest.approx(merged["fidelity_mean"], abs=6e-4)


def test_a_rerun_reuses_what_is_there(first_run):
    wd, _ = first_run
    stamps = {p: p.stat().st_mtime_ns for p in wd.glob("onnx-*/model.onnx")}
    stamps.update({p: p.stat().st_mtime_ns for p in wd.glob("extension*/extension.json")})
    text = quickstart(wd)
    for what in ("extension", "extension-trained", "onnx-merged", "onnx-split", "onnx-swap"):
        assert re.search(rf"reusing \S*{what}\b", text.replace("\n", " ")), f"{what} not reused"
    assert len(stamps) == 5
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # nothing rewritten
