"""Static QDQ int8 (activation scales calibrated once) against dynamic int8 (scales per run), quality only.

    python perf/int8_static_qdq.py          # writes perf/results/int8-static-qdq.json

The packaged MiniLM's fp32 base export, MatMuls quantized three ways with onnxruntime.quantization
(static QDQ MinMax and Percentile calibrated on the first 64 lines of the shipped training text, per-channel
int8 weights, uint8 activations; and quantize_dynamic), sentence-embedding cosine to fp32 on 650 held-out
texts. Decides issue 13's "static QDQ if it measurably wins": it does not (perf/README.md, int8).
"""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE)); sys.path.insert(0, str(HERE.parent))
from embdeploy.models import load_base
from embdeploy.quickstart import data_file
from bench_train_k import HEADS, HELD_T, TAILS  # noqa: E402
import onnxruntime as ort
from onnxruntime.quantization import quantize_dynamic, quantize_static, QuantType, QuantFormat, CalibrationDataReader, CalibrationMethod
from embdeploy.export import export_base
from embdeploy.onnx.io import load_model, save_model

model, tok, info = load_base("minilm")
work = Path(tempfile.mkdtemp(prefix="int8-static-"))
proto = load_model(export_base(model, cache_dir=work / "cache", pooling=info.pooling).path)
src = work / "src"
save_model(proto, src)
held = [l for l in data_file("heldout.txt").read_text().splitlines() if l.strip()]
compounds = sorted({h + t for h in HEADS for t in TAILS if h != t})[:500]
held += [HELD_T[i % len(HELD_T)].format(w=w) for i, w in enumerate(compounds)]
enc = tok(held, padding=True, return_tensors="np")
calib = [l for l in data_file("train.txt").read_text().splitlines() if l.strip()][:64]
s0 = ort.InferenceSession(str(src/"model.onnx"), providers=["CPUExecutionProvider"])
names = [i.name for i in s0.get_inputs()]
class R(CalibrationDataReader):
    def __init__(self):
        self.batches = []
        for b in range(0, 64, 8):
            e = tok(calib[b:b+8], padding="max_length", truncation=True, max_length=128, return_tensors="np")
            self.batches.append({k: e[k].astype(np.int64) for k in names})
        self.it = iter(self.batches)
    def get_next(self): return next(self.it, None)
def run(path, threads=2):
    so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(["sentence_embedding"], {k: enc[k][b:b+16].astype(np.int64) for k in names})[0] for b in range(0, len(held), 16)]), s
ref, sref = run(src/"model.onnx")
def cos(a, b): return (a*b).sum(1)/np.linalg.norm(a,axis=1)/np.linalg.norm(b,axis=1)
out = {}
for label, method in (("static minmax", CalibrationMethod.MinMax), ("static percentile", CalibrationMethod.Percentile)):
    dst = Path(tempfile.mkdtemp(dir=work))
    try:
        quantize_static(str(src/"model.onnx"), str(dst/"model.onnx"), R(), quant_format=QuantFormat.QDQ, per_channel=True,
                        op_types_to_quantize=["MatMul"], activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=method, use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
        got, s = run(dst/"model.onnx")
        c = cos(got, ref); out[label] = {"cos_mean": float(c.mean()), "cos_min": float(c.min()), "cos_p01": float(np.percentile(c, 1))}
        print(f"{label:20s} mean {c.mean():.5f} min {c.min():.5f}", flush=True)
    except Exception as e:
        print(label, "failed", type(e).__name__, str(e)[:200], flush=True)
dst = Path(tempfile.mkdtemp(dir=work))
quantize_dynamic(str(src/"model.onnx"), str(dst/"model.onnx"), per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                 op_types_to_quantize=["MatMul"], use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
got, sd = run(dst/"model.onnx"); c = cos(got, ref); print(f"{'dynamic':20s} mean {c.mean():.5f} min {c.min():.5f}")
out["dynamic"] = {"cos_mean": float(c.mean()), "cos_min": float(c.min()), "cos_p01": float(np.percentile(c, 1))}
(HERE / "results" / "int8-static-qdq.json").write_text(json.dumps({"texts": len(held), "calibration_texts": 64, "schemes": out}, indent=2) + "\n")
