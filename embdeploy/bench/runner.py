"""run_bench: time base and extended exports interleaved, measure what their sessions cost."""

from __future__ import annotations

import os
import platform
import random
import time
from pathlib import Path
from typing import Callable, Iterable

from ..errors import EmbdeployError
from ..export.manifest import ExportManifest
from . import genai as bench_genai
from . import memory, procmem
from . import sessions as ortsess
from .artifacts import own_bases, resolve_artifacts, variant_labels
from .inputs import BASE_MIX, NEW_MIX, session_feed, token_ids
from .result import BenchResult, LatencyRow, ReferenceRow, Skipped, VariantInfo, shape_name
from .timing import Entry, calibrate_inner, run_rounds, summarize

DEFAULT_SHAPES = ((1, 16), (1, 128), (8, 128))
DEFAULT_ROUNDS = 30
DEFAULT_WARMUP = 3
NEW_FRACTION = 0.25
# One round slot lasts at least this long (several calls of a fast model), so timer
# resolution and per-call jitter do not dominate the per-round ratio.
MIN_SLOT_S = 0.005
# Sessions are created anew this many times, the rounds split between them. Two sessions
# of the same file differed by up to 5% at 1x16 on a shared 2-core machine, steadily
# for the life of the sessions (memory placement of the weights), so a single session
# per variant would put that into the ratio; fresh sessions per block average it out.
SESSION_BLOCKS = 5

Progress = Callable[[str], None]


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """'1x16,8x128' -> ((1, 16), (8, 128)); the CLI's --shapes."""
    shapes, bad = [], []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        b, sep, s = part.lower().partition("x")
        if not sep or not b.isdigit() or not s.isdigit() or int(b) < 1 or int(s) < 1:
            bad.append(part)
        else:
            shapes.append((int(b), int(s)))
    if bad or not shapes:
        raise EmbdeployError(
            f"cannot read shapes {', '.join(bad) or repr(text)}; write BATCHxSEQ, comma-separated, e.g. 1x16,1x128,8x128"
        )
    return tuple(shapes)


