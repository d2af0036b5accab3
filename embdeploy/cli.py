"""The `embdeploy` command: a thin layer that parses options and calls one library function per command."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="embdeploy",
    help=(
        "Give a pretrained transformers model new tokens in a separate extension table (base rows never change), "
        "train only the new rows, export to ONNX Runtime, prove it matches PyTorch, and measure what it costs."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # help strings hold "[default: …]" and "[serve]", which rich markup would swallow
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(stderr=True)
out = Console()


class Terminated(KeyboardInterrupt):
    """SIGTERM (systemd, docker stop, kill): unwound like Ctrl-C, so partial outputs are removed."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _version(value: bool):
    if value:
        from . import __version__

        print(f"embdeploy {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", help="Print the version and exit.", callback=_version,
                                       is_eager=True)):
    """Give a pretrained transformers model new tokens in a separate extension table (base rows never change), train only the new rows, export to ONNX Runtime, prove it matches PyTorch, and measure what it costs."""
    # The application's settings, made when a command runs (importing this module changes nothing); the
    # libraries are imported lazily by the commands, after this.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _command(fn):
    """Turn library errors into a one-line message and a non-zero exit, no traceback.

    SIGTERM is handled like Ctrl-C while the command runs (a server installs its own handlers on top).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import EmbdeployError

        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except EmbdeployError as e:
            console.print("[bold red]error:[/] " + _escape(str(e)), highlight=False)
            raise typer.Exit(e.exit_code) from None
        except Terminated:
            console.print("[yellow]terminated (SIGTERM)[/]; unfinished output was removed")
            raise typer.Exit(143) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _validation_summary(report):
    """One row per output: the worst numbers over all probes."""
    from rich.table import Table

    t = Table(title=f"validation {'passed' if report.passed else 'FAILED'}: {report.mode} {report.dtype} on {report.provider}, "
                    f"{len(report.checks)} checks, {report.new_ids_checked} new ids", title_justify="left")
    for col in ("output", "max |diff|", "mean |diff|", "worst cosine", "mean cosine", "top-1", "top-5", ""):
        t.add_column(col, justify="left" if col == "output" else "right")
    for name, w in report.outputs().items():
        top = ["-", "-"] if w.get("top1") is None else [f"{w['top1']:.4f}", f"{w['top5']:.4f}"]
        t.add_row(name, f"{w['max_abs']:.2e}", f"{w['mean_abs']:.2e}", f"{w['min_cosine']:.6f}",
                  f"{w.get('mean_cosine', 1.0):.6f}", *top, "ok" if w["ok"] else "FAIL")
    return t


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)


_BASE_MODEL_HELP = ("Where the base model is, when not where extension.json records it (the extension was moved "
                    "to another machine or venv): its directory, `minilm` for the built-in model, or a hub id; "
                    "refused unless its embedding table has the recorded fingerprint "
                    "[default: the base extension.json records].")


def _base_model_option():
    return typer.Option(None, "--base-model", help=_BASE_MODEL_HELP)


class Init(str, Enum):
    subword_mean = "subword-mean"
    mean = "mean"
    mean_noise = "mean-noise"
    copy_token = "copy-token"
    reference = "reference"
    zeros = "zeros"
    normal = "normal"
    vectors = "vectors"


class Task(str, Enum):
    auto = "auto"
    feature_extraction = "feature-extraction"
    fill_mask = "fill-mask"
    text_generation = "text-generation"


# ------------------------------------------------------------------------------------------ suggest
@app.command()
@_command
def suggest(
    corpus: list[Path] = typer.Argument(..., help="Corpus files: plain text (one text per line) or JSON lines ({\"text\": ...}); streamed, any size."),
    model: str = typer.Option("minilm", "--model", "-m", help="Base model directory, or `minilm` for the built-in model (only its tokenizer is loaded) [default: minilm]."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer directory, if not the model's own."),
    top: Optional[int] = typer.Option(1000, help="Most tokens to suggest [default: 1000]."),
    min_count: int = typer.Option(5, help="Ignore words seen fewer times [default: 5]."),
    min_saving: int = typer.Option(1, help="Stop the list at the first word that saves fewer corpus tokens [default: 1]."),
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Token file to write (what `extend --tokens` reads)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON (every candidate)."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG: cumulative share of corpus tokens saved against K."),
    rows: int = typer.Option(30, help="Table rows to print (the token file and --json hold them all) [default: 30]."),
    overwrite: bool = typer.Option(False, help="Replace --out if it is a token file suggest wrote."),
):
    """Find the words worth adding: whole words as the model's tokenizer splits them, scored by corpus tokens saved."""
    from .suggest import SuggestConfig, load_suggest_tokenizer
    from .suggest import suggest as run_suggest

    config = SuggestConfig(top=top, min_count=min_count, min_saving=min_saving)
    tok = load_suggest_tokenizer(model, tokenizer)
    with _progress_bar("reading the corpus", json_out) as bar:
        result = run_suggest(corpus, tok, config, model_name=model, progress=bar)
    if out_file is not None:
        result.write_tokens(out_file, overwrite=overwrite, inputs=corpus)
    if plot is not None:
        result.write_plot(plot)
    if json_out:
        print(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
        return
    for line in result.lines(limit=rows):
        print(line)
    print(result.summary())
    for reason, n in result.dropped.items():
        print(f"  dropped {n} word(s): {reason}")
    if out_file is not None:
        print(f"wrote {out_file}: {len(result.candidates)} token(s); next: embdeploy extend {model} --tokens {out_file} --out EXT_DIR")
    if plot is not None:
        print(f"wrote {plot}")


class _progress_bar:
    """A rich progress bar on stderr (bytes read of the corpus); silent when stderr is not a terminal or for --json."""

    def __init__(self, what: str, quiet: bool):
        self.what, self.quiet, self.bar, self.task = what, quiet or not console.is_terminal, None, None

    def __enter__(self):
        if not self.quiet:
            from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

            self.bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.what, total=None)
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


