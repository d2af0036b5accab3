"""sha256 fingerprints of embedding tables and files.

A table's fingerprint covers dtype, shape and the raw bytes, so a table cast to
another dtype or with one row changed gets another fingerprint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def table_fingerprint(table) -> str:
    """sha256 of a torch tensor or numpy array: 'sha256:<hex>'."""
    if hasattr(table, "detach"):  # torch.Tensor, without importing torch here
        t = table.detach().cpu().contiguous()
        dtype = str(t.dtype).replace("torch.", "")
        if dtype == "bfloat16":
            raw = t.view(dtype=_torch().int16).numpy().tobytes()
        else:
            raw = t.numpy().tobytes()
        shape = tuple(t.shape)
    else:
        arr = np.ascontiguousarray(table)
        dtype, raw, shape = str(arr.dtype), arr.tobytes(), arr.shape
    h = hashlib.sha256()
    h.update(f"{dtype}:{'x'.join(map(str, shape))}:".encode())
    h.update(raw)
    return "sha256:" + h.hexdigest()


def rows_fingerprint(embed, head=None) -> str:
    """The extension fingerprint of (K, H) rows (and untied head rows): torch tensors or numpy arrays alike."""
    parts = [table_fingerprint(embed)] + ([table_fingerprint(head)] if head is not None else [])
    return table_fingerprint(np.frombuffer("|".join(parts).encode(), dtype=np.uint8))


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _torch():
    import torch

    return torch


# Text the normalizer, pre-tokenizer and model are run on for the tokenizer fingerprint: case, accents
# (composed and decomposed), compatibility forms, punctuation, digits, spacing, CJK, emoji.
_TOKENIZER_PROBE = ("Hello, Wörld! Ünïcödé café cafe\u0301 naïve ﬁnal ½ 12345 3.14 don't — "
                    "tab\there  two  spaces UPPER lower MiXeD 日本語 😀 #tag user@example.com")


def tokenizer_fingerprint(tokenizer, n_base: int) -> str:
    """sha256 of what a tokenizer's base part does: its ids below `n_base`, and its normalizer,
    pre-tokenizer and model on a fixed probe text.

    Behaviour, not file bytes: two saves of one tokenizer (by transformers 4 or 5) agree, while a base
    id moved, a vocabulary swapped or a normalizer changed gives another fingerprint. Tokens added on
    top (ids >= n_base: embdeploy's new tokens and padding placeholders) do not count.
    """
    backend = tokenizer.backend_tokenizer
    vocab = sorted((t, i) for t, i in tokenizer.get_vocab().items() if i < n_base)
    h = hashlib.sha256()
    h.update(f"n_base={n_base};".encode())
    for t, i in vocab:
        h.update(f"{i}\t{t}\n".encode("utf-8", "surrogatepass"))
    text = backend.normalizer.normalize_str(_TOKENIZER_PROBE) if backend.normalizer is not None else _TOKENIZER_PROBE
    pieces = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer is not None else [(text, (0, 0))]
    h.update(text.encode("utf-8", "surrogatepass"))
    for piece, offsets in pieces:
        ids = [t.id for t in backend.model.tokenize(piece)]
        h.update(f"|{piece}|{offsets}|{ids}".encode("utf-8", "surrogatepass"))
    return "sha256:" + h.hexdigest()
