"""Attach a vocabulary extension to an exported ONNX model by rewriting its graph.

The word-embedding Gather (and the LM head, tied or untied) is found by the
*content* of its weight, never by names, so any exporter works. Three rewrites
give the three export modes of DESIGN.md:

- `rewrite_merged`: the table becomes one (V+K, H) initializer.
- `rewrite_split`: base initializer untouched, extension in its own initializer,
  joined by a Concat that ONNX Runtime folds at session creation.
- `rewrite_swap`: base untouched and never concatenated; new ids go through a
  second Gather and a Where. The extension is an overridable initializer, so a
  session can bring another extension table, of any row count
  (`swap_session_options`).

Each rewrite takes a `ModelProto` loaded with its external data and returns
`(new_model, changed)`; the input model is never modified and nothing is written
to disk (see `embdeploy.onnx.io` for that).

Pass `head_table` and `head_ext` for an untied LM head; without them only a
head tied to `base_table` (found by content) is extended.

Row lookup after every rewrite: id < V -> base[id], V <= id < V+K -> ext[id - V].
Logits after every rewrite: columns [0, V) as before, column V+j = h @ ext_head[j]
(no bias on new columns: a head bias is extended with zeros).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from embdeploy.errors import EmbdeployError, raise_all

EXT_EMBED = "embdeploy_ext_embed"
EXT_HEAD = "embdeploy_ext_head"
# Symbolic dims written by rewrite_swap: the extension's row count and the logits width.
EXT_ROWS_DIM = "embdeploy_ext_rows"
VOCAB_DIM = "embdeploy_vocab"

_SWAP_MIN_OPSET = 13  # Clip on int64 (12) and Unsqueeze with an axes input (13)


# --------------------------------------------------------------------------- matches


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


class _Index:
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


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _dims(tensor: TensorProto) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.dims)


def _equal(arr: np.ndarray, table: np.ndarray) -> bool:
    """Exact equality, accepting the table cast to the initializer's float dtype (fp16, bf16)."""
    if arr.shape != table.shape:
        return False
    if arr.dtype != table.dtype:
        floatlike = np.issubdtype(arr.dtype, np.floating) or arr.dtype.name in ("bfloat16",)
        if not floatlike:
            return False  # int8/uint8 weights are quantized: a cast would compare garbage
        table = table.astype(arr.dtype)
    return bool(np.array_equal(arr, table))


def _as_table(table, what: str) -> np.ndarray:
    arr = np.asarray(table)
    if arr.ndim != 2:
        raise EmbdeployError(f"{what} must be a 2-D (rows, hidden) array, got shape {arr.shape}")
    return arr


# --------------------------------------------------------------------------- finders


def find_embedding(model: onnx.ModelProto, base_table) -> EmbeddingMatch:
    """Find the word-embedding Gather(s) of `model` by the content of their table.

    A match is a Gather (axis 0) whose data input is an initializer or Constant
    equal to `base_table` (V, H), or to it cast to the initializer's dtype.
    Several Gathers reading the same initializer are one match; several distinct
    initializers holding the table, or none, raise `EmbdeployError`.
    """
    base = _as_table(base_table, "base_table")
    idx = _Index(model.graph)
    by_table: dict[str, list[int]] = {}
    for i, node in enumerate(idx.nodes):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        data = node.input[0]
        if data in idx.consts and _attr(node, "axis", 0) == 0:
            by_table.setdefault(data, []).append(i)

    same_shape = [t for t in by_table if _dims(idx.consts[t]) == base.shape]
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


def _no_table_message(idx: _Index, by_table: dict[str, list[int]], base: np.ndarray) -> str:
    v, h = base.shape
    msg = (
        f"the ONNX model does not contain this base table: no Gather reads an initializer equal to "
        f"the {v}x{h} {base.dtype} base table ({len(by_table)} Gather table(s) checked: "
        f"{', '.join(f'{t!r} {list(_dims(idx.consts[t]))}' for t in by_table) or 'none'}). "
        "Was it exported from another model, or quantized? Export the base model this extension "
        "was made for, unquantized, and rewrite that file"
    )
    for t in by_table:
        dims = _dims(idx.consts[t])
        if len(dims) == 2 and dims[1] == h and dims[0] > v:
            arr = idx.array(t)
            if _equal(arr[:v], base):
                msg += (
                    f". Note: initializer {t!r} has {dims[0]} rows whose first {v} equal the base table: "
                    "this model looks already extended; rewrite the base export instead"
                )
    return msg


