"""bench: latency, throughput and session memory of base vs extended ONNX exports.

    result = run_bench(["out/swap", "out/merged"], base_dir="out/base")
    write_markdown(result, "bench.md"); write_plot(result, "bench.png")
    check_baseline(result, "perf/baselines/cpu.json", max_regression=0.05)

Timing is interleaved and reported as ratios to the base (DESIGN.md, idea 6).
"""

from .gate import Comparison, check_baseline, load_baseline, save_baseline
from .report import print_result, render_memory_table, render_table, write_markdown, write_plot
from .result import BenchResult, LatencyRow, MultiSessionRow, SessionCost, Skipped, VariantInfo
from .runner import DEFAULT_ROUNDS, DEFAULT_SHAPES, DEFAULT_WARMUP, parse_shapes, run_bench

__all__ = [
    "BenchResult", "Comparison", "LatencyRow", "MultiSessionRow", "SessionCost", "Skipped", "VariantInfo",
    "DEFAULT_ROUNDS", "DEFAULT_SHAPES", "DEFAULT_WARMUP",
    "check_baseline", "load_baseline", "parse_shapes", "print_result", "render_memory_table", "render_table", "run_bench",
    "save_baseline", "write_markdown", "write_plot",
]
