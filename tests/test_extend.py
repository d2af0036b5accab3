"""The extend stage: extension tables beside a frozen base, init, save/load, merge."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_bert, tiny_gemma, tiny_gpt2, tiny_llama

from embdeploy.errors import EmbdeployError, FingerprintMismatch
from embdeploy.extend.config import ExtensionConfig, read_token_file
from embdeploy.extend.layer import ExtendedEmbedding, ExtendedLMHead
from embdeploy.extend.merge import merge_extension
from embdeploy.extend.model import RESERVED, Extension, extend_model, load_extension
from embdeploy.fingerprint import table_fingerprint

NEW_WP = ["hyperkalemia", "troponin", "echocardiogram"]
NEW_BPE = ["fever-scan", "troponin", "cpuwork"]


def _models(request, wordpiece_tokenizer, bpe_tokenizer):
    """(model, tokenizer, new tokens, auto class name) for an architecture name."""
    kind = request
    if kind == "bert":
        return tiny_bert(), copy.deepcopy(wordpiece_tokenizer), NEW_WP, "AutoModel"
    if kind == "bert-mlm":
        return tiny_bert(masked_lm=True), copy.deepcopy(wordpiece_tokenizer), NEW_WP, "AutoModelForMaskedLM"
    tok = copy.deepcopy(bpe_tokenizer)
    if kind == "gpt2":
        return tiny_gpt2(len(tok)), tok, NEW_BPE, "AutoModelForCausalLM"
    if kind == "llama":
        return tiny_llama(len(tok)), tok, NEW_BPE, "AutoModelForCausalLM"
    if kind == "gpt2-padded":  # table padded past the tokenizer: ids must start at rows, not len(tok)
        return tiny_gpt2(len(tok) + 13), tok, NEW_BPE, "AutoModelForCausalLM"
    if kind == "gemma":  # scaled embeddings (embed_scale = sqrt(H))
        return tiny_gemma(len(tok)), tok, NEW_BPE, "AutoModelForCausalLM"
    raise AssertionError(kind)


ARCHS = ["bert", "bert-mlm", "gpt2", "llama", "gpt2-padded", "gemma"]


def _out(model, enc):
    o = model(**enc)
    return o.logits if hasattr(o, "logits") and o.logits is not None else o.last_hidden_state


def _enc(tok, texts):
    return tok(texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_base_untouched_and_new_rows_used(arch, wordpiece_tokenizer, bpe_tokenizer):
    model, tok, new, _ = _models(arch, wordpiece_tokenizer, bpe_tokenizer)
    reference = copy.deepcopy(model)
    base_w = model.get_input_embeddings().weight
    base_before = base_w.detach().clone()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_before = head.weight.detach().clone() if head is not None else None
    plain = ["the patient had a fever", "a small model runs fast on one cpu core today"]
    enc_plain = _enc(tok, plain)

    ext = extend_model(model, tok, new, name="clin")
    V = base_w.shape[0]
    assert [ext.token_ids[t] for t in new] == list(range(V, V + len(new)))
    assert model.get_input_embeddings().weight is base_w  # not copied
    # only K×H rows are trainable
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("embdeploy_tables" in n for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == len(new) * ext.H * (
        2 if ext.head_mode == "untied" else 1
    )
    # inputs without new tokens: bit-identical outputs
    enc2 = _enc(ext.tokenizer, plain)
    assert torch.equal(enc2["input_ids"], enc_plain["input_ids"])
    with torch.no_grad():
        assert torch.equal(_out(model, enc2)[..., :V], _out(reference, enc_plain))

    # a few optimizer steps move the new rows and nothing else
    opt = torch.optim.AdamW(ext.extension_parameters(), lr=1e-2, weight_decay=0.1)
    enc_new = _enc(ext.tokenizer, [f"the {new[0]} and {new[1]} went home", f"{new[2]} today"])
    assert (enc_new["input_ids"] >= V).sum() >= 3
    before_new = ext.embed_table().clone()
    for _ in range(3):
        loss = _out(model, enc_new).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(ext.embed_table(), before_new)
    assert torch.equal(base_w, base_before)
    if head_before is not None:
        assert torch.equal(ext.base_head_table(), head_before)
    ext.verify_base()

    # the new token's output depends on its row
    with torch.no_grad():
        o1 = _out(model, enc_new)
        ext.embed_tables["clin"].data[0] += 1.0
        o2 = _out(model, enc_new)
    assert not torch.allclose(o1, o2)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "gpt2-padded", "gemma"])
def test_merge_equivalence(arch, tmp_path, wordpiece_tokenizer, bpe_tokenizer):
    import transformers

    model, tok, new, auto = _models(arch, wordpiece_tokenizer, bpe_tokenizer)
    ext = extend_model(model, tok, new, name="clin", init="normal", seed=3)
    texts = [f"the {new[0]} went home", f"a {new[1]} and {new[2]} and the fever"]
    with torch.no_grad():
        want = _out(ext.model, _enc(ext.tokenizer, texts))
    merge_extension(ext, tmp_path / "merged")
    merged = getattr(transformers, auto).from_pretrained(str(tmp_path / "merged")).eval()
    mtok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    enc = _enc(mtok, texts)
    assert torch.equal(enc["input_ids"], _enc(ext.tokenizer, texts)["input_ids"])
    assert merged.get_input_embeddings().weight.shape[0] == ext.V + ext.K
    with torch.no_grad():
        got = _out(merged, enc)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_padded_vocab_ids_follow_table_rows(bpe_tokenizer):
    tok = copy.deepcopy(bpe_tokenizer)
    model = tiny_gpt2(len(tok) + 13)
    n_tok = len(tok)
    ext = extend_model(model, tok, NEW_BPE)
    V = model.get_input_embeddings().weight.shape[0]
    assert V == n_tok + 13
    assert ext.token_ids[NEW_BPE[0]] == V  # never len(tokenizer), which is a padding row
    assert ext.reserved == 13
    assert ext.tokenizer.convert_tokens_to_ids(RESERVED.format(n_tok)) == n_tok


def test_scaled_embedding_applies_scale_to_new_rows(bpe_tokenizer):
    tok = copy.deepcopy(bpe_tokenizer)
    model = tiny_gemma(len(tok))
    ext = extend_model(model, tok, NEW_BPE, init="normal")
    emb = model.get_input_embeddings()
    assert isinstance(emb, ExtendedEmbedding)
    ids = torch.tensor([[ext.V, ext.V + 2, 5]])
    out = emb(ids)
    if not hasattr(emb.base, "embed_scale"):
        pytest.skip("transformers < 5 scales Gemma's embeddings in GemmaModel.forward, outside the embedding module")
    scale = emb.base.embed_scale
    assert float(scale) != 1.0
    torch.testing.assert_close(out[0, 0], ext.embed_table()[0] * scale)
    torch.testing.assert_close(out[0, 1], ext.embed_table()[2] * scale)
    assert torch.equal(out[0, 2], emb.base(torch.tensor([5]))[0])


def test_padding_idx_kept(wordpiece_tokenizer):
    model = tiny_bert()
    ext = extend_model(model, copy.deepcopy(wordpiece_tokenizer), NEW_WP)
    assert model.get_input_embeddings().padding_idx == 0 == ext.embedding_modules[0].base.padding_idx


def test_subword_mean_init_is_mean_of_piece_rows(wordpiece_tokenizer):
    model = tiny_bert()
    table = model.get_input_embeddings().weight.detach().clone()
    tok = copy.deepcopy(wordpiece_tokenizer)
    ext = extend_model(model, tok, NEW_WP)
    for j, t in enumerate(NEW_WP):
        pieces = wordpiece_tokenizer(t, add_special_tokens=False)["input_ids"]
        assert len(pieces) > 1
        torch.testing.assert_close(ext.embed_table()[j], table[pieces].mean(0), rtol=0, atol=1e-7)


def test_init_strategies(tmp_path, wordpiece_tokenizer, bpe_tokenizer):
    from safetensors.torch import save_file

    model = tiny_bert()
    table = model.get_input_embeddings().weight.detach().clone()
    K, H = len(NEW_WP), table.shape[1]
    e = extend_model(copy.deepcopy(model), copy.deepcopy(wordpiece_tokenizer), NEW_WP, init="mean")
    torch.testing.assert_close(e.embed_table(), table.mean(0).expand(K, H))
    e = extend_model(copy.deepcopy(model), copy.deepcopy(wordpiece_tokenizer), NEW_WP, init="mean-noise")
    rows = e.embed_table()
    assert not torch.equal(rows[0], rows[1])
    assert (rows - table.mean(0)).abs().max() < 0.05
    e = extend_model(copy.deepcopy(model), copy.deepcopy(wordpiece_tokenizer), NEW_WP, init="copy-token", init_token="heart")
    hid = wordpiece_tokenizer.convert_tokens_to_ids("heart")
    assert torch.equal(e.embed_table()[1], table[hid])
    e = extend_model(copy.deepcopy(model), copy.deepcopy(wordpiece_tokenizer), NEW_WP, init="zeros")
    assert torch.count_nonzero(e.embed_table()) == 0
    e1 = extend_model(copy.deepcopy(model), copy.deepcopy(wordpiece_tokenizer), NEW_WP, init="normal", seed=1)
    e2 = extend_model(copy.deepcopy(model), copy.deepcopy(wordpiece_tokenizer), NEW_WP, init="normal", seed=1)
    assert torch.equal(e1.embed_table(), e2.embed_table())
    vec = torch.randn(K, H)
    save_file({"vectors": vec}, str(tmp_path / "v.safetensors"))
    e = extend_model(copy.deepcopy(model), copy.deepcopy(wordpiece_tokenizer), NEW_WP, init="vectors",
                     init_source=str(tmp_path / "v.safetensors"))
    assert torch.equal(e.embed_table(), vec)
    # reference: another model directory whose vocabulary knows one of the tokens by string
    ref_model = tiny_bert(seed=9)
    ref_tok = copy.deepcopy(wordpiece_tokenizer)
    ref_ext = extend_model(ref_model, ref_tok, ["troponin"], init="normal", seed=5)
    merge_extension(ref_ext, tmp_path / "ref")
    ref_row = ref_ext.embed_table()[0]
    e = extend_model(copy.deepcopy(model), copy.deepcopy(wordpiece_tokenizer), NEW_WP, init="reference",
                     init_source=str(tmp_path / "ref"))
    torch.testing.assert_close(e.embed_table()[1], ref_row)
    assert any("not in the reference vocabulary" in n for n in e.last_report.notes)
    # untied head rows get a matching default
    tok = copy.deepcopy(bpe_tokenizer)
    llama = tiny_llama(len(tok))
    head = llama.get_output_embeddings().weight.detach().clone()
    e = extend_model(llama, tok, ["troponin"])
    pieces = bpe_tokenizer("troponin", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(e.head_table()[0], head[pieces].mean(0), rtol=0, atol=1e-7)


def test_vectors_wrong_shape_or_nan_refused(tmp_path, wordpiece_tokenizer):
    from safetensors.torch import save_file

    H = 32
    save_file({"vectors": torch.randn(3, H + 1)}, str(tmp_path / "bad.safetensors"))
    bad = torch.randn(3, H)
    bad[1, 4] = float("nan")
    save_file({"vectors": bad}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(EmbdeployError, match=r"shape \(3, 33\), expected \(3, 32\)"):
        extend_model(tiny_bert(), copy.deepcopy(wordpiece_tokenizer), NEW_WP, init="vectors",
                     init_source=str(tmp_path / "bad.safetensors"))
    with pytest.raises(EmbdeployError, match=r"NaN or Inf in rows \[1\].*troponin"):
        extend_model(tiny_bert(), copy.deepcopy(wordpiece_tokenizer), NEW_WP, init="vectors",
                     init_source=str(tmp_path / "nan.safetensors"))


def test_existing_tokens_skipped_or_strict(wordpiece_tokenizer):
    ext = extend_model(tiny_bert(), copy.deepcopy(wordpiece_tokenizer), ["the", "troponin"])
    assert ext.tokens == ["troponin"]
    assert ext.last_report.skipped[0][0] == "the" and "already one token" in ext.last_report.skipped[0][1]
    with pytest.raises(EmbdeployError, match="'the': already one token in the vocabulary"):
        extend_model(tiny_bert(), copy.deepcopy(wordpiece_tokenizer), ["the", "troponin"], strict=True)
    with pytest.raises(EmbdeployError, match="none of the tokens is new"):
        extend_model(tiny_bert(), copy.deepcopy(wordpiece_tokenizer), ["the", "heart"])


def test_pretokenizer_split_is_reported(wordpiece_tokenizer):
    ext = extend_model(tiny_bert(), copy.deepcopy(wordpiece_tokenizer), ["mri-scan", "troponin"])
    assert any("'mri-scan' would be split at pre-tokenization" in n for n in ext.last_report.notes)
    ids = ext.tokenizer("an mri-scan today", add_special_tokens=False)["input_ids"]
    assert ext.token_ids["mri-scan"] in ids


def test_stacked_named_groups(tmp_path, wordpiece_tokenizer):
    model = tiny_bert()
    ext = extend_model(model, copy.deepcopy(wordpiece_tokenizer), ["troponin", "hyperkalemia"], name="cardio")
    ext.add(ExtensionConfig(tokens=["echocardiogram"], name="imaging", init="zeros"))
    V = ext.V
    assert ext.token_ids == {"troponin": V, "hyperkalemia": V + 1, "echocardiogram": V + 2}
    assert torch.count_nonzero(ext.embed_table()[2]) == 0
    with pytest.raises(EmbdeployError, match="named 'cardio' already exists"):
        ext.add(ExtensionConfig(tokens=["angioplasty"], name="cardio"))
    ext.save(tmp_path / "e")
    back = load_extension(tmp_path / "e", model=tiny_bert())
    assert back.token_ids == ext.token_ids and [g.name for g in back.groups] == ["cardio", "imaging"]
    assert torch.equal(back.embed_table(), ext.embed_table())


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_save_load_round_trip(arch, tmp_path, wordpiece_tokenizer, bpe_tokenizer):
    model, tok, new, _ = _models(arch, wordpiece_tokenizer, bpe_tokenizer)
    fresh = copy.deepcopy(model)
    ext = extend_model(model, tok, new, init="normal", seed=4)
    ext.save(tmp_path / "e")
    m = json.loads((tmp_path / "e" / "extension.json").read_text())
    assert m["V"] == ext.V and m["K"] == 3 and m["H"] == ext.H
    assert m["base_fingerprint"]["embed"] == table_fingerprint(fresh.get_input_embeddings().weight)
    assert [t["id"] for t in m["tokens"]] == [ext.V, ext.V + 1, ext.V + 2]
    back = load_extension(tmp_path / "e", model=fresh)
    assert torch.equal(back.embed_table(), ext.embed_table())
    if ext.head_mode == "untied":
        assert torch.equal(back.head_table(), ext.head_table())
    texts = [f"the {new[0]} and {new[2]}"]
    with torch.no_grad():
        assert torch.equal(_out(back.model, _enc(back.tokenizer, texts)), _out(model, _enc(ext.tokenizer, texts)))
    # the original tokenizer is kept beside the extended one
    assert back.base_tokenizer(new[0], add_special_tokens=False)["input_ids"] == tok.__class__.from_pretrained(
        str(tmp_path / "e" / "base_tokenizer"))(new[0], add_special_tokens=False)["input_ids"]
    assert len(back.base_tokenizer(new[0], add_special_tokens=False)["input_ids"]) > 1


def test_saved_tokenizers_name_a_class_transformers_4_knows(tmp_path, bpe_tokenizer):
    """Exports are served where optimum-onnx runs (transformers<4.58): a generic fast tokenizer must not be
    recorded under transformers 5's "TokenizersBackend", which transformers 4 cannot load."""
    from transformers import AutoTokenizer

    from embdeploy.models import save_tokenizer

    ext = extend_model(tiny_gpt2(len(bpe_tokenizer)), copy.deepcopy(bpe_tokenizer), NEW_BPE, init="normal")
    ext.save(tmp_path / "e")
    save_tokenizer(ext.tokenizer, tmp_path / "t")
    for d in (tmp_path / "e", tmp_path / "e" / "base_tokenizer", tmp_path / "t"):
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast", d
    back = AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    text = f"the {NEW_BPE[0]} and {NEW_BPE[1]}"
    assert back(text)["input_ids"] == ext.tokenizer(text)["input_ids"]
    assert ext.V in back(text)["input_ids"]


