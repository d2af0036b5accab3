"""`embdeploy suggest`: words as the tokenizer splits them, scored by tokens saved, proven reachable.

Three tokenizer families, each built here: WordPiece (the packaged MiniLM's, uncased with
accent stripping), byte-level BPE (GPT-2 style) and SentencePiece-style Unigram (Metaspace ▁).
The expected counts and savings are computed independently of `suggest`: each line is encoded
whole by the tokenizer and its pieces are grouped per word with `word_ids()`.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tracemalloc
from collections import Counter

import pytest
from conftest import CORPUS, make_bpe_tokenizer, tiny_bert, tiny_gpt2, tiny_llama

from embdeploy.errors import EmbdeployError
from embdeploy.extend.config import ExtensionConfig, read_token_file
from embdeploy.extend.model import Extension
from embdeploy.suggest import SuggestConfig, suggest

# planted domain words, each seen a known number of times, between common words
PLANTED = {"troponin": 9, "hyperkalemia": 7, "zorblaxine": 5, "qwertyx": 2}


def make_unigram_tokenizer():
    """A SentencePiece-style Unigram tokenizer (NFKC, Metaspace ▁), trained on CORPUS in a moment."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>")
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


@pytest.fixture(scope="module")
def tokenizers(wordpiece_tokenizer):
    return {"wordpiece": wordpiece_tokenizer, "bpe": make_bpe_tokenizer(), "unigram": make_unigram_tokenizer()}


def planted_corpus() -> list[str]:
    lines, frames = [], ["the {w} rose today", "{w} was measured again", "a note on {w} and the test"]
    for w, n in PLANTED.items():
        lines += [frames[i % len(frames)].format(w=w) for i in range(n)]
    return lines + CORPUS[:12]


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def independent_counts(tok, lines):
    """word -> (count, tokens saved), from whole-line encodings grouped per word (not suggest's code path)."""
    count, saved = Counter(), Counter()
    for line in lines:
        enc = tok(line, add_special_tokens=False, return_offsets_mapping=True)
        groups: dict[int, list[int]] = {}
        for k, wid in enumerate(enc.word_ids()):
            if wid is not None:
                groups.setdefault(wid, []).append(k)
        for ks in groups.values():
            a, b = enc["offset_mapping"][ks[0]][0], enc["offset_mapping"][ks[-1]][1]
            word = line[a:b].strip().lower()
            count[word] += 1
            saved[word] += len(ks) - 1
    return count, saved


def extension_for(family, tok):
    model = {"wordpiece": lambda: tiny_bert(), "bpe": lambda: tiny_gpt2(len(tok)),
             "unigram": lambda: tiny_llama(len(tok))}[family]()
    return Extension(model, copy.deepcopy(tok))


@pytest.mark.parametrize("family", ["wordpiece", "bpe", "unigram"])
def test_suggest_scores_reach_and_round_trip(family, tokenizers, tmp_path, one_thread):
    tok = tokenizers[family]
    lines = planted_corpus()
    corpus = write(tmp_path / "corpus.txt", lines)
    res = suggest([corpus], tok, SuggestConfig(top=50, min_count=2))
    words = [c.word for c in res.candidates]
    count, saved = independent_counts(tok, lines)
    # every planted word is there, and the list is ranked by the tokens saved (ties: count, then word)
    assert {w for w in PLANTED if saved[w] > 0} <= set(words), res.lines()
    assert words == sorted(words, key=lambda w: (-saved[w], -count[w], w))
    for c in res.candidates:
        assert (c.count, c.saved) == (count[c.word], saved[c.word]), c
    assert res.corpus_tokens == sum(len(tok(ln, add_special_tokens=False)["input_ids"]) for ln in lines)
    assert res.candidates[-1].cumulative_share == pytest.approx(res.tokens_saved / res.corpus_tokens)
    # the token file round-trips into extend, and every suggested word is then one token in the corpus
    out = res.write_tokens(tmp_path / "tokens.txt")
    assert read_token_file(out) == words
    ext = extension_for(family, tok)
    report = ext.add(ExtensionConfig(tokens=read_token_file(out)))
    assert [t for t, _ in report.added] == words and not report.skipped
    ids = ext.token_ids
    for w in words:
        using = [ln for ln in lines if w in ln.lower().split()]
        assert using, w
        assert all(ids[w] in ext.tokenizer(ln, add_special_tokens=False)["input_ids"] for ln in using), w


