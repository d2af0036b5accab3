"""Fixtures for the optimum environment (transformers<4.58 + optimum-onnx; see .ci/run, stage 2).

These tests are not under tests/: the main environment (transformers 5) collects
tests/ and perf/, and optimum-onnx cannot be installed there. Every base here is
a model *directory* (optimum exports from a directory, not from a model object):
the tiny random models of tests/conftest.py saved with save_pretrained, and the
packaged MiniLM.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `pytest tests_optimum` as well as `python -m pytest tests_optimum`
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tests.conftest import make_bpe_tokenizer, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402  (the same tiny models)

NEW_TOKENS = ["hyperkalemia", "troponin", "zorblax", "qwertyx"]
ARCHS = ("bert", "bert-mlm", "gpt2", "minilm")  # llama: only the with-past tests (test_base_onnx.py)
MODES = ("merged", "split", "swap")
# optimum's task names for our archs (the plain export, without a KV cache)
TASKS = {"bert": "feature-extraction", "bert-mlm": "fill-mask", "gpt2": "text-generation", "llama": "text-generation",
         "minilm": "feature-extraction"}


def pytest_configure(config):
    # optimum's exporter traces with torch.jit, which warns about every Python branch on a tensor; known, not ours
    config.addinivalue_line("filterwarnings", "ignore::torch.jit.TracerWarning")


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models on 1 torch thread: on a 2-core machine hand-offs cost more than the matmuls."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """{arch: model directory}: tiny random models saved with save_pretrained, and the packaged MiniLM."""
    from transformers import AutoTokenizer

    from embdeploy.models import packaged_minilm_dir

    minilm = packaged_minilm_dir()
    root = tmp_path_factory.mktemp("models")
    dirs = {"minilm": minilm}
    wordpiece = AutoTokenizer.from_pretrained(str(minilm))
    for arch, model, tok in (
        ("bert", tiny_bert(), wordpiece),
        ("bert-mlm", tiny_bert(masked_lm=True), wordpiece),
        ("gpt2", None, make_bpe_tokenizer()),
        ("llama", None, make_bpe_tokenizer()),  # untied head: the extension has head rows too
    ):
        model = model if model is not None else {"gpt2": tiny_gpt2, "llama": tiny_llama}[arch](len(tok))
        d = root / arch
        model.save_pretrained(str(d))
        tok.save_pretrained(str(d))
        dirs[arch] = d
    return dirs


@pytest.fixture(scope="session")
def extensions(model_dirs, tmp_path_factory):
    """{arch: (Extension, extension directory)}: NEW_TOKENS with random rows ("normal" init, so every new
    token has a row of its own and a wrong row shows in the outputs)."""
    from embdeploy.extend.config import ExtensionConfig
    from embdeploy.extend.model import Extension
    from embdeploy.models import load_base

    root = tmp_path_factory.mktemp("ext")
    out = {}
    for arch, d in model_dirs.items():
        model, tok, info = load_base(d)
        ext = Extension(model, tok, info)
        ext.add(ExtensionConfig(tokens=NEW_TOKENS, init="normal", seed=3))
        assert ext.K == len(NEW_TOKENS), f"{arch}: some test tokens are already in the vocabulary"
        out[arch] = (ext, ext.save(root / arch))
    return out


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("embdeploy-cache")


@pytest.fixture(scope="session")
def optimum_bases(model_dirs, tmp_path_factory):
    """optimum_bases(arch, task=None, library=None) -> a directory written by optimum's main_export
    (what `optimum-cli export onnx --model DIR --task TASK` writes), made once per argument set."""
    from optimum.exporters.onnx import main_export

    root = tmp_path_factory.mktemp("optimum-bases")
    made = {}

    def make(arch: str, task: str | None = None, library: str | None = None) -> Path:
        key = (arch, task or TASKS[arch], library)
        if key not in made:
            out = root / "-".join(filter(None, key))
            main_export(str(model_dirs[arch]), output=out, task=key[1], library_name=library)
            made[key] = out
        return made[key]

    return make
