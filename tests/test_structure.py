"""One shape for each idea (issue 16): the typed manifest, one fingerprint of the rows, library calls that
leave the process as they found it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from embdeploy.errors import EmbdeployError
from embdeploy.export.manifest import MANIFEST, ExportManifest
from embdeploy.fingerprint import rows_fingerprint, table_fingerprint


def _manifest(tmp_path, **over) -> ExportManifest:
    (tmp_path / "model.onnx").write_bytes(b"not read here")
    fields = dict(mode="swap", task="feature-extraction", V=10, K=2, H=4, dtype="float32",
                  inputs=("input_ids", "attention_mask"), input_roles={"input_ids": "input_ids"},
                  outputs=("last_hidden_state",), files={}, base_fingerprint={"embed": "sha256:" + "a" * 64, "head": None},
                  tokens=("alpha", "beta"), extension_initializers={"embed": "embdeploy_ext_embed", "head": None},
                  extension_fingerprint="sha256:" + "b" * 64, base_model={"ref": "x"}, pooling={"mode": "mean", "normalize": True})
    fields.update(over)
    return ExportManifest(**fields).with_files(tmp_path)


def test_manifest_round_trips_through_its_file(tmp_path):
    m = _manifest(tmp_path)
    m.write(tmp_path)
    doc = json.loads((tmp_path / MANIFEST).read_text())
    assert doc["kind"] == "embdeploy-onnx" and doc["format_version"] == 1
    assert doc["tokens"] == [{"token": "alpha", "id": 10}, {"token": "beta", "id": 11}]
    back = ExportManifest.read(tmp_path)
    assert back == m and back.path == tmp_path.resolve() and back.model_path == tmp_path.resolve() / "model.onnx"
    assert back.token_ids == {"alpha": 10, "beta": 11} and back.ext_embed == "embdeploy_ext_embed"
    assert back.roles == {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    assert dataclasses.replace(back, validation={"passed": True}).to_json()["validation"] == {"passed": True}


def test_manifest_lists_every_problem_at_once(tmp_path):
    doc = _manifest(tmp_path).to_json()
    doc.update(V="10", K=3, outputs="last_hidden_state", pooling="mean", mode="merged")
    del doc["files"]
    (tmp_path / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(EmbdeployError) as err:
        ExportManifest.read(tmp_path)
    msg = str(err.value)
    for part in ("V is a string, expected an integer", "outputs is a string, expected a list", "files is missing",
                 "pooling is a string, expected an object or null", "K is 3 but 2 tokens are listed"):
        assert part in msg, msg


def test_extended_modes_need_rows_and_base_none(tmp_path):
    doc = _manifest(tmp_path).to_json()
    doc.update(mode="base", K=2)
    (tmp_path / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(EmbdeployError, match="a base export must have K=0, found K=2"):
        ExportManifest.read(tmp_path)


def test_one_fingerprint_for_torch_and_numpy_rows(make_extension):
    ext = make_extension("llama")  # untied head: its rows are in the fingerprint too
    assert ext.head_mode == "untied"
    embed = ext.embed_table().detach()
    head = ext.head_table().detach() if ext.head_mode == "untied" else None
    np_head = None if head is None else head.numpy().copy()
    assert ext.extension_fingerprint() == rows_fingerprint(embed.numpy().copy(), np_head)
    assert rows_fingerprint(embed) == rows_fingerprint(embed.numpy())
    changed = embed.numpy().copy()
    changed[0, 0] += 1.0
    assert rows_fingerprint(changed) != rows_fingerprint(embed)
    assert table_fingerprint(torch.zeros(2, 3)) == table_fingerprint(np.zeros((2, 3), np.float32))


def test_importing_the_cli_changes_no_environment():
    code = ("import os, json; before = dict(os.environ); import embdeploy.cli; "
            "print(json.dumps(sorted(set(os.environ.items()) ^ set(before.items()))))")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_VERBOSITY", "TOKENIZERS_PARALLELISM")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == []


def test_loading_a_model_leaves_transformers_logging_as_it_was(minilm_dir):
    import transformers

    from embdeploy.models import load_base, load_tokenizer

    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_info()
    try:
        load_tokenizer(minilm_dir)
        load_base("minilm")
        assert transformers.logging.get_verbosity() == transformers.logging.INFO
        assert transformers.utils.logging.is_progress_bar_enabled()
    finally:
        transformers.logging.set_verbosity(before)