def test_fingerprint_refusal(tmp_path, wordpiece_tokenizer):
    ext = extend_model(tiny_bert(seed=0), copy.deepcopy(wordpiece_tokenizer), NEW_WP)
    ext.save(tmp_path / "e")
    with pytest.raises(FingerprintMismatch, match="was made for a base whose embedding table has fingerprint"):
        load_extension(tmp_path / "e", model=tiny_bert(seed=1))


def test_save_refuses_existing_dir_and_leaves_nothing(tmp_path, wordpiece_tokenizer):
    ext = extend_model(tiny_bert(), copy.deepcopy(wordpiece_tokenizer), NEW_WP)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep.txt").write_text("mine")
    with pytest.raises(EmbdeployError, match="already exists; pass --overwrite"):
        ext.save(tmp_path / "e")
    assert (tmp_path / "e" / "keep.txt").read_text() == "mine"
    # --overwrite replaces only an extension directory, never a directory of the user's files (issue 18)
    with pytest.raises(EmbdeployError, match="replaces only what embdeploy wrote"):
        ext.save(tmp_path / "e", overwrite=True)
    assert (tmp_path / "e" / "keep.txt").read_text() == "mine"
    ext.save(tmp_path / "f")
    (tmp_path / "f" / "stale.txt").write_text("old revision's file")
    ext.save(tmp_path / "f", overwrite=True)
    assert (tmp_path / "f" / "extension.json").exists() and not (tmp_path / "f" / "stale.txt").exists()
    assert not list(tmp_path.glob(".*.partial-*"))


