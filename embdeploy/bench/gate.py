"""The regression gate: ratios to base compared with a committed baseline.

Ratios, not times: a baseline saved on one machine still holds on another,
because the base is timed in the same rounds as the variant. The thread count
changes ratios, so a baseline only gates runs with the same threads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import EmbdeployError, RegressionDetected
from ..jsonfile import read_versioned
from .result import BenchResult

BASELINE_KIND = "embdeploy-bench-baseline"
BASELINE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Comparison:
    provider: str
    shape: str
    variant: str
    mix: str
    baseline: float  # ratio to base in the baseline
    current: float  # ratio to base in this run
    limit: float  # baseline * (1 + max_regression)

    @property
    def change(self) -> float:
        """Relative change of the ratio: +0.10 is 10% slower relative to base than the baseline."""
        return self.current / self.baseline - 1.0

    @property
    def regressed(self) -> bool:
        return self.current > self.limit

    def describe(self) -> str:
        return (f"{self.variant} {self.mix} {self.shape} on {self.provider}: ratio {self.current:.3f} vs baseline "
                f"{self.baseline:.3f} ({self.change:+.1%}, limit {self.limit:.3f})")


def save_baseline(result: BenchResult, path) -> Path:
    """Write the run's ratios to `path` (JSON, meant to be committed)."""
    path = Path(path)
    ratios = [
        {"provider": r.provider, "shape": r.shape, "variant": r.variant, "mode": r.mode, "mix": r.mix,
         "ratio": r.ratio_to_base, "ratio_q25": r.ratio_q25, "ratio_q75": r.ratio_q75}
        for r in result.latency if r.variant != "base"
    ]
    if not ratios:
        raise EmbdeployError("the run has no variant ratios to save; benchmark at least one export besides the base")
    doc = {
        "kind": BASELINE_KIND, "format_version": BASELINE_FORMAT_VERSION,
        "threads": result.settings.get("threads"), "rounds": result.settings.get("rounds"),
        "machine": {k: result.machine.get(k) for k in ("cpu", "onnxruntime", "date")},
        "ratios": ratios,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")
    except OSError as e:
        raise EmbdeployError(f"cannot write the baseline {path}: {e.strerror}; choose a writable path") from None
    return path


def load_baseline(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EmbdeployError(f"baseline {path} does not exist; create it with --save-baseline {path} on a trusted run")
    doc = read_versioned(path, kind=BASELINE_KIND, what="an embdeploy bench baseline",
                         fix="re-create it with --save-baseline", versions=(BASELINE_FORMAT_VERSION,))
    if not isinstance(doc.get("ratios"), list):
        raise EmbdeployError(f"{path} is not an embdeploy bench baseline (it has no 'ratios' list); "
                             "re-create it with --save-baseline")
    return doc


def check_baseline(result: BenchResult, path, max_regression: float = 0.05) -> list[Comparison]:
    """Compare every ratio present in both the run and the baseline.

    Returns all comparisons; raises RegressionDetected listing every one
    whose ratio exceeds baseline * (1 + max_regression).
    """
    if max_regression < 0:
        raise EmbdeployError(f"max_regression={max_regression}: use a non-negative fraction, e.g. 0.05 for 5%")
    doc = load_baseline(path)
    threads = result.settings.get("threads")
    if doc.get("threads") is not None and doc["threads"] != threads:
        raise EmbdeployError(
            f"baseline {path} was measured with {doc['threads']} intra-op thread(s), this run with {threads}; "
            f"ratios change with threads: re-run with --threads {doc['threads']} or save a new baseline"
        )
    current = {r.key: r for r in result.latency}
    comparisons = []
    for b in doc["ratios"]:
        try:
            key = (b["provider"], b["shape"], b["variant"], b["mix"])
            ratio = float(b["ratio"])
        except (KeyError, TypeError, ValueError):
            raise EmbdeployError(f"baseline {path} has a malformed entry {b!r}; re-create it with --save-baseline") from None
        if key in current:
            comparisons.append(Comparison(*key, baseline=ratio, current=current[key].ratio_to_base,
                                          limit=ratio * (1 + max_regression)))
    if not comparisons:
        have = sorted({f"{r.variant}/{r.shape}/{r.provider}" for r in result.latency if r.variant != "base"})
        want = sorted({f"{b.get('variant')}/{b.get('shape')}/{b.get('provider')}" for b in doc["ratios"]})
        raise EmbdeployError(
            f"nothing to compare: the baseline {path} has {', '.join(want)} but this run has {', '.join(have) or 'no variants'}; "
            "benchmark the same variants and shapes, or save a new baseline"
        )
    worse = [c for c in comparisons if c.regressed]
    if worse:
        lines = "\n".join(f"  - {c.describe()}" for c in worse)
        raise RegressionDetected(
            f"{len(worse)} of {len(comparisons)} ratios regressed by more than {max_regression:.0%} against {path}:\n{lines}\n"
            "fix the slowdown, or if it is intended, save a new baseline with --save-baseline"
        )
    return comparisons
