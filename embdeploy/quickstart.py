"""`embdeploy quickstart`: the whole pipeline on the built-in MiniLM, with a summary a newcomer can read.

extend (50 clinical terms) → eval → train (distill) → eval → export merged/split/swap
(validated) → bench → summary. Everything lands in one working directory; a
re-run reuses what is already there (extension, trained extension, base export
cache, exports) and only redoes what is missing.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import EmbdeployError
from .export.manifest import EXPORT_MODES

WORKDIR_MARK = ".embdeploy-quickstart"


def _is_quickstart_dir(wd: Path) -> bool:
    # work dirs of versions before the marker hold at least the extension quickstart wrote
    return (wd / WORKDIR_MARK).is_file() or (wd / "extension" / "extension.json").is_file()


def _clear_workdir(wd: Path, keep: Path) -> None:
    """Delete what is in `wd`, except `keep` (the base export cache, shared with `embdeploy export`) if it lies inside."""
    import shutil

    keep = keep.resolve()
    for child in wd.iterdir():
        if child.resolve() == keep:
            continue
        if child.is_dir() and not child.is_symlink() and keep.is_relative_to(child.resolve()):
            _clear_workdir(child, keep)
        elif child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def data_file(name: str) -> Path:
    return Path(str(resources.files("embdeploy") / "data" / name))


@dataclass
class QuickstartResult:
    workdir: Path
    tokens_added: int = 0
    quality_before: dict = field(default_factory=dict)
    quality_after: dict = field(default_factory=dict)
    exports: dict = field(default_factory=dict)  # mode -> {"dir", "max_abs_diff", "bytes"}
    bench: dict = field(default_factory=dict)  # mode -> {shape: ratio}
    suggested: list = field(default_factory=list)  # what `suggest` finds in the shipped training corpus (top rows)
    on_texts: dict = field(default_factory=dict)  # mode -> {token_reduction, ratio_b1, fidelity_mean, fidelity_min}
    plot: Path | None = None
    seconds: dict = field(default_factory=dict)
    terms: Path | None = None  # the token file the extension was made from
    memory: dict = field(default_factory=dict)  # variant -> {private_mb, mapped_mb, create_s}: one session, alone


def _stage(console: Console, n: int, total: int, what: str):
    console.rule(f"[bold cyan]{n}/{total}[/] {what}", align="left")


def _dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def run_quickstart(workdir="embdeploy-quickstart", model: str = "minilm", terms=None, train_texts=None,
                   eval_texts=None, steps: int | None = None, bench_rounds: int = 12, fresh: bool = False,
                   console: Console | None = None, cache_dir=None) -> QuickstartResult:
    from .export import export_extension
    from .export.manifest import ExportManifest
    from .extend.config import ExtensionConfig, read_token_file
    from .extend.model import Extension, load_extension
    from .models import load_base
    from .train import TrainConfig, read_texts, train

    from .export.base import cache_root

    console = console or Console()
    wd = Path(workdir)
    cache = cache_root(cache_dir)  # the one `embdeploy export` uses, so the base is exported once for both
    if fresh and wd.exists():
        if not _is_quickstart_dir(wd):
            raise EmbdeployError(
                f"--fresh deletes the work directory, and {wd} was not made by `embdeploy quickstart` "
                f"(no {WORKDIR_MARK}); nothing was deleted. Choose another --workdir"
            )
        _clear_workdir(wd, cache)
    if wd.exists() and any(wd.iterdir()) and not _is_quickstart_dir(wd):
        raise EmbdeployError(
            f"{wd} holds files that `embdeploy quickstart` did not write (no {WORKDIR_MARK}); "
            "choose an empty or new --workdir"
        )
    wd.mkdir(parents=True, exist_ok=True)
    (wd / WORKDIR_MARK).write_text("made by `embdeploy quickstart`; --fresh may delete this directory\n")
    res = QuickstartResult(workdir=wd)
    terms = Path(terms) if terms else data_file("terms.txt")
    res.terms = terms
    train_texts = Path(train_texts) if train_texts else data_file("train.txt")
    eval_texts = Path(eval_texts) if eval_texts else data_file("heldout.txt")
    total = 7
    t_all = time.perf_counter()

    # 0. suggest: which words the shipped corpus would suggest (the demo keeps its 50 curated terms)
    _stage(console, 1, total, f"suggest: the words worth adding in {train_texts.name}, by tokens saved")
    t = time.perf_counter()
    from .suggest import SuggestConfig, load_suggest_tokenizer, suggest

    sg = suggest([train_texts], load_suggest_tokenizer(model), SuggestConfig(top=200, min_count=2), model_name=str(model))
    for line in sg.lines(limit=8):
        console.print(line, highlight=False, markup=False)
    console.print(sg.summary(), highlight=False, markup=False)
    res.suggested = [{"word": c.word, "count": c.count, "pieces": c.pieces, "saved": c.saved} for c in sg.candidates[:20]]
    res.seconds["suggest"] = time.perf_counter() - t

    # 1. extend ------------------------------------------------------------------------------
    _stage(console, 2, total, f"extend {model} with the terms in {terms.name}")
    ext_dir, trained_dir = wd / "extension", wd / "extension-trained"
    t = time.perf_counter()
    tokens = read_token_file(terms)
    if (ext_dir / "extension.json").is_file():
        ext = load_extension(ext_dir)
        console.print(f"reusing {ext_dir} ({ext.K} tokens)")
    else:
        m, tok, info = load_base(model)
        ext = Extension(m, tok, info)
        rep = ext.add(ExtensionConfig(tokens=tokens, name="clinical"))
        ext.save(ext_dir)
        console.print(f"added {len(rep.added)} tokens (ids {rep.added[0][1]}..{rep.added[-1][1]}), "
                      f"skipped {len(rep.skipped)}; wrote {ext_dir}")
    res.tokens_added = ext.K
    res.seconds["extend"] = time.perf_counter() - t

    # 2. train (quality before and after) ------------------------------------------------------
    _stage(console, 3, total, "train the new rows (token distillation; the base stays frozen)")
    t = time.perf_counter()
    held = read_texts(eval_texts)
    from .train import Evaluator

    evaluator = Evaluator(ext, held)  # the original-tokenization side is computed once
    before = evaluator.run()
    res.quality_before = before.to_json()
    if (trained_dir / "extension.json").is_file():
        ext = load_extension(trained_dir)
        evaluator = Evaluator(ext, held)
        console.print(f"reusing {trained_dir}")
    else:
        rec = train(ext, read_texts(train_texts), TrainConfig(steps=steps), console=console)
        ext.save(trained_dir)
        console.print(f"trained {rec.steps} steps in {rec.time_s:.0f}s; wrote {trained_dir}")
    after = evaluator.run()
    res.quality_after = after.to_json()
    after.render(console, before=before, title="held-out quality, subword-mean init → trained")
    res.seconds["train"] = time.perf_counter() - t

    # 3-4. export in every mode, each validated ------------------------------------------------
    _stage(console, 4, total, "export to ONNX in three modes (base exported once, then a graph rewrite)")
    t = time.perf_counter()
    console.print(f"base export cache: {cache} (shared with `embdeploy export`; move it with --cache-dir or "
                  "$EMBDEPLOY_CACHE)", highlight=False, markup=False)
    for mode in EXPORT_MODES:
        out = wd / f"onnx-{mode}"
        if (out / "embdeploy.json").is_file():
            man = ExportManifest.read(out)
            if man.extension_fingerprint == ext.extension_fingerprint() and (man.validation or {}).get("passed"):
                console.print(f"reusing {out}")
                res.exports[mode] = {"dir": out, "max_abs_diff": man.validation.get("max_abs_diff"), "bytes": _dir_size(out)}
                continue
        r = export_extension(trained_dir, mode, out, cache_dir=cache, overwrite=True,
                             progress=lambda msg: console.print(f"[dim]  {msg}[/]"))
        res.exports[mode] = {"dir": out, "max_abs_diff": r.report.max_abs_diff, "bytes": _dir_size(out),
                             "rewrite_s": r.timings.get("rewrite")}
        console.print(f"{mode}: validated, max abs diff {r.report.max_abs_diff:.2e}")
    res.seconds["export"] = time.perf_counter() - t

    _stage(console, 5, total, "validation (ONNX Runtime vs PyTorch) passed for every mode")
    for mode, e in res.exports.items():
        console.print(f"{mode}: max abs diff {e['max_abs_diff']:.2e}")

    # 5. bench ------------------------------------------------------------------------------
    _stage(console, 6, total, "benchmark: base vs extended, interleaved, 1 thread")
    t = time.perf_counter()
    from .bench import run_bench, write_markdown, write_plot

    result = run_bench([res.exports[m]["dir"] for m in EXPORT_MODES], rounds=bench_rounds, memory_cost=True,
                       progress=lambda msg: console.print(f"[dim]  {msg}[/]"), texts=held, batch_sizes=(1,))
    (wd / "bench.json").write_text(result.to_json())
    write_markdown(result, wd / "bench.md")
    res.plot = write_plot(result, wd / "bench.png")
    for row in result.latency:
        if row.mix == "base-ids" and row.variant != "base":
            res.bench.setdefault(row.mode, {})[row.shape] = row.ratio_to_base
    ratio_b1 = {r.variant: r.ratio_to_base for r in result.latency if r.shape == "texts/b1"}
    for r in result.texts:
        res.on_texts[r.variant] = {"token_reduction": r.token_reduction, "ratio_b1": ratio_b1.get(r.variant),
                                   "fidelity_mean": r.fidelity_mean, "fidelity_min": r.fidelity_min}
    for s in result.sessions:
        if s.provider == "cpu":
            res.memory[s.variant] = {"private_mb": s.private_mb, "mapped_mb": s.mapped_mb, "create_s": s.create_s}
    res.seconds["bench"] = time.perf_counter() - t
    res.seconds["total"] = time.perf_counter() - t_all

    # 6. summary ----------------------------------------------------------------------------
    _stage(console, 7, total, "summary")
    console.print(summary_table(res))
    for line in next_steps(res, eval_texts, str(model)):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    return res


def summary_table(res: QuickstartResult) -> Table:
    t = Table(title="embdeploy quickstart", title_justify="left", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("result")
    from .train.evaluate import QualityReport

    t.add_row("tokens added", f"{res.tokens_added}" + (f", from {res.terms}" if res.terms else ""))
    b, a = res.quality_before, res.quality_after
    if b and a:
        t.add_row("held-out sentence cosine (mean / min)",
                  f"before training {b['sentence_cos_mean']:.3f} / {b['sentence_cos_min']:.3f}  →  "
                  f"after {a['sentence_cos_mean']:.3f} / {a['sentence_cos_min']:.3f}  (1.000: the same vector "
                  "as the base model on the original tokenization)")
        ra = lambda q: "n/a" if q.get("retrieval_accuracy") is None else f"{q['retrieval_accuracy']:.2f}"  # noqa: E731
        n = QualityReport.from_json(a).candidates_label()
        t.add_row(f"retrieval accuracy (1 of {n})", f"{ra(b)} → {ra(a)}  (each text must find its original-"
                  f"tokenization twin among {n} candidates; chance at most 1 in "
                  f"{a.get('candidates_min') or a.get('candidates')})")
    t.add_row("how to read the modes", "latency ratio = extended time / base time at BxS (B texts of S tokens), the "
              "median of per-round ratios, both timed in one run: above 1 is slower than the base, below 1 faster. "
              "Per session: private = memory the session owns, shared = the export's files memory-mapped, which "
              "sessions and processes share.")
    for mode, e in res.exports.items():
        ratios = res.bench.get(mode, {})
        rtxt = ", ".join(f"{s} {r:.3f}" for s, r in ratios.items() if re.fullmatch(r"\d+x\d+", s))
        mem = res.memory.get(mode)
        mtxt = (f"per session private {mem['private_mb']:.0f} MB, shared {mem['mapped_mb']:.0f} MB, created in "
                f"{mem['create_s']:.2f} s; " if mem else "")
        t.add_row(f"{mode}", f"max abs diff {e['max_abs_diff']:.1e}; latency ratio to base {rtxt}; {mtxt}"
                             f"{_fmt_bytes(e['bytes'])} on disk; {_MODE_NOTE[mode]}; {e['dir']}")
    if "merged" in res.on_texts:
        o = res.on_texts["merged"]
        t.add_row("on the held-out texts (merged)",
                  f"{o['token_reduction']:.0%} fewer tokens, end-to-end latency ratio {o['ratio_b1']:.2f} at batch 1 "
                  f"(tokenization included), fidelity {o['fidelity_mean']:.3f} (min {o['fidelity_min']:.3f}): the "
                  "cosine to the base model's output on the original tokenization")
    if res.plot:
        t.add_row("plot", str(res.plot))
    t.add_row("report", str(res.workdir / "bench.md"))
    t.add_row("time", ", ".join(f"{k} {v:.0f}s" for k, v in res.seconds.items()))
    return t


_MODE_NOTE = {
    "merged": "one table, loads in any ONNX Runtime consumer",
    "split": "base and extension in separate files; ORT joins them at load into a private copy",
    "swap": "the base stays shared; the extension table can be replaced per session (one per tenant)",
}


def next_steps(res: QuickstartResult, texts: Path, model: str) -> list[str]:
    """What to run next, with this run's own paths."""
    wd = res.workdir
    return [
        "next:",
        f"  serve it:        pip install 'embdeploy[serve]' && embdeploy serve {wd / 'onnx-merged'}",
        f"  your own texts:  embdeploy bench {wd / 'onnx-merged'} {wd / 'onnx-swap'} --texts YOUR_TEXTS.txt"
        f"   (the quickstart used {texts})",
        f"  your own words:  embdeploy suggest YOUR_CORPUS.txt --model {model} --out tokens.txt, then "
        f"embdeploy extend {model} --tokens tokens.txt --out ext",
    ]


def result_json(res: QuickstartResult) -> dict:
    return json.loads(json.dumps(res.__dict__, default=str))
