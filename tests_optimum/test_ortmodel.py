"""A merged export directory is an optimum model directory: ORTModel classes load it, and on inputs that
hold the new tokens it computes what the extended PyTorch model computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ARCHS

ORT_CLASS = {
    "bert": "ORTModelForFeatureExtraction",
    "minilm": "ORTModelForFeatureExtraction",
    "bert-mlm": "ORTModelForMaskedLM",
    "gpt2": "ORTModelForCausalLM",
}
ATOL = 1e-4  # float32 on CPU: the same math in another order


def load_ortmodel(arch: str, directory):
    import optimum.onnxruntime

    cls = getattr(optimum.onnxruntime, ORT_CLASS[arch])
    kwargs = {"use_cache": False} if arch == "gpt2" else {}  # our decoders have no KV cache inputs
    return cls.from_pretrained(str(directory), **kwargs)


def probe_batch(tokenizer, V: int, K: int):
    """Texts through the export directory's own tokenizer, plus a row holding every new id directly;
    right-padded, so rows differ in length."""
    texts = ["the troponin level and hyperkalemia", "zorblax qwertyx", "plain words only"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert set(range(V, V + K)) <= set(ids.flatten().tolist()), "the export's tokenizer lost new tokens"
    direct = torch.tensor([[5] + list(range(V + K - 1, V - 1, -1)) + [7]])  # V+K-1 first, down to V
    width = max(ids.shape[1], direct.shape[1])
    pad = tokenizer.pad_token_id or 0
    rows = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)
            for t, v in ((ids, pad), (mask, 0), (direct, pad), (torch.ones_like(direct), 0))]
    return torch.cat([rows[0], rows[2]]), torch.cat([rows[1], rows[3]])


def pytorch_outputs(ext, arch: str, ids, mask):
    kwargs = {"use_cache": False} if arch == "gpt2" else {}
    with torch.no_grad():
        out = ext.model(input_ids=ids, attention_mask=mask, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def check_directory(arch: str, ext, directory) -> None:
    from transformers import AutoTokenizer

    cfg = json.loads((directory / "config.json").read_text())
    assert cfg["vocab_size"] == ext.V + ext.K
    model = load_ortmodel(arch, directory)
    ids, mask = probe_batch(AutoTokenizer.from_pretrained(str(directory)), ext.V, ext.K)
    got = model(input_ids=ids, attention_mask=mask)
    got = got.logits if arch in ("bert-mlm", "gpt2") else got.last_hidden_state
    want = pytorch_outputs(ext, arch, ids, mask)
    assert got.shape == want.shape
    if arch in ("bert-mlm", "gpt2"):
        assert got.shape[-1] == ext.V + ext.K  # scores for the new tokens too
    keep = mask.bool()  # padding positions are not defined
    np.testing.assert_allclose(got[keep].numpy(), want[keep].numpy(), atol=ATOL, rtol=ATOL)
    if arch == "gpt2":  # optimum's generate on top: the same greedy continuation as PyTorch
        prompt = ids[-1:, :6]
        kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
        ours = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
        with torch.no_grad():
            ref = ext.model.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=False, **kw)
        assert ours.tolist() == ref.tolist()


@pytest.mark.parametrize("backend", ["torch", "optimum"])
@pytest.mark.parametrize("arch", ARCHS)
def test_merged_directory_loads_in_ortmodel(extensions, export_cache, tmp_path, arch, backend):
    from embdeploy.export import export_extension

    ext, _ = extensions[arch]
    res = export_extension(ext, "merged", tmp_path / "merged", backend=backend, cache_dir=export_cache)
    check_directory(arch, ext, res.out)


MAIN_PYTHON = os.environ.get("EMBDEPLOY_MAIN_PYTHON")


@pytest.mark.skipif(not MAIN_PYTHON, reason="EMBDEPLOY_MAIN_PYTHON (the transformers-5 environment's python) is "
                    "not set; .ci/run sets it")
@pytest.mark.parametrize("arch", ["bert-mlm", "gpt2"])
def test_merged_directory_from_the_main_environment_loads_here(extensions, tmp_path, arch):
    """The deployment this exists for: export where embdeploy lives (transformers 5), serve with optimum
    (transformers<4.58). The directory, config and tokenizer included, must load here."""
    import transformers

    version = subprocess.run([MAIN_PYTHON, "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert version.split(".")[0] != transformers.__version__.split(".")[0], (
        f"EMBDEPLOY_MAIN_PYTHON has transformers {version}, the same major version as here: nothing is crossed")
    ext, ext_dir = extensions[arch]
    env = dict(os.environ, HF_HUB_OFFLINE="1", EMBDEPLOY_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([MAIN_PYTHON, "-m", "embdeploy.cli", "export", str(ext_dir), "--mode", "merged",
                        "--out", str(tmp_path / "merged")], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["transformers_version"] == version
    check_directory(arch, ext, tmp_path / "merged")
