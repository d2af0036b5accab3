"""A merged int8 export (`export --quantize int8`) is an optimum model directory too: ORTModel classes load
it unchanged and compute what embdeploy's own Session computes on it, within the int8 tolerance of the
extended PyTorch model (cosine per real position; top-1 for logits), new tokens included."""

from __future__ import annotations

import numpy as np
import pytest
from test_ortmodel import load_ortmodel, probe_batch, pytorch_outputs


@pytest.mark.parametrize("arch", ["bert", "bert-mlm", "gpt2"])
def test_merged_int8_directory_loads_in_ortmodel(extensions, export_cache, tmp_path, arch):
    import onnx
    from transformers import AutoTokenizer

    from embdeploy.export import export_extension
    from embdeploy.export.validate import tolerance_for
    from embdeploy.runtime import Session

    ext, _ = extensions[arch]
    res = export_extension(ext, "merged", tmp_path / "int8", cache_dir=export_cache, quantize="int8")
    graph = onnx.load(str(res.out / "model.onnx"), load_external_data=False).graph
    assert "MatMulInteger" in {n.op_type for n in graph.node}  # it really is the quantized graph

    model = load_ortmodel(arch, res.out)
    ids, mask = probe_batch(AutoTokenizer.from_pretrained(str(res.out)), ext.V, ext.K)
    out = model(input_ids=ids, attention_mask=mask)
    lm = arch in ("bert-mlm", "gpt2")
    name = "logits" if lm else "last_hidden_state"
    got = (out.logits if lm else out.last_hidden_state).numpy()
    keep = mask.bool().numpy()

    ours = Session(res.out, providers="cpu").run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[name]
    np.testing.assert_allclose(got[keep], ours[keep], atol=1e-5, rtol=1e-5)  # the same graph, the same kernels

    want = pytorch_outputs(ext, arch, ids, mask).numpy()
    assert got.shape == want.shape
    a, b = got[keep].astype(np.float64), want[keep].astype(np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    tol = tolerance_for("int8", "cpu")
    assert cos.min() >= tol.min_cosine and cos.mean() >= tol.min_mean_cosine, (cos.min(), cos.mean())
    if lm:
        assert got.shape[-1] == ext.V + ext.K  # scores for the new tokens too
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= tol.min_top1
