"""Interleaved latency rounds.

Why this shape of loop: on a shared machine the speed drifts by more than the
differences being measured. Every round runs every entry (the base included)
on the same inputs in a fresh random order, and the ratio to base is the
median over rounds of (entry time / base time of that round), so drift that
lasts longer than a round cancels out.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class Entry:
    key: tuple  # (label, mix)
    run: Callable[[], object]
    batch: int
    calls: list[float] = field(default_factory=list)  # seconds, one per call
    slots: list[float] = field(default_factory=list)  # seconds, one per round (median of its calls)


def calibrate_inner(run: Callable[[], object], min_slot_s: float, max_inner: int = 256) -> int:
    """Calls per round slot so that one slot lasts at least `min_slot_s` (short models read too coarsely otherwise)."""
    t = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        t.append(time.perf_counter() - t0)
    per_call = max(sorted(t)[1], 1e-7)
    return int(min(max_inner, max(1, math.ceil(min_slot_s / per_call))))


def run_rounds(entries: list[Entry], rounds: int, warmup: int, inner: int, seed: int) -> None:
    """Fill `calls` and `slots` of every entry. `warmup` untimed calls per entry first, in shuffled order too."""
    rng = random.Random(seed)
    order = list(range(len(entries)))
    for _ in range(warmup):
        rng.shuffle(order)
        for i in order:
            entries[i].run()
    perf = time.perf_counter
    for _ in range(rounds):
        rng.shuffle(order)
        for i in order:
            e = entries[i]
            start = len(e.calls)
            for _ in range(inner):
                t0 = perf()
                e.run()
                e.calls.append(perf() - t0)
            # The median, not the sum: a call that lost the CPU to another process does not decide the round.
            e.slots.append(float(np.median(e.calls[start:])))


def summarize(entry: Entry, base: Entry) -> dict:
    """Percentiles over calls, throughput over all timed calls, ratio over rounds."""
    calls = np.asarray(entry.calls)
    ratios = np.asarray(entry.slots) / np.asarray(base.slots)
    q25, q50, q75 = np.percentile(ratios, [25, 50, 75])
    return {
        "p50_ms": float(np.percentile(calls, 50) * 1e3),
        "p90_ms": float(np.percentile(calls, 90) * 1e3),
        "p99_ms": float(np.percentile(calls, 99) * 1e3),
        "mean_ms": float(calls.mean() * 1e3),
        "throughput_seq_s": float(entry.batch * calls.size / calls.sum()),
        "ratio_to_base": float(q50),
        "ratio_q25": float(q25),
        "ratio_q75": float(q75),
        "calls": int(calls.size),
    }
