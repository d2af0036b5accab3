"""The split pass: base tables untouched, the extension in its own initializer, joined by Concat."""

from __future__ import annotations

import onnx

from .build import (
    EXT_EMBED,
    EXT_HEAD,
    Builder,
    extend_biases,
    head_seeds,
    materialize_if_constant,
    plan,
    redirect,
    unchanged,
)


def rewrite_split(
    model: onnx.ModelProto, base_table, ext_table, head_table=None, head_ext=None, *, in_place: bool = False
) -> tuple[onnx.ModelProto, bool]:
    """Keep the base tables as they are; add the extension as its own initializer joined by Concat.

    The extension rows live in initializer `embdeploy_ext_embed` (K, H) and, for an
    untied head, `embdeploy_ext_head` (K, H); both are stored in PyTorch (K, H)
    layout whatever the head's layout.

    Cases rewritten:
    - word-embedding Gather(s): data input becomes Concat(base, embdeploy_ext_embed, axis=0);
      a tied head reading the same initializer reads the same Concat;
    - head on a (V, H) initializer (Transpose -> MatMul, Gemm transB=1): Concat axis 0;
    - head on a pre-transposed (H, V) initializer (torch.onnx dynamo): Concat(W, Transpose(ext), axis=1);
      a tied head uses `embdeploy_ext_embed`, so the rows are stored once;
    - a head bias (Gemm C, or a constant Add after the head, last axis V): K zeros appended.
    K == 0 returns the model unchanged (a copy unless `in_place`). Other readers of the tables
    raise `EmbdeployError`. `in_place=True` rewrites and returns `model` itself, copying no weight.
    """
    p = plan(model, base_table, ext_table, head_table, head_ext, in_place, resizes_tables=True)
    if p.ext.shape[0] == 0:
        return unchanged(p), False
    b = Builder(p)
    emb, head = p.emb, p.head
    materialize_if_constant(b, emb.table)
    b.add_init(EXT_EMBED, p.ext)
    joined = b.node("Concat", [emb.table, EXT_EMBED], b.fresh("embdeploy_embed_table"), axis=0)
    b.before.append(joined)
    redirect(b, emb.table, joined.output[0])

    if head is not None and head.weight != emb.table:
        materialize_if_constant(b, head.weight)
        if p.tied:
            rows = EXT_EMBED
        else:
            b.add_init(EXT_HEAD, p.head_rows)
            rows = EXT_HEAD
        if head.layout == "VH":
            joined = b.node("Concat", [head.weight, rows], b.fresh("embdeploy_head_table"), axis=0)
            b.before.append(joined)
        else:
            cols = b.node("Transpose", [rows], b.fresh("embdeploy_ext_head_t"), perm=[1, 0])  # (H, K)
            joined = b.node("Concat", [head.weight, cols.output[0]], b.fresh("embdeploy_head_table"), axis=1)
            b.before.extend([cols, joined])
        redirect(b, head.weight, joined.output[0])
    if head is not None:
        extend_biases(b)
        b.logits = (head_seeds(p), emb.vocab_size + p.ext.shape[0])
    return b.finish(), True
