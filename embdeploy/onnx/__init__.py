"""ONNX side of embdeploy: the graph rewrites that attach an extension (passes), and model file I/O.

Modules: `match` (find the embedding Gather and LM head by table content), `build`
(plan and builder the passes share), one pass a module (`merged`, `split`,
`swap`), `rewrite` (their public names in one place), `io` (files). The public
names are importable from here too, loaded on first use so that importing
`embdeploy.onnx.io` does not pay for the passes.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "EXT_EMBED": "build", "EXT_HEAD": "build", "EXT_ROWS_DIM": "build", "VOCAB_DIM": "build",
    "EmbeddingMatch": "match", "HeadMatch": "match", "find_embedding": "match", "find_lm_head": "match",
    "rewrite_merged": "merged", "rewrite_split": "split", "rewrite_swap": "swap", "SWAP_MIN_OPSET": "swap",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)


def __dir__():
    return sorted({*globals(), *_PUBLIC})
