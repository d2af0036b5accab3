"""Synthetic export directories for the benchmark: an embedding Gather and a MatMul body.

Not a transformer: a stand-in with the same table shapes (MiniLM: V=30522,
H=384) and a MatMul stack of chosen depth, so the gate and the memory story can
be run without torch. The embedding part of each mode is written with
embdeploy.onnx.rewrite when it can be imported (the real rewrite), and by hand
otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _base_model(V: int, H: int, layers: int, rng) -> tuple[onnx.ModelProto, np.ndarray]:
    table = rng.standard_normal((V, H), dtype=np.float32)
    inits = [numpy_helper.from_array(table, "word_embeddings")]
    nodes = [helper.make_node("Gather", ["word_embeddings", "input_ids"], ["h0"])]
    x = "h0"
    for i in range(layers):  # h -> tanh(h @ W1) @ W2 per layer, W1 (H, 4H), W2 (4H, H)
        for j, (a, b) in enumerate([(H, 4 * H), (4 * H, H)]):
            w = f"layer{i}.w{j}"
            inits.append(numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), w))
            nodes.append(helper.make_node("MatMul", [x, w], [f"{w}.mm"]))
            nodes.append(helper.make_node("Tanh", [f"{w}.mm"], [f"{w}.out"]))
            x = f"{w}.out"
    mask = helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT)
    unsq = helper.make_node("Unsqueeze", ["mask_f", "last_axis"], ["mask3"])
    out = helper.make_node("Mul", [x, "mask3"], ["last_hidden_state"])
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "last_axis"))
    graph = helper.make_graph(
        nodes + [mask, unsq, out], "synthetic",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", H])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), table


def _rewrite(mode: str, model, table, ext):
    from embdeploy.onnx import rewrite

    fn = {"merged": rewrite.rewrite_merged, "split": rewrite.rewrite_split, "swap": rewrite.rewrite_swap}[mode]
    new, changed = fn(model, table, ext)
    assert changed
    return new


def _save(model, out: Path, separate=None) -> None:
    try:
        from embdeploy.onnx.io import save_model
    except ImportError:
        save_model = None
    out.mkdir(parents=True, exist_ok=True)
    if save_model is not None:
        save_model(model, out, separate=separate)
    else:
        onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                        size_threshold=1024, all_tensors_to_one_file=True)


def write_manifest(out: Path, mode: str, V: int, K: int, H: int, inputs, outputs, base_dir: Path | None,
                   task: str = "feature-extraction") -> None:
    """The embdeploy.json a real export would carry (made-up fingerprints: these models come from no checkpoint)."""
    from embdeploy.export.manifest import ExportManifest

    extended = mode != "base"
    ExportManifest(
        mode=mode, task=task, V=V, K=K if extended else 0, H=H, dtype="float32", inputs=tuple(inputs),
        input_roles={n: n for n in inputs}, outputs=tuple(outputs), files={},
        base_fingerprint={"embed": "sha256:" + "0" * 64, "head": None},
        tokens=tuple(f"synthetic{j}" for j in range(K)) if extended else (),
        extension_initializers={"embed": "embdeploy_ext_embed" if mode in ("split", "swap") else None, "head": None},
        base_onnx=str(base_dir.resolve()) if base_dir is not None and extended else None,
        extension_fingerprint="sha256:" + "1" * 64 if extended else None,
        base_model={"ref": "synthetic"} if extended else None,
    ).with_files(out).write(out)


def build_synthetic(out, V: int = 30522, K: int = 1000, H: int = 384, layers: int = 2,
                    modes=("base", "merged", "split", "swap"), seed: int = 0) -> dict[str, Path]:
    """Write one export directory per mode under `out`; returns {mode: dir}."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    model, table = _base_model(V, H, layers, rng)
    ext = (rng.standard_normal((K, H), dtype=np.float32) * table.std()).astype(np.float32)
    dirs = {}
    for mode in modes:
        d = out / mode
        m = model if mode == "base" else _rewrite(mode, model, table, ext)
        _save(m, d, separate={"embdeploy_ext_embed": "extension.data"} if mode in ("split", "swap") else None)
        write_manifest(d, mode, V, K, H, ["input_ids", "attention_mask"], ["last_hidden_state"], out / "base")
        dirs[mode] = d
    return dirs
