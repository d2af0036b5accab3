"""Latency regression gate: a short interleaved bench on small synthetic exports.

    python -m pytest perf/test_latency_gate.py            # check against the committed baseline
    EMBDEPLOY_UPDATE_BASELINE=1 python -m pytest perf/test_latency_gate.py   # re-record it

The exports are built with the real rewrites (embdeploy.onnx.rewrite), so a
rewrite that makes a mode slower relative to the base shows up here. Only
ratios to base are compared, with a margin (MAX_REGRESSION) far wider than the
±3% that an identical copy of the base moves between runs, so machine noise
does not fail it; a real slowdown of a mode's graph does.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from embdeploy.bench import check_baseline, run_bench, save_baseline
from synth_models import build_synthetic

BASELINE = Path(__file__).resolve().parent / "baselines" / "cpu-synthetic.json"
MAX_REGRESSION = 0.30
SHAPES = ((1, 16), (4, 64))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    dirs = build_synthetic(tmp_path_factory.mktemp("synthetic"), V=8192, K=512, H=256, layers=2)
    return run_bench([dirs["merged"], dirs["split"], dirs["swap"]], base_dir=dirs["base"], shapes=SHAPES,
                     threads=1, rounds=30, warmup=2, memory_cost=False)


def test_ratios_hold_against_committed_baseline(result):
    if os.environ.get("EMBDEPLOY_UPDATE_BASELINE") == "1":
        save_baseline(result, BASELINE)
        pytest.skip(f"baseline re-recorded at {BASELINE}; review and commit it")
    comparisons = check_baseline(result, BASELINE, MAX_REGRESSION)  # raises RegressionDetected, listing each
    assert {c.variant for c in comparisons} == {"merged", "split", "swap"}
    assert len(comparisons) == 2 * 3 * len(SHAPES)


def test_merged_and_split_are_as_fast_as_base(result):
    # ORT folds split's Concat at load, so merged and split run the same graph as the base.
    for r in result.latency:
        if r.variant in ("merged", "split"):
            assert 0.75 < r.ratio_to_base < 1.33, r
