"""perf/bench_optimum.py still runs end to end (on a tiny model, a few rounds). No timing is asserted:
the numbers belong in perf/results/, made on MiniLM with the full settings."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from conftest import ROOT


def test_bench_optimum_runs_and_reports_every_variant(model_dirs, tmp_path):
    cmd = [sys.executable, str(ROOT / "perf" / "bench_optimum.py"), "--model", str(model_dirs["bert"]), "--K", "4",
           "--shapes", "1x8,2x8", "--rounds", "3", "--no-memory", "--work", str(tmp_path / "work"),
           "--out", str(tmp_path / "out")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "optimum-vs-embdeploy-cpu.json").read_text())
    labels = [v["label"] for v in data["variants"]]
    assert labels == ["base:embdeploy-base", "merged:embdeploy-merged", "split", "swap", "merged:optimum-merged"]
    assert data["base"]["path"].endswith("optimum-base") and data["settings"]["threads"] == 1
    rows = {(r["variant"], r["mix"], r["shape"]) for r in data["latency"]}
    for shape in ("1x8", "2x8"):
        assert ("base", "base-ids", shape) in rows and ("base:embdeploy-base", "base-ids", shape) in rows
        for label in labels[1:]:
            assert {(label, "base-ids", shape), (label, "new-ids", shape)} <= rows
    assert all(math.isfinite(r["ratio_to_base"]) and r["ratio_to_base"] > 0 for r in data["latency"])
    assert data["bases_max_abs_diff"] < 1e-4 and "perf/bench_optimum.py --model" in data["command"]
    md = (tmp_path / "out" / "optimum-vs-embdeploy-cpu.md").read_text()
    assert data["command"] in md and "p50 latency ratio to optimum's base export" in md
