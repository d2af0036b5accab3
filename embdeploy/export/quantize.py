"""int8 exports: ONNX Runtime's dynamic quantization of the base graph's MatMul weights.

    proto = quantize_proto(fp32_base_proto, base_table, head_table)

The scheme is onnxruntime.quantization.quantize_dynamic with int8 weights, one scale per
output channel, on MatMul nodes whose weight is a constant (MatMulConstBOnly); activations
are quantized at run time, one scale per tensor. Everything the extension touches stays in
float, so new rows stay exact and a swap export still takes any table: the word-embedding
Gather is not a MatMul, and the LM head (found by the content of its table, as the rewrite
finds it) is excluded by name. Quantizing the base once means re-exporting after more
training is the rewrite alone (the quantized base is cached like the fp32 one, keyed by the
scheme and the calibration texts).

Calibration: one scale per activation tensor is poor where a few features are far larger
than the rest (transformers' outlier features). The fp32 graph is run on calibration texts
(`--calibration-texts FILE`, else a sample of the shipped training text) and the
`KEEP_FLOAT` MatMuls whose input has the largest ratio max|x| / rms stay in float. On the
packaged MiniLM that is layer 0's FFN output projection (ratio 82, the next 79 and 64), and
keeping it lifts the worst held-out cosine to fp32 from 0.980 to 0.987 at about 5% of the
MatMul work (perf/README.md, int8).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

from ..errors import EmbdeployError

QUANTIZE = ("int8",)
KEEP_FLOAT = 1  # MatMuls kept in float, by largest input outlier ratio on the calibration texts
CALIBRATION_TEXTS = 64  # texts used (the first ones of the file)
CALIBRATION_TOKENS = 128  # longest calibration sequence
DEFAULT_CALIBRATION = "embdeploy/data/train.txt"


def calibration_texts(path=None) -> tuple[list[str], str]:
    """(texts, where they came from): the first CALIBRATION_TEXTS texts of `path` or of the shipped sample."""
    from importlib import resources

    from ..train.texts import iter_texts

    source = Path(path) if path is not None else Path(str(resources.files("embdeploy") / "data" / "train.txt"))
    texts = []
    for t in iter_texts(source):
        if t.strip():
            texts.append(t)
        if len(texts) == CALIBRATION_TEXTS:
            break
    if not texts:
        raise EmbdeployError(f"calibration texts {source} hold no text; pass a file with one text per line")
    return texts, (str(path) if path is not None else DEFAULT_CALIBRATION)


def scheme(quantize: str, calibration: list[str] | None = None, source: str | None = None) -> dict:
    """What a quantized export records in embdeploy.json (and the base cache keys on)."""
    if quantize not in QUANTIZE:
        raise EmbdeployError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE)}")
    import hashlib

    import onnxruntime

    doc = {
        "precision": "int8", "method": "onnxruntime.quantization.quantize_dynamic", "weights": "int8 (QInt8)",
        "per_channel": True, "activations": "uint8, dynamic (per run)", "ops": ["MatMul"],
        "const_weights_only": True, "float": "embedding tables, LM head, everything else",
        "onnxruntime": onnxruntime.__version__,
    }
    if calibration is not None:
        digest = hashlib.sha256("\n".join(calibration).encode()).hexdigest()
        doc["keep_float"] = {"matmuls": KEEP_FLOAT, "by": "largest input max|x|/rms on the calibration texts",
                             "calibration": {"source": source, "texts": len(calibration), "sha256": "sha256:" + digest,
                                             "max_tokens": CALIBRATION_TOKENS}}
    return doc


def outlier_ratios(proto, names: list[str], feeds: list[tuple]) -> dict[str, float]:
    """{MatMul node name: max|x| / rms of its first input over the real tokens of `feeds`} (fp32 graph, ORT CPU)."""
    import numpy as np
    import onnx

    from ..onnx.io import save_model
    from ..ort import create_session, session_options

    nodes = {n.name: n for n in proto.graph.node}
    probe = onnx.ModelProto()  # a copy with other outputs: the base is quantized once, then cached
    probe.CopyFrom(proto)
    del probe.graph.output[:]
    wanted = [nodes[n].input[0] for n in names]
    for x in dict.fromkeys(wanted):
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(x))
    peak, square, count = {x: 0.0 for x in wanted}, {x: 0.0 for x in wanted}, {x: 0 for x in wanted}
    with tempfile.TemporaryDirectory(prefix="embdeploy-calib-") as tmp:
        save_model(probe, Path(tmp))
        del probe
        sess = create_session(Path(tmp) / "model.onnx", ["CPUExecutionProvider"], session_options())
        outs = list(dict.fromkeys(wanted))
        for feed, mask in feeds:
            real = mask.astype(bool)
            for x, value in zip(outs, sess.run(outs, feed)):
                v = np.asarray(value, np.float64)
                v = v[real] if v.shape[:2] == real.shape else v.reshape(-1, v.shape[-1])
                peak[x] = max(peak[x], float(np.abs(v).max()))
                square[x] += float((v ** 2).sum())
                count[x] += v.size
    return {n: peak[x] / max(np.sqrt(square[x] / max(count[x], 1)), 1e-30) for n, x in zip(names, wanted)}


def calibration_feeds(proto, base_table, tokenizer, texts: list[str]) -> list[tuple[dict, object]] | None:
    """ORT feeds (with their masks) of `texts` for the base graph `proto`; None when it takes inputs
    calibration cannot fill (a KV cache)."""
    import numpy as np

    from ..onnx.match import find_embedding
    from ..ort import ORT_INT, role_arrays
    from .graph import input_roles

    roles = input_roles(proto, find_embedding(proto, base_table).gathers)
    if any(r not in ("input_ids", "attention_mask", "token_type_ids", "position_ids") for r in roles.values()):
        return None
    types = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    int_of = {7: "tensor(int64)", 6: "tensor(int32)"}
    feeds = []
    for start in range(0, len(texts), 16):
        enc = tokenizer(texts[start:start + 16], truncation=True, max_length=CALIBRATION_TOKENS, padding=True,
                        return_tensors="np")
        arrays = role_arrays(np.asarray(enc["input_ids"], np.int64), np.asarray(enc["attention_mask"], np.int64))
        feed = {n: arrays[r].astype(ORT_INT.get(int_of.get(types.get(n)), np.int64)) for n, r in roles.items()}
        feeds.append((feed, arrays["attention_mask"]))
    return feeds


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_proto(proto, base_table, head_table=None, calibration: list | None = None):
    """(`proto` with its MatMul weights in int8, {node: outlier ratio} of the MatMuls kept in float).

    `proto` is a float32 base graph; the tables and the LM head stay untouched. `calibration`:
    feeds from `calibration_feeds`; with them the KEEP_FLOAT most outlier-prone MatMuls stay float.
    """
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
    kept = {}
    if calibration:  # a graph whose MatMuls read no initializer directly (e.g. weights through a Transpose) has no candidate
        consts = {t.name for t in proto.graph.initializer}
        candidates = [n.name for n in proto.graph.node
                      if n.op_type == "MatMul" and n.input[1] in consts and n.name not in keep]
        ratios = outlier_ratios(proto, candidates, calibration) if candidates else {}
        kept = dict(sorted(ratios.items(), key=lambda kv: -kv[1])[:KEEP_FLOAT])
        keep += list(kept)
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
    return out, {name: round(r, 2) for name, r in kept.items()}
