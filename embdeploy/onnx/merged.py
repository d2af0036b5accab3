"""The merged pass: the embedding table (and LM head weight) becomes one table with the K rows appended."""

from __future__ import annotations

import numpy as np
import onnx

from .build import Builder, extend_biases, head_seeds, materialize, plan, unchanged


def rewrite_merged(
    model: onnx.ModelProto, base_table, ext_table, head_table=None, head_ext=None, *, in_place: bool = False
) -> tuple[onnx.ModelProto, bool]:
    """Replace the embedding table (and LM head weight) by one table with the K extension rows appended.

    Cases rewritten:
    - word-embedding Gather(s) on a (V, H) initializer or Constant -> (V+K, H), same name;
    - tied head reading the same initializer (Transpose -> MatMul, Gemm transB=1): extended with it;
    - tied head on its own initializer, (V, H) or pre-transposed (H, V) as torch.onnx dynamo
      exports it: that initializer gets the ext rows (or columns);
    - untied head (`head_table`, `head_ext` given): its weight gets `head_ext`, in its layout;
    - a head bias (Gemm C, or a constant Add after the head, last axis V): K zeros appended.
    K == 0 returns the model unchanged (a copy unless `in_place`). Other readers of the tables
    raise `EmbdeployError`. `in_place=True` rewrites and returns `model` itself.
    """
    p = plan(model, base_table, ext_table, head_table, head_ext, in_place, resizes_tables=True)
    if p.ext.shape[0] == 0:
        return unchanged(p), False
    b = Builder(p)
    emb, head = p.emb, p.head
    materialize(b, emb.table, np.concatenate([p.idx.array(emb.table), p.ext], axis=0))
    if head is not None and head.weight != emb.table:
        w = p.idx.array(head.weight)
        if head.layout == "VH":
            materialize(b, head.weight, np.concatenate([w, p.head_rows], axis=0))
        else:
            materialize(b, head.weight, np.concatenate([w, p.head_rows.T], axis=1))
        del w
    if head is not None:
        extend_biases(b)
        b.logits = (head_seeds(p), emb.vocab_size + p.ext.shape[0])
    return b.finish(), True