def test_corrupted_extension_files(tmp_path, wordpiece_tokenizer):
    ext = extend_model(tiny_bert(), copy.deepcopy(wordpiece_tokenizer), NEW_WP)
    ext.save(tmp_path / "e")
    st = tmp_path / "e" / "extension.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(EmbdeployError, match="corrupted or truncated"):
        load_extension(tmp_path / "e", model=tiny_bert())
    ext.save(tmp_path / "f")
    mf = tmp_path / "f" / "extension.json"
    m = json.loads(mf.read_text())
    m["format_version"] = 99
    mf.write_text(json.dumps(m))
    with pytest.raises(EmbdeployError, match="format_version 99; this embdeploy reads version 1"):
        load_extension(tmp_path / "f", model=tiny_bert())
    m["format_version"] = 1
    m["K"] = 5
    mf.write_text(json.dumps(m))
    with pytest.raises(EmbdeployError, match="K is 5 but 3 tokens are listed"):
        load_extension(tmp_path / "f", model=tiny_bert())
    m["K"] = 3
    m["H"] = 64
    mf.write_text(json.dumps(m))
    with pytest.raises(EmbdeployError, match=r"has shape \(3, 32\), the manifest says \(3, 64\)"):
        load_extension(tmp_path / "f", model=tiny_bert())
    mf.write_text("{not json")
    with pytest.raises(EmbdeployError, match="not valid JSON"):
        load_extension(tmp_path / "f", model=tiny_bert())
    with pytest.raises(EmbdeployError, match="not an extension directory"):
        load_extension(tmp_path, model=tiny_bert())


