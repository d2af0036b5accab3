"""Find the word-embedding Gather and the LM head of a graph by the content of their tables.

Names are never looked at, so any exporter works. `Index` is the read-only view
of a graph (constants, producers, consumers) the finders and the passes share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from embdeploy.errors import EmbdeployError

_COMPARE_BYTES = 16 << 20  # compare tables in blocks: a whole-table `==` allocates a bool per element


@dataclass(frozen=True)
class EmbeddingMatch:
    """The word-embedding table found in a graph.

    `table` is an initializer (or a Constant node output) equal to the base
    table; `gathers` are the positions in `graph.node` of the Gathers reading it
    (several when e.g. encoder and decoder share the table).
    """

    table: str
    gathers: tuple[int, ...]
    vocab_size: int
    hidden_size: int
    dtype: np.dtype


@dataclass(frozen=True)
class HeadMatch:
    """The LM head found in a graph.

    `weight` holds the head table either as (V, H) (`layout="VH"`: read through a
    Transpose, or by a Gemm with transB=1) or pre-transposed as (H, V)
    (`layout="HV"`: MatMul / Gemm transB=0 B input). `heads` are the positions in
    `graph.node` of the MatMul/Gemm nodes producing logits, `transposes` those of
    the Transpose nodes between the weight and a head.
    """

    weight: str
    layout: Literal["VH", "HV"]
    heads: tuple[int, ...]
    transposes: tuple[int, ...]


class Index:
    """Read-only lookups over a graph: constants, producers, consumers."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.nodes = list(graph.node)
        self.consts: dict[str, TensorProto] = {t.name: t for t in graph.initializer}
        self.const_nodes: dict[str, int] = {}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = {}
        for i, node in enumerate(self.nodes):
            for slot, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((i, slot))
            for name in node.output:
                self.producer[name] = i
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        self.consts[node.output[0]] = attr.t
                        self.const_nodes[node.output[0]] = i
        self.in_subgraphs = _subgraph_refs(graph)

    def label(self, i: int) -> str:
        node = self.nodes[i]
        name = repr(node.name) if node.name else f"#{i} (unnamed)"
        return f"{node.op_type} node {name} -> {', '.join(map(repr, node.output))}"

    def array(self, name: str) -> np.ndarray:
        tensor = self.consts[name]
        if tensor.data_location == TensorProto.EXTERNAL:
            raise EmbdeployError(
                f"initializer {name!r} has its values in an external data file that was not loaded; "
                "load the model with embdeploy.onnx.io.load_model (or onnx.load with "
                "load_external_data=True) before rewriting it"
            )
        return numpy_helper.to_array(tensor)

    def elem_type(self, name: str) -> int | None:
        g = self.graph
        for vi in (*g.input, *g.value_info, *g.output):
            if vi.name == name and vi.type.HasField("tensor_type"):
                return vi.type.tensor_type.elem_type or None
        if name in self.consts:
            return self.consts[name].data_type
        return None


def _subgraph_refs(graph: onnx.GraphProto) -> set[str]:
    """Names read by nodes inside subgraphs (If/Loop/Scan bodies), recursively."""

    def subgraphs(g: onnx.GraphProto):
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    yield attr.g
                yield from attr.graphs

    refs: set[str] = set()
    pending = list(subgraphs(graph))
    while pending:
        g = pending.pop()
        for node in g.node:
            refs.update(node.input)
        pending.extend(subgraphs(g))
    return refs


def node_attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def tensor_dims(tensor: TensorProto) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.dims)


