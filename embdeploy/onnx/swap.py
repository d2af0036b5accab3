"""The swap pass: new ids go to a second, replaceable table through a Where; the base tables stay as they are."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from embdeploy.errors import EmbdeployError

from .build import EXT_EMBED, EXT_HEAD, EXT_ROWS_DIM, VOCAB_DIM, Builder, head_output, materialize_if_constant, plan, unchanged
from .match import node_attr

SWAP_MIN_OPSET = 13  # Clip on int64 (12) and Unsqueeze with an axes input (13)


def rewrite_swap(
    model: onnx.ModelProto, base_table, ext_table, head_table=None, head_ext=None, *, in_place: bool = False
) -> tuple[onnx.ModelProto, bool]:
    """Route new ids to a second, replaceable table; the base tables are neither changed nor copied.

    Each word-embedding Gather(base, ids) becomes (ids cast to int64 when needed):
        V = Shape(base)[0], K = Shape(embdeploy_ext_embed)[0]
        rows = Where(Unsqueeze(ids < V, -1),
                     Gather(base, Clip(ids, 0, V-1)),
                     Gather(embdeploy_ext_embed, Clip(ids - V, 0, K-1)))
    Each LM head output L = head(h, W) (after its bias Add, if any) becomes
        Concat([L, h @ ext_head^T], axis=-1)
    with ext_head = `embdeploy_ext_embed` for a tied head, `embdeploy_ext_head` for an
    untied one; a Gemm head keeps its transA/alpha and its bias only on base columns.

    The extension initializers are also declared as graph inputs of shape
    (embdeploy_ext_rows, H), i.e. overridable initializers: ONNX Runtime does not
    constant-fold them, so another table of any row count K >= 1 can be supplied
    per session (`embdeploy.ort.swap_session_options`) or even per run as a feed. The
    logits' vocabulary axis is declared as `embdeploy_vocab`. Needs opset >= 13. K == 0
    returns the model unchanged (a copy unless `in_place`). Ids outside [0, V+K) are
    clipped, not rejected. `in_place=True` rewrites and returns `model` itself, copying no weight.
    """
    p = plan(model, base_table, ext_table, head_table, head_ext, in_place)
    if p.ext.shape[0] == 0:
        return unchanged(p), False
    opset = next(o.version for o in p.model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < SWAP_MIN_OPSET:
        raise EmbdeployError(
            f"swap mode needs ONNX opset >= {SWAP_MIN_OPSET}, the model uses opset {opset}; "
            "re-export with a newer opset or use mode 'merged' or 'split'"
        )
    b = Builder(p)
    idx, emb, head = p.idx, p.emb, p.head
    materialize_if_constant(b, emb.table)  # the Shape below runs before any node
    _add_overridable(b, EXT_EMBED, p.ext)

    zero = b.const("embdeploy_zero", np.array(0, dtype=np.int64))
    one = b.const("embdeploy_one", np.array(1, dtype=np.int64))
    last_axis = b.const("embdeploy_last_axis", np.array([-1], dtype=np.int64))

    def rows_of(table: str) -> tuple[str, str]:
        """(n, n - 1) as int64 scalars, computed from the table's shape at run time."""
        shape = b.node("Shape", [table])
        n = b.node("Gather", [shape.output[0], zero])
        last = b.node("Sub", [n.output[0], one])
        b.before.extend([shape, n, last])
        return n.output[0], last.output[0]

    v, v_last = rows_of(emb.table)
    _, k_last = rows_of(EXT_EMBED)
    for g in emb.gathers:
        gather = idx.nodes[g]
        ids = gather.input[1]
        new = []
        if idx.elem_type(ids) != TensorProto.INT64:
            cast = b.node("Cast", [ids], to=TensorProto.INT64)  # int32 ids, or a type the graph does not declare
            new.append(cast)
            ids = cast.output[0]
        is_base = b.node("Less", [ids, v])
        base_ids = b.node("Clip", [ids, zero, v_last])
        shifted = b.node("Sub", [ids, v])
        ext_ids = b.node("Clip", [shifted.output[0], zero, k_last])
        base_rows = b.node("Gather", [gather.input[0], base_ids.output[0]], axis=0)
        ext_rows = b.node("Gather", [EXT_EMBED, ext_ids.output[0]], axis=0)
        cond = b.node("Unsqueeze", [is_base.output[0], last_axis])  # (..., 1) broadcasts over H
        where = b.node("Where", [cond.output[0], base_rows.output[0], ext_rows.output[0]], gather.output[0])
        new += [is_base, base_ids, shifted, ext_ids, base_rows, ext_rows, cond, where]
        b.replace[g] = new

    seeds = set()
    if head is not None:
        if p.tied:
            rows = EXT_EMBED
        else:
            rows = EXT_HEAD
            _add_overridable(b, EXT_HEAD, p.head_rows)
        rows_t = None
        for i in head.heads:
            node = idx.nodes[i]
            out_pos, _ = head_output(p, i)
            logits = idx.nodes[out_pos].output[0]
            base_logits = b.fresh("embdeploy_base_logits")
            b.edit(out_pos).output[0] = base_logits
            if node.op_type == "Gemm":
                ext_logits = b.node(
                    "Gemm", [node.input[0], rows],
                    alpha=float(node_attr(node, "alpha", 1.0)), transA=int(node_attr(node, "transA", 0)), transB=1,
                )
            else:
                if rows_t is None:
                    rows_t = b.node("Transpose", [rows], perm=[1, 0])  # (H, K)
                    b.before.append(rows_t)
                ext_logits = b.node("MatMul", [node.input[0], rows_t.output[0]])
            concat = b.node("Concat", [base_logits, ext_logits.output[0]], logits, axis=-1)
            b.after.setdefault(out_pos, []).extend([ext_logits, concat])
            seeds.add(logits)
    if seeds:
        b.logits = (seeds, VOCAB_DIM)
    return b.finish(), True


def _add_overridable(b: Builder, name: str, rows: np.ndarray) -> None:
    """An initializer that is also a graph input with a symbolic row count (see rewrite_swap)."""
    b.add_init(name, rows)
    elem = helper.np_dtype_to_tensor_dtype(rows.dtype)
    b.new_inputs.append(helper.make_tensor_value_info(name, elem, [EXT_ROWS_DIM, rows.shape[1]]))
