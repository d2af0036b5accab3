"""Reading an exported graph's interface, and casting a graph to float16.

`input_roles` says which graph input is which (input_ids, attention_mask, ...),
so a base ONNX made by another exporter, with other input names, can be fed
by validation. The ids input is found structurally (it feeds the
word-embedding Gather), the others by name. A decoder exported with a KV cache
(optimum's `text-generation-with-past`) has `past_key_values.*` inputs (role
PAST) and `present.*` outputs; `cache_outputs` pairs them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import EmbdeployError

_PASS_THROUGH = ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Clip")
_FP16_MAX = float(np.finfo(np.float16).max)
PAST = "past_key_values"  # the role of every KV-cache input; the other roles have one input each
_PAST_PREFIXES = ("past_key_values", "past_key", "past_value")
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


def graph_inputs(model: onnx.ModelProto) -> list[str]:
    """Graph inputs a caller feeds (initializers listed as inputs, i.e. overridable tables, excluded)."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def graph_outputs(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def _role_by_name(name: str) -> str | None:
    n = name.lower()
    if n.startswith(_PAST_PREFIXES):
        return PAST
    if "past" in n or "cache" in n or "present" in n:
        return None
    if "mask" in n:
        return "attention_mask"
    if "type" in n or "segment" in n:
        return "token_type_ids"
    if "position" in n or n in ("pos", "pos_ids"):
        return "position_ids"
    if n in ("input_ids", "ids", "tokens", "token_ids"):
        return "input_ids"
    return None


def input_roles(model: onnx.ModelProto, gathers: tuple[int, ...] = ()) -> dict[str, str]:
    """{graph input name: role} for every fed input; raises naming inputs it cannot fill.

    `gathers` are the positions of the word-embedding Gathers (`find_embedding`):
    the graph input their indices come from is input_ids whatever its name.
    """
    names = graph_inputs(model)
    producer = {out: n for n in model.graph.node for out in n.output}
    ids_inputs = set()
    for g in gathers:
        name = model.graph.node[g].input[1]
        while name not in names and name in producer and producer[name].op_type in _PASS_THROUGH:
            name = producer[name].input[0]
        if name in names:
            ids_inputs.add(name)
    declared = {i.name: i for i in model.graph.input}
    roles, unknown = {}, []
    for name in names:
        role = "input_ids" if name in ids_inputs else _role_by_name(name)
        if role == PAST and not _is_cache(declared[name]):
            unknown.append(f"{name!r} (a KV cache must be a 4-D float tensor (batch, heads, past, head_dim) with "
                           "heads and head_dim fixed)")
        elif role is None or (role != PAST and role in roles.values()):
            unknown.append(repr(name))
        else:
            roles[name] = role
    if unknown:
        raise EmbdeployError(
            f"the ONNX model has inputs embdeploy cannot fill: {', '.join(unknown)}. It feeds token ids, "
            "an attention mask, token type ids and position ids (one input each) and an empty KV cache "
            "(past_key_values.*); export the base without other inputs (e.g. optimum task 'feature-extraction', "
            "'text-generation' or 'text-generation-with-past')"
        )
    if "input_ids" not in roles.values():
        raise EmbdeployError(
            f"none of the ONNX model's inputs ({', '.join(map(repr, names))}) feeds the word-embedding Gather; "
            "embdeploy needs a model that takes token ids"
        )
    return roles


def _is_cache(vi: onnx.ValueInfoProto) -> bool:
    t = vi.type.tensor_type
    dims = list(t.shape.dim)
    return t.elem_type in _FLOATS and len(dims) == 4 and all(d.HasField("dim_value") for d in (dims[1], dims[3]))