def _refuse_subgraph_use(idx: _Index, name: str) -> None:
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
    tab = _as_table(table, "head table")
    idx = _Index(model.graph)
    found: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for i, node in enumerate(idx.nodes):
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        # The op computes h @ B' with B' of shape (H, V); need_t says whether B' must equal table.T.
        need_t = node.op_type == "MatMul" or _attr(node, "transB", 0) == 0
        b, via = node.input[1], None
        if b not in idx.consts and b in idx.producer:
            p = idx.producer[b]
            pnode = idx.nodes[p]
            if pnode.op_type == "Transpose" and list(_attr(pnode, "perm", [1, 0])) == [1, 0]:
                if pnode.input[0] in idx.consts:
                    b, via, need_t = pnode.input[0], p, not need_t
        if b not in idx.consts:
            continue
        expected_shape = tab.shape[::-1] if need_t else tab.shape
        if _dims(idx.consts[b]) != tuple(expected_shape):
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


# --------------------------------------------------------------------------- shared plumbing


@dataclass
class _Plan:
    model: onnx.ModelProto  # the deep copy being rewritten
    idx: _Index
    emb: EmbeddingMatch
    head: HeadMatch | None
    ext: np.ndarray  # (K, H) in the table's dtype
    head_rows: np.ndarray | None  # (K, H) rows appended to the head, in the head weight's dtype
    tied: bool  # head rows are the embedding extension rows


def _plan(model, base_table, ext_table, head_table, head_ext) -> _Plan:
    base = _as_table(base_table, "base_table")
    ext = _as_table(ext_table, "ext_table")
    v, h = base.shape
    if ext.shape[1] != h:
        raise EmbdeployError(
            f"ext_table has hidden size {ext.shape[1]} but the base table has {h}; "
            "build the extension for this base model"
        )
    if (head_table is None) != (head_ext is None):
        raise EmbdeployError(
            "head_table and head_ext go together: pass both for an untied LM head, neither for a tied "
            "head or a model without LM head"
        )
    if head_table is not None:
        head_table = _as_table(head_table, "head_table")
        head_ext = _as_table(head_ext, "head_ext")
        if head_table.shape != base.shape:
            raise EmbdeployError(f"head_table has shape {head_table.shape}, expected {base.shape} like the base table")
        if head_ext.shape != ext.shape:
            raise EmbdeployError(f"head_ext has shape {head_ext.shape}, expected {ext.shape} like ext_table")

    existing = [n for n in _all_names(model.graph) if n.startswith("embdeploy_ext_")]
    if existing:
        raise EmbdeployError(
            f"the model already has an embdeploy extension ({', '.join(sorted(existing))}); "
            "rewrite the base export, not an extended one"
        )
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):
        raise EmbdeployError("the model imports no default ONNX opset; it cannot be rewritten")

    new = copy.deepcopy(model)
    emb = find_embedding(new, base)
    tied = head_table is None
    head = find_lm_head(new, base if tied else head_table)
    if not tied and head is None:
        raise EmbdeployError(
            "no MatMul/Gemm in the graph uses head_table (as an (H, V) initializer, a Transpose of a "
            "(V, H) initializer or a Gemm with transB=1); pass head_table=None if the head is tied to the "
            "input embeddings or the model has no LM head"
        )
    if not tied and head.weight == emb.table and not np.array_equal(head_ext, ext):
        raise EmbdeployError(
            f"initializer {emb.table!r} is both the input embedding and the LM head (tied in the graph) "
            "but head_ext differs from ext_table; pass head_table=None and head_ext=None for a tied head"
        )
    idx = _Index(new.graph)
    head_rows = None
    if head is not None:
        head_dtype = helper.tensor_dtype_to_np_dtype(idx.consts[head.weight].data_type)
        head_rows = (ext if tied else head_ext).astype(head_dtype)
    return _Plan(new, idx, emb, head, ext.astype(emb.dtype), head_rows, tied)


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer}
    names.update(vi.name for vi in (*graph.input, *graph.output, *graph.value_info))
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        if node.name:
            names.add(node.name)
    return names