def test_suggest_writes_the_form_the_tokenizer_works_in(tokenizers, tmp_path):
    """Uncased WordPiece: 'Unterstützt' and 'unterstutzt' are one word, suggested lowercased without accents."""
    lines = ["Das Team Unterstützt die Studie"] * 3 + ["sie unterstutzt uns"] * 2 + ["UNTERSTÜTZT!"]
    res = suggest([write(tmp_path / "c.txt", lines)], tokenizers["wordpiece"], SuggestConfig(min_count=2))
    top = res.candidates[0]
    assert top.word == "unterstutzt" and top.count == 6


def test_suggest_drops_digits_punctuation_single_tokens_and_rare_words(tokenizers, tmp_path):
    lines = ["1234567 987654321 --- ... the the the patient"] * 5 + ["zorblaxine once"]
    res = suggest([write(tmp_path / "c.txt", lines)], tokenizers["wordpiece"], SuggestConfig(min_count=2))
    words = {c.word for c in res.candidates}
    assert not words & {"1234567", "987654321", "---", "...", "the", "patient", "zorblaxine"}
    assert res.dropped["digits or punctuation only"] >= 1
    assert res.dropped["seen fewer than 2 times"] >= 1


def test_suggest_reads_json_lines_and_several_files(tokenizers, tmp_path):
    a = write(tmp_path / "a.jsonl", [json.dumps({"text": "the troponin rose"})] * 3)
    b = write(tmp_path / "b.txt", ["troponin again"] * 2)
    res = suggest([a, b], tokenizers["wordpiece"], SuggestConfig(min_count=1))
    assert res.corpus_texts == 5
    assert next(c for c in res.candidates if c.word == "troponin").count == 5


def test_suggest_streams_a_corpus_larger_than_its_memory(tokenizers, tmp_path):
    """Peak Python memory on a 3 MB corpus stays within 1 MB of that on a 0.3 MB one (the cap set here):
    the corpus is streamed, never held (the fixed part is the tokenizer's vocabulary)."""
    line = "the troponin and hyperkalemia rose while the patient rested at home today"

    def peak_for(n_lines):
        corpus = tmp_path / f"c{n_lines}.txt"
        with open(corpus, "w") as f:
            for i in range(n_lines):
                f.write(f"{line} {i % 7}\n")
        tracemalloc.start()
        try:
            res = suggest([corpus], tokenizers["wordpiece"], SuggestConfig(top=10, verify_lines=200))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert res.corpus_texts == n_lines and res.corpus_bytes == corpus.stat().st_size
        assert {c.word: c.count for c in res.candidates}["troponin"] == n_lines
        return peak, corpus.stat().st_size

    small, _ = peak_for(4_200)
    big, size = peak_for(42_000)
    assert size > 3_000_000
    assert big < small + 1_000_000, f"peak {big / 1e6:.1f} MB on {size / 1e6:.1f} MB vs {small / 1e6:.1f} MB on a tenth"


def test_suggest_bounds_distinct_words(tokenizers, tmp_path):
    """Past max_distinct forms the rarest are pruned while counting; frequent words keep exact counts."""
    lines = [f"troponin zq{i:05d}x" for i in range(3000)]
    res = suggest([write(tmp_path / "c.txt", lines)], tokenizers["wordpiece"],
                  SuggestConfig(max_distinct=1000, min_count=2))
    assert res.pruned_below >= 1
    assert res.distinct_words <= 1001
    assert {c.word: c.count for c in res.candidates}["troponin"] == 3000


