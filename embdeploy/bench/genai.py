"""Generation timing of genai exports: prefill latency and decode tokens/s, extended vs the genai base, interleaved.

    rows, inner = time_genai(arts, "cpu", ((1, 32),), new_tokens=64, threads=1, rounds=30, warmup=3)

onnxruntime-genai does the cache, the mask and the search; this times what a caller of
`embdeploy.runtime.generate` waits for. Per variant and token mix, one round slot is:

    prefill:BxS      `append_tokens` of a (B, S) prompt on a fresh generator: the prompt's forward pass,
                     the KV cache written. Repeated `inner` times per slot (a new generator each) so that a
                     slot lasts MIN_SLOT_S; the slot is their median.
    decode:BxS+N     then N greedy tokens with min_length = max_length = S + N, so EOS cannot end a run
                     early and every variant does the same work. The first generate_next_token picks from
                     the prefill's logits; each later one runs one decode step and the search (over V+K
                     columns in an extended export), so a slot is the median of N - 1 step times.
                     p50 ms is one step, seq/s is tokens/s (B tokens per step).

Rows are LatencyRows like every other bench row, the ratios the same median over rounds
of (variant slot / base slot in that round), so reports, plots and the baseline gate read
them unchanged. Models are created afresh in SESSION_BLOCKS blocks, as sessions are in
runner.py. Swap exports get their exported tables per generator (`set_model_input`), as
a request does.
"""

from __future__ import annotations

import json
import math
import random
import time

import numpy as np

from ..errors import EmbdeployError
from .inputs import BASE_MIX, NEW_MIX, token_ids
from .result import LatencyRow, shape_name
from .timing import Entry, summarize

DEFAULT_NEW_TOKENS = 64
MAX_INNER = 64
PREFILL, DECODE = "prefill", "decode"


def prefill_shape(shape) -> str:
    return f"{PREFILL}:{shape_name(shape)}"


def decode_shape(shape, new_tokens: int) -> str:
    return f"{DECODE}:{shape_name(shape)}+{new_tokens}"


def cuda_unavailable_reason(og) -> str | None:
    if not og.is_cuda_available():
        return (f"onnxruntime-genai {og.__version__} here has no CUDA support; install onnxruntime-genai-cuda "
                "on a machine with an NVIDIA GPU (genai exports are built and validated for the CPU for now)")
    return None


def check_lengths(arts, shapes, new_tokens: int) -> None:
    """Every shape fits every export's context (genai_config.json's context_length); all problems at once."""
    from ..export.genai import GENAI_CONFIG

    if new_tokens < 2:
        raise EmbdeployError(f"new_tokens={new_tokens}: use 2 or more (the first token comes from the prefill's "
                             "logits, decode steps start with the second)")
    problems = []
    for label, a in arts:
        context = json.loads((a.path / GENAI_CONFIG).read_text())["model"].get("context_length")
        for b, s in shapes:
            if context is not None and s + new_tokens > int(context):
                problems.append(f"{label}: a {s}-token prompt and {new_tokens} new tokens exceed the context of "
                                f"{context} tokens in {a.path / GENAI_CONFIG}")
    if problems:
        raise EmbdeployError("cannot time generation:\n" + "\n".join(f"  - {p}" for p in problems)
                             + "\npass shorter --shapes or fewer --new-tokens")


def load_model(og, path, provider: str, threads: int):
    """An og.Model with the bench's threading (1 intra-op, 1 inter-op by default), on `provider`."""
    cfg = og.Config(str(path))
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    if provider == "cuda":  # not run on the CPU-only machines this was written on
        cfg.clear_providers()
        cfg.append_provider("cuda")
    return og.Model(cfg)


def generation(og, model, ids: np.ndarray, tables: dict, new_tokens: int, prefills: int) -> tuple[list, list]:
    """(prefill seconds × `prefills`, decode step seconds × (new_tokens - 1)) for prompt `ids` (B, S)."""
    batch, seq = ids.shape
    perf = time.perf_counter
    pre = []
    for _ in range(prefills):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, num_beams=1, batch_size=batch, max_length=seq + new_tokens,
                                  min_length=seq + new_tokens)
        gen = og.Generator(model, params)
        for name, rows in tables.items():
            gen.set_model_input(name, rows)
        t0 = perf()
        gen.append_tokens(ids)
        pre.append(perf() - t0)
    gen.generate_next_token()  # picks from the prefill's logits, no model run
    steps = []
    while not gen.is_done():
        t0 = perf()
        gen.generate_next_token()
        steps.append(perf() - t0)
    if len(steps) != new_tokens - 1:
        raise EmbdeployError(f"onnxruntime-genai stopped after {len(steps) + 1} of {new_tokens} tokens although "
                             "min_length asked for all; time with fewer --new-tokens")
    return pre, steps