# ------------------------------------------------------------------------------------------ extend
@app.command()
@_command
def extend(
    model: str = typer.Argument(..., help="Base model directory (saved with save_pretrained), `minilm` for the built-in model, or an extension directory to stack a new named group onto."),
    tokens: Path = typer.Option(..., "--tokens", "-t", help="Text file, one new token per line (UTF-8; '#' lines are comments)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Extension directory to write."),
    name: str = typer.Option("default", help="Name of this extension group (groups stack; ids follow in order)."),
    init: Init = typer.Option(Init.subword_mean, help="How new rows start: subword-mean = mean of the rows of the token's original pieces."),
    init_token: Optional[str] = typer.Option(None, help="For --init copy-token: the existing token whose row is copied."),
    init_source: Optional[str] = typer.Option(None, help="For --init reference: a model/merged directory; for --init vectors: a .safetensors file."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer directory, if not the model's own."),
    task: Task = typer.Option(Task.auto, help="Model head to load; auto reads config.architectures."),
    strict: bool = typer.Option(False, help="Fail if a token is already in the vocabulary instead of skipping it."),
    seed: int = typer.Option(0, help="Seed for random inits."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Add new tokens to a model in a separate extension table and write an extension directory."""
    from .extend.api import extend_cli

    result = extend_cli(model, tokens, out_dir, name=name, init=init.value, init_token=init_token,
                        init_source=init_source, tokenizer=tokenizer, task=None if task == Task.auto else task.value,
                        strict=strict, seed=seed, overwrite=overwrite)
    if json_out:
        out.print_json(data=result)
        return
    out.print(f"[green]wrote[/] {out_dir}: {len(result['added'])} new token(s), ids {result['first_id']}..{result['last_id']}"
              f" (V={result['V']}, H={result['H']}, head {result['head']})")
    for t, why in result["skipped"]:
        out.print(f"  [yellow]skipped[/] {_escape(t)!s}: {why}")
    for n in result["notes"]:
        out.print(f"  [cyan]note[/] {_escape(n)}")


# ------------------------------------------------------------------------------------------ inspect
@app.command()
@_command
def inspect(
    path: Path = typer.Argument(..., help="An extension directory or an ONNX export directory."),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
):
    """Show what an extension or an ONNX export directory holds."""
    from .inspect import describe

    info = describe(path)
    if json_out:
        out.print_json(data=info["manifest"])
    else:
        out.print(info["table"])


# ------------------------------------------------------------------------------------------ merge
@app.command()
@_command
def merge(
    ext_dir: Path = typer.Argument(..., help="Extension directory."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Plain transformers model directory to write."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    base_model: Optional[str] = _base_model_option(),
):
    """Write a plain transformers model with the new rows merged in (loads with AutoModel*.from_pretrained)."""
    from .extend.merge import merge_extension
    from .extend.model import load_extension

    ext = load_extension(ext_dir, base_model=base_model)
    merge_extension(ext, out_dir, overwrite=overwrite, inputs=(ext_dir,))
    out.print(f"[green]wrote[/] {out_dir}: vocabulary {ext.V} + {ext.K} = {ext.V + ext.K} rows")


class Objective(str, Enum):
    distill = "distill"
    mlm = "mlm"
    clm = "clm"


# ------------------------------------------------------------------------------------------ train
@app.command()
@_command
def train(
    ext_dir: Path = typer.Argument(..., help="Extension directory to train."),
    texts: Path = typer.Option(..., "--texts", help="Training texts: plain text (one per line) or JSON lines ({\"text\": ...})."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the trained extension here [default: update EXT_DIR in place]."),
    objective: Objective = typer.Option(Objective.distill, help="distill: match the original tokenization's hidden states (any model); mlm: masked-LM head; clm: causal LM."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps [default: 3 per new token, at least 300]."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (warm-up then cosine decay) [default: per objective]."),
    batch_size: int = typer.Option(32, help="Global batch size (split over processes under torchrun)."),
    layer: int = typer.Option(-1, help="distill: hidden layer to match (-1 = last)."),
    pooled: Optional[bool] = typer.Option(None, "--pooled/--no-pooled", help="distill: also match the pooled sentence embedding [default: on for sentence-transformers models, which need it to keep pooled outputs close]."),
    seed: int = typer.Option(0, help="Seed; the same seed gives the same rows on CPU."),
    eval_texts: Optional[Path] = typer.Option(None, help="Held-out texts: print the quality report before and after."),
    checkpoint_dir: Optional[Path] = typer.Option(None, help="Write checkpoints here (safetensors + JSON)."),
    checkpoint_every: int = typer.Option(0, help="Checkpoint every N steps (0: only at the end when --checkpoint-dir is set)."),
    resume: bool = typer.Option(False, help="Continue from the newest checkpoint in --checkpoint-dir."),
    device: str = typer.Option("auto", help="auto: the GPU when torch sees one (cuda:LOCAL_RANK under torchrun), else the CPU; or cpu, cuda, cuda:N."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    base_model: Optional[str] = _base_model_option(),
):
    """Train only the new rows (base frozen and verified by fingerprint afterwards); the record goes into extension.json."""
    from .extend.model import load_extension
    from .fsutil import check_output_dir
    from .train import TrainConfig, init_distributed
    from .train import train as run_train

    config = TrainConfig(objective=objective.value, steps=steps, lr=lr, batch_size=batch_size, layer=layer,
                         pooled=pooled, seed=seed, device=device, checkpoint_dir=checkpoint_dir,
                         checkpoint_every=checkpoint_every, resume=resume)
    inputs = (texts, eval_texts, checkpoint_dir)
    if out_dir is not None:
        inputs = (ext_dir, *inputs)  # without --out, EXT_DIR is updated in place, as documented
        check_output_dir(out_dir, overwrite, "extension", inputs)
    rank, _ = init_distributed()  # a no-op outside torchrun / accelerate launch
    ext = load_extension(ext_dir, base_model=base_model)
    rec = run_train(ext, texts, config, eval_texts=eval_texts, console=console)
    target = out_dir or ext_dir
    if rank != 0:
        return  # every rank holds the same rows; only rank 0 writes
    ext.save(target, overwrite=True if out_dir is None else overwrite, inputs=inputs)
    if rec.eval_after:  # --eval-texts: the held-out report before and after, as its help says
        from .train.evaluate import QualityReport

        before = QualityReport.from_json(rec.eval_before) if rec.eval_before else None
        QualityReport.from_json(rec.eval_after).render(out, before=before, title="held-out quality, before → after training")
    out.print(f"[green]wrote[/] {target}: {rec.objective}, {rec.steps} steps on {rec.device}, loss {rec.first_loss:.4g} → "
              f"{rec.final_loss:.4g}, {rec.time_s:.0f}s ({rec.tokens_per_s:.0f} tokens/s); base rows verified unchanged")


# ------------------------------------------------------------------------------------------ eval
@app.command(name="eval")
@_command
def eval_(
    ext_dir: Path = typer.Argument(..., help="Extension directory."),
    texts: Path = typer.Option(..., "--texts", help="Held-out texts that use the new tokens (plain text or JSON lines)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    base_model: Optional[str] = _base_model_option(),
):
    """Quality of the new rows: output with new tokens vs with the original tokenization (cosines, retrieval accuracy)."""
    from .extend.model import load_extension
    from .train import evaluate, read_texts

    ext = load_extension(ext_dir, base_model=base_model)
    report = evaluate(ext, read_texts(texts))
    if json_out:
        out.print_json(data=report.to_json())
    else:
        report.render(out)


class Mode(str, Enum):
    merged = "merged"
    split = "split"
    swap = "swap"


class Format(str, Enum):
    onnx = "onnx"
    genai = "genai"


class DType(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"


class Quantize(str, Enum):
    int8 = "int8"


class Backend(str, Enum):
    torch = "torch"
    optimum = "optimum"


# ------------------------------------------------------------------------------------------ export
@app.command()
@_command
def export(
    ext_dir: Path = typer.Argument(..., help="Extension directory (from `embdeploy extend` / `train`)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="ONNX directory to write (required unless the recipe names one)."),
    mode: Optional[Mode] = typer.Option(
        None,
        help="merged: one (V+K)xH table, loads anywhere [default]. "
        "split: base and extension in separate files joined by Concat; ORT folds the Concat at session "
        "creation, so each session holds a private full copy of the table instead of a shared memory map "
        "(MiniLM: 92 MB private vs 46 MB for merged; see perf/README.md). swap: two Gathers + Where; the base stays shared, the extension table can be "
        "replaced per session without re-export; a few elementwise ops per token.",
    ),
    recipe: Optional[Path] = typer.Option(None, help="Declarative export recipe (JSON, see export/); options given here override it."),
    base_onnx: Optional[Path] = typer.Option(None, help="Use this ONNX file/dir (e.g. from optimum-cli) as the base instead of exporting one."),
    backend: Optional[Backend] = typer.Option(None, help="Base exporter: torch (torch.onnx dynamo) [default] or optimum (needs optimum-onnx)."),
    dtype: Optional[DType] = typer.Option(None, help="fp32 [default], or fp16 (for the CUDA provider)."),
    quantize: Optional[Quantize] = typer.Option(None, help="int8: ONNX Runtime dynamic quantization of the MatMul weights (per channel) for the CPU; the embedding tables, LM head and the MatMul with the largest activation outliers stay float, validated by cosine to PyTorch fp32."),
    calibration_texts: Optional[Path] = typer.Option(None, help="With --quantize int8: texts (one per line or JSON lines; the first 64 are used) on which the activation outliers are measured [default: a sample of embdeploy's shipped training text]."),
    provider: Optional[str] = typer.Option(None, help="Provider used for validation: cpu [default] or cuda."),
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip the validation gate (the manifest then records validation: null)."),
    validate_texts: Optional[Path] = typer.Option(None, help="Your texts (one per line, or JSON lines) as extra validation probes, as `embdeploy validate --texts`."),
    cache_dir: Optional[Path] = typer.Option(None, help="Base export cache, shared with `embdeploy quickstart` [default: $EMBDEPLOY_CACHE or ~/.cache/embdeploy]."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show every validation probe, not one row per output."),
    base_model: Optional[str] = _base_model_option(),
    format_: Format = typer.Option(Format.onnx, "--format", help="onnx [default], or genai: a causal LM for "
                                   "onnxruntime-genai (KV cache, its search; `embdeploy generate`), base built by its "
                                   "model builder, modes merged or swap (needs the genai extra)."),
):
    """Export an extension to ONNX (base exported once and cached, then a graph rewrite), then validate it against PyTorch."""
    from .export import export_extension

    if format_ is Format.genai:
        if validate_texts is not None:
            from .errors import EmbdeployError

            raise EmbdeployError("--validate-texts is for ONNX exports; a genai export is checked by generation, "
                                 "drop --validate-texts")
        export_genai_cmd(ext_dir, out_dir, mode, recipe, base_onnx, backend, dtype, quantize, provider, no_validate,
                         cache_dir, overwrite, verbose, base_model)
        return
    args = {}
    if recipe is not None:
        from .export import load_recipe

        args.update(load_recipe(recipe))
    given = {"mode": mode and mode.value, "dtype": dtype and dtype.value, "backend": backend and backend.value,
             "provider": provider, "base_onnx": base_onnx, "out": out_dir, "quantize": quantize and quantize.value,
             "calibration_texts": calibration_texts, "validate_texts": validate_texts}
    args.update({k: v for k, v in given.items() if v is not None})
    if no_validate:
        args["validate"] = False
    if args.get("out") is None:
        from .errors import EmbdeployError

        raise EmbdeployError("no output directory: pass --out DIR (or set `out` in the recipe)")
    args.setdefault("mode", "merged")
    res = export_extension(ext_dir, overwrite=overwrite, cache_dir=cache_dir, base_model=base_model, progress=lambda m: console.print(f"[dim]{_escape(m)}[/]"), **args)
    if res.report is not None:
        out.print(res.report.table() if verbose else _validation_summary(res.report))
    t = res.timings
    out.print(
        f"[green]wrote[/] {res.out} ({res.mode}, {res.dtype}{', int8 weights' if args.get('quantize') else ''}); base {'from cache' if res.base_cached else 'exported'}, "
        f"rewrite {t.get('rewrite', 0):.2f}s, total {t.get('total', 0):.1f}s"
        + ("" if res.report is None else f"; validation passed, max abs diff {res.report.max_abs_diff:.2e}")
    )


def export_genai_cmd(ext_dir, out_dir, mode, recipe, base_onnx, backend, dtype, quantize, provider, no_validate,
                     cache_dir, overwrite, verbose, base_model):
    from .errors import EmbdeployError
    from .export.genai import export_genai

    given = {"--recipe": recipe, "--base-onnx": base_onnx, "--backend": backend, "--quantize": quantize}
    refused = [k for k, v in given.items() if v is not None]
    if refused:
        raise EmbdeployError(f"--format genai builds its base with onnxruntime-genai's model builder; drop "
                             f"{', '.join(refused)}")
    if out_dir is None:
        raise EmbdeployError("no output directory: pass --out DIR")
    res = export_genai(ext_dir, (mode or Mode.merged).value, out_dir, dtype=(dtype.value if dtype else "fp32"),
                       overwrite=overwrite, validate=not no_validate, cache_dir=cache_dir,
                       provider=provider or "cpu", base_model=base_model,
                       progress=lambda m: console.print(f"[dim]{_escape(m)}[/]"))
    if res.report is not None:
        out.print(res.report.table() if verbose else _validation_summary(res.report))
        for note in res.report.notes if verbose else ():
            out.print(f"note: {_escape(note)}")
    t = res.timings
    out.print(
        f"[green]wrote[/] {res.out} (genai, {res.mode}, {res.dtype}); base {'from cache' if res.base_cached else 'built'}, "
        f"rewrite {t.get('rewrite', 0):.2f}s, total {t.get('total', 0):.1f}s"
        + ("" if res.report is None else f"; validation passed, max abs diff {res.report.max_abs_diff:.2e}, "
           "greedy generation equal to transformers")
    )


# ------------------------------------------------------------------------------------------ generate
@app.command()
@_command
def generate(
    onnx_dir: Path = typer.Argument(..., help="A genai export (`embdeploy export --format genai`)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The text to continue."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Stop after this many tokens (or at EOS)."),
    extension: Optional[Path] = typer.Option(None, "--extension", help="Swap exports: use this extension directory's "
                                             "rows for this run (made for the same base, same K) [default: the "
                                             "exported rows]."),
):
    """Generate text with onnxruntime-genai (greedy), streaming it as it comes; new tokens are read and written."""
    import sys

    from .runtime.generate import Generator

    gen = Generator(onnx_dir)
    tables = gen.extension_tables(extension) if extension is not None else None
    for piece in gen.stream(prompt, max_new_tokens, tables):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


# ------------------------------------------------------------------------------------------ validate
@app.command()
@_command
def validate(
    onnx_dir: Path = typer.Argument(..., help="ONNX directory written by `embdeploy export`."),
    ext: Optional[Path] = typer.Option(None, "--ext", help="Extension directory to compare with [default: the one recorded at export]."),
    provider: str = typer.Option("cpu", help="ONNX Runtime provider: cpu or cuda."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show every probe, not one row per output."),
    base_model: Optional[str] = _base_model_option(),
    texts: Optional[Path] = typer.Option(None, "--texts", help="Your texts (one per line, or JSON lines) as extra "
                                         "probes: the export's tokenizer, truncated to the model's length, the same "
                                         "tolerance; for int8 exports the mean cosine on them is the figure to read."),
):
    """Check file digests, then ONNX Runtime against PyTorch on probes that hit every new id; non-zero exit on any failure."""
    from .errors import EmbdeployError, ValidationFailed
    from .export import validate_dir

    try:
        from .export.manifest import ExportManifest

        extra = {"texts": texts}
        if ExportManifest.read(onnx_dir).format == "genai":
            from .export.validate_genai import validate_genai_dir as validate_dir  # noqa: F811

            if texts is not None:
                raise EmbdeployError("--texts is for ONNX exports; a genai export is checked by generation, drop --texts")
            extra = {}
        report = validate_dir(onnx_dir, ext, provider=provider, base_model=base_model, **extra)
    except ValidationFailed:
        raise
    if json_out:
        out.print_json(data=report.to_json())
    else:
        out.print(report.table() if verbose else _validation_summary(report))
        if report.texts:
            t = report.texts
            out.print(f"your texts: {t['count']} ({t['positions']} positions, {t['new_token_positions']} new-token "
                      f"positions, {t['truncated']} truncated to {t['max_length']} tokens)")
        out.print(f"[green]passed[/]: {onnx_dir}, max abs diff {report.max_abs_diff:.2e}")


# ------------------------------------------------------------------------------------------ bench
@app.command()
@_command
def bench(
    onnx_dirs: list[Path] = typer.Argument(..., help="ONNX export directories to time (their base export is found from embdeploy.json)."),
    base: Optional[Path] = typer.Option(None, help="Base export directory to compare with [default: the one the exports record]."),
    shapes: str = typer.Option("1x16,1x128,8x128", help="Grid of BATCHxSEQ shapes, comma-separated."),
    threads: int = typer.Option(1, help="ONNX Runtime intra-op threads. 1 keeps ratios stable on shared machines (perf/README.md has the measurements)."),
    rounds: int = typer.Option(30, help="Timed rounds; every variant runs once per round, in shuffled order."),
    warmup: int = typer.Option(3, help="Untimed warm-up rounds."),
    providers: str = typer.Option("cpu", help="cpu, cuda or cpu,cuda (CUDA is skipped with a message when absent; timed with IO binding)."),
    sessions: int = typer.Option(0, help="Also create N sessions in one process: N swap sessions with different tables vs N merged."),
    no_memory: bool = typer.Option(False, "--no-memory", help="Skip per-session creation time and memory (each in its own process)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON instead of tables."),
    report_md: Optional[Path] = typer.Option(None, help="Write a markdown report here."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG plot here (latency per shape and mode, ratio to base)."),
    baseline: Optional[Path] = typer.Option(None, help="Regression gate: compare ratios to base with this baseline JSON."),
    max_regression: float = typer.Option(0.05, help="Gate margin: fail when a ratio is worse than baseline by more than this fraction."),
    save_baseline: Optional[Path] = typer.Option(None, help="Write this run's ratios as a baseline JSON."),
    texts: Optional[Path] = typer.Option(None, "--texts", help="Your texts (one per line, or JSON lines): tokens per text, end-to-end latency with tokenization, and fidelity to the base, per --batch-sizes."),
    batch_sizes: str = typer.Option("1,8,32", help="Batch sizes for --texts [default: 1,8,32]."),
    new_tokens: int = typer.Option(64, help="genai exports: greedy tokens per timed generation, EOS ignored (each shape BxS is then B prompts of S tokens)."),
):
    """Time base vs extended exports interleaved in one run (p50/p90/p99, throughput, ratio to base), session memory; optional regression gate."""
    from .bench import check_baseline, print_result, run_bench, write_markdown, write_plot
    from .bench import save_baseline as write_baseline
    from .bench import parse_shapes

    result = run_bench(onnx_dirs, base_dir=base, shapes=parse_shapes(shapes), providers=providers, threads=threads,
                       rounds=rounds, warmup=warmup, sessions=sessions, memory_cost=not no_memory,
                       progress=lambda m: console.print(f"[dim]{_escape(m)}[/]"), texts=texts,
                       batch_sizes=batch_sizes if texts is not None else None, new_tokens=new_tokens)
    if json_out:
        out.print_json(result.to_json())
    else:
        print_result(out, result)
    if report_md:
        write_markdown(result, report_md)
        console.print(f"wrote {report_md}")
    if plot:
        write_plot(result, plot)
        console.print(f"wrote {plot}")
    if save_baseline:
        write_baseline(result, save_baseline)
        console.print(f"wrote baseline {save_baseline}")
    if baseline:
        comps = check_baseline(result, baseline, max_regression)
        console.print(f"[green]gate passed[/]: {len(comps)} ratio(s) within {max_regression:.0%} of {baseline}")


# ------------------------------------------------------------------------------------------ serve
@app.command()
@_command
def serve(
    onnx_dir: Path = typer.Argument(..., help="ONNX directory written by `embdeploy export`."),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8000, help="Port to bind."),
    providers: Optional[str] = typer.Option(None, help="e.g. cpu or cuda,cpu [default: CUDA if available, else CPU]."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime intra-op threads [default: ORT's choice]."),
    extension: Optional[Path] = typer.Option(None, help="Swap exports: serve with this extension directory's table."),
    max_batch: int = typer.Option(64, help="Most texts in one request (more gets 413)."),
    max_chars: int = typer.Option(20000, help="Longest text in characters (longer gets 413)."),
    header_timeout: float = typer.Option(10.0, help="Seconds for a request's headers to arrive (slow clients are closed)."),
    body_timeout: float = typer.Option(30.0, help="Seconds for a request's body to arrive (else 408)."),
    keep_alive: float = typer.Option(5.0, help="Seconds an idle keep-alive connection stays open."),
    max_connections: int = typer.Option(1000, help="Open connections at most; more are closed at once."),
    api_key: Optional[list[str]] = typer.Option(None, "--api-key", help="Require `Authorization: Bearer KEY` (repeatable; also $EMBDEPLOY_API_KEYS, comma-separated, which keeps keys out of the process list). /health and /healthz stay open."),
    batching: bool = typer.Option(True, "--batching/--no-batching", help="Coalesce concurrent requests into shared ONNX Runtime runs; --no-batching runs one request per run (for comparison)."),
    batch_size: int = typer.Option(32, help="Most texts in one ONNX Runtime run."),
    max_batch_tokens: int = typer.Option(8192, help="Most padded tokens (texts x longest) in one run; a longer text runs alone."),
    max_wait_ms: float = typer.Option(2.0, help="Milliseconds a run may wait for requests still arriving (a lone request never waits)."),
    max_queue: int = typer.Option(1024, help="Texts waiting for a run at most; more gets 503 with Retry-After."),
    request_timeout: float = typer.Option(30.0, help="Seconds a request may take from queue to answer (else 503 if still queued, 504 if running)."),
    tenant: Optional[list[str]] = typer.Option(None, "--tenant", help="NAME=EXT_DIR: serve that extension's vocabulary over the swap export as model NAME (repeatable). Requests pick it with their `model` field; without one they get the export's own table."),
    tenants_file: Optional[Path] = typer.Option(None, help='Tenants from a file: JSON {"NAME": "EXT_DIR", ...} or NAME=EXT_DIR lines (paths relative to the file).'),
    workers: int = typer.Option(1, help="Server processes on the one port, each with its own Session (the base's file pages are shared); /metrics sums them. Not with --admin-key."),
    access_log: bool = typer.Option(False, "--access-log/--no-access-log", help="One JSON line per request on stderr: time, client, method, path, status, model, ms."),
    admin_key: Optional[list[str]] = typer.Option(None, "--admin-key", help="Open PUT/DELETE /admin/tenants/NAME (add and remove tenants while serving) to `Authorization: Bearer KEY` (repeatable; also $EMBDEPLOY_ADMIN_KEYS) [default: admin routes off]."),
):
    """Serve an export over HTTP: POST /v1/encode, POST /v1/embeddings, GET /v1/models, TEI's POST /embed, GET /healthz, GET /v1/metadata; requests share runs (dynamic batching); --tenant serves more vocabularies over a swap export; a genai export gets POST /v1/completions (OpenAI-style) instead (needs the `serve` extra: pip install "embdeploy[serve]")."""
    from .errors import EmbdeployError
    from .runtime.batching import BatchConfig
    from .runtime.serve import serve as run_server
    from .runtime.tenants import parse_tenant_args, read_tenants_file

    keys = list(api_key or []) + [k.strip() for k in os.environ.get("EMBDEPLOY_API_KEYS", "").split(",") if k.strip()]
    admins = list(admin_key or []) + [k.strip() for k in os.environ.get("EMBDEPLOY_ADMIN_KEYS", "").split(",") if k.strip()]
    tenants = parse_tenant_args(tenant)
    if tenants_file is not None:
        from_file = read_tenants_file(tenants_file)
        twice = sorted(set(tenants) & set(from_file))
        if twice:
            raise EmbdeployError(f"tenant(s) {', '.join(map(repr, twice))} given by --tenant and in {tenants_file}; "
                                 "name each tenant once")
        tenants.update(from_file)
    run_server(onnx_dir, host=host, port=port, providers=providers, threads=threads,
               extension=extension, max_batch=max_batch, max_chars=max_chars, header_timeout=header_timeout,
               body_timeout=body_timeout, keep_alive=keep_alive, max_connections=max_connections,
               api_keys=keys or None,
               batching=BatchConfig(enabled=batching, max_batch_texts=batch_size, max_batch_tokens=max_batch_tokens,
                                    max_wait_ms=max_wait_ms, max_queue=max_queue, request_timeout=request_timeout),
               tenants=tenants or None, admin_keys=admins or None, json_access_log=access_log,
               workers=workers)


# ------------------------------------------------------------------------------------------ quickstart
@app.command()
@_command
def quickstart(
    workdir: Path = typer.Option(Path("embdeploy-quickstart"), help="Working directory for every artifact (reused on re-runs)."),
    model: str = typer.Option("minilm", help="Base model [default: the built-in all-MiniLM-L6-v2]."),
    terms: Optional[Path] = typer.Option(None, help="New tokens [default: 50 clinical terms shipped with embdeploy]."),
    texts: Optional[Path] = typer.Option(None, help="Training contexts [default: shipped with embdeploy]."),
    eval_texts: Optional[Path] = typer.Option(None, help="Held-out texts [default: shipped with embdeploy]."),
    steps: Optional[int] = typer.Option(None, help="Training steps [default: train's default]."),
    bench_rounds: int = typer.Option(12, help="Benchmark rounds (30 for committed figures; 12 keeps the demo short)."),
    fresh: bool = typer.Option(False, help="Delete WORKDIR first instead of reusing it (a base export cache inside it is kept)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Base export cache, shared with `embdeploy export` [default: $EMBDEPLOY_CACHE or ~/.cache/embdeploy]."),
):
    """The whole pipeline on the built-in model: extend → train → eval → export (merged, split, swap) → validate → bench."""
    from .quickstart import run_quickstart

    run_quickstart(workdir, model=model, terms=terms, train_texts=texts, eval_texts=eval_texts, steps=steps,
                   bench_rounds=bench_rounds, fresh=fresh, console=out, cache_dir=cache_dir)


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
