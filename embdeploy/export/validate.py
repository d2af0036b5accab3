"""Check an exported ONNX directory against PyTorch, number by number. A gate, not a warning.

    report = validate("clinical-onnx", ext)     # raises ValidationFailed on any failed check
    print(report.render())

Probes (every one runs through ONNX Runtime and through the extended PyTorch
model wrapped like the export, see `wrapper.task_outputs`):

    new tokens (text)  texts holding every new token, batched and padded
    new ids (direct)   every id V..V+K-1 fed directly (V and V+K-1 first), not via the tokenizer
    base only          a text without new tokens
    padding            a batch of very different lengths, right-padded
    one token          batch 1, sequence 1: shapes unlike the export's dummy (2, 16)
    your texts         with `texts`: the user's own texts, extended tokenizer, truncated to the model's length

A decoder exported with a KV cache (`past_key_values.*` inputs, `present.*`
outputs, recorded as `kv_cache` in embdeploy.json) runs every probe with an
empty past (sequence length 0), then one decode step: the probe's present.*
fed back as past with one more token per row (the new ids V..V+K-1 in turn),
compared with PyTorch's full-sequence outputs at the last position. present.*
themselves are checked for shape only; the decode step is what proves them.

Per probe and output: names and shapes must match, values must be finite, and
max |ort - torch|, mean |ort - torch| and the worst cosine (over the last axis,
per row) must be within TOLERANCES[(dtype, provider)]. Per-token outputs are
compared where attention_mask is 1 (padding positions are not defined). Per output,
over every probe: the mean row cosine and, for logits, top-1 agreement and top-5
overlap with PyTorch on those real positions (all V+K columns) must reach the
tolerance's thresholds too; int8 is gated by these, not by distances.

Swap exports are also run with a replacement extension table (rows permuted
and perturbed), given to ONNX Runtime per session and to PyTorch as the
extension's rows, to prove the table really is swappable (direct ids, padding,
one token and the first text batch).
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EmbdeployError, FingerprintMismatch, ValidationFailed
from ..ort import ORT_INT, create_session, import_ort, role_arrays, session_options, swap_session_options

# --------------------------------------------------------------------------- tolerances


@dataclass(frozen=True)
class Tolerance:
    """A check passes when max_abs <= atol + rtol * max|ref|, mean_abs <= mean_atol + rtol * mean|ref|
    and the worst row cosine >= min_cosine.

    Over all probes of one output (rows pooled, so a one-row probe does not decide alone): the mean row
    cosine >= min_mean_cosine and, for logits, the share of real positions whose top-1 id agrees with
    PyTorch's >= min_top1 and the mean overlap of the top-5 ids >= min_top5. The columns of the new ids
    count like any other: the export must predict them too. The defaults do not gate (float rows are
    held by the distances)."""

    atol: float
    rtol: float
    mean_atol: float
    min_cosine: float
    min_mean_cosine: float = -1.0
    min_top1: float = 0.0
    min_top5: float = 0.0


# The one table of tolerances. fp32 on CPU is the same math in another order; CUDA
# adds TF32/fused kernels; fp16 is compared with the fp32 PyTorch model, so it shows
# the precision lost, bounded.
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("float32", "cpu"): Tolerance(atol=1e-4, rtol=1e-4, mean_atol=1e-5, min_cosine=0.99999),
    ("float32", "cuda"): Tolerance(atol=1e-3, rtol=1e-3, mean_atol=1e-4, min_cosine=0.9999),
    ("float16", "cpu"): Tolerance(atol=3e-2, rtol=1e-2, mean_atol=3e-3, min_cosine=0.999),
    ("float16", "cuda"): Tolerance(atol=5e-2, rtol=2e-2, mean_atol=5e-3, min_cosine=0.998),
    # int8 (per-channel MatMul weights) is judged by what users read, not by distance: the worst and the
    # mean row cosine (each real position of a per-token output, each text of a pooled one) to PyTorch
    # fp32, and for logits top-1 agreement and top-5 overlap. Measured (perf/README.md, int8 validation):
    # MiniLM K=1000 worst row 0.959, mean 0.992 (token states) / 0.994 (sentences); the 37 coverage
    # families worst 0.9990+, mean 0.9997+, top-1 0.917+ and top-5 0.974+ (random tiny LMs have
    # near-flat logits, where ties flip easily; real ones are more peaked).
    ("int8", "cpu"): Tolerance(atol=float("inf"), rtol=0.0, mean_atol=float("inf"), min_cosine=0.95,
                               min_mean_cosine=0.98, min_top1=0.85, min_top5=0.9),
}
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
_ALIASES = {"token_embeddings": "last_hidden_state"}  # optimum's sentence-transformers export
TOKENS_PER_TEXT = 16
BATCH = 8
# Past this K the probes pack more new tokens per row and more rows per call (the same ids, every one
# probed, in a few large calls rather than hundreds of small ones): K=20,000 on MiniLM validated in
# 25 s before, see perf/README.md for after.
LARGE_K = 1024


def tolerance_for(dtype: str, provider: str) -> Tolerance:
    try:
        return TOLERANCES[(dtype, provider)]
    except KeyError:
        raise EmbdeployError(
            f"no tolerance for dtype {dtype} on provider {provider!r}; providers: {', '.join(PROVIDERS)}"
        ) from None


# --------------------------------------------------------------------------- report


@dataclass
class Check:
    probe: str
    output: str
    shape: list[int]
    max_abs: float
    mean_abs: float
    min_cosine: float
    ref_max_abs: float
    ok: bool
    problem: str | None = None
    mean_cosine: float = 1.0
    rows: int = 0  # rows the cosines are over (real positions of a per-token output, texts of a pooled one)
    top1: float | None = None  # logits: share of those positions whose top-1 id is PyTorch's
    top5: float | None = None  # logits: mean share of PyTorch's top-5 ids among the export's top 5


@dataclass
class ValidationReport:
    onnx_dir: str
    mode: str
    dtype: str
    provider: str
    tolerance: Tolerance
    checks: list[Check] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # failures that are not a number (names, shapes, ids)
    notes: list[str] = field(default_factory=list)
    new_ids_checked: int = 0
    texts: dict | None = None  # with the user's texts: how many, their positions, new-token positions, truncated
    extension_fingerprint_matches: bool = True
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.problems and all(c.ok for c in self.checks) and not self._pooled_failures()

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs for c in self.checks), default=0.0)

    def outputs(self) -> dict[str, dict]:
        """Per output over all probes: the worst distances and row cosine, the mean row cosine and, for
        logits, top-1 agreement and top-5 overlap (means over every row of every probe)."""
        worst: dict[str, dict] = {}
        sums: dict[str, list[float]] = {}  # [rows, sum of cosines, logit rows, top-1 agreeing, top-5 overlap]
        for c in self.checks:
            w = worst.setdefault(c.output, {"max_abs": 0.0, "mean_abs": 0.0, "min_cosine": 1.0, "mean_cosine": 1.0,
                                            "top1": None, "top5": None, "rows": 0, "ok": True})
            w["max_abs"] = max(w["max_abs"], c.max_abs)
            w["mean_abs"] = max(w["mean_abs"], c.mean_abs)
            w["min_cosine"] = min(w["min_cosine"], c.min_cosine)
            w["ok"] = w["ok"] and c.ok
            s = sums.setdefault(c.output, [0, 0.0, 0, 0.0, 0.0])
            s[0] += c.rows
            s[1] += c.mean_cosine * c.rows
            if c.top1 is not None:
                s[2] += c.rows
                s[3] += c.top1 * c.rows
                s[4] += c.top5 * c.rows
        for name, w in worst.items():
            rows, cos, logit_rows, top1, top5 = sums[name]
            w["rows"] = rows
            if rows:
                w["mean_cosine"] = cos / rows
            if logit_rows:
                w["top1"], w["top5"] = top1 / logit_rows, top5 / logit_rows
            w["ok"] = w["ok"] and not self._pooled_problems(name, w)
        return worst

    def _pooled_problems(self, name: str, w: dict) -> list[str]:
        """What fails the tolerance's thresholds on the means over all probes of output `name`."""
        tol, lines = self.tolerance, []
        if w["rows"] and w["mean_cosine"] < tol.min_mean_cosine:
            lines.append(f"{name}: mean cosine {w['mean_cosine']:.6f} over {w['rows']} rows of all probes "
                         f"(min {tol.min_mean_cosine})")
        if w["top1"] is not None and w["top1"] < tol.min_top1:
            lines.append(f"{name}: top-1 agreement with PyTorch {w['top1']:.4f} over {w['rows']} real positions "
                         f"(min {tol.min_top1})")
        if w["top5"] is not None and w["top5"] < tol.min_top5:
            lines.append(f"{name}: top-5 overlap with PyTorch {w['top5']:.4f} over {w['rows']} real positions "
                         f"(min {tol.min_top5})")
        return lines

    def _pooled_failures(self) -> list[str]:
        return [line for name, w in self.outputs().items() for line in self._pooled_problems(name, w)]

    def failures(self) -> list[str]:
        lines = list(self.problems)
        tol = self.tolerance
        for c in self.checks:
            if not c.ok:
                lines.append(
                    c.problem or f"{c.probe} / {c.output}: max |diff| {c.max_abs:.3g} (allowed {tol.atol + tol.rtol * c.ref_max_abs:.3g}), "
                    f"mean {c.mean_abs:.3g}, worst cosine {c.min_cosine:.6f} (min {tol.min_cosine})"
                )
        return lines + self._pooled_failures()

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "onnx_dir": self.onnx_dir,
            "mode": self.mode,
            "dtype": self.dtype,
            "provider": self.provider,
            "tolerance": asdict(self.tolerance),
            "max_abs_diff": self.max_abs_diff,
            "outputs": self.outputs(),
            "new_ids_checked": self.new_ids_checked,
            "texts": self.texts,
            "extension_fingerprint_matches": self.extension_fingerprint_matches,
            "problems": self.failures(),
            "notes": self.notes,
            "checks": [asdict(c) for c in self.checks],
            "seconds": round(self.seconds, 3),
        }

    def table(self):
        """A rich Table: one row per probe and output."""
        from rich.table import Table

        status = "[green]passed[/green]" if self.passed else "[red]FAILED[/red]"
        t = Table(title=f"validation {status}: {self.mode} {self.dtype} on {self.provider} ({self.onnx_dir})")
        for col in ("probe", "output", "shape", "max |diff|", "mean |diff|", "worst cos", "mean cos", "top-1", "top-5", ""):
            t.add_column(col, justify="left" if col in ("probe", "output", "shape", "") else "right")
        for c in self.checks:
            t.add_row(c.probe, c.output, "x".join(map(str, c.shape)), f"{c.max_abs:.2e}", f"{c.mean_abs:.2e}",
                      f"{c.min_cosine:.6f}", f"{c.mean_cosine:.6f}", _share(c.top1), _share(c.top5),
                      "ok" if c.ok else "[red]FAIL[/red]")
        return t

    def render(self, width: int = 120) -> str:
        from rich.console import Console

        buf = io.StringIO()
        console = Console(file=buf, width=width, force_terminal=False, color_system=None)
        console.print(self.table())
        tol = self.tolerance
        console.print(f"tolerance: {tolerance_text(tol)}; {self.new_ids_checked} new ids checked in {self.seconds:.1f}s")
        for name, w in self.outputs().items():
            if w["rows"]:
                console.print(f"{name} over all probes: mean cosine {w['mean_cosine']:.6f} ({w['rows']} rows)"
                              + ("" if w["top1"] is None else f", top-1 agreement {w['top1']:.4f}, "
                                 f"top-5 overlap {w['top5']:.4f}"))
        for line in self.failures():
            console.print(f"FAIL: {line}")
        for note in self.notes:
            console.print(f"note: {note}")
        return buf.getvalue()


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def tolerance_text(tol: Tolerance) -> str:
    """The tolerance in one line, the thresholds that gate only."""
    parts = [f"atol {tol.atol:g} + rtol {tol.rtol:g}·max|ref|, mean {tol.mean_atol:g}"] if np.isfinite(tol.atol) else []
    parts.append(f"worst row cosine >= {tol.min_cosine}")
    if tol.min_mean_cosine > -1:
        parts.append(f"mean cosine >= {tol.min_mean_cosine}")
    if tol.min_top1 > 0:
        parts.append(f"logits top-1 agreement >= {tol.min_top1}")
    if tol.min_top5 > 0:
        parts.append(f"top-5 overlap >= {tol.min_top5}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- probes


# What a probe exercises; the swap check re-runs the kinds that reach every extension row.
TEXT, IDS, BASE, PADDING, ONE_TOKEN, DECODE = "new tokens (text)", "new ids (direct)", "base only", "padding", \
    "one token", "decode step"
USER = "your texts"


@dataclass
class Probe:
    name: str
    input_ids: np.ndarray  # (B, S) int64
    attention_mask: np.ndarray  # (B, S) int64, right padding
    kind: str = ""  # one of the kinds above


def _pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def _batches(kind: str, rows: list[list[int]], pad_id: int, batch: int = BATCH) -> list[Probe]:
    probes = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        suffix = f" {start // batch + 1}" if len(rows) > batch else ""
        probes.append(Probe(kind + suffix, *_pad(chunk, pad_id), kind=kind))
    return probes


def max_positions(config, cap: int = 512) -> int:
    """The longest sequence the model takes (position table size), capped to keep probes cheap."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return min(value, cap)
    return cap


def build_probes(tokenizer, V: int, K: int, max_len: int = 512) -> tuple[list[Probe], list[str]]:
    """The probes of the module docstring, rows at most `max_len` long, and notes for the report."""
    tokens = [tokenizer.convert_ids_to_tokens(i) for i in range(V, V + K)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start = [i for i in (tokenizer.cls_token_id, tokenizer.bos_token_id) if i is not None][:1]
    scale = 4 if K > LARGE_K else 1
    batch = BATCH * scale
    per_text = max(1, min(TOKENS_PER_TEXT * scale, max_len // 4))  # room for the filler pieces around them
    per_row = max(1, min(2 * TOKENS_PER_TEXT * scale, max_len - len(start)))

    def encode(text: str) -> list[int]:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_len]
        return ids or start or [0]

    probes, notes, produced = [], [], set()
    if K:
        text_rows = []
        for s in range(0, K, per_text):
            text_rows.append(encode("the " + " ".join(tokens[s : s + per_text]) + " ."))
            produced.update(i for i in text_rows[-1] if i >= V)
        probes += _batches(TEXT, text_rows, pad_id, batch)
        missing = [t for i, t in zip(range(V, V + K), tokens) if i not in produced]
        if missing:
            notes.append(
                f"{len(missing)} new token(s) are not produced as their id by the tokenizer in a plain sentence "
                f"(e.g. {', '.join(map(repr, missing[:5]))}); their rows are still checked through the direct-id probe"
            )
        new_ids = [V + K - 1, V] + list(range(V + 1, V + K - 1)) if K > 1 else [V]
        id_rows = [start + new_ids[s : s + per_row] for s in range(0, len(new_ids), per_row)]
        probes += _batches(IDS, id_rows, pad_id, batch)
    base_text = "the quick brown fox jumps over the lazy dog"
    base_ids = encode(base_text)
    if any(i >= V for i in base_ids):
        notes.append("the base-only probe text contains new tokens; it still runs, but is not base-only")
    probes.append(Probe(BASE, *_pad([base_ids], pad_id), kind=BASE))
    long_text = f"{base_text} and then {base_text} again" + (f" {tokens[-1]}" if K else "")
    pad_rows = [encode(long_text), encode(f"a {tokens[0]}" if K else "a"), encode("hello")]
    for i in range(1, len(pad_rows)):  # three different lengths, whatever the tokenizer made of the texts
        while len(pad_rows[i]) > 1 and len(pad_rows[i]) in {len(r) for r in pad_rows[:i]}:
            pad_rows[i] = pad_rows[i][:-1]
    probes.append(Probe(PADDING, *_pad(pad_rows, pad_id), kind=PADDING))
    probes.append(Probe(ONE_TOKEN, *_pad([[V + K - 1 if K else (start or [0])[0]]], pad_id), kind=ONE_TOKEN))
    return probes, notes


def text_probes(tokenizer, texts: list[str], V: int, max_len: int = 512) -> tuple[list[Probe], dict]:
    """The user's texts as probes: the export's (extended) tokenizer, at most `max_len` tokens each, batched
    by length (less padding); and what they hold, for the report."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, truncated = [], 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        truncated += len(ids) > max_len
        rows.append(ids[:max_len] or [pad_id])
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    probes = _batches(USER, [rows[i] for i in order], pad_id)
    new = [i for r in rows for i in r if i >= V]
    summary = {"count": len(rows), "positions": sum(map(len, rows)), "new_token_positions": len(new),
               "new_ids": len(set(new)), "truncated": truncated, "max_length": max_len}
    return probes, summary


# --------------------------------------------------------------------------- comparison


def _compare(probe: Probe, name: str, got: np.ndarray, want: np.ndarray, tol: Tolerance, logits: bool = False) -> Check:
    shape = list(got.shape)
    if got.shape != want.shape:
        return Check(probe.name, name, shape, float("inf"), float("inf"), -1.0, 0.0, False,
                     f"{probe.name} / {name}: ONNX shape {list(got.shape)}, PyTorch shape {list(want.shape)}")
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    if got.ndim >= 3 and got.shape[:2] == probe.attention_mask.shape:
        keep = probe.attention_mask.astype(bool)  # per-token output: real positions only
        got64, want64 = got64[keep], want64[keep]
    if not np.isfinite(got64).all():
        return Check(probe.name, name, shape, float("inf"), float("inf"), -1.0, 0.0, False,
                     f"{probe.name} / {name}: ONNX Runtime returned NaN or Inf")
    diff = np.abs(got64 - want64)
    max_abs, mean_abs = float(diff.max(initial=0.0)), float(diff.mean()) if diff.size else 0.0
    ref_max, ref_mean = float(np.abs(want64).max(initial=0.0)), float(np.abs(want64).mean()) if want64.size else 0.0
    a = got64.reshape(-1, got64.shape[-1]) if got64.ndim else got64.reshape(1, 1)
    b = want64.reshape(-1, want64.shape[-1]) if want64.ndim else want64.reshape(1, 1)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    rows = nb > 1e-6  # a cosine of (near) zero vectors means nothing
    cos = (a[rows] * b[rows]).sum(-1) / np.maximum(na[rows] * nb[rows], 1e-30)
    min_cos = float(cos.min()) if cos.size else 1.0
    ok = (
        max_abs <= tol.atol + tol.rtol * ref_max
        and mean_abs <= tol.mean_atol + tol.rtol * ref_mean
        and min_cos >= tol.min_cosine
    )
    check = Check(probe.name, name, shape, max_abs, mean_abs, min_cos, ref_max, ok,
                  mean_cosine=float(cos.mean()) if cos.size else 1.0, rows=int(cos.size))
    if logits and a.shape[0] and a.shape[-1] > 1:
        check.top1, check.top5 = _top_k_agreement(a, b)
        check.rows = a.shape[0]  # top-k counts every position, a zero row of logits included
    return check


def _top_k_agreement(got: np.ndarray, want: np.ndarray, k: int = 5) -> tuple[float, float]:
    """(share of rows whose argmax agrees, mean share of `want`'s top-k ids in `got`'s top k); (N, vocab) each."""
    k = min(k, got.shape[-1])
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    g = np.argpartition(-got, k - 1, axis=-1)[:, :k]
    w = np.argpartition(-want, k - 1, axis=-1)[:, :k]
    overlap = (g[:, :, None] == w[:, None, :]).any(-1).sum(-1) / k
    return top1, float(overlap.mean())


def _match_outputs(names: list[str], got: list[np.ndarray], ref: dict) -> tuple[dict[str, str], list[str]]:
    """{onnx output: reference output}: same name, a known alias, or else the one reference of the same shape."""
    mapping, problems = {}, []
    for name, value in zip(names, got):
        key = name if name in ref else _ALIASES.get(name)
        if key not in ref:
            same = [k for k, v in ref.items() if tuple(v.shape) == value.shape and k not in mapping.values()]
            key = same[0] if len(same) == 1 else None
        if key is None:
            problems.append(
                f"ONNX output {name!r} {list(value.shape)} has no PyTorch counterpart (PyTorch gives "
                f"{', '.join(f'{k} {list(v.shape)}' for k, v in ref.items())}); embdeploy cannot check it"
            )
        else:
            mapping[name] = key
    return mapping, problems


# --------------------------------------------------------------------------- running


class _Reference:
    """The extended PyTorch model, called like the export."""

    def __init__(self, ext, task: str, pooling, roles: set[str]):
        import inspect

        from .wrapper import model_inputs

        self.ext, self.task, self.pooling = ext, task, pooling
        self.inputs = set(model_inputs(ext.model))
        if "position_ids" in roles and "position_ids" in inspect.signature(ext.model.forward).parameters:
            self.inputs.add("position_ids")

    def __call__(self, feeds: dict[str, np.ndarray], V: int | None = None) -> dict[str, np.ndarray]:
        import torch

        from .wrapper import task_outputs

        model = self.ext.model
        device = self.ext.base_table().device
        kwargs = {k: torch.from_numpy(v).to(device) for k, v in feeds.items() if k in self.inputs}
        training = model.training
        model.eval()  # dropout off, as in the export; the caller's mode is restored
        try:
            with torch.no_grad():
                out = task_outputs(model, self.task, self.pooling, kwargs, extras=True)
        except EmbdeployError:
            raise
        except Exception as e:  # the model's own code fails: say so instead of a traceback
            raise EmbdeployError(_reference_failure(self.ext, e)) from e
        finally:
            model.train(training)
        result = {k: v.detach().float().cpu().numpy() for k, v in out.items()}
        if V is not None and "logits" in result:  # a base export: logits over the base vocabulary only
            result["logits"] = result["logits"][..., :V]
        return result


def _reference_failure(ext, e: Exception) -> str:
    first = next((ln for ln in str(e).splitlines() if ln.strip()), "")[:300]
    msg = (f"the extended PyTorch model ({type(ext.model).__name__}) fails on a validation probe "
           f"({type(e).__name__}: {first}), so there is nothing to check the export against")
    V, total = ext.V, ext.V + ext.K
    if str(V) in first and str(total) in first:
        msg += (f". Sizes {V} and {total} mean the model adds a vocabulary-sized tensor to its logits outside "
                "the LM head (a separate logits bias), which embdeploy does not extend; load the base without "
                "its LM head (its …Model class) and export that")
    return msg


def _session(model_path: Path, provider: str, options=None):
    if provider not in PROVIDERS:
        raise EmbdeployError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    ort = import_ort(cuda=provider == "cuda")
    wanted = PROVIDERS[provider][0]
    if wanted not in ort.get_available_providers():
        raise EmbdeployError(
            f"ONNX Runtime here has no {wanted} (available: {', '.join(ort.get_available_providers())}); "
            "install onnxruntime-gpu for cuda, or validate with provider cpu"
        )
    # explicit: a CPU fallback must not pass as a CUDA validation
    return create_session(model_path, PROVIDERS[provider], options or session_options(), explicit=True)


def _run_probes(sess, roles: dict[str, str], reference, probes, tol, report, label: str = "", base_V=None,
                extra_feeds: dict | None = None, cache: dict[str, str] | None = None,
                step_ids: list[int] | None = None) -> None:
    """Run every probe through ORT and PyTorch and add the checks to `report`.

    With a KV cache (`cache`: {past input: present output}) each probe runs with an empty past, then one
    decode step feeds its present.* back with one more token per row (from `step_ids`); that step's
    outputs are compared with PyTorch's full-sequence outputs at the last position.
    """
    run = _ProbeRun(sess, roles, reference, tol, report, label, base_V, extra_feeds or {}, cache or {})
    for index, probe in enumerate(probes):
        got = run.probe(probe)
        if run.unfillable:
            return  # an input embdeploy cannot feed: every probe would say the same
        if got is not None and run.cache:
            run.decode_step(probe, got, step_ids, index)


class _ProbeRun:
    """One ORT session checked against the reference: the plain probe check and the decode-step check.

    The output mapping (ORT output -> reference output) is found on the first probe and kept for the rest.
    """

    def __init__(self, sess, roles, reference, tol, report, label, base_V, extra_feeds: dict, cache: dict):
        self.sess, self.roles, self.reference, self.tol, self.report = sess, roles, reference, tol, report
        self.label, self.base_V, self.extra_feeds, self.cache = label, base_V, extra_feeds, cache
        self.names = [o.name for o in sess.get_outputs()]
        self.inputs = {i.name: i for i in sess.get_inputs()}
        self.compared = [n for n in self.names if n not in set(cache.values())]  # present.*: via the decode step
        self.mapping: dict | None = None
        self.unfillable = False

    def probe(self, probe: Probe) -> dict | None:
        """Run `probe` with an empty past and compare; the ORT outputs (None when the run failed)."""
        feeds = role_arrays(probe.input_ids, probe.attention_mask)
        got = self._run(probe, feeds, None)
        if got is not None:
            self._check(probe, got, self.reference(feeds, self.base_V))
        return got

    def decode_step(self, probe: Probe, got: dict, step_ids: list[int], index: int) -> None:
        """Feed `probe`'s present.* back with one more token per row; compare with the full sequence's last position."""
        B, S = probe.input_ids.shape
        bad = [p for p in self.cache.values() if got[p].ndim != 4 or got[p].shape[0] != B or got[p].shape[2] != S]
        if bad:
            self.report.problems.append(
                f"{self.label}{probe.name}: present output(s) {', '.join(bad)} are not (batch {B}, heads, {S}, "
                f"head_dim) after a prefill of {S} tokens with an empty past")
            return
        full = _decode_probe(probe, step_ids, index)
        full_feeds = role_arrays(full.input_ids, full.attention_mask)
        step_feeds = {r: v if r == "attention_mask" else v[:, -1:] for r, v in full_feeds.items()}
        step = Probe(f"{DECODE} after {probe.name}", full.input_ids[:, -1:], full.attention_mask[:, -1:], kind=DECODE)
        stepped = self._run(step, step_feeds, {past: got[present] for past, present in self.cache.items()})
        if stepped is not None:
            ref = {k: v[:, -1:] if v.ndim >= 3 and v.shape[:2] == full.input_ids.shape else v
                   for k, v in self.reference(full_feeds, self.base_V).items()}
            self._check(step, stepped, ref)

    def _run(self, probe: Probe, feeds: dict, past: dict | None) -> dict | None:
        ort_feed, problem = _ort_feed(self.roles, self.inputs, feeds, past)
        if problem:
            self.report.problems.append(problem)
            self.unfillable = True
            return None
        ort_feed.update(self.extra_feeds)
        try:
            return dict(zip(self.names, self.sess.run(None, ort_feed)))
        except Exception as e:  # ORT's RuntimeException etc.
            self.report.problems.append(f"{self.label}{probe.name}: ONNX Runtime failed: {str(e).splitlines()[0]}")
            return None

    def _check(self, probe: Probe, got: dict, ref: dict) -> None:
        if self.mapping is None:
            self.mapping, problems = _match_outputs(self.compared, [np.asarray(got[n]) for n in self.compared], ref)
            self.report.problems.extend(problems)
        for name in self.compared:
            if name in self.mapping:
                c = _compare(probe, name, np.asarray(got[name]), ref[self.mapping[name]], self.tol,
                             logits=self.mapping[name] == "logits")
                c.probe = self.label + c.probe
                if c.problem:
                    c.problem = self.label + c.problem
                self.report.checks.append(c)


def _decode_probe(probe: Probe, step_ids: list[int], index: int) -> Probe:
    """`probe` with one more real token per row, taken in turn from `step_ids` (from row `index` on)."""
    B = probe.input_ids.shape[0]
    nxt = np.array([step_ids[(index + b) % len(step_ids)] for b in range(B)], np.int64)[:, None]
    return Probe(probe.name, np.concatenate([probe.input_ids, nxt], axis=1),
                 np.concatenate([probe.attention_mask, np.ones((B, 1), np.int64)], axis=1), kind=probe.kind)


def _ort_feed(roles: dict[str, str], inputs: dict, feeds: dict, past: dict | None) -> tuple[dict, str | None]:
    """The ORT feed of one run: role arrays in the graph's int type; PAST inputs from `past`, else empty."""
    from ..ort import empty_past
    from .graph import PAST

    batch = feeds["input_ids"].shape[0]
    out = {}
    for name, role in roles.items():
        inp = inputs[name]
        if role == PAST:
            value = past[name] if past is not None else empty_past(inp, batch)
            if value is None:
                return {}, (f"input {name!r} {inp.type} {inp.shape} is a KV cache embdeploy cannot fill: it feeds "
                            "a 4-D float (batch, heads, 0, head_dim) with heads and head_dim fixed in the graph")
            out[name] = value
            continue
        dtype = ORT_INT.get(inp.type)
        if dtype is None:
            return {}, f"input {name!r} has type {inp.type}; embdeploy feeds int64 or int32 ids"
        out[name] = feeds[role].astype(dtype)
    return out, None


@contextlib.contextmanager
def _extension_rows(ext, embed: np.ndarray, head: np.ndarray | None):
    """Temporarily give the extension's PyTorch tables these (K, H) rows (restored on exit)."""
    import torch

    params = list(ext.embed_tables.values())
    tables = [(params, embed)]
    if head is not None and ext.head_mode == "untied":
        tables.append((list(ext.head_tables.values()), head))
    saved = [(p, p.data) for ps, _ in tables for p in ps]
    try:
        for ps, rows in tables:
            offset = 0
            for p in ps:
                n = p.shape[0]
                p.data = torch.from_numpy(np.ascontiguousarray(rows[offset : offset + n])).to(p.device, p.dtype)
                offset += n
        yield
    finally:
        for p, data in saved:
            p.data = data


def _replacement(table: np.ndarray, seed: int) -> np.ndarray:
    """Rows permuted (reversed, shifted) and perturbed: a different table of the same shape."""
    rng = np.random.default_rng(seed)
    rows = np.roll(table[::-1], 1, axis=0).astype(np.float32)
    scale = float(table.std()) or 1.0
    return rows + rng.normal(0.0, 0.5 * scale, size=rows.shape).astype(np.float32)


def validate(onnx_dir, ext, provider: str = "cpu", texts=None) -> ValidationReport:
    """Validate the export in `onnx_dir` against extension `ext`; raise ValidationFailed on any failure.

    Every file is checked against its digest first. `texts` (a file, one text per line or JSON lines;
    or a list of str) adds the user's texts as probes, checked with the same tolerance. Returns the
    report when every check passed. The exception carries it as `.report`.
    """
    from .manifest import ExportManifest

    return validate_manifest(ExportManifest.verify(onnx_dir), ext, provider, texts=texts)


def read_probe_texts(texts) -> list[str] | None:
    """`texts` for validation: None, a list of str, or a file in read_texts' formats (refused when missing or empty)."""
    if texts is None or isinstance(texts, list):
        if texts is not None and not any(t.strip() for t in texts):
            raise EmbdeployError("the texts to validate on are all empty; pass texts with words in them, or drop --texts")
        return texts
    from ..train.texts import read_texts

    return read_texts(texts)


def validate_manifest(m, ext, provider: str = "cpu", shown_as=None, texts=None) -> ValidationReport:
    """`validate` for an export whose manifest `m` (an ExportManifest read from its directory) the caller
    has verified or just written: export_extension validates its unfinished `.NAME.partial-*` directory
    and reports it as `shown_as`, the name it will have."""
    from ..onnx import EXT_EMBED, EXT_HEAD
    from .wrapper import check_pooling, infer_task

    t0 = time.perf_counter()
    texts = read_probe_texts(texts)  # a bad file is refused before anything runs
    onnx_dir = m.path
    mode = m.mode
    report = ValidationReport(str(shown_as or onnx_dir), mode, m.precision, provider,
                              tolerance_for(m.precision, provider))

    recorded = m.base_fingerprint.get("embed")
    if recorded != ext.base_fingerprint:
        raise FingerprintMismatch(
            f"{onnx_dir} was exported from a base with embedding fingerprint {str(recorded)[:23]}…, this extension's "
            f"base has {ext.base_fingerprint[:23]}…; validate with the extension it was exported from (--ext DIR)"
        )
    want = (ext.V, 0 if mode == "base" else ext.K, ext.H)
    if (m.V, m.K, m.H) != want:
        raise EmbdeployError(
            f"{onnx_dir} holds V={m.V}, K={m.K}, H={m.H} but the extension has V={want[0]}, K={ext.K}, "
            f"H={want[2]}; validate with the extension it was exported from (--ext DIR)"
        )
    if mode != "base" and m.extension_fingerprint != ext.extension_fingerprint():
        report.extension_fingerprint_matches = False
        report.notes.append(
            "the extension's rows differ from the ones recorded at export (trained further since?); "
            "the numbers below compare the ONNX model with the extension given now"
        )
    task = m.task or infer_task(ext.model, ext.base_info.task or None)
    pooling = check_pooling(m.pooling) if task == "feature-extraction" else None
    roles = m.roles
    K = 0 if mode == "base" else ext.K
    probes, notes = build_probes(ext.tokenizer, ext.V, K, max_positions(ext.model.config))
    report.notes.extend(notes)
    if texts:
        user, report.texts = text_probes(ext.tokenizer, texts, ext.V, max_positions(ext.model.config))
        probes += user
        t = report.texts
        report.notes.append(f"{t['count']} of your texts: {t['positions']} positions, {t['new_token_positions']} of "
                            f"them new tokens ({t['new_ids']} distinct ids)"
                            + (f"; {t['truncated']} truncated to {t['max_length']} tokens" if t["truncated"] else ""))
    report.new_ids_checked = K
    reference = _Reference(ext, task, pooling, set(roles.values()))
    base_V = ext.V if mode == "base" else None
    cache = m.kv_cache
    # A decode step's extra token: every new id in turn (an id below V for a base export).
    step_ids = list(range(ext.V, ext.V + K)) if K else [ext.V - 1]
    if cache:
        report.notes.append(f"KV-cache decoder: every probe runs with an empty past ({len(cache)} past_key_values "
                            "inputs), then one decode step feeds its present.* back with one more token")

    model_path = m.model_path
    sess = _session(model_path, provider)
    outputs = [o.name for o in sess.get_outputs()]
    if outputs != list(m.outputs):
        report.problems.append(f"the graph's outputs {outputs} differ from the manifest's {list(m.outputs)}")
    fed = {i.name for i in sess.get_inputs()} - {EXT_EMBED, EXT_HEAD}  # swap tables: overridable, not fed
    if fed != set(roles):
        report.problems.append(f"the graph's inputs {sorted(fed)} differ from the manifest's {sorted(roles)}")
    else:
        _run_probes(sess, roles, reference, probes, report.tolerance, report, base_V=base_V, cache=cache,
                    step_ids=step_ids)
    del sess

    if mode == "swap" and not report.problems:
        _swap_check(model_path, provider, ext, m, roles, reference, probes, report, cache, step_ids)
    report.seconds = time.perf_counter() - t0
    if not report.passed:
        lines = report.failures()
        shown = "\n".join(f"  - {ln}" for ln in lines[:12]) + (f"\n  … {len(lines) - 12} more" if len(lines) > 12 else "")
        hint = "" if report.extension_fingerprint_matches else (
            "\nThe extension given differs from the one exported; re-export it, or validate with the extension dir "
            "it was exported from.")
        err = ValidationFailed(f"validation of {report.onnx_dir} failed ({len(lines)} problem(s)):\n{shown}{hint}")
        err.report = report
        raise err
    return report


def _swap_check(model_path, provider, ext, m, roles, reference, probes, report, cache, step_ids) -> None:
    from ..onnx import EXT_EMBED, EXT_HEAD

    np_dtype = np.float16 if m.dtype == "float16" else np.float32
    embed = _replacement(ext.embed_table().float().cpu().numpy(), seed=1).astype(np_dtype)
    head = None
    if ext.head_mode == "untied":
        head = _replacement(ext.head_table().float().cpu().numpy(), seed=2).astype(np_dtype)
    # Every row through the direct ids; the tokenizer path was checked above, once is enough here.
    new_probes = [p for p in probes if p.kind in (IDS, PADDING, ONE_TOKEN)]
    new_probes.insert(0, next(p for p in probes if p.kind == TEXT))
    if provider == "cpu":
        # The table through the session options, as a CPU service swaps it (ort.swap_session_options).
        so, feeds = swap_session_options(session_options(), embed, head), None
    else:
        # On CUDA, ORT ignores a CPU initializer it planned for the GPU and refuses a GPU one it did not
        # allocate itself (measured, onnxruntime-gpu 1.31), so a GPU service feeds the table as the graph
        # input the rewrite declared for it (runtime.Session's default table_binding "feed"). Check that.
        so, feeds = None, {EXT_EMBED: embed, **({EXT_HEAD: head} if head is not None else {})}
    sess = _session(model_path, provider, so)
    with _extension_rows(ext, embed.astype(np.float32), None if head is None else head.astype(np.float32)):
        _run_probes(sess, roles, reference, new_probes, report.tolerance, report, label="swapped table: ",
                    extra_feeds=feeds, cache=cache, step_ids=step_ids)


def validate_dir(onnx_dir, ext_dir=None, provider: str = "cpu", base_model=None, texts=None) -> ValidationReport:
    """For `embdeploy validate`: load the extension (`ext_dir`, else the one recorded at export) and validate
    (`texts`: the user's texts as extra probes, see `validate`)."""
    from ..extend.model import load_extension
    from .manifest import ExportManifest

    m = ExportManifest.verify(onnx_dir)
    texts = read_probe_texts(texts)  # before the extension loads: a wrong path is reported in a second
    ext_dir = ext_dir or m.extension_dir
    if not ext_dir:
        raise EmbdeployError(
            f"{onnx_dir} does not record the extension it was exported from; pass it with --ext EXT_DIR"
        )
    if not Path(ext_dir).is_dir():
        raise EmbdeployError(
            f"the extension directory {ext_dir} (recorded at export) does not exist any more; pass it with --ext EXT_DIR"
        )
    return validate_manifest(m, load_extension(ext_dir, base_model=base_model), provider=provider, texts=texts)
