"""What the passes share: the checked plan of a rewrite and the builder that writes the new model.

A pass reads the input model only through `Plan.idx` and records its edits on a
`Builder`; `Builder.finish` writes them once, into the input itself
(`in_place=True`) or into a new model. The new model copies the input's
structure and the initializers the pass leaves alone, never the payload of one
it replaces: protobuf messages cannot share a tensor's bytes, so keeping the
input intact costs exactly one copy of the unchanged weights, and `in_place`
costs none.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from embdeploy.errors import EmbdeployError, raise_all

from .io import copy_without
from .match import EmbeddingMatch, HeadMatch, Index, as_table, find_embedding, find_lm_head, tensor_dims

EXT_EMBED = "embdeploy_ext_embed"
EXT_HEAD = "embdeploy_ext_head"
# Symbolic dims written by rewrite_swap: the extension's row count and the logits width.
EXT_ROWS_DIM = "embdeploy_ext_rows"
VOCAB_DIM = "embdeploy_vocab"


@dataclass
class Plan:
    model: onnx.ModelProto  # the input, read through idx until Builder.finish
    idx: Index
    emb: EmbeddingMatch
    head: HeadMatch | None
    ext: np.ndarray  # (K, H) in the table's dtype
    head_rows: np.ndarray | None  # (K, H) rows appended to the head, in the head weight's dtype
    tied: bool  # head rows are the embedding extension rows
    in_place: bool


def plan(model, base_table, ext_table, head_table, head_ext, in_place: bool, resizes_tables: bool = False) -> Plan:
    """Check the arguments and the model, find the tables; raises EmbdeployError naming what is wrong.

    `resizes_tables` (merged, split): every reader of the tables must be one the pass extends.
    """
    base = as_table(base_table, "base_table")
    ext = as_table(ext_table, "ext_table")
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
        head_table = as_table(head_table, "head_table")
        head_ext = as_table(head_ext, "head_ext")
        if head_table.shape != base.shape:
            raise EmbdeployError(f"head_table has shape {head_table.shape}, expected {base.shape} like the base table")
        if head_ext.shape != ext.shape:
            raise EmbdeployError(f"head_ext has shape {head_ext.shape}, expected {ext.shape} like ext_table")

    existing = [n for n in all_names(model.graph) if n.startswith("embdeploy_ext_")]
    if existing:
        raise EmbdeployError(
            f"the model already has an embdeploy extension ({', '.join(sorted(existing))}); "
            "rewrite the base export, not an extended one"
        )
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):
        raise EmbdeployError("the model imports no default ONNX opset; it cannot be rewritten")

    emb = find_embedding(model, base)
    tied = head_table is None
    head = find_lm_head(model, base if tied else head_table)
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
    idx = Index(model.graph)
    head_rows = None
    if head is not None:
        head_dtype = helper.tensor_dtype_to_np_dtype(idx.consts[head.weight].data_type)
        head_rows = (ext if tied else head_ext).astype(head_dtype)
    p = Plan(model, idx, emb, head, ext.astype(emb.dtype), head_rows, tied, in_place)
    if resizes_tables and len(ext):
        check_only_known_consumers(p)
    return p


def unchanged(plan: Plan) -> onnx.ModelProto:
    """What a pass returns for K == 0: the input itself in place, else a copy."""
    return plan.model if plan.in_place else copy.deepcopy(plan.model)


def all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer}
    names.update(vi.name for vi in (*graph.input, *graph.output, *graph.value_info))
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        if node.name:
            names.add(node.name)
    return names


@dataclass
class _Value:
    """A replaced initializer value, kept as the bytes it will be stored as (the array is freed early)."""

    dims: tuple[int, ...]
    data_type: int
    raw: bytes


@dataclass
class Builder:
    """Collects a pass's edits by original node position; `finish` writes them into the output model once."""

    plan: Plan
    used: set[str] = field(init=False)
    before: list[onnx.NodeProto] = field(default_factory=list)  # nodes reading only initializers: go first
    replace: dict[int, list[onnx.NodeProto]] = field(default_factory=dict)
    after: dict[int, list[onnx.NodeProto]] = field(default_factory=dict)
    drop: set[int] = field(default_factory=set)
    new_inits: list[TensorProto] = field(default_factory=list)
    new_inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    values: dict[str, _Value] = field(default_factory=dict)  # initializers given a new value
    drop_value_info: set[str] = field(default_factory=set)  # a stale declared shape would fail the checker
    resized_inputs: dict[int, tuple[int, ...]] = field(default_factory=dict)  # graph.input position -> shape
    logits: tuple[set[str], int | str] | None = None  # (seeds, new last dim) for fix_logits_types

    def __post_init__(self):
        self.used = all_names(self.plan.model.graph)

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

    def add_init(self, name: str, value: np.ndarray) -> None:
        self.new_inits.append(numpy_helper.from_array(value, name))
        self.used.add(name)

    def edit(self, i: int) -> onnx.NodeProto:
        """A copy of original node i that replaces it; edits accumulate on the same copy."""
        if i not in self.replace:
            clone = onnx.NodeProto()
            clone.CopyFrom(self.plan.idx.nodes[i])
            self.replace[i] = [clone]
        return self.replace[i][0]

    def finish(self) -> onnx.ModelProto:
        """The rewritten model: the input itself with `in_place`, else a new one sharing no storage with it."""
        model, idx = self.plan.model, self.plan.idx
        nodes = list(self.before)
        for i, node in enumerate(idx.nodes):
            if i in self.drop:
                continue
            nodes.extend(self.replace.get(i, [node]))
            nodes.extend(self.after.get(i, []))
        if self.plan.in_place:
            out, graph = model, model.graph
            del graph.node[:]  # the old node messages stay valid (they live as long as the model): re-added below
            for t in graph.initializer:
                if t.name in self.values:
                    _fill(t, self.values.pop(t.name))  # the old bytes stay allocated with the model (protobuf's arena)
        else:
            out = copy_without(model, "graph")
            graph = out.graph
            graph.CopyFrom(copy_without(model.graph, "initializer", "node"))
            for t in model.graph.initializer:
                if t.name in self.values:
                    slot = graph.initializer.add()
                    slot.name = t.name
                    _fill(slot, self.values.pop(t.name))
                else:
                    graph.initializer.add().CopyFrom(t)  # the one copy that keeps the input intact
        graph.node.extend(nodes)
        graph.initializer.extend(self.new_inits)
        for pos, shape in self.resized_inputs.items():
            for d, size in zip(graph.input[pos].type.tensor_type.shape.dim, shape):
                d.Clear()
                d.dim_value = size
        graph.input.extend(self.new_inputs)
        if self.drop_value_info:
            kept = [vi for vi in graph.value_info if vi.name not in self.drop_value_info]
            del graph.value_info[:]
            graph.value_info.extend(kept)
        if self.logits is not None:
            _fix_logits_types(graph, *self.logits, vocab_size=self.plan.emb.vocab_size)
        return out