class _Builder:
    """Collects node insertions/replacements by original position, then rebuilds the node list once."""

    def __init__(self, plan: _Plan):
        self.plan = plan
        self.used = _all_names(plan.model.graph)
        self.before: list[onnx.NodeProto] = []  # nodes reading only initializers: go first
        self.replace: dict[int, list[onnx.NodeProto]] = {}
        self.after: dict[int, list[onnx.NodeProto]] = {}
        self.drop: set[int] = set()
        self.new_inits: list[TensorProto] = []

    def fresh(self, base: str) -> str:
        name, n = base, 0
        while name in self.used:
            n += 1
            name = f"{base}_{n}"
        self.used.add(name)
        return name

    def node(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> onnx.NodeProto:
        out = out or self.fresh(f"embdeploy_{op.lower()}")
        return helper.make_node(op, inputs, [out], name=self.fresh(f"embdeploy/{op}"), **attrs)

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.new_inits.append(numpy_helper.from_array(value, name))
        return name

    def edit(self, i: int) -> onnx.NodeProto:
        """A copy of original node i that replaces it; edits accumulate on the same copy."""
        if i not in self.replace:
            clone = onnx.NodeProto()
            clone.CopyFrom(self.plan.idx.nodes[i])
            self.replace[i] = [clone]
        return self.replace[i][0]

    def finish(self) -> None:
        graph = self.plan.model.graph
        nodes = list(self.before)
        for i, node in enumerate(self.plan.idx.nodes):
            if i in self.drop:
                continue
            nodes.extend(self.replace.get(i, [node]))
            nodes.extend(self.after.get(i, []))
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(self.new_inits)


def _materialize(b: _Builder, name: str, value: np.ndarray) -> None:
    """Give initializer or Constant `name` the new value (Constants become initializers)."""
    graph = b.plan.model.graph
    tensor = numpy_helper.from_array(value, name)
    if name in b.plan.idx.const_nodes:
        b.drop.add(b.plan.idx.const_nodes[name])
        b.new_inits.append(tensor)
    else:
        pos = next(i for i, init in enumerate(graph.initializer) if init.name == name)
        graph.initializer[pos].CopyFrom(tensor)
    if any(vi.name == name for vi in graph.value_info):  # a stale declared shape would fail the checker
        kept = [vi for vi in graph.value_info if vi.name != name]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    for vi in graph.input:  # initializers listed as inputs (old exporters)
        if vi.name == name:
            shape = vi.type.tensor_type.shape
            for d, size in zip(shape.dim, value.shape):
                d.Clear()
                d.dim_value = size


def _check_only_known_consumers(plan: _Plan) -> None:
    """Merged/split change the shape of the tables: every reader must be one we extend."""
    idx, emb, head = plan.idx, plan.emb, plan.head
    known = {(i, 0) for i in emb.gathers}
    if head is not None:
        known.update((i, 1) for i in head.heads)
        known.update((i, 0) for i in head.transposes)
    problems = []
    for name in {emb.table} | ({head.weight} if head else set()):
        for i, slot in idx.consumers.get(name, []):
            if (i, slot) not in known:
                problems.append(f"initializer {name!r} is also read by {idx.label(i)} (input {slot})")
        if any(o.name == name for o in idx.graph.output):
            problems.append(f"initializer {name!r} is a graph output")
    if head is not None:
        for t in head.transposes:
            for i, slot in idx.consumers.get(idx.nodes[t].output[0], []):
                if (i, slot) not in known:
                    problems.append(f"the transposed head weight from {idx.label(t)} is also read by {idx.label(i)}")
    raise_all(
        problems,
        "merged/split modes change the table's row count, which these readers would see "
        "(use mode 'swap', which leaves the base tables untouched):",
    )


def _head_output(plan: _Plan, i: int) -> tuple[int, str | None]:
    """(position, bias) of the node whose output is the logits of head node i.

    A bias is a Gemm C input, or a constant added right after the head: its last
    axis is V. Returns the head itself, or the bias Add when there is one.
    """
    idx, v = plan.idx, plan.emb.vocab_size
    node = idx.nodes[i]
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        c = node.input[2]
        return i, c if _is_vocab_bias(idx, c, v, i) else None
    readers = idx.consumers.get(node.output[0], [])
    if len(readers) == 1 and idx.nodes[readers[0][0]].op_type == "Add":
        j, slot = readers[0]
        other = idx.nodes[j].input[1 - slot]
        if other in idx.consts and _is_vocab_bias(idx, other, v, j):
            return j, other
    return i, None


def _is_vocab_bias(idx: _Index, name: str, v: int, reader: int) -> bool:
    if name not in idx.consts:
        raise EmbdeployError(
            f"the LM head bias {name!r} of {idx.label(reader)} is computed, not a constant; "
            "embdeploy can only extend a constant head bias"
        )
    dims = _dims(idx.consts[name])
    if not dims or dims[-1] != v:
        return False  # a scalar or broadcast bias already covers new columns
    if int(np.prod(dims)) != v:
        raise EmbdeployError(
            f"the LM head bias {name!r} read by {idx.label(reader)} has shape {list(dims)}; only a "
            f"bias broadcast along the vocabulary axis (last dim {v}) can be extended"
        )
    return True


def _extend_biases(b: _Builder) -> None:
    """Merged/split: new logits columns get zero bias."""
    plan, k = b.plan, b.plan.ext.shape[0]
    done = set()
    for i in plan.head.heads:
        _, bias = _head_output(plan, i)
        if bias is None or bias in done:
            continue
        done.add(bias)
        arr = plan.idx.array(bias)
        zeros = np.zeros((*arr.shape[:-1], k), dtype=arr.dtype)
        _materialize(b, bias, np.concatenate([arr, zeros], axis=-1))


def _fix_logits_types(plan: _Plan, seeds: set[str], new_dim: int | str) -> None:
    """Drop stale value_info downstream of the logits and widen the vocabulary axis of outputs."""
    graph = plan.model.graph
    downstream = set(seeds)
    for node in graph.node:  # topological order
        if downstream.intersection(node.input):
            downstream.update(node.output)
    kept = [vi for vi in graph.value_info if vi.name not in downstream]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    for out in graph.output:
        if out.name not in downstream or not out.type.HasField("tensor_type"):
            continue
        dims = out.type.tensor_type.shape.dim
        if len(dims) and dims[-1].HasField("dim_value") and dims[-1].dim_value == plan.emb.vocab_size:
            dims[-1].Clear()
            if isinstance(new_dim, int):
                dims[-1].dim_value = new_dim
            else:
                dims[-1].dim_param = new_dim


# --------------------------------------------------------------------------- merged


def rewrite_merged(
    model: onnx.ModelProto, base_table, ext_table, head_table=None, head_ext=None
) -> tuple[onnx.ModelProto, bool]:
    """Replace the embedding table (and LM head weight) by one table with the K extension rows appended.

    Cases rewritten:
    - word-embedding Gather(s) on a (V, H) initializer or Constant -> (V+K, H), same name;
    - tied head reading the same initializer (Transpose -> MatMul, Gemm transB=1): extended with it;
    - tied head on its own initializer, (V, H) or pre-transposed (H, V) as torch.onnx dynamo
      exports it: that initializer gets the ext rows (or columns);
    - untied head (`head_table`, `head_ext` given): its weight gets `head_ext`, in its layout;
    - a head bias (Gemm C, or a constant Add after the head, last axis V): K zeros appended.
    K == 0 returns the copy unchanged. Other readers of the tables raise `EmbdeployError`.
    """
    plan = _plan(model, base_table, ext_table, head_table, head_ext)
    if plan.ext.shape[0] == 0:
        return plan.model, False  # a copy, as promised
    _check_only_known_consumers(plan)
    b = _Builder(plan)
    emb, head = plan.emb, plan.head
    _materialize(b, emb.table, np.concatenate([plan.idx.array(emb.table), plan.ext], axis=0))
    if head is not None and head.weight != emb.table:
        w = plan.idx.array(head.weight)
        if head.layout == "VH":
            _materialize(b, head.weight, np.concatenate([w, plan.head_rows], axis=0))
        else:
            _materialize(b, head.weight, np.concatenate([w, plan.head_rows.T], axis=1))
    if head is not None:
        _extend_biases(b)
    b.finish()
    if head is not None:
        _fix_logits_types(plan, _head_seeds(plan), emb.vocab_size + plan.ext.shape[0])
    return plan.model, True


def _head_seeds(plan: _Plan) -> set[str]:
    idx, head = plan.idx, plan.head
    seeds = {idx.nodes[i].output[0] for i in head.heads}
    seeds.update(idx.nodes[t].output[0] for t in head.transposes)
    return seeds


# --------------------------------------------------------------------------- split


def rewrite_split(
    model: onnx.ModelProto, base_table, ext_table, head_table=None, head_ext=None
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
    K == 0 returns the copy unchanged. Other readers of the tables raise `EmbdeployError`.
    """
    plan = _plan(model, base_table, ext_table, head_table, head_ext)
    if plan.ext.shape[0] == 0:
        return plan.model, False  # a copy, as promised
    _check_only_known_consumers(plan)
    b = _Builder(plan)
    emb, head = plan.emb, plan.head
    _materialize_if_constant(b, emb.table)
    b.new_inits.append(numpy_helper.from_array(plan.ext, EXT_EMBED))
    b.used.add(EXT_EMBED)
    joined = b.node("Concat", [emb.table, EXT_EMBED], b.fresh("embdeploy_embed_table"), axis=0)
    b.before.append(joined)
    _redirect(b, emb.table, joined.output[0])

    if head is not None and head.weight != emb.table:
        _materialize_if_constant(b, head.weight)
        if plan.tied:
            rows = EXT_EMBED
        else:
            b.new_inits.append(numpy_helper.from_array(plan.head_rows, EXT_HEAD))
            b.used.add(EXT_HEAD)
            rows = EXT_HEAD
        if head.layout == "VH":
            joined = b.node("Concat", [head.weight, rows], b.fresh("embdeploy_head_table"), axis=0)
            b.before.append(joined)
        else:
            cols = b.node("Transpose", [rows], b.fresh("embdeploy_ext_head_t"), perm=[1, 0])  # (H, K)
            joined = b.node("Concat", [head.weight, cols.output[0]], b.fresh("embdeploy_head_table"), axis=1)
            b.before.extend([cols, joined])
        _redirect(b, head.weight, joined.output[0])
    if head is not None:
        _extend_biases(b)
    b.finish()
    if head is not None:
        _fix_logits_types(plan, _head_seeds(plan), emb.vocab_size + plan.ext.shape[0])
    return plan.model, True


def _materialize_if_constant(b: _Builder, name: str) -> None:
    if name in b.plan.idx.const_nodes:
        _materialize(b, name, b.plan.idx.array(name))


def _redirect(b: _Builder, name: str, to: str) -> None:
    for i, slot in b.plan.idx.consumers.get(name, []):
        b.edit(i).input[slot] = to


# --------------------------------------------------------------------------- swap


def rewrite_swap(
    model: onnx.ModelProto, base_table, ext_table, head_table=None, head_ext=None
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
    per session (`swap_session_options`) or even per run as a feed. The logits'
    vocabulary axis is declared as `embdeploy_vocab`. Needs opset >= 13. K == 0
    returns the copy unchanged. Ids outside [0, V+K) are clipped, not rejected.
    """
    plan = _plan(model, base_table, ext_table, head_table, head_ext)
    if plan.ext.shape[0] == 0:
        return plan.model, False  # a copy, as promised
    opset = next(o.version for o in plan.model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < _SWAP_MIN_OPSET:
        raise EmbdeployError(
            f"swap mode needs ONNX opset >= {_SWAP_MIN_OPSET}, the model uses opset {opset}; "
            "re-export with a newer opset or use mode 'merged' or 'split'"
        )
    b = _Builder(plan)
    idx, emb, head = plan.idx, plan.emb, plan.head
    _materialize_if_constant(b, emb.table)  # the Shape below runs before any node
    _add_overridable(b, EXT_EMBED, plan.ext)

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
        if plan.tied:
            rows = EXT_EMBED
        else:
            rows = EXT_HEAD
            _add_overridable(b, EXT_HEAD, plan.head_rows)
        rows_t = None
        for i in head.heads:
            node = idx.nodes[i]
            out_pos, _ = _head_output(plan, i)
            logits = idx.nodes[out_pos].output[0]
            base_logits = b.fresh("embdeploy_base_logits")
            b.edit(out_pos).output[0] = base_logits
            if node.op_type == "Gemm":
                ext_logits = b.node(
                    "Gemm", [node.input[0], rows],
                    alpha=float(_attr(node, "alpha", 1.0)), transA=int(_attr(node, "transA", 0)), transB=1,
                )
            else:
                if rows_t is None:
                    rows_t = b.node("Transpose", [rows], perm=[1, 0])  # (H, K)
                    b.before.append(rows_t)
                ext_logits = b.node("MatMul", [node.input[0], rows_t.output[0]])
            concat = b.node("Concat", [base_logits, ext_logits.output[0]], logits, axis=-1)
            b.after.setdefault(out_pos, []).extend([ext_logits, concat])
            seeds.add(logits)
    b.finish()
    if seeds:
        _fix_logits_types(plan, seeds, VOCAB_DIM)
    return plan.model, True


def _add_overridable(b: _Builder, name: str, rows: np.ndarray) -> None:
    """An initializer that is also a graph input with a symbolic row count (see rewrite_swap)."""
    b.new_inits.append(numpy_helper.from_array(rows, name))
    b.used.add(name)
    elem = helper.np_dtype_to_tensor_dtype(rows.dtype)
    b.plan.model.graph.input.append(helper.make_tensor_value_info(name, elem, [EXT_ROWS_DIM, rows.shape[1]]))