def time_genai(arts, provider: str, shapes, new_tokens: int, threads: int, rounds: int, warmup: int, say,
               new_fraction: float, blocks: int, min_slot_s: float) -> tuple[list[LatencyRow], dict]:
    """Prefill and decode rows for every (label, export) in `arts` (the base first), interleaved."""
    from ..export.genai import import_genai, read_tables

    og = import_genai()
    check_lengths(arts, shapes, new_tokens)
    tables = {label: {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in read_tables(a).items()}
              for label, a in arts}
    cases = [(label, mix) for label, a in arts for mix in ([BASE_MIX] if a.K == 0 else [BASE_MIX, NEW_MIX])]
    entries = {(shape, case, phase): Entry(key=case, run=None, batch=shape[0])
               for shape in shapes for case in cases for phase in (PREFILL, DECODE)}
    inner: dict[str, int] = {}
    per_block = [rounds // blocks + (1 if i < rounds % blocks else 0) for i in range(blocks)]
    order = list(range(len(arts)))
    for block, block_rounds in enumerate(per_block):
        if block_rounds == 0:
            continue
        random.Random(block).shuffle(order)
        models = {arts[i][0]: load_model(og, arts[i][1].path, provider, threads) for i in order}
        V, K = {label: a.V for label, a in arts}, {label: a.K for label, a in arts}
        for shape in shapes:
            batch, seq = shape
            say(f"{provider} genai {shape_name(shape)}+{new_tokens}: block {block + 1}/{blocks}, {block_rounds} rounds")
            # Same seed per shape and mix: every variant reads the same prompt.
            prompts = {(label, mix): token_ids(batch, seq, V[label], K[label], mix, new_fraction,
                                               seed=1000 * batch + seq + (mix == NEW_MIX)).astype(np.int32)
                       for label, mix in cases}

            def run(case, prefills):
                return generation(og, models[case[0]], prompts[case], tables[case[0]], new_tokens, prefills)

            name = shape_name(shape)
            if name not in inner:
                run(("base", BASE_MIX), 1)
                t = sorted(run(("base", BASE_MIX), 3)[0])[1]
                inner[name] = int(min(MAX_INNER, max(1, math.ceil(min_slot_s / max(t, 1e-7)))))
            rng = random.Random(block * 7919 + batch * 1009 + seq)
            idx = list(range(len(cases)))
            for _ in range(warmup):
                rng.shuffle(idx)
                for i in idx:
                    run(cases[i], 1)
            for _ in range(block_rounds):
                rng.shuffle(idx)
                for i in idx:
                    pre, steps = run(cases[i], inner[name])
                    for phase, times in ((PREFILL, pre), (DECODE, steps)):
                        e = entries[(shape, cases[i], phase)]
                        e.calls.extend(times)
                        e.slots.append(float(np.median(times)))
        del models
    modes = {label: a.mode for label, a in arts}
    rows = []
    for shape in shapes:
        for phase, shown in ((PREFILL, prefill_shape(shape)), (DECODE, decode_shape(shape, new_tokens))):
            base_entry = entries[(shape, ("base", BASE_MIX), phase)]
            for case in cases:
                rows.append(LatencyRow(provider=provider, shape=shown, variant=case[0], mode=modes[case[0]],
                                       mix=case[1], **summarize(entries[(shape, case, phase)], base_entry)))
    return rows, {f"{PREFILL}:{k}": v for k, v in inner.items()}


def is_genai_run(arts, texts: bool, sessions: int) -> bool:
    """True when the exports are genai exports; what a genai run cannot measure is refused, all at once."""
    formats = {label: a.format for label, a in arts}
    if "genai" not in formats.values():
        return False
    problems = []
    if len(set(formats.values())) > 1:
        shown = ", ".join(f"{label} ({f})" for label, f in formats.items())
        problems.append(f"genai and ONNX exports in one run ({shown}): bench genai exports against their genai base "
                        "and ONNX exports against theirs, in separate runs")
    if texts:
        problems.append("--texts compares encoder outputs on your texts; drop it for genai exports")
    if sessions:
        problems.append("--sessions compares N ONNX Runtime sessions given tables through the session options; "
                        "genai swap tables are fed per generator instead, drop --sessions")
    if problems:
        raise EmbdeployError("cannot benchmark these genai exports:\n" + "\n".join(f"  - {p}" for p in problems))
    return True


def bench_genai(result, arts, provider: str, shapes, new_tokens: int, threads: int, rounds: int, warmup: int, say,
                new_fraction: float, blocks: int, min_slot_s: float) -> None:
    """run_bench's genai path for one provider: the rows, settings and skips go into `result`."""
    from ..export.genai import import_genai
    from .result import Skipped

    og = import_genai()
    s = result.settings
    if "genai" not in s:
        s["genai"] = {"new_tokens": new_tokens, "onnxruntime_genai": og.__version__,
                      "search": "greedy, min_length = max_length = prompt + new_tokens (EOS cannot stop a run)"}
        s["shapes"] = [name for shape in shapes for name in (prefill_shape(shape), decode_shape(shape, new_tokens))]
        result.skipped.append(Skipped("session memory", "not measured for genai exports (onnxruntime-genai owns the "
                                      "sessions); time and ratios only"))
    if provider == "cuda":
        reason = cuda_unavailable_reason(og)
        if reason:
            result.skipped.append(Skipped("cuda", reason))
            say(f"cuda skipped: {reason}")
            return
    rows, inner = time_genai(arts, provider, shapes, new_tokens, threads, rounds, warmup, say, new_fraction, blocks,
                             min_slot_s)
    result.latency.extend(rows)
    s["inner"].update({f"{provider}/{k}": v for k, v in inner.items()})
