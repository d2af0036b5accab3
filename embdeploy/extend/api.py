"""One function per CLI command of the extend stage."""

from __future__ import annotations

from pathlib import Path

from ..errors import EmbdeployError
from ..models import load_base
from .config import ExtensionConfig, read_token_file
from .model import MANIFEST, Extension, load_extension


def extend_cli(model: str, tokens: Path, out: Path, *, name="default", init="subword-mean", init_token=None,
               init_source=None, tokenizer=None, task=None, strict=False, seed=0, overwrite=False) -> dict:
    """Extend a base model (or stack a group onto an extension directory) and save; returns a summary."""
    from ..fsutil import check_output_dir

    inputs = (model, tokens, tokenizer, init_source)
    check_output_dir(Path(out), overwrite, "extension", inputs)  # fail before loading anything
    file_notes: list[str] = []
    token_list = read_token_file(tokens, notes=file_notes)
    cfg = ExtensionConfig(tokens=token_list, name=name, init=init, init_token=init_token,
                          init_source=init_source, seed=seed, strict=strict)
    if (Path(model) / MANIFEST).is_file():
        if tokenizer or task:
            raise EmbdeployError("--tokenizer and --task apply to a base model, not to an extension directory")
        ext = load_extension(model)
    else:
        m, tok, info = load_base(model, task=task, tokenizer=tokenizer)
        ext = Extension(m, tok, info)
    report = ext.add(cfg)
    ext.save(out, overwrite=overwrite, inputs=inputs)
    return {
        "out": str(out),
        "added": report.added,
        "skipped": report.skipped,
        "notes": file_notes + report.notes,
        "first_id": report.added[0][1],
        "last_id": report.added[-1][1],
        "V": ext.V,
        "K": ext.K,
        "H": ext.H,
        "head": ext.head_mode,
    }
