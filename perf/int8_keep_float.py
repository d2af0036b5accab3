"""Which MatMuls to keep in float in an int8 export: quality when each choice is left unquantized.

    python perf/int8_keep_float.py        # writes perf/results/int8-keep-float.json

The packaged MiniLM with K = 1,000 (as perf/bench_int8.py builds it), exported merged in fp32; its graph
quantized with onnxruntime's quantize_dynamic (int8 per-channel MatMul weights) keeping different MatMuls in
float; sentence-embedding cosine to the fp32 export on the 650 held-out texts of bench_int8. Also the input
outlier ratio (max|x| / rms over real tokens, on the calibration sample embdeploy uses by default) of every
MatMul, which the export's scheme ranks by. Quality only: no timing, so the machine's load does not matter.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def main() -> int:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from bench_int8 import build_extension
    from embdeploy.export import export_extension
    from embdeploy.export.quantize import calibration_feeds, calibration_texts, outlier_ratios
    from embdeploy.onnx.io import load_model, save_model

    work = Path(tempfile.mkdtemp(prefix="int8-keep-float-"))
    ext, held = build_extension()
    made = export_extension(ext, "merged", work / "fp32", cache_dir=work / "cache", validate=False)
    proto = load_model(work / "fp32")
    for i, n in enumerate(proto.graph.node):
        n.name = n.name or f"node_{i}"
    src = work / "named"
    save_model(proto, src)
    consts = {t.name for t in proto.graph.initializer}
    names = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in consts]
    layers = [names[i:i + 6] for i in range(0, len(names), 6)]  # q, k, v, attention out, FFN in, FFN out
    texts, _ = calibration_texts()
    feeds = calibration_feeds(load_model(made.base_onnx), ext.base_table().detach().numpy(), ext.base_tokenizer, texts)
    ratios = outlier_ratios(proto, names, feeds)  # the inputs of the merged graph are the base's
    enc = ext.tokenizer(held, padding=True, return_tensors="np")

    def run(path: Path) -> np.ndarray:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feeds = [i.name for i in s.get_inputs()]
        return np.concatenate([s.run(["sentence_embedding"], {k: enc[k][b:b + 16].astype(np.int64) for k in feeds})[0]
                               for b in range(0, len(held), 16)])

    ref = run(src / "model.onnx")
    rows = []
    top = sorted(ratios, key=lambda n: -ratios[n])
    choices = {"none (every MatMul int8)": [], "largest outlier ratio (embdeploy's scheme)": top[:1],
               "2 largest": top[:2], "4 largest": top[:4]}
    for j, what in enumerate(("q", "k", "v", "attention out", "FFN in", "FFN out")):
        choices[f"{what} of every layer"] = [layer[j] for layer in layers]
    choices["layer 0 entirely"] = layers[0]
    for label, keep in choices.items():
        dst = Path(tempfile.mkdtemp(dir=work))
        quantize_dynamic(str(src / "model.onnx"), str(dst / "model.onnx"), per_channel=True, reduce_range=False,
                         weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], nodes_to_exclude=keep,
                         use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
        got = run(dst / "model.onnx")
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        rows.append({"kept_float": label, "nodes": keep, "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                     "cos_p01": float(np.percentile(cos, 1))})
        print(f"{label:45s} mean {cos.mean():.4f} min {cos.min():.4f} p1 {np.percentile(cos, 1):.4f}", flush=True)
    out = {"texts": len(held), "outlier_ratios": {n: round(ratios[n], 1) for n in top}, "rows": rows}
    (HERE / "results" / "int8-keep-float.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
