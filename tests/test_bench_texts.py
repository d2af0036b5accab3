"""`bench --texts`: tokens saved, end-to-end latency with tokenization, and fidelity, on the user's texts.

The tokens and fidelity figures are checked against an independent computation: the
tokenizers called directly, and PyTorch (the extended model on the extended tokenization
against the same model on the original tokenization, mean-pooled last_hidden_state).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from embdeploy.bench import check_baseline, run_bench, save_baseline, write_markdown, write_plot
from embdeploy.bench.texts import base_tokenizer, parse_batch_sizes
from embdeploy.errors import EmbdeployError

TEXTS = [
    "the troponin rose after the hyperkalemia was treated",
    "no new word in this one at all",
    "zorblax and qwertyx are both new here",
    "Troponin again, and the patient went home",
    "hyperkalemia hyperkalemia troponin",
    "a plain sentence about a small model",
]


@pytest.fixture(scope="module")
def exported(make_extension, export_cache, tmp_path_factory):
    from embdeploy.export import export_extension

    ext = make_extension("bert", init="subword-mean")
    root = tmp_path_factory.mktemp("bench-texts")
    outs = {m: export_extension(ext, m, root / m, cache_dir=export_cache).out for m in ("merged", "swap")}
    return ext, outs, root


def torch_pooled(ext, tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ext.model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    return ((h * m).sum(1) / m.sum(1)).double().numpy(), enc["attention_mask"].sum(1).numpy()


def test_texts_figures_match_an_independent_computation(exported, wordpiece_tokenizer, tmp_path):
    ext, outs, _ = exported
    res = run_bench([outs["merged"], outs["swap"]], shapes="1x8", rounds=3, warmup=1, memory_cost=False,
                    texts=TEXTS, batch_sizes=(1, 4))
    ext_vec, ext_tok = torch_pooled(ext, ext.tokenizer, TEXTS)
    base_vec, base_tok = torch_pooled(ext, wordpiece_tokenizer, TEXTS)
    cos = (ext_vec * base_vec).sum(1) / (np.linalg.norm(ext_vec, axis=1) * np.linalg.norm(base_vec, axis=1))
    assert [r.variant for r in res.texts] == ["merged", "swap"]
    for r in res.texts:
        assert r.texts == len(TEXTS)
        assert r.base_tokens_total == int(base_tok.sum()) and r.tokens_total == int(ext_tok.sum())
        assert r.token_reduction == pytest.approx(1 - ext_tok.sum() / base_tok.sum())
        assert r.token_reduction > 0  # the new words are one token each now
        assert r.fidelity_mean == pytest.approx(cos.mean(), abs=1e-4)
        assert r.fidelity_min == pytest.approx(cos.min(), abs=1e-4)
        assert r.fidelity_output == "last_hidden_state, mean-pooled"
    rows = {(r.shape, r.variant): r for r in res.latency if r.mix == "your-texts"}
    assert set(rows) == {(s, v) for s in ("texts/b1", "texts/b4") for v in ("base", "merged", "swap")}
    assert all(r.calls == 3 and r.p50_ms > 0 and r.ratio_to_base > 0 for r in rows.values())
    assert rows[("texts/b1", "base")].ratio_to_base == 1.0
    # reports carry them, and the gate gates the text ratios too
    md = write_markdown(res, tmp_path / "r.md").read_text()
    assert "On your texts" in md and "texts/b4" in md and f"{res.texts[0].fidelity_mean:.4f}" in md
    assert write_plot(res, tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    save_baseline(res, tmp_path / "b.json")
    comps = check_baseline(res, tmp_path / "b.json", max_regression=0.5)
    assert {c.shape for c in comps} >= {"texts/b1", "texts/b4"}


def test_base_tokenizer_is_the_original(exported, wordpiece_tokenizer):
    ext, _, _ = exported
    base = base_tokenizer(ext.tokenizer, ext.V)
    assert len(base) == len(wordpiece_tokenizer)
    for t in TEXTS:
        assert base(t)["input_ids"] == wordpiece_tokenizer(t)["input_ids"]


def test_texts_refusals(exported):
    _, outs, _ = exported
    with pytest.raises(EmbdeployError, match="cannot read batch sizes"):
        parse_batch_sizes("1,x")
    with pytest.raises(EmbdeployError, match="no texts to benchmark"):
        run_bench([outs["merged"]], shapes="1x8", rounds=3, memory_cost=False, texts=[])


def test_bench_texts_cli(exported, tmp_path):
    _, outs, _ = exported
    f = tmp_path / "texts.txt"
    f.write_text("\n".join(TEXTS) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    p = subprocess.run([sys.executable, "-m", "embdeploy.cli", "bench", str(outs["swap"]), "--texts", str(f),
                        "--batch-sizes", "1,2", "--shapes", "1x8", "--rounds", "3", "--no-memory", "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["texts"][0]["variant"] == "swap" and data["texts"][0]["texts"] == len(TEXTS)
    assert {r["shape"] for r in data["latency"]} == {"1x8", "texts/b1", "texts/b2"}
