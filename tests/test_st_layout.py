"""Which sentence-transformers files an export gets, and when it gets none (tests_optimum/ loads them in
sentence-transformers itself and compares the vectors)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from embdeploy.export.st_layout import st_layout_plan

MEAN_NORM = {"mode": "mean", "normalize": True}
MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]
POOL_MEAN = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}


def st_dir(d: Path, modules=MODULES, pooling=POOL_MEAN, pool_path="1_Pooling") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "modules.json").write_text(json.dumps(modules))
    (d / pool_path).mkdir(parents=True, exist_ok=True)
    (d / pool_path / "config.json").write_text(json.dumps(pooling))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    return d


def test_the_packaged_minilm_gets_its_modules_pooling_and_configs(minilm_dir):
    files, why_not = st_layout_plan(minilm_dir, MEAN_NORM)
    assert why_not is None
    assert set(files) == {"modules.json", "1_Pooling/config.json", "sentence_bert_config.json",
                          "config_sentence_transformers.json"}
    assert files["1_Pooling/config.json"] == (minilm_dir / "1_Pooling" / "config.json").read_bytes()
    kinds = [(m["type"].rsplit(".", 1)[-1], m["path"]) for m in json.loads(files["modules.json"])]
    assert kinds == [("Transformer", ""), ("Pooling", "1_Pooling"), ("Normalize", "2_Normalize")]


def test_the_transformer_is_the_export_itself_wherever_the_base_kept_it(tmp_path):
    mods = [{**MODULES[0], "path": "0_Transformer"}, *MODULES[1:]]
    files, why_not = st_layout_plan(st_dir(tmp_path / "m", modules=mods), MEAN_NORM)
    assert why_not is None
    assert json.loads(files["modules.json"])[0]["path"] == ""


@pytest.mark.parametrize("change,pooling,reason", [
    (lambda d: (d / "modules.json").unlink(), MEAN_NORM, "modules.json is missing"),
    (lambda d: (d / "modules.json").write_text(json.dumps(
        MODULES + [{"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}])),
     MEAN_NORM, "are not Transformer, Pooling[, Normalize]"),
    (lambda d: (d / "1_Pooling" / "config.json").write_text(json.dumps({**POOL_MEAN, "pooling_mode_cls_token": True})),
     MEAN_NORM, "its pooling (cls, mean) is not the export's (mean)"),
    (lambda d: (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "max"})),
     MEAN_NORM, "its pooling (max) is not the export's (mean)"),
    (lambda d: None, {"mode": "mean", "normalize": False}, "Normalize module and the export's normalization disagree"),
    (lambda d: (d / "modules.json").write_text(json.dumps([MODULES[0], {**MODULES[1], "path": "../elsewhere"}])),
     MEAN_NORM, "leaves the model directory"),
])
def test_no_layout_where_sentence_transformers_would_compute_something_else(tmp_path, change, pooling, reason):
    d = st_dir(tmp_path / "m")
    change(d)
    files, why_not = st_layout_plan(d, pooling)
    assert files == {} and reason in why_not


def test_a_model_without_sentence_embedding_gets_nothing(tmp_path):
    assert st_layout_plan(st_dir(tmp_path / "m"), None) == ({}, "not a sentence-transformers model")


def test_an_export_of_a_sentence_transformers_base_lists_the_files_with_their_digests(tmp_path, export_cache):
    """A tiny BERT saved as a sentence-transformers model (mean pooling, normalized), extended and exported."""
    from conftest import tiny_bert

    from embdeploy.export import export_extension, verify_dir
    from embdeploy.extend.api import extend_cli
    from embdeploy.fingerprint import file_digest
    from embdeploy.models import packaged_minilm_dir

    base = tmp_path / "base"
    tiny_bert().save_pretrained(base)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (packaged_minilm_dir() / f).is_file():
            shutil.copy(packaged_minilm_dir() / f, base / f)
    st_dir(base)
    (tmp_path / "t.txt").write_text("troponin\nhyperkalemia\n")
    extend_cli(str(base), tmp_path / "t.txt", tmp_path / "ext")
    res = export_extension(tmp_path / "ext", "swap", tmp_path / "out", cache_dir=export_cache)
    m = json.loads((res.out / "embdeploy.json").read_text())
    assert m["pooling"] == MEAN_NORM
    for name in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json"):
        assert m["files"][name] == file_digest(res.out / name)
    verify_dir(res.out)  # the new files are covered like every other
