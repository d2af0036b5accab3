"""Which tokens to add: whole words as the model's tokenizer sees them, scored by the tokens they save.

    suggest(["corpus.txt"], tokenizer, SuggestConfig(top=1000)) -> SuggestResult

One streaming pass over the corpus counts words *as the tokenizer splits them*:
its own normalizer (lowercasing, accent stripping, ...) and pre-tokenizer
(whitespace and punctuation, byte-level BPE's leading-space forms, SentencePiece's
▁), so no model family is special-cased. Each distinct pre-tokenized form is then
cut into pieces by the tokenizer's model once; a word saves
count × (pieces − 1) tokens on the corpus. Candidates are the words `extend`
would add; reachability is not assumed: the candidates are really added to a
copy of the tokenizer and a sample of the corpus is re-tokenized, and a word the
extended tokenizer does not produce is dropped and reported.
"""

from __future__ import annotations

import copy
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import EmbdeployError

SPACE_MARKS = " \t\r\n\u2581"  # whitespace, and SentencePiece's visible space ▁
HEADER = "# embdeploy suggest"


@dataclass(frozen=True)
class SuggestConfig:
    top: int | None = 1000  # at most this many tokens (None: every candidate)
    min_count: int = 5  # a word seen fewer times is not a candidate
    min_saving: int = 1  # stop the list at the first word that saves fewer tokens
    max_distinct: int = 2_000_000  # distinct forms kept while counting (rarest pruned past this)
    verify_lines: int = 20_000  # corpus lines re-tokenized to prove the candidates are reachable

    def __post_init__(self):
        problems = []
        if self.top is not None and (not isinstance(self.top, int) or self.top < 1):
            problems.append(f"top is {self.top!r}; ask for at least 1 token (or leave it unset for every candidate)")
        if not isinstance(self.min_count, int) or self.min_count < 1:
            problems.append(f"min_count is {self.min_count!r}; use 1 or more")
        if not isinstance(self.min_saving, int) or self.min_saving < 0:
            problems.append(f"min_saving is {self.min_saving!r}; use 0 or more")
        if not isinstance(self.max_distinct, int) or self.max_distinct < 1000:
            problems.append(f"max_distinct is {self.max_distinct!r}; use 1000 or more")
        if not isinstance(self.verify_lines, int) or self.verify_lines < 0:
            problems.append(f"verify_lines is {self.verify_lines!r}; use 0 or more")
        if problems:
            raise EmbdeployError("suggest settings have problems:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class Candidate:
    word: str  # the token to add, in the form the tokenizer works in (after its normalizer)
    count: int  # occurrences in the corpus
    pieces: int  # pieces the base tokenizer cuts it into now (its most frequent form)
    saved: int  # tokens saved on the corpus: sum over its forms of count x (pieces - 1)
    cumulative_share: float = 0.0  # share of the corpus's tokens saved by this and every word above it


@dataclass
class SuggestResult:
    candidates: list[Candidate]
    corpus: list[str]
    model: str
    corpus_bytes: int
    corpus_texts: int
    corpus_words: int
    corpus_tokens: int  # the corpus's tokens under the base tokenizer (no special tokens)
    distinct_words: int
    seconds: float
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> how many words
    unreachable: list[str] = field(default_factory=list)  # candidates extend could not turn into one token
    pruned_below: int = 0  # counts at or below this were pruned while counting (0: nothing pruned)
    config: dict = field(default_factory=dict)

    @property
    def tokens_saved(self) -> int:
        return sum(c.saved for c in self.candidates)

    @property
    def share_saved(self) -> float:
        return self.tokens_saved / self.corpus_tokens if self.corpus_tokens else 0.0

    @property
    def mb_per_minute(self) -> float:
        return self.corpus_bytes / 1e6 / (self.seconds / 60) if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(tokens_saved=self.tokens_saved, share_saved=self.share_saved, mb_per_minute=self.mb_per_minute)
        return d

    def summary(self) -> str:
        if not self.candidates:
            return (f"no word in {self.corpus_texts} texts ({self.corpus_words} words) is cut into several pieces by "
                    f"this tokenizer at least {self.config.get('min_count')} times; nothing to add")
        return (f"{len(self.candidates)} tokens save {self.tokens_saved} of {self.corpus_tokens} corpus tokens "
                f"({self.share_saved:.1%}); {self.corpus_texts} texts, {_size(self.corpus_bytes)} in "
                f"{self.seconds:.1f}s ({self.mb_per_minute:.0f} MB/min)")

    def lines(self, limit: int | None = 30) -> list[str]:
        """The table as plain fixed-width lines (complete in a CI log, never cut to a terminal's width)."""
        rows = self.candidates if limit is None else self.candidates[:limit]
        width = max([4, *(len(c.word) for c in rows)])
        out = [f"{'#':>5}  {'word':<{width}}  {'count':>8}  {'pieces now':>10}  {'tokens saved':>12}  {'cumulative':>10}"]
        for i, c in enumerate(rows, 1):
            out.append(f"{i:>5}  {c.word:<{width}}  {c.count:>8}  {c.pieces:>10}  {c.saved:>12}  {c.cumulative_share:>10.2%}")
        if limit is not None and len(self.candidates) > limit:
            out.append(f"  … {len(self.candidates) - limit} more (every row is in the token file and in --json)")
        return out

    def write_tokens(self, path, overwrite: bool = False, inputs=()) -> Path:
        """A token file `extend --tokens` reads unchanged: '#' header lines, then one token per line."""
        header = [
            f"{HEADER}: {len(self.candidates)} tokens for {self.model}",
            f"# corpus: {', '.join(self.corpus)} ({self.corpus_texts} texts, {self.corpus_tokens} tokens)",
            f"# saves {self.tokens_saved} tokens ({self.share_saved:.1%}); min_count {self.config.get('min_count')}",
        ]
        body = "\n".join(header + [c.word for c in self.candidates]) + "\n"
        return write_text_output(path, body, overwrite, inputs)

    def write_plot(self, path) -> Path:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        ks = list(range(1, len(self.candidates) + 1))
        share = [100 * c.cumulative_share for c in self.candidates]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(ks, share, lw=1.8)
        ax.set_xlabel("K (tokens added, best first)")
        ax.set_ylabel("corpus tokens saved (%)")
        ax.set_title(f"tokens saved against K: {self.model} on {len(self.corpus)} corpus file(s)")
        ax.grid(alpha=0.3)
        if ks:
            for frac in (0.5, 0.9):  # where the curve reaches half and 90% of its final value
                k = next(i for i, s in enumerate(share, 1) if s >= frac * share[-1])
                ax.axvline(k, color="grey", ls=":", lw=1)
                ax.annotate(f"{frac:.0%} of the saving at K={k}", (k, frac * share[-1]), xytext=(6, -14),
                            textcoords="offset points", fontsize=8)
        fig.tight_layout()
        tmp = Path(path).with_name(f".{Path(path).name}.partial-{os.getpid()}.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, path)
        return Path(path)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def write_text_output(path, body: str, overwrite: bool, inputs=()) -> Path:
    """Write a small text file atomically; replace only a file suggest wrote, never an input."""
    p = Path(path)
    for src in inputs:
        if Path(src).exists() and p.exists() and p.resolve() == Path(src).resolve():
            raise EmbdeployError(f"--out {p} is an input of this command; choose another --out")
    if p.is_dir():
        raise EmbdeployError(f"--out {p} is a directory; pass a file name such as tokens.txt")
    if p.exists():
        if not overwrite:
            raise EmbdeployError(f"{p} already exists; pass --overwrite to replace it or choose another --out")
        with open(p, "rb") as f:
            head = f.read(len(HEADER))
        if head.decode("utf-8", "replace") != HEADER:
            raise EmbdeployError(
                f"--overwrite replaces only a token file `embdeploy suggest` wrote, and {p} is not one "
                f"(it does not start with {HEADER!r}); nothing was changed. Choose another --out"
            )
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(body, encoding="utf-8")
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def _splitter(tokenizer):
    """text -> [(pre-tokenized form, word in normalized text)], as the tokenizer itself splits it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise EmbdeployError(
            "suggest needs a fast tokenizer (tokenizer.json); convert it with "
            "`AutoTokenizer.from_pretrained(path, use_fast=True).save_pretrained(path)`"
        )
    norm, pre = backend.normalizer, backend.pre_tokenizer

    def split(text: str):
        n = norm.normalize_str(text) if norm is not None else text
        if pre is None:  # no pre-tokenizer: the model sees whitespace-separated words
            return [(w, w) for w in n.split()]
        return [(form, n[a:b].strip(SPACE_MARKS)) for form, (a, b) in pre.pre_tokenize_str(n)]

    return split, backend.model


def _texts(corpus, counter):
    from .train.texts import iter_texts

    for path in corpus:
        yield from iter_texts(path, counter)


def suggest(corpus, tokenizer, config: SuggestConfig | None = None, model_name: str = "", progress=None) -> SuggestResult:
    """Count, score, filter and prove reachable; `progress(bytes_read, bytes_total)` is called as it reads."""
    from .extend.config import token_list_problems
    from .extend.model import already_one_token, new_added_token

    config = config or SuggestConfig()
    corpus = [str(c) for c in corpus]
    if not corpus:
        raise EmbdeployError("no corpus: pass one or more text files (one text per line, or JSON lines)")
    from .fsutil import check_regular_file

    total = sum(check_regular_file(c, "corpus file", "pass a text file (one text per line) or JSON lines").stat().st_size
                for c in corpus)
    split, model = _splitter(tokenizer)
    t0 = time.perf_counter()
    forms: Counter[str] = Counter()
    surface: dict[str, str] = {}
    counter, texts, pruned_below, last = [0], 0, 0, 0.0
    for text in _texts(corpus, counter):
        texts += 1
        for form, word in split(text):
            forms[form] += 1
            if form not in surface:
                surface[form] = word
        if len(forms) > config.max_distinct:  # bounded memory on any corpus: forget the rarest forms
            pruned_below += 1
            for f in [f for f, c in forms.items() if c <= pruned_below]:
                del forms[f], surface[f]
        if progress is not None and time.perf_counter() - last > 0.2:
            progress(counter[0], total)
            last = time.perf_counter()
    if progress is not None:
        progress(counter[0], total)
    if texts == 0:
        raise EmbdeployError(f"the corpus ({', '.join(corpus)}) has no texts; pass text files with one text per line")

    # Pieces per distinct form, once; a word's forms are, e.g., "Ġtroponin" and "troponin" (line start).
    per_word: dict[str, list[int]] = {}  # word -> [count, saved, pieces of its most frequent form, that count]
    corpus_tokens = 0
    for form, count in forms.items():
        pieces = len(model.tokenize(form))
        corpus_tokens += count * pieces
        w = per_word.setdefault(surface[form], [0, 0, pieces, 0])
        w[0] += count
        w[1] += count * (pieces - 1)
        if count > w[3]:
            w[2], w[3] = pieces, count
    words = sum(forms.values())

    dropped: Counter[str] = Counter()
    vocab = tokenizer.get_vocab()
    ranked = []
    for word, (count, saved, pieces, _) in per_word.items():
        if not word:
            continue
        if count < config.min_count:
            dropped[f"seen fewer than {config.min_count} times"] += 1
        elif saved == 0:
            dropped["already one token"] += 1
        elif not any(ch.isalpha() for ch in word):
            dropped["digits or punctuation only"] += 1
        elif token_list_problems([word]) or word.startswith("#"):
            dropped["not writable as a token line"] += 1
        elif already_one_token(tokenizer, word, vocab):
            dropped["one token on its own (extend would skip it)"] += 1
        else:
            ranked.append(Candidate(word, count, pieces, saved))
    ranked.sort(key=lambda c: (-c.saved, -c.count, c.word))
    if config.min_saving:
        ranked = [c for c in ranked if c.saved >= config.min_saving]
    want = len(ranked) if config.top is None else config.top
    pool = ranked[: min(len(ranked), int(want * 1.2) + 50)]  # a margin for the ones the check drops
    unreachable = _unreachable(pool, tokenizer, split, corpus, config.verify_lines, new_added_token)
    kept = [c for c in pool if c.word not in unreachable][:want]
    cum = 0
    for c in kept:
        cum += c.saved
        c.cumulative_share = cum / corpus_tokens if corpus_tokens else 0.0
    if unreachable:
        dropped["extend would not make it one token (checked on the corpus)"] += len(unreachable)
    return SuggestResult(
        candidates=kept, corpus=corpus, model=model_name, corpus_bytes=counter[0], corpus_texts=texts,
        corpus_words=words, corpus_tokens=corpus_tokens, distinct_words=len(per_word),
        seconds=time.perf_counter() - t0, dropped=dict(dropped), unreachable=sorted(unreachable),
        pruned_below=pruned_below, config=asdict(config),
    )


def _unreachable(pool: list[Candidate], tokenizer, split, corpus, verify_lines: int, new_added_token) -> set[str]:
    """Candidates that, really added to a copy of the tokenizer, are not produced on the corpus.

    A candidate seen in the first `verify_lines` texts must come out as its new id in at least
    half the texts it occurs in; one not seen there must come out of the bare word and of the
    word between two others.
    """
    if not pool:
        return set()
    tok = copy.deepcopy(tokenizer)
    words = [c.word for c in pool]
    tok.add_tokens([new_added_token(w) for w in words])
    ids = {w: tok.convert_tokens_to_ids(w) for w in words}
    wanted = set(words)
    seen: Counter[str] = Counter()
    hit: Counter[str] = Counter()
    batch: list[tuple[str, set[str]]] = []

    def check(batch):
        enc = tok([t for t, _ in batch], add_special_tokens=False)["input_ids"]
        for (_, present), row in zip(batch, enc):
            got = set(row)
            for w in present:
                seen[w] += 1
                hit[w] += ids[w] in got

    n = 0
    for text in _texts(corpus, None):
        if n >= verify_lines:
            break
        n += 1
        present = {w for _, w in split(text) if w in wanted}
        if present:
            batch.append((text, present))
        if len(batch) >= 256:
            check(batch)
            batch = []
    if batch:
        check(batch)
    bad = {w for w in words if seen[w] and hit[w] * 2 < seen[w]}
    unseen = [w for w in words if not seen[w]]
    if unseen:
        enc = tok([f"{w}" for w in unseen] + [f"a {w} b" for w in unseen], add_special_tokens=False)["input_ids"]
        k = len(unseen)
        bad |= {w for i, w in enumerate(unseen) if ids[w] not in enc[i] or ids[w] not in enc[k + i]}
    return bad


def load_suggest_tokenizer(model: str, tokenizer: str | None = None):
    """The base model's tokenizer only (no weights are loaded): fast, no remote code."""
    from .models import load_tokenizer, resolve_model_ref

    path = tokenizer or resolve_model_ref(model)
    try:
        tok = load_tokenizer(path, "model directory")
    except EmbdeployError:
        raise
    except Exception as e:  # transformers raises OSError/ValueError with long texts
        raise EmbdeployError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}; pass --model DIR") from None
    if not getattr(tok, "is_fast", False):
        raise EmbdeployError(
            f"the tokenizer at {path} is a slow (Python) tokenizer; suggest needs a fast tokenizer (tokenizer.json). "
            "Convert it with `AutoTokenizer.from_pretrained(path, use_fast=True).save_pretrained(path)`"
        )
    return tok