def _fill(tensor: TensorProto, value: _Value) -> None:
    name = tensor.name
    tensor.Clear()
    tensor.name = name
    tensor.dims.extend(value.dims)
    tensor.data_type = value.data_type
    tensor.raw_data = value.raw


def materialize(b: Builder, name: str, value: np.ndarray) -> None:
    """Give initializer or Constant `name` the new value (Constants become initializers)."""
    idx, graph = b.plan.idx, b.plan.model.graph
    if name in idx.const_nodes:
        b.drop.add(idx.const_nodes[name])
        b.new_inits.append(numpy_helper.from_array(value, name))
    else:
        # numpy_helper.from_array's encoding, for the float tables and biases handled here
        raw = numpy_helper.tobytes_little_endian(np.ascontiguousarray(value))
        b.values[name] = _Value(tuple(value.shape), helper.np_dtype_to_tensor_dtype(value.dtype), raw)
    b.drop_value_info.add(name)
    for pos, vi in enumerate(graph.input):  # initializers listed as inputs (old exporters)
        if vi.name == name:
            b.resized_inputs[pos] = tuple(value.shape)


def materialize_if_constant(b: Builder, name: str) -> None:
    if name in b.plan.idx.const_nodes:
        materialize(b, name, b.plan.idx.array(name))


def redirect(b: Builder, name: str, to: str) -> None:
    for i, slot in b.plan.idx.consumers.get(name, []):
        b.edit(i).input[slot] = to


def check_only_known_consumers(plan: Plan) -> None:
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


def head_output(plan: Plan, i: int) -> tuple[int, str | None]:
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


def _is_vocab_bias(idx: Index, name: str, v: int, reader: int) -> bool:
    if name not in idx.consts:
        raise EmbdeployError(
            f"the LM head bias {name!r} of {idx.label(reader)} is computed, not a constant; "
            "embdeploy can only extend a constant head bias"
        )
    dims = tensor_dims(idx.consts[name])
    if not dims or dims[-1] != v:
        return False  # a scalar or broadcast bias already covers new columns
    if int(np.prod(dims)) != v:
        raise EmbdeployError(
            f"the LM head bias {name!r} read by {idx.label(reader)} has shape {list(dims)}; only a "
            f"bias broadcast along the vocabulary axis (last dim {v}) can be extended"
        )
    return True


def extend_biases(b: Builder) -> None:
    """Merged/split: new logits columns get zero bias."""
    plan, k = b.plan, b.plan.ext.shape[0]
    done = set()
    for i in plan.head.heads:
        _, bias = head_output(plan, i)
        if bias is None or bias in done:
            continue
        done.add(bias)
        arr = plan.idx.array(bias)
        zeros = np.zeros((*arr.shape[:-1], k), dtype=arr.dtype)
        materialize(b, bias, np.concatenate([arr, zeros], axis=-1))


def head_seeds(plan: Plan) -> set[str]:
    idx, head = plan.idx, plan.head
    seeds = {idx.nodes[i].output[0] for i in head.heads}
    seeds.update(idx.nodes[t].output[0] for t in head.transposes)
    return seeds


def _fix_logits_types(graph: onnx.GraphProto, seeds: set[str], new_dim: int | str, vocab_size: int) -> None:
    """Drop stale value_info downstream of the logits and widen the vocabulary axis of outputs."""
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
        if len(dims) and dims[-1].HasField("dim_value") and dims[-1].dim_value == vocab_size:
            dims[-1].Clear()
            if isinstance(new_dim, int):
                dims[-1].dim_value = new_dim
            else:
                dims[-1].dim_param = new_dim
