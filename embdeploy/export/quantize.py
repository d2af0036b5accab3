"""int8 exports: ONNX Runtime's dynamic quantization of the base graph's MatMul weights.

    proto = quantize_proto(fp32_base_proto, base_table, head_table)

The scheme is onnxruntime.quantization.quantize_dynamic with int8 weights, one scale per
output channel, on MatMul nodes whose weight is a constant (MatMulConstBOnly); activations
are quantized at run time. Everything the extension touches stays in float, so new rows
stay exact and a swap export still takes any table: the word-embedding Gather is not a
MatMul, and the LM head (found by the content of its table, as the rewrite finds it) is
excluded by name. Quantizing the base once means re-exporting after more training is the
rewrite alone (the quantized base is cached like the fp32 one).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

from ..errors import EmbdeployError

QUANTIZE = ("int8",)


def scheme(quantize: str) -> dict:
    """What a quantized export records in embdeploy.json (and the base cache keys on)."""
    if quantize not in QUANTIZE:
        raise EmbdeployError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE)}")
    import onnxruntime

    return {
        "precision": "int8", "method": "onnxruntime.quantization.quantize_dynamic", "weights": "int8 (QInt8)",
        "per_channel": True, "activations": "uint8, dynamic (per run)", "ops": ["MatMul"],
        "const_weights_only": True, "float": "embedding tables, LM head, everything else",
        "onnxruntime": onnxruntime.__version__,
    }


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_proto(proto, base_table, head_table=None):
    """`proto` (a float32 base graph) with its MatMul weights in int8; the tables and the LM head untouched."""
    import onnx

    from ..onnx.io import load_model, save_model
    from ..onnx.match import find_lm_head

    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:  # pragma: no cover - onnxruntime always ships it
        raise EmbdeployError("onnxruntime.quantization is not available; install onnxruntime (the `cpu` extra)") from None
    for t in proto.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT16:
            raise EmbdeployError("int8 quantization starts from a float32 base; export with --dtype fp32 (the default)")
    used = {n.name for n in proto.graph.node if n.name}
    for i, node in enumerate(proto.graph.node):  # quantize_dynamic excludes nodes by name
        if not node.name:
            name = f"embdeploy_node_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
    head = find_lm_head(proto, head_table if head_table is not None else base_table)
    keep = [proto.graph.node[i].name for i in (head.heads if head is not None else ())]
    with tempfile.TemporaryDirectory(prefix="embdeploy-int8-") as tmp:
        src, dst = Path(tmp) / "in", Path(tmp) / "out"
        save_model(proto, src)
        dst.mkdir()
        with _quiet_root_logger():  # the quantizer logs advice to the root logger on every call
            quantize_dynamic(
                str(src / "model.onnx"), str(dst / "model.onnx"), per_channel=True, reduce_range=False,
                weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], nodes_to_exclude=keep,
                use_external_data_format=True, extra_options={"MatMulConstBOnly": True},
            )
        out = load_model(dst)
    if not any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear", "MatMulIntegerToFloat") for n in out.graph.node):
        raise EmbdeployError("int8 quantization found no MatMul with constant weights to quantize in this graph; "
                             "export it in float32 instead")
    return out