def run_bench(
    onnx_dirs: Iterable,
    base_dir=None,
    shapes=DEFAULT_SHAPES,
    providers=("cpu",),
    threads: int = 1,
    rounds: int = DEFAULT_ROUNDS,
    warmup: int = DEFAULT_WARMUP,
    sessions: int = 0,
    memory_cost: bool = True,
    progress: Progress | None = None,
    texts=None,
    batch_sizes=None,
    new_tokens: int = 64,
) -> BenchResult:
    """Benchmark each export in `onnx_dirs` against the base export.

    Latency: per provider and shape, `rounds` rounds in which every variant
    (the base included) runs on the same inputs in a shuffled order; ratios to
    base are medians of per-round ratios. Extended variants run two token
    mixes (all ids < V, and 25% new ids); the base runs the first only.
    memory_cost: creation time and memory of one session per variant, each in
    a fresh process. sessions=N > 0: N swap sessions with N different
    extension tables in one process, against N merged sessions.
    texts: the user's texts (a file or a list): tokens per text, end-to-end latency per batch
    (tokenization included) for each of `batch_sizes`, and output fidelity; see bench/texts.py.
    genai exports (`export --format genai`): per shape (B, S), prefill latency of an S-token prompt and decode
    steps of `new_tokens` greedy tokens through onnxruntime-genai, against the genai base; see bench/genai.py.
    """
    say = progress or (lambda msg: None)
    shapes = parse_shapes(shapes) if isinstance(shapes, str) else tuple(tuple(s) for s in shapes)
    if not shapes or any(len(s) != 2 or not all(isinstance(n, int) and n >= 1 for n in s) for s in shapes):
        raise EmbdeployError(f"shapes {shapes!r}: give (batch, seq) pairs of positive integers, e.g. ((1, 16), (8, 128))")
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    providers = [p.lower() for p in providers]
    for p in providers:
        ortsess.provider_name(p)
    problems = []
    if threads < 1:
        problems.append(f"threads={threads}: use 1 or more (1 gives the steadiest ratios)")
    if rounds < 3:
        problems.append(f"rounds={rounds}: use 3 or more, the ratio is a median over rounds")
    if warmup < 0:
        problems.append(f"warmup={warmup}: use 0 or more")
    if sessions < 0:
        problems.append(f"sessions={sessions}: use 0 (skip) or the number of sessions to create")
    if problems:
        raise EmbdeployError("cannot run the benchmark:\n" + "\n".join(f"  - {p}" for p in problems))

    if texts is not None:
        from .texts import DEFAULT_BATCH_SIZES, parse_batch_sizes

        batch_sizes = parse_batch_sizes(batch_sizes) if isinstance(batch_sizes, str) else tuple(batch_sizes or DEFAULT_BATCH_SIZES)
        if isinstance(texts, (str, os.PathLike)):
            from ..train.texts import read_texts

            texts = read_texts(texts)
    base, variants = resolve_artifacts(list(onnx_dirs), base_dir)
    variants += own_bases(base, variants)
    labels = variant_labels(base, variants)
    if texts is not None and not variants:
        raise EmbdeployError("--texts compares extended exports with the base: pass at least one extended export")
    arts: list[tuple[str, ExportManifest]] = [("base", base)] + list(zip(labels, variants))
    genai = bench_genai.is_genai_run(arts, texts is not None, sessions)

    result = BenchResult(
        settings={
            "threads": threads, "inter_op_threads": 1, "execution_mode": "sequential", "rounds": rounds,
            "warmup": warmup, "shapes": [shape_name(s) for s in shapes], "providers": providers,
            "new_fraction": NEW_FRACTION, "session_blocks": SESSION_BLOCKS, "min_slot_ms": MIN_SLOT_S * 1e3, "sessions": sessions, "inner": {},
        },
        machine=machine_info(),
        base=_info("base", base),
        variants=[_info(label, a) for label, a in zip(labels, variants)],
    )

    for provider in providers:
        if genai:
            bench_genai.bench_genai(result, arts, provider, shapes, new_tokens, threads, rounds, warmup, say,
                                    NEW_FRACTION, SESSION_BLOCKS, MIN_SLOT_S)
            continue
        if provider == "cuda":
            reason = ortsess.cuda_unavailable_reason()
            if reason:
                result.skipped.append(Skipped("cuda", reason))
                say(f"cuda skipped: {reason}")
                continue
        try:
            rows, inner, refs = _time_provider(arts, provider, shapes, threads, rounds, warmup, say)
        except _CudaFallback as e:
            result.skipped.append(Skipped("cuda", str(e)))
            continue
        result.latency.extend(rows)
        result.references.extend(refs)
        result.settings["inner"].update({f"{provider}/{k}": v for k, v in inner.items()})

        if memory_cost:
            for label, a in arts:
                say(f"{provider}: session cost of {label} (fresh process)")
                try:
                    result.sessions.append(memory.session_cost(a, label, provider, threads))
                except EmbdeployError as e:
                    if provider != "cuda":
                        raise
                    result.skipped.append(Skipped(f"cuda session cost of {label}", str(e)))

    if texts is not None:
        from .texts import TEXT_MIX, measure_texts, text_shape

        rows, text_rows = measure_texts(base, variants, labels, list(texts), batch_sizes, rounds, warmup, threads, say)
        result.latency.extend(rows)
        result.texts = text_rows
        result.settings.update(text_batch_sizes=list(batch_sizes), text_mix=TEXT_MIX)
        result.settings["shapes"] = result.settings["shapes"] + [text_shape(b) for b in batch_sizes]

    if sessions > 0:
        _multi(result, arts, sessions, threads, say)
        if any(r.provider == "cuda" for r in result.latency):
            _multi_cuda(result, arts, sessions, threads, say)
    return result


class _CudaFallback(EmbdeployError):
    pass


