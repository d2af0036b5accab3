"""sentence-transformers (5.x, backend="onnx" over optimum-onnx) on our exports of a sentence-transformers base:
the vectors it gives are the export's own `sentence_embedding` (pooled and normalized as the base is), and the
extended PyTorch model's, on texts that hold the new tokens.

Before the export carried modules.json and 1_Pooling/, sentence-transformers loaded the directory as a bare
transformers model, mean-pooled without normalizing: norms around 7 instead of 1.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch

from conftest import MODES

pytest.importorskip("sentence_transformers")

TEXTS = ["the troponin level and hyperkalemia", "zorblax qwertyx", "plain words only, none of them new"]
ATOL = 1e-5  # float32 on CPU: the same math in another order
MAIN_PYTHON = os.environ.get("EMBDEPLOY_MAIN_PYTHON")


def st_vectors(directory) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(directory), backend="onnx", device="cpu", local_files_only=True)
    return model.encode(TEXTS, convert_to_numpy=True)


def ours(directory) -> np.ndarray:
    from embdeploy.runtime import Session

    return Session(directory, providers="cpu").encode(TEXTS, outputs="sentence_embedding")["sentence_embedding"]


def pytorch_vectors(ext) -> np.ndarray:
    """The extended model in PyTorch, pooled as the base's modules.json says (mean, then normalize)."""
    enc = ext.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = ext.model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    mean = (states * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(mean, dim=-1).numpy()


def check(directory, ext) -> None:
    got = st_vectors(directory)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)  # Normalize is applied
    np.testing.assert_allclose(got, ours(directory), atol=ATOL, rtol=0)
    np.testing.assert_allclose(got, pytorch_vectors(ext), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_sentence_transformers_gives_our_sentence_embedding(extensions, export_cache, tmp_path, mode):
    from embdeploy.export import export_extension

    ext, _ = extensions["minilm"]
    assert ext.K == 4 and set(range(ext.V, ext.V + ext.K)) <= set(sum(ext.tokenizer(TEXTS)["input_ids"], []))
    res = export_extension(ext, mode, tmp_path / mode, cache_dir=export_cache)
    files = json.loads((res.out / "embdeploy.json").read_text())["files"]
    for name in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json"):
        assert name in files, f"{name} is not written, or not hashed into embdeploy.json"
    modules = json.loads((res.out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    check(res.out, ext)


def test_a_plain_transformers_base_gets_no_sentence_transformers_files(extensions, export_cache, tmp_path):
    from embdeploy.export import export_extension

    ext, _ = extensions["bert"]
    res = export_extension(ext, "merged", tmp_path / "merged", cache_dir=export_cache)
    assert not (res.out / "modules.json").exists() and not (res.out / "1_Pooling").exists()


@pytest.mark.skipif(not MAIN_PYTHON, reason="EMBDEPLOY_MAIN_PYTHON (the transformers-5 environment's python) is "
                    "not set; .ci/run sets it")
def test_an_export_from_the_main_environment_loads_here(extensions, tmp_path):
    """Export where embdeploy lives (transformers 5), encode with sentence-transformers 5 here (transformers 4.57)."""
    ext, ext_dir = extensions["minilm"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", EMBDEPLOY_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([MAIN_PYTHON, "-m", "embdeploy.cli", "export", str(ext_dir), "--mode", "merged",
                        "--out", str(tmp_path / "merged")], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    check(tmp_path / "merged", ext)