def cache_outputs(model: onnx.ModelProto, roles: dict[str, str]) -> dict[str, str]:
    """{past input: present output}: the graph output that is the cache after this step, for every PAST input.

    `past_key_values.0.key` pairs with `present.0.key` (optimum's and transformers' names). Raises
    naming the inputs without such an output: their cache could not be fed back for the next token.
    """
    outputs = set(graph_outputs(model))
    pairs, missing = {}, []
    for name, role in roles.items():
        if role != PAST:
            continue
        prefix = next(p for p in _PAST_PREFIXES if name.startswith(p))
        present = "present" + name[len(prefix):] if prefix == PAST else name.replace("past", "present", 1)
        if present in outputs:
            pairs[name] = present
        else:
            missing.append(f"{name!r} (no output {present!r})")
    if missing:
        raise EmbdeployError(
            f"the ONNX model has KV-cache inputs without a matching present.* output: {', '.join(missing)}; "
            "embdeploy validates a decode step by feeding each present.* back as past_key_values.*. Export the "
            "decoder with its cache outputs (optimum task 'text-generation-with-past'), or without a cache "
            "('text-generation')"
        )
    return pairs


# --------------------------------------------------------------------------- float16


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of a float32 model, with float32 inputs and outputs.

    Float initializers and Constant/attribute tensors are cast (clamped to the
    float16 range: exporters write finfo(float32).min as the attention-mask fill,
    which would overflow to -inf and give 0 * -inf = NaN); Cast(to=float) becomes
    Cast(to=float16); float graph inputs get a Cast to float16 and outputs a Cast
    back to float32, so callers feed and read float32 as before.
    """
    new = onnx.ModelProto()
    new.CopyFrom(model)
    graph = new.graph
    _graph_to_fp16(graph)
    for f in new.functions:
        for node in f.node:
            _node_to_fp16(node)

    inits = {t.name for t in graph.initializer}
    renames, head = {}, []
    for vi in graph.input:
        if vi.name not in inits and vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            inner = f"{vi.name}_embdeploy_fp16"
            renames[vi.name] = inner
            head.append(helper.make_node("Cast", [vi.name], [inner], to=TensorProto.FLOAT16, name=f"embdeploy/cast_in/{vi.name}"))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]

    tail = []
    producers = {out: node for node in graph.node for out in node.output}
    for vi in graph.output:
        if vi.type.tensor_type.elem_type != TensorProto.FLOAT or vi.name not in producers:
            continue
        inner = f"{vi.name}_embdeploy_fp16"
        node = producers[vi.name]
        node.output[list(node.output).index(vi.name)] = inner
        for other in graph.node:
            for i, name in enumerate(other.input):
                if name == vi.name:
                    other.input[i] = inner
        tail.append(helper.make_node("Cast", [inner], [vi.name], to=TensorProto.FLOAT, name=f"embdeploy/cast_out/{vi.name}"))
    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    return new


def _graph_to_fp16(graph: onnx.GraphProto) -> None:
    for i, t in enumerate(graph.initializer):
        if t.data_type == TensorProto.FLOAT:
            graph.initializer[i].CopyFrom(_tensor_fp16(t))
    # Declared intermediate types would contradict the new ones; ORT re-infers them.
    del graph.value_info[:]
    for node in graph.node:
        _node_to_fp16(node)


def _node_to_fp16(node: onnx.NodeProto) -> None:
    if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        for attr in list(node.attribute):
            if attr.name in ("value_float", "value_floats"):
                value = np.array(helper.get_attribute_value(attr), dtype=np.float32)
                node.attribute.remove(attr)
                node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value.astype(np.float16))))
    for attr in node.attribute:
        if attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT and attr.i == TensorProto.FLOAT:
            attr.i = TensorProto.FLOAT16
        if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
            attr.t.CopyFrom(_tensor_fp16(attr.t))
        for i, t in enumerate(attr.tensors):
            if t.data_type == TensorProto.FLOAT:
                attr.tensors[i].CopyFrom(_tensor_fp16(t))
        if attr.type == onnx.AttributeProto.GRAPH:
            _graph_to_fp16(attr.g)
        for g in attr.graphs:
            _graph_to_fp16(g)


def _tensor_fp16(t: TensorProto) -> TensorProto:
    arr = numpy_helper.to_array(t)
    return numpy_helper.from_array(np.clip(arr, -_FP16_MAX, _FP16_MAX).astype(np.float16), t.name)