def _time_provider(arts, provider, shapes, threads, rounds, warmup, say):
    """Rounds split over SESSION_BLOCKS blocks, each with freshly created sessions (see SESSION_BLOCKS)."""
    entries: dict[tuple, dict[tuple, Entry]] = {shape: {} for shape in shapes}
    inner: dict[str, int] = {}
    per_block = [rounds // SESSION_BLOCKS + (1 if i < rounds % SESSION_BLOCKS else 0) for i in range(SESSION_BLOCKS)]
    order = list(range(len(arts)))
    for block, block_rounds in enumerate(per_block):
        if block_rounds == 0:
            continue
        random.Random(block).shuffle(order)
        try:
            live = {arts[i][0]: ortsess.create_session(arts[i][1].model_path, provider, threads) for i in order}
        except EmbdeployError as e:
            if provider == "cuda":
                raise _CudaFallback(f"a CUDA session could not be created: {e}") from None
            raise
        if provider == "cuda" and any("CUDAExecutionProvider" not in s.get_providers() for s in live.values()):
            raise _CudaFallback(
                "onnxruntime has the CUDA provider but fell back to CPU (no usable CUDA device or driver); "
                "check nvidia-smi and the CUDA/cuDNN versions onnxruntime-gpu needs")
        keep: list = []  # device buffers for IO binding live as long as this block's runners
        for shape in shapes:
            batch, seq = shape
            say(f"{provider} {shape_name(shape)}: block {block + 1}/{SESSION_BLOCKS}, {block_rounds} rounds")
            for label, a in arts:
                for mix in [BASE_MIX] if a.K == 0 else [BASE_MIX, NEW_MIX]:
                    # Same seed per shape and mix: every variant sees the same ids.
                    ids = token_ids(batch, seq, a.V, a.K, mix, NEW_FRACTION, seed=1000 * batch + seq + (mix == NEW_MIX))
                    feed = session_feed(live[label], ids)
                    run = _cuda_runner(live[label], feed, keep) if provider == "cuda" else _cpu_runner(live[label], feed)
                    entry = entries[shape].setdefault((label, mix), Entry(key=(label, mix), run=run, batch=batch))
                    entry.run = run
            group = list(entries[shape].values())
            base_entry = entries[shape][("base", BASE_MIX)]
            if shape_name(shape) not in inner:
                inner[shape_name(shape)] = calibrate_inner(base_entry.run, MIN_SLOT_S)
            run_rounds(group, block_rounds, warmup, inner[shape_name(shape)],
                       seed=block * 7919 + batch * 1009 + seq)
        del live, keep
    modes = {label: a.mode for label, a in arts}
    by_path = {a.path: label for label, a in arts}
    own = {label: by_path.get(Path(a.base_onnx).resolve()) for label, a in arts if a.base_onnx}
    rows, refs = [], []
    for shape in shapes:
        base_entry = entries[shape][("base", BASE_MIX)]
        for e in entries[shape].values():
            rows.append(LatencyRow(provider=provider, shape=shape_name(shape), variant=e.key[0], mode=modes[e.key[0]],
                                   mix=e.key[1], **summarize(e, base_entry)))
            ref = own.get(e.key[0])
            if ref not in (None, "base"):
                s = summarize(e, entries[shape][(ref, BASE_MIX)])
                refs.append(ReferenceRow(provider=provider, shape=shape_name(shape), variant=e.key[0], mix=e.key[1],
                                         reference=ref, ratio=s["ratio_to_base"], ratio_q25=s["ratio_q25"],
                                         ratio_q75=s["ratio_q75"]))
    return rows, inner, refs


def _cpu_runner(sess, feed):
    def run():
        return sess.run(None, feed)

    return run


def _cuda_runner(sess, feed, keep):
    """Inputs bound on the device once; outputs stay on the device; the call returns when they are ready."""
    rt = ortsess.ort()
    io = sess.io_binding()
    for name, arr in feed.items():
        value = rt.OrtValue.ortvalue_from_numpy(arr, "cuda", 0)
        keep.append(value)
        io.bind_ortvalue_input(name, value)
    for out in sess.get_outputs():
        io.bind_output(out.name, "cuda", 0)
    keep.append(io)

    def run():
        sess.run_with_iobinding(io)
        io.synchronize_outputs()

    return run


def _multi(result: BenchResult, arts, n: int, threads: int, say: Progress) -> None:
    by_mode = {a.mode: a for _, a in arts}
    if "swap" not in by_mode:
        result.skipped.append(Skipped(
            "sessions", f"--sessions {n} compares N swap sessions with N merged ones; no swap export was given "
            "(export one with `embdeploy export --mode swap` and pass its directory)"))
        return
    if "merged" not in by_mode:
        result.skipped.append(Skipped(
            "sessions (merged)", "no merged export was given, so the N-session comparison shows swap alone; "
            "pass a merged export too to compare"))
    for prepacking in (True, False):
        for mode in ("swap", "merged"):
            if mode in by_mode:
                say(f"{n} {mode} sessions in one process (prepacking {'on' if prepacking else 'off'})")
                result.multi.append(memory.multi_session(by_mode[mode], n, threads, prepacking))


def _multi_cuda(result: BenchResult, arts, n: int, threads: int, say: Progress) -> None:
    by_mode = {a.mode: a for _, a in arts}
    for mode in ("swap", "merged"):
        if mode not in by_mode:
            continue
        say(f"cuda: {n} {mode} tenants in one process")
        try:
            result.multi.append(memory.multi_session(by_mode[mode], n, threads, True, provider="cuda"))
        except EmbdeployError as e:
            result.skipped.append(Skipped(f"cuda: {n} {mode} tenants", str(e)))


def _info(label: str, a: ExportManifest) -> VariantInfo:
    size = sum((a.path / name).stat().st_size for name in a.files) / 1e6
    return VariantInfo(label=label, mode=a.mode, path=str(a.path), V=a.V, K=a.K, H=a.H, size_mb=round(size, 2),
                       precision=a.precision)


def machine_info() -> dict:
    rt = ortsess.ort()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": usable, "platform": platform.platform(),
        "python": platform.python_version(), "onnxruntime": rt.__version__,
        "ort_providers": rt.get_available_providers(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "gpu": procmem.gpu_description() if "CUDAExecutionProvider" in rt.get_available_providers() else None,
    }
