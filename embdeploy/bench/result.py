"""What a benchmark run produces: plain dataclasses that round-trip through JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

RESULT_FORMAT_VERSION = 1


def shape_name(shape) -> str:
    return f"{shape[0]}x{shape[1]}"


@dataclass
class VariantInfo:
    label: str  # "base", "merged", "swap", or mode:dirname when a mode repeats
    mode: str
    path: str
    V: int
    K: int
    H: int
    size_mb: float | None = None  # the export's files on disk (what embdeploy.json lists)
    precision: str | None = None  # float32 | float16 | int8


@dataclass
class LatencyRow:
    provider: str  # "cpu" | "cuda"
    shape: str  # "BxS"
    variant: str  # VariantInfo.label
    mode: str
    mix: str  # "base-ids" | "new-ids"
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput_seq_s: float
    ratio_to_base: float  # median over rounds of (this time / base time in the same round)
    ratio_q25: float
    ratio_q75: float
    calls: int

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.provider, self.shape, self.variant, self.mix)


@dataclass
class ReferenceRow:
    """A variant against another export timed in the same rounds: its own base, when that is not the base.

    An int8 export against the int8 base it was rewritten from is what the extension costs; the
    latency rows' ratio to the (fp32) base is what int8 buys.
    """

    provider: str
    shape: str
    variant: str
    mix: str
    reference: str  # the label of the reference export among the variants
    ratio: float  # median over rounds of (this time / the reference's time in the same round)
    ratio_q25: float
    ratio_q75: float


@dataclass
class SessionCost:
    """One session created alone in a fresh process."""

    provider: str
    variant: str
    mode: str
    create_s: float
    peak_mb: float  # high-water RSS during creation and a first run, above the process before creation
    rss_mb: float  # resident after creation and one run
    private_mb: float  # anonymous resident memory: copies the session owns
    mapped_mb: float  # the export's files memory-mapped (page cache, shareable)
    gpu_mb: float | None = None


@dataclass
class MultiSessionRow:
    """N sessions in one process, each with a different extension."""

    config: str  # "swap" | "merged", with " (no prepacking)" when MatMul prepacking was off
    mode: str
    n: int
    prepacking: bool
    sharing: str  # how the base table is shared: "mmap", "one OrtValue", "none (private table per session)"
    create_s: float
    rss_mb: float
    private_mb: float
    mapped_mb: float
    footprint_mb: float  # private + mapped once: resident size once every row has been used
    tables_mb: float  # the per-session tables the caller supplied, all N
    shared_mb: float  # the base table, counted once
    overhead_per_session_mb: float  # (footprint - tables - shared) / n
    provider: str = "cpu"
    gpu_mb: float | None = None  # CUDA: device memory the process holds with all N sessions (nvidia-smi)
    gpu_per_session_mb: float | None = None  # CUDA: (gpu_mb with N sessions - with 1) / (N - 1)


@dataclass
class TextRow:
    """One extended export on the user's texts against the base on the original tokenization."""

    variant: str
    mode: str
    texts: int
    tokens_total: int  # extended tokenization, special tokens included
    tokens_mean: float
    base_tokens_total: int
    base_tokens_mean: float
    token_reduction: float  # 1 - tokens_total / base_tokens_total
    fidelity_mean: float  # cosine per text, extended output vs base output on the original tokenization
    fidelity_min: float
    fidelity_output: str  # what was compared (see bench/texts.py)
    truncated: int = 0  # texts cut at the model's max length (extended tokenization)
    base_truncated: int = 0


@dataclass
class Skipped:
    what: str  # e.g. "cuda", "sessions"
    reason: str


@dataclass
class BenchResult:
    settings: dict
    machine: dict
    base: VariantInfo
    variants: list[VariantInfo]
    latency: list[LatencyRow] = field(default_factory=list)
    sessions: list[SessionCost] = field(default_factory=list)
    multi: list[MultiSessionRow] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    texts: list[TextRow] = field(default_factory=list)  # `bench --texts`: tokens and fidelity per variant
    references: list[ReferenceRow] = field(default_factory=list)  # variants against their own base (see ReferenceRow)
    format_version: int = RESULT_FORMAT_VERSION
    kind: str = "embdeploy-bench"

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "BenchResult":
        def build(kind, row):
            names = {f.name for f in fields(kind)}
            return kind(**{k: v for k, v in row.items() if k in names})

        return cls(
            settings=d["settings"],
            machine=d["machine"],
            base=build(VariantInfo, d["base"]),
            variants=[build(VariantInfo, v) for v in d["variants"]],
            latency=[build(LatencyRow, r) for r in d.get("latency", [])],
            sessions=[build(SessionCost, r) for r in d.get("sessions", [])],
            multi=[build(MultiSessionRow, r) for r in d.get("multi", [])],
            skipped=[build(Skipped, r) for r in d.get("skipped", [])],
            texts=[build(TextRow, r) for r in d.get("texts", [])],
            references=[build(ReferenceRow, r) for r in d.get("references", [])],
            format_version=d.get("format_version", RESULT_FORMAT_VERSION),
        )

    @classmethod
    def from_json(cls, text: str) -> "BenchResult":
        return cls.from_dict(json.loads(text))

    def rows(self, provider: str | None = None) -> list[LatencyRow]:
        return [r for r in self.latency if provider is None or r.provider == provider]