def test_suggest_settings_and_inputs_are_checked(tokenizers, tmp_path):
    with pytest.raises(EmbdeployError, match="top is 0; ask for at least 1 token"):
        SuggestConfig(top=0)
    with pytest.raises(EmbdeployError, match="min_count is 0"):
        SuggestConfig(min_count=0)
    empty = write(tmp_path / "empty.txt", ["", "  "])
    with pytest.raises(EmbdeployError, match="has no texts"):
        suggest([empty], tokenizers["wordpiece"])
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"PK\x03\x04\x00\x00" * 10)
    with pytest.raises(EmbdeployError, match="is binary"):
        suggest([binary], tokenizers["wordpiece"])
    with pytest.raises(EmbdeployError, match="does not exist"):
        suggest([tmp_path / "missing.txt"], tokenizers["wordpiece"])


def test_suggest_refuses_a_slow_tokenizer(tmp_path):
    """A Python (slow) tokenizer has no normalizer or pre-tokenizer to ask: refused with the fix."""
    from transformers import PreTrainedTokenizer

    class Slow(PreTrainedTokenizer):  # a minimal whitespace tokenizer in pure Python
        def __init__(self, **kw):
            self._v = {"[UNK]": 0, "troponin": 1}
            super().__init__(unk_token="[UNK]", **kw)

        @property
        def vocab_size(self):
            return len(self._v)

        def get_vocab(self):
            return dict(self._v)

        def _tokenize(self, text, **kw):
            return text.split()

        def _convert_token_to_id(self, token):
            return self._v.get(token, 0)

        def _convert_id_to_token(self, index):
            return {i: t for t, i in self._v.items()}.get(index, "[UNK]")

    slow = Slow()
    assert not slow.is_fast
    with pytest.raises(EmbdeployError, match="suggest needs a fast tokenizer"):
        suggest([write(tmp_path / "c.txt", ["troponin"] * 5)], slow)


def run_cli(args, cwd):
    p = subprocess.run([sys.executable, "-m", "embdeploy.cli", "suggest", *map(str, args)], capture_output=True,
                       text=True, cwd=cwd, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    return p.returncode, p.stdout, " ".join(p.stderr.split())  # stderr's line breaks are the console's


def test_suggest_cli_end_to_end(tmp_path):
    """The command a user runs: table, token file, plot, JSON; then `extend` reads the file unchanged;
    a corpus with nothing fragmented says so and exits 0; bad settings exit 2 with the fix."""
    corpus = write(tmp_path / "corpus.txt", planted_corpus())
    rc, out, err = run_cli([corpus, "--model", "minilm", "--top", "3", "--min-count", "2", "--out", "tokens.txt",
                            "--plot", "curve.png"], tmp_path)
    assert rc == 0, err
    assert "troponin" in out and "tokens saved" in out and "cumulative" in out and "wrote tokens.txt" in out
    assert len(read_token_file(tmp_path / "tokens.txt")) == 3
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc, out, err = run_cli([corpus, "--top", "3", "--min-count", "2", "--json"], tmp_path)
    assert rc == 0, err
    data = json.loads(out)
    assert [c["word"] for c in data["candidates"]] == read_token_file(tmp_path / "tokens.txt")
    # the file is not silently replaced, and --overwrite replaces only a token file suggest wrote
    rc, _, err = run_cli([corpus, "--out", "tokens.txt"], tmp_path)
    assert rc == 2 and "already exists" in err
    write(tmp_path / "notes.txt", ["mine"])
    rc, _, err = run_cli([corpus, "--out", "notes.txt", "--overwrite"], tmp_path)
    assert rc == 2 and "replaces only a token file" in err
    assert (tmp_path / "notes.txt").read_text() == "mine\n"
    rc, _, err = run_cli([corpus, "--out", corpus, "--overwrite"], tmp_path)
    assert rc == 2 and "is an input of this command" in err
    # nothing fragmented: said, exit 0, a token file with only its header
    plain = write(tmp_path / "plain.txt", ["the patient went home"] * 6)
    rc, out, err = run_cli([plain, "--out", "none.txt"], tmp_path)
    assert rc == 0, err
    assert "nothing to add" in out
    assert [ln for ln in (tmp_path / "none.txt").read_text().splitlines() if not ln.startswith("#")] == []
    rc, _, err = run_cli([corpus, "--top", "0"], tmp_path)
    assert rc == 2 and "ask for at least 1 token" in err and "Traceback" not in err
