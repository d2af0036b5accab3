"""Text generation on a genai export: a thin layer over onnxruntime-genai (it does the cache, search and batching).

    gen = Generator("clinical-genai")                            # a merged or swap export
    for piece in gen.stream("the patient had hyperkalemia", max_new_tokens=32):
        print(piece, end="", flush=True)
    gen.generate_ids([...], extension=tables)                    # swap: another extension's rows, this request only

What embdeploy adds: the directory is verified (every file against its digest),
prompts are encoded with transformers' tokenizer from the export (onnxruntime-genai's
tokenizer ignores the lstrip/single_word flags of embdeploy's new tokens, see
export/validate_genai.py), and in swap mode the extension table is fed per
generator, the export's own rows unless the request brings others
(`read_extension` checks they were made for this base).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import EmbdeployError


class Generator:
    """Greedy (default) or sampled generation on the genai export in `onnx_dir`."""

    def __init__(self, onnx_dir):
        from transformers import AutoTokenizer

        from ..export.genai import GenaiInterface, import_genai, read_tables
        from ..export.manifest import ExportManifest

        self.manifest = m = ExportManifest.verify(onnx_dir)
        if m.format != "genai":
            raise EmbdeployError(f"{onnx_dir} is a {m.format!r} export; `embdeploy generate` runs exports made with "
                                 "`embdeploy export --format genai`")
        self._og = import_genai()
        self.model = self._og.Model(str(m.path))
        self.interface = GenaiInterface.read(m.path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(m.path))
        self.tables = read_tables(m)  # swap: {input name: rows}; the default for every request

    def extension_tables(self, ext_dir) -> dict[str, np.ndarray]:
        """The rows of extension directory `ext_dir` as this swap export's inputs (refused if made for another base)."""
        from .tables import read_extension

        m = self.manifest
        if m.mode != "swap":
            raise EmbdeployError(f"{m.path} is a {m.mode} export, its rows are fixed; --extension needs a swap export")
        ext = read_extension(ext_dir, m, np.float32)
        if ext.K != m.K:
            raise EmbdeployError(f"the extension in {ext_dir} has K={ext.K} rows, the export {m.K}: onnxruntime-genai "
                                 "sizes the logits by genai_config.json's vocab_size; use an extension with "
                                 f"{m.K} rows (or export this one)")
        tables = {m.ext_embed: ext.embed}
        if m.ext_head:
            tables[m.ext_head] = ext.head
        return tables

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise EmbdeployError("the prompt is empty after tokenization; pass some text")
        return ids

    def generate_ids(self, ids: list[int], max_new_tokens: int = 64, extension: dict | None = None,
                     **search) -> Iterator[int]:
        """Token ids after `ids`, one at a time, until EOS or `max_new_tokens`; `search`: genai search options."""
        if max_new_tokens < 1:
            raise EmbdeployError(f"max_new_tokens is {max_new_tokens}; pass 1 or more")
        og = self._og
        params = og.GeneratorParams(self.model)
        params.set_search_options(**{"do_sample": False, **search, "max_length": len(ids) + max_new_tokens})
        gen = og.Generator(self.model, params)
        for name, rows in (extension if extension is not None else self.tables).items():
            gen.set_model_input(name, np.ascontiguousarray(rows, dtype=np.float32))
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        while not gen.is_done():
            gen.generate_next_token()
            yield int(gen.get_next_tokens()[0])

    def stream(self, prompt: str, max_new_tokens: int = 64, extension: dict | None = None, **search) -> Iterator[str]:
        """The generated text, piece by piece as tokens arrive (a piece ends where the decoded text is whole)."""
        yield from decode_pieces(self.tokenizer, self.generate_ids(self.encode(prompt), max_new_tokens, extension, **search))


def decode_pieces(tokenizer, tokens) -> Iterator[str]:
    """The text of the token ids `tokens` (an iterator), piece by piece as they arrive (a piece ends where the
    decoded text is whole; special tokens are skipped)."""
    out: list[int] = []
    shown = ""
    for token in tokens:
        out.append(token)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue  # a multi-byte character split over tokens: wait for the rest
        if text.startswith(shown):
            piece, shown = text[len(shown):], text
            if piece:
                yield piece
    text = tokenizer.decode(out, skip_special_tokens=True)
    if text.startswith(shown) and text[len(shown):]:
        yield text[len(shown):]


def generate(onnx_dir, prompt: str, max_new_tokens: int = 64, extension=None) -> str:
    """The whole generated text for `prompt` (see Generator.stream)."""
    gen = Generator(onnx_dir)
    tables = gen.extension_tables(Path(extension)) if extension is not None else None
    return "".join(gen.stream(prompt, max_new_tokens, tables))
