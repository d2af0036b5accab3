"""The `embdeploy` command: a thin layer that parses options and calls one library function per command."""

from __future__ import annotations

import functools
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    name="embdeploy",
    help=(
        "Give a pretrained transformers model new tokens in a separate extension table (base rows never change), "
        "train only the new rows, export to ONNX Runtime, prove it matches PyTorch, and measure what it costs."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(stderr=True)
out = Console()


def _command(fn):
    """Turn library errors into a one-line message and a non-zero exit, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import EmbdeployError

        try:
            return fn(*args, **kwargs)
        except EmbdeployError as e:
            console.print("[bold red]error:[/] " + _escape(str(e)), highlight=False)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)


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
):
    """Write a plain transformers model with the new rows merged in (loads with AutoModel*.from_pretrained)."""
    from .extend.merge import merge_extension
    from .extend.model import load_extension

    ext = load_extension(ext_dir)
    merge_extension(ext, out_dir, overwrite=overwrite)
    out.print(f"[green]wrote[/] {out_dir}: vocabulary {ext.V} + {ext.K} = {ext.V + ext.K} rows")


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