def _equal(arr: np.ndarray, table: np.ndarray) -> bool:
    """Exact equality, accepting the table cast to the initializer's float dtype (fp16, bf16)."""
    if arr.shape != table.shape:
        return False
    if arr.dtype != table.dtype:
        floatlike = np.issubdtype(arr.dtype, np.floating) or arr.dtype.name in ("bfloat16",)
        if not floatlike:
            return False  # int8/uint8 weights are quantized: a cast would compare garbage
    rows = max(1, _COMPARE_BYTES // max(1, arr[:1].nbytes))
    return all(
        np.array_equal(arr[i:i + rows], table[i:i + rows].astype(arr.dtype, copy=False))
        for i in range(0, max(1, len(arr)), rows)
    )


def as_table(table, what: str) -> np.ndarray:
    arr = np.asarray(table)
    if arr.ndim != 2:
        raise EmbdeployError(f"{what} must be a 2-D (rows, hidden) array, got shape {arr.shape}")
    return arr


def find_embedding(model: onnx.ModelProto, base_table) -> EmbeddingMatch:
    """Find the word-embedding Gather(s) of `model` by the content of their table.

    A match is a Gather (axis 0) whose data input is an initializer or Constant
    equal to `base_table` (V, H), or to it cast to the initializer's dtype.
    Several Gathers reading the same initializer are one match; several distinct
    initializers holding the table, or none, raise `EmbdeployError`.
    """
    base = as_table(base_table, "base_table")
    idx = Index(model.graph)
    by_table: dict[str, list[int]] = {}
    for i, node in enumerate(idx.nodes):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        data = node.input[0]
        if data in idx.consts and node_attr(node, "axis", 0) == 0:
            by_table.setdefault(data, []).append(i)

    same_shape = [t for t in by_table if tensor_dims(idx.consts[t]) == base.shape]
    matches = [t for t in same_shape if _equal(idx.array(t), base)]
    if not matches:
        raise EmbdeployError(_no_table_message(idx, by_table, base))
    if len(matches) > 1:
        listed = "; ".join(
            f"{t!r} (read by {', '.join(idx.label(i) for i in by_table[t])})" for t in matches
        )
        raise EmbdeployError(
            f"several distinct initializers hold the base embedding table: {listed}. embdeploy extends "
            "exactly one table; export the model with its embeddings shared (tied) so the graph keeps "
            "one initializer, or deduplicate the initializers before rewriting"
        )
    table = matches[0]
    _refuse_subgraph_use(idx, table)
    tensor = idx.consts[table]
    return EmbeddingMatch(
        table=table,
        gathers=tuple(by_table[table]),
        vocab_size=int(base.shape[0]),
        hidden_size=int(base.shape[1]),
        dtype=helper.tensor_dtype_to_np_dtype(tensor.data_type),
    )


def _no_table_message(idx: Index, by_table: dict[str, list[int]], base: np.ndarray) -> str:
    v, h = base.shape
    msg = (
        f"the ONNX model does not contain this base table: no Gather reads an initializer equal to "
        f"the {v}x{h} {base.dtype} base table ({len(by_table)} Gather table(s) checked: "
        f"{', '.join(f'{t!r} {list(tensor_dims(idx.consts[t]))}' for t in by_table) or 'none'}). "
        "Was it exported from another model, or quantized? Export the base model this extension "
        "was made for, unquantized, and rewrite that file"
    )
    for t in by_table:
        dims = tensor_dims(idx.consts[t])
        if len(dims) == 2 and dims[1] == h and dims[0] > v:
            arr = idx.array(t)
            if _equal(arr[:v], base):
                msg += (
                    f". Note: initializer {t!r} has {dims[0]} rows whose first {v} equal the base table: "
                    "this model looks already extended; rewrite the base export instead"
                )
    return msg


def _refuse_subgraph_use(idx: Index, name: str) -> None:
    if name in idx.in_subgraphs:
        raise EmbdeployError(
            f"initializer {name!r} is also read inside a subgraph (If/Loop/Scan body); embdeploy rewrites "
            "only the main graph. Export without control flow (e.g. without the merged past/no-past "
            "decoder) and rewrite that model"
        )


def find_lm_head(model: onnx.ModelProto, table) -> HeadMatch | None:
    """Find the LM head whose weight is `table` (V, H), or None when the graph has none.

    Cases: MatMul(h, W) or Gemm(h, W) with W an (H, V) initializer equal to
    table.T (pre-transposed, as torch.onnx dynamo folds it); MatMul/Gemm fed by a
    Transpose of a (V, H) initializer equal to the table; Gemm with transB=1 and
    B the (V, H) table. Tables cast to the initializer's float dtype match too.
    Several heads reading one initializer are one match; distinct matching
    initializers raise `EmbdeployError`.
    """
    tab = as_table(table, "head table")
    idx = Index(model.graph)
    found: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for i, node in enumerate(idx.nodes):
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        # The op computes h @ B' with B' of shape (H, V); need_t says whether B' must equal table.T.
        need_t = node.op_type == "MatMul" or node_attr(node, "transB", 0) == 0
        b, via = node.input[1], None
        if b not in idx.consts and b in idx.producer:
            p = idx.producer[b]
            pnode = idx.nodes[p]
            if pnode.op_type == "Transpose" and list(node_attr(pnode, "perm", [1, 0])) == [1, 0]:
                if pnode.input[0] in idx.consts:
                    b, via, need_t = pnode.input[0], p, not need_t
        if b not in idx.consts:
            continue
        expected_shape = tab.shape[::-1] if need_t else tab.shape
        if tensor_dims(idx.consts[b]) != tuple(expected_shape):
            continue
        if not _equal(idx.array(b), tab.T if need_t else tab):
            continue
        heads, transposes = found.setdefault((b, "HV" if need_t else "VH"), ([], []))
        heads.append(i)
        if via is not None and via not in transposes:
            transposes.append(via)
    if not found:
        return None
    if len(found) > 1:
        listed = "; ".join(
            f"{w!r} ({layout}, read by {', '.join(idx.label(i) for i in heads)})"
            for (w, layout), (heads, _) in found.items()
        )
        raise EmbdeployError(
            f"several distinct initializers hold the LM head table: {listed}. embdeploy extends exactly "
            "one head weight; deduplicate them before rewriting"
        )
    (weight, layout), (heads, transposes) = next(iter(found.items()))
    _refuse_subgraph_use(idx, weight)
    return HeadMatch(weight=weight, layout=layout, heads=tuple(heads), transposes=tuple(transposes))