def test_token_file_problems_listed_at_once(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("troponin\n\n  \nfoo \ntroponin\n")
    with pytest.raises(EmbdeployError) as e:
        read_token_file(f)
    msg = str(e.value)
    assert "token #2 is empty" in msg and "token #3 is empty" in msg
    assert "'foo ' has leading or trailing whitespace" in msg
    assert "'troponin' appears twice (#1 and #5)" in msg
    f.write_bytes(b"abc\x00def\n")
    with pytest.raises(EmbdeployError, match="binary"):
        read_token_file(f)
    f.write_bytes(b"\xff\xfeabc\n")
    with pytest.raises(EmbdeployError, match="not UTF-8"):
        read_token_file(f)
    f.write_text("# only a comment\n")
    with pytest.raises(EmbdeployError, match="has no tokens"):
        read_token_file(f)
    with pytest.raises(EmbdeployError, match="does not exist"):
        read_token_file(tmp_path / "missing.txt")
    f.write_text("# header\ntroponin\r\nhyperkalemia\n")
    assert read_token_file(f) == ["troponin", "hyperkalemia"]


def test_config_validation():
    with pytest.raises(EmbdeployError, match="unknown init 'magic'"):
        ExtensionConfig(tokens=["a"], init="magic")
    with pytest.raises(EmbdeployError, match="needs init_token"):
        ExtensionConfig(tokens=["a"], init="copy-token")
    with pytest.raises(EmbdeployError, match="extension name 'a b'"):
        ExtensionConfig(tokens=["a"], name="a b")


def test_load_base_errors(tmp_path):
    from embdeploy.models import load_base

    with pytest.raises(EmbdeployError, match="does not exist"):
        load_base(str(tmp_path / "nope"))
    with pytest.raises(EmbdeployError, match="not a Hugging Face model directory"):
        load_base(str(tmp_path))
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(EmbdeployError, match="is a file"):
        load_base(str(tmp_path / "f.bin"))


def test_lm_head_module_keeps_base_logits(bpe_tokenizer):
    tok = copy.deepcopy(bpe_tokenizer)
    model = tiny_llama(len(tok))
    ref = copy.deepcopy(model)
    ext = extend_model(model, tok, NEW_BPE, init="normal")
    assert isinstance(model.get_output_embeddings(), ExtendedLMHead)
    enc = _enc(ext.tokenizer, [f"the {NEW_BPE[0]} ran"])
    with torch.no_grad():
        logits = model(**enc).logits
        h = model.model(**enc).last_hidden_state
    assert logits.shape[-1] == ext.V + ext.K
    torch.testing.assert_close(logits[..., ext.V:], h @ ext.head_table().T)
    base_only = _enc(ext.tokenizer, ["the fever"])
    with torch.no_grad():
        assert torch.equal(model(**base_only).logits[..., : ext.V], ref(**base_only).logits)


def test_tokens_equal_after_normalization_get_one_row(wordpiece_tokenizer, bpe_tokenizer):
    """Uncased BERT folds case and strips accents (NFD): 'Hyperkalemia', 'hyperkalémia' and the NFD spelling of
    'caféine' are the tokens already listed; each would get a row the tokenizer never produces, so each is skipped."""
    import unicodedata

    nfc, nfd = unicodedata.normalize("NFC", "caféine"), unicodedata.normalize("NFD", "caféine")
    tokens = ["hyperkalemia", "Hyperkalemia", "hyperkalémia", nfc, nfd]
    ext = Extension(tiny_bert(), copy.deepcopy(wordpiece_tokenizer))
    rep = ext.add(ExtensionConfig(tokens=tokens))
    assert [t for t, _ in rep.added] == ["hyperkalemia", nfc]
    assert [t for t, _ in rep.skipped] == ["Hyperkalemia", "hyperkalémia", nfd]
    assert all("the same token as" in why and "never be used" in why for _, why in rep.skipped)
    for t, i in rep.added:  # every row that exists is one the tokenizer produces
        assert ext.tokenizer(t, add_special_tokens=False)["input_ids"] == [i]
    # stacking a spelling of a token an earlier group has
    rep2 = ext.add(ExtensionConfig(tokens=["Troponin", "TROPONIN", "troponin"][:1] + ["HYPERKALEMIA"], name="more"))
    assert [t for t, _ in rep2.added] == ["Troponin"]
    assert "an earlier extension group" in dict(rep2.skipped)["HYPERKALEMIA"]
    with pytest.raises(EmbdeployError, match="the same token as 'hyperkalemia'"):
        Extension(tiny_bert(), copy.deepcopy(wordpiece_tokenizer)).add(ExtensionConfig(tokens=tokens, strict=True))
    # a cased tokenizer without a normalizer tells them apart: both get rows, both are produced
    bpe = Extension(tiny_gpt2(len(bpe_tokenizer)), copy.deepcopy(bpe_tokenizer))
    rep = bpe.add(ExtensionConfig(tokens=["Troponin", "troponin"]))
    assert len(rep.added) == 2 and not rep.skipped


def test_invisible_characters_in_tokens_are_refused():
    from embdeploy.extend.config import token_list_problems

    bad = ["zw\u200bsp", "bidi\u202eoverride", "del\x7f", "n\x85el", "line\u2028sep", "tab\tin"]
    problems = token_list_problems(bad + ["family\U0001F468\u200d\U0001F469", "نیم\u200cفاصله"])
    assert len(problems) == len(bad)
    joined = " ".join(problems)
    for code in ("U+200B (ZERO WIDTH SPACE)", "U+202E (RIGHT-TO-LEFT OVERRIDE)", "U+007F", "U+0085", "U+2028 (LINE SEPARATOR)", "U+0009"):
        assert code in joined, code
    assert "remove them" in joined


def test_comment_lines_are_reported(tmp_path, wordpiece_tokenizer):
    f = tmp_path / "t.txt"
    f.write_text("# my terms\ntroponin\n#hashtag\nhyperkalemia\n")
    notes = []
    assert read_token_file(f, notes=notes) == ["troponin", "hyperkalemia"]
    assert notes == ["2 line(s) of t.txt start with '#' and were read as comments, not tokens"]
