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


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _torch():
    import torch

    return torch
