"""Attach a vocabulary extension to an exported ONNX model by rewriting its graph.

The rewrites are passes, one a module: `merged`, `split`, `swap`, over the
matching of `match` (the word-embedding Gather and the LM head are found by the
*content* of their weights, never by names, so any exporter works) and the
builder of `build`. This module keeps their public names in one place.

- `rewrite_merged`: the table becomes one (V+K, H) initializer.
- `rewrite_split`: base initializer untouched, extension in its own initializer,
  joined by a Concat that ONNX Runtime folds at session creation.
- `rewrite_swap`: base untouched and never concatenated; new ids go through a
  second Gather and a Where. The extension is an overridable initializer, so a
  session can bring another extension table, of any row count
  (`embdeploy.ort.swap_session_options`).

Each rewrite takes a `ModelProto` loaded with its external data and returns
`(new_model, changed)`; nothing is written to disk (see `embdeploy.onnx.io` for
that). By default the input model is never modified, which costs one copy of
the weights the rewrite does not change (protobuf messages cannot share a
tensor's bytes). With `in_place=True` the input is rewritten and returned
itself, and no unchanged weight is copied: what `embdeploy export` does, as it
drops the input right after.

Pass `head_table` and `head_ext` for an untied LM head; without them only a
head tied to `base_table` (found by content) is extended.

Row lookup after every rewrite: id < V -> base[id], V <= id < V+K -> ext[id - V].
Logits after every rewrite: columns [0, V) as before, column V+j = h @ ext_head[j]
(no bias on new columns: a head bias is extended with zeros).
"""

from .build import EXT_EMBED, EXT_HEAD, EXT_ROWS_DIM, VOCAB_DIM
from .match import EmbeddingMatch, HeadMatch, find_embedding, find_lm_head
from .merged import rewrite_merged
from .split import rewrite_split
from .swap import SWAP_MIN_OPSET, rewrite_swap

__all__ = [
    "EXT_EMBED", "EXT_HEAD", "EXT_ROWS_DIM", "VOCAB_DIM", "SWAP_MIN_OPSET", "EmbeddingMatch", "HeadMatch",
    "find_embedding", "find_lm_head", "rewrite_merged", "rewrite_split", "rewrite_swap",
]
