"""The quality report: held-out cosines and retrieval against the original tokenization."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2

from embdeploy.errors import EmbdeployError
from embdeploy.extend.config import ExtensionConfig
from embdeploy.extend.model import Extension
from embdeploy.train import Evaluator, QualityReport, evaluate, train


pytestmark = pytest.mark.usefixtures("one_thread")


# "ﬀoo" is one [UNK] for the uncased word-piece tokenizer: copying the [UNK] row makes the
# extended model read exactly what the original reads, so every cosine must be 1.
UNK_WORD = "ﬀoo"
HELD_OUT = [
    "my uncle was told about ﬀoo yesterday",
    "the report mentions troponin twice",
    "is hyperkalemia dangerous for older people",
    "nothing new in this sentence",
]


def bert_ext(tokenizer, tokens, init="subword-mean", **kw):
    ext = Extension(tiny_bert(layers=2), copy.deepcopy(tokenizer))
    ext.add(ExtensionConfig(tokens=tokens, init=init, **kw))
    return ext


def test_identity_extension_gives_cosine_one(wordpiece_tokenizer):
    assert wordpiece_tokenizer.tokenize(UNK_WORD) == ["[UNK]"]
    ext = bert_ext(wordpiece_tokenizer, [UNK_WORD], init="copy-token", init_token="[UNK]")
    ext.add(ExtensionConfig(tokens=["troponin", "hyperkalemia"], name="clin"))
    rep = evaluate(ext, HELD_OUT)
    assert rep.texts == 3 and rep.pairs == 3
    unk = rep.per_token[UNK_WORD]
    assert unk["sentence_cos"] == pytest.approx(1.0, abs=1e-6)
    assert unk["retrieved"] == unk["queries"] == 1
    assert rep.token_cos_min <= rep.token_cos_mean <= 1 + 1e-6
    # candidates: the 4 held-out texts (one is the twin) and each text refilled with the 2 other tokens
    assert rep.candidates == rep.candidates_min == 4 + 2 and rep.tokens_not_covered == []


def test_training_on_identity_contexts_starts_at_zero_loss(wordpiece_tokenizer):
    ext = bert_ext(wordpiece_tokenizer, [UNK_WORD], init="copy-token", init_token="[UNK]")
    rec = train(ext, [f"we saw {UNK_WORD} today", f"{UNK_WORD} is rare"], steps=1, lr=1e-3, batch_size=2, progress=False)
    assert rec.first_loss == pytest.approx(0.0, abs=1e-10)


def test_numbers_are_sane_and_training_improves_them(wordpiece_tokenizer):
    tokens = ["troponin", "hyperkalemia", "echocardiogram"]
    ext = bert_ext(wordpiece_tokenizer, tokens, init="normal")
    held = [f"the nurse wrote {t} in the chart" for t in tokens] + [f"{t} was checked" for t in tokens]
    train_texts = [f"{f} {t} {g}" for t in tokens for f in ("we found", "the team saw", "a case of")
                   for g in ("today", "in the lab", "after surgery")]
    rec = train(ext, train_texts, eval_texts=held, steps=60, lr=5e-2, batch_size=8, progress=False)
    b, a = QualityReport(**rec.eval_before), QualityReport(**rec.eval_after)
    for r in (b, a):
        assert -1 <= r.sentence_cos_min <= r.sentence_cos_mean <= 1 + 1e-6
        assert -1 <= r.token_cos_min <= r.token_cos_mean <= 1 + 1e-6
        assert 0 <= r.retrieval_accuracy <= 1
        # every refill of a text is another held-out text here, so the candidates are the 6 texts
        assert r.texts == 6 and r.pairs == 6 and r.candidates == 6
    assert a.sentence_cos_mean > b.sentence_cos_mean
    assert a.token_cos_mean > b.token_cos_mean


def test_evaluator_reference_side_is_reused(wordpiece_tokenizer):
    ext = bert_ext(wordpiece_tokenizer, ["troponin", "hyperkalemia"])
    ev = Evaluator(ext, HELD_OUT)
    first = ev.run()
    with torch.no_grad():
        ext.embed_tables["default"][0] += torch.randn(ext.H, generator=torch.Generator().manual_seed(0))
    second = ev.run()
    assert second.per_token["troponin"]["sentence_cos"] != first.per_token["troponin"]["sentence_cos"]
    assert second.per_token["hyperkalemia"]["sentence_cos"] == first.per_token["hyperkalemia"]["sentence_cos"]


def test_report_json_and_render(wordpiece_tokenizer):
    from rich.console import Console

    ext = bert_ext(wordpiece_tokenizer, ["troponin", "hyperkalemia", "bradycardia"])
    rep = evaluate(ext, HELD_OUT)
    data = json.loads(json.dumps(rep.to_json()))
    assert QualityReport(**data) == rep
    assert rep.tokens_not_covered == ["bradycardia"]
    console = Console(record=True, width=120)
    rep.render(console, before=rep)
    text = console.export_text()
    for part in ("sentence cosine, mean", "retrieval accuracy (1 of 6)", "before", "after", "bradycardia"):
        assert part in text


def test_no_text_with_new_tokens_is_an_error(wordpiece_tokenizer, tmp_path):
    ext = bert_ext(wordpiece_tokenizer, ["troponin"])
    with pytest.raises(EmbdeployError, match="none of the 2 evaluation texts contains a new token.*troponin"):
        evaluate(ext, ["plain words", "nothing here"])
    f = tmp_path / "held.txt"
    f.write_text("the troponin rose\n")
    assert evaluate(ext, f).texts == 1


def test_causal_model_report(bpe_tokenizer):
    tok = copy.deepcopy(bpe_tokenizer)
    ext = Extension(tiny_gpt2(len(tok)), tok)
    ext.add(ExtensionConfig(tokens=["troponin", "cpuwork"]))
    rep = evaluate(ext, ["the doctor saw troponin rise", "a cpuwork job ran"])
    assert rep.texts == 2 and rep.retrieval_accuracy is not None
    assert rep.embedding == "mean of last hidden states"


def test_every_held_out_line_is_read_and_the_report_says_how_many(wordpiece_tokenizer, tmp_path):
    """A file of N lines, M of them with a new token: M are compared, all N are retrieval candidates."""
    from rich.console import Console

    tokens = ["troponin", "hyperkalemia"]
    ext = bert_ext(wordpiece_tokenizer, tokens)
    whens = {"troponin": ("today", "again", "at noon"), "hyperkalemia": ("on monday", "twice", "at night")}
    with_token = [f"the {t} level was checked {w}" for t in tokens for w in whens[t]]  # refills are new texts
    plain = [f"an ordinary sentence number {i} about the weather" for i in range(40)]
    f = tmp_path / "held.txt"
    f.write_text("\n".join(with_token[:3] + plain + with_token[3:]) + "\n")
    n, m = len(with_token) + len(plain), len(with_token)
    rep = evaluate(ext, f)
    assert rep.texts_given == n and rep.texts == m and rep.pairs == m
    # each query: the other n - 1 lines, its one refill with the other token, and its twin
    assert rep.candidates == rep.candidates_min == n + 1
    assert 0 <= rep.retrieval_accuracy <= 1
    assert sum(d["queries"] for d in rep.per_token.values()) == m
    console = Console(record=True, width=400)
    rep.render(console)
    text = " ".join(console.export_text().split())
    assert f"{m} of {n} texts hold a new token" in text
    assert f"retrieval accuracy (1 of {n + 1})" in text
    assert f"the other {n - m} held-out text(s) hold no new token" in text
    assert f"chance is at most 1 in {n + 1}" in text and "1.000 means the same vector" in text


def test_one_new_token_is_still_retrieved_among_the_other_texts(wordpiece_tokenizer):
    """With a single new token there is no refill, but the other held-out texts still make a query."""
    ext = bert_ext(wordpiece_tokenizer, [UNK_WORD], init="copy-token", init_token="[UNK]")
    rep = evaluate(ext, HELD_OUT)
    assert rep.candidates == len(HELD_OUT)
    assert rep.retrieval_accuracy == 1.0  # the identity row: the twin is the same vector
