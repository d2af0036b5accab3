"""`validate --texts FILE`: the user's texts as extra probes, through the export's extended tokenizer,
batched and truncated to the model's length, checked with the same tolerance; a file that is missing or
holds no text is refused before anything runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embdeploy.errors import EmbdeployError, ValidationFailed
from embdeploy.export import export_extension
from embdeploy.export import validate as validate_module
from embdeploy.export.validate import USER, max_positions, validate, validate_dir

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

TEXTS = [
    "the troponin rose overnight",
    "hyperkalemia and zorblax again, then qwertyx",
    "plain words only here",
    "troponin troponin troponin",
]


@pytest.fixture(scope="module")
def merged(make_extension, export_cache, tmp_path_factory):
    ext = make_extension("bert")
    root = tmp_path_factory.mktemp("texts")
    res = export_extension(ext, "merged", root / "merged", cache_dir=export_cache)
    return ext, res, root


def test_texts_with_new_tokens_reach_the_probes(merged, tmp_path):
    ext, res, _ = merged
    long_text = " ".join(["troponin and the fever"] * 200)  # far past the model's 128 positions
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS + [long_text]) + "\n")
    max_len = max_positions(ext.model.config)
    rows = [ext.tokenizer(t)["input_ids"][:max_len] for t in TEXTS + [long_text]]
    new_positions = sum(i >= ext.V for r in rows for i in r)
    assert new_positions > len(TEXTS)  # the texts do hold new tokens, as their own ids

    report = validate(res.out, ext, texts=path)
    assert report.passed
    assert report.texts == {"count": 5, "positions": sum(map(len, rows)), "new_token_positions": new_positions,
                            "new_ids": len({i for r in rows for i in r if i >= ext.V}), "truncated": 1,
                            "max_length": max_len}
    user = [c for c in report.checks if c.probe.startswith(USER)]
    per_token = [c for c in user if c.output == "last_hidden_state"]
    assert per_token, [c.probe for c in report.checks]
    # every real position of every text was compared, and the long one ran at the model's length, not beyond
    assert sum(c.rows for c in per_token) == sum(map(len, rows))
    assert max(c.shape[1] for c in per_token) == max_len
    assert report.to_json()["texts"]["new_token_positions"] == new_positions


def test_texts_are_checked_with_the_same_tolerance(merged, tmp_path, monkeypatch):
    """With a tolerance nothing can meet, the user's probes fail like the built-in ones (and are named)."""
    ext, res, _ = merged
    path = tmp_path / "t.txt"
    path.write_text(json.dumps({"text": TEXTS[1]}) + "\n")  # JSON lines too
    impossible = validate_module.Tolerance(atol=-1.0, rtol=0.0, mean_atol=-1.0, min_cosine=2.0)
    monkeypatch.setitem(validate_module.TOLERANCES, ("float32", "cpu"), impossible)
    with pytest.raises(ValidationFailed) as info:
        validate(res.out, ext, texts=path)
    assert any(line.startswith(f"{USER} / ") for line in info.value.report.failures())


def test_missing_or_empty_texts_are_refused(merged, tmp_path):
    ext, res, _ = merged
    with pytest.raises(EmbdeployError, match=r"no-such\.txt"):
        validate_dir(res.out, texts=tmp_path / "no-such.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(EmbdeployError, match=r"empty\.txt is empty; write one text per line"):
        validate(res.out, ext, texts=empty)
    with pytest.raises(EmbdeployError, match="all empty"):
        validate(res.out, ext, texts=["  ", ""])


def test_cli_validate_refuses_a_missing_or_empty_texts_file(merged, tmp_path):
    """Exit 2 and the file's name, before the extension (and its base model) is even loaded."""
    from typer.testing import CliRunner

    from embdeploy.cli import app

    _, res, _ = merged
    runner = CliRunner()
    r = runner.invoke(app, ["validate", str(res.out), "--texts", str(tmp_path / "gone.txt")])
    assert r.exit_code == 2 and "gone.txt does not exist" in " ".join(r.output.split()), r.output
    (tmp_path / "blank.txt").write_text("\n")
    r = runner.invoke(app, ["validate", str(res.out), "--texts", str(tmp_path / "blank.txt")])
    assert r.exit_code == 2 and "blank.txt is empty" in " ".join(r.output.split()), r.output


def test_text_probes_batch_by_length_and_keep_every_text():
    from embdeploy.export.validate import text_probes

    class Tok:  # a word = a token; ids past 100 are "new"
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [101 if w == "new" else 5 for w in text.split()]}

    texts = [" ".join(["w"] * n) + " new" for n in range(20, 0, -1)]
    probes, summary = text_probes(Tok(), texts, V=100, max_len=8)
    assert summary == {"count": 20, "positions": sum(min(n + 1, 8) for n in range(1, 21)),
                       "new_token_positions": 7, "new_ids": 1, "truncated": 13, "max_length": 8}
    lengths = [int(m) for p in probes for m in p.attention_mask.sum(1)]
    assert sorted(lengths) == lengths and len(lengths) == 20  # shortest first, none dropped
    assert all(p.input_ids.shape[1] <= 8 for p in probes)
    assert all(np.all(p.input_ids[p.attention_mask == 0] == 0) for p in probes)


def test_export_validate_texts(make_extension, export_cache, tmp_path):
    """export(..., validate_texts=FILE) runs the same probes in its gate; a missing file is refused before the export."""
    ext = make_extension("bert")
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    res = export_extension(ext, "swap", tmp_path / "swap", cache_dir=export_cache, validate_texts=path)
    assert res.report.texts["count"] == len(TEXTS) and res.report.texts["new_token_positions"] > 0
    assert any(c.probe.startswith(USER) for c in res.report.checks)
    with pytest.raises(EmbdeployError, match="gone.txt does not exist"):
        export_extension(ext, "merged", tmp_path / "m", cache_dir=export_cache, validate_texts=tmp_path / "gone.txt")
    assert not (tmp_path / "m").exists()
    with pytest.raises(EmbdeployError, match="drop --no-validate"):
        export_extension(ext, "merged", tmp_path / "m", cache_dir=export_cache, validate_texts=path, validate=False)
