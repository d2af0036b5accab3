"""Training text: reading corpora and finding contexts for each new token.

A context is a text in which the *extended* tokenizer produces the token's new
id: that is the ground truth for "this text teaches this row", and the search
itself (the tokenizer runs over the corpus, normalizer included). Tokens without
any context get synthetic ones and are reported, never silently skipped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EmbdeployError

MAX_FILE_BYTES = 2 * 1024**3
WINDOW_CHARS = 400  # long texts are cut to a window around the new token (chars each side)

# Synthetic contexts for a token no text contains: the bare word and short neutral frames.
SYNTHETIC = (
    "{t}",
    "{t}.",
    "This is about {t}.",
    "The word {t} appears in this sentence.",
    "What is {t}?",
    "We talked about {t} today.",
    "{t} is mentioned in the report.",
    "Here is a note on {t} and related topics.",
)


def read_texts(path) -> list[str]:
    """Texts from a plain-text file (one per line) or JSON lines (`{"text": ...}` per line).

    The format is detected from the first non-empty line: a line starting with `{`
    that parses as a JSON object means JSON lines. Blank lines are dropped.
    """
    from ..fsutil import check_regular_file

    p = check_regular_file(path, "text file", "pass a text file (one text per line) or JSON lines")
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise EmbdeployError(f"text file {p} is {size / 2**30:.1f} GiB; split it or sample it below 2 GiB")
    raw = p.read_bytes()
    if b"\x00" in raw[: 1 << 20]:
        raise EmbdeployError(f"text file {p} is binary (contains NUL bytes); pass UTF-8 text, one text per line")
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise EmbdeployError(f"text file {p} is not UTF-8 (bad byte at offset {e.start}); save it as UTF-8") from None
    lines = content.splitlines()
    first = next((ln.strip() for ln in lines if ln.strip()), None)
    if first is None:
        raise EmbdeployError(f"text file {p} is empty; write one text per line (or JSON lines with a \"text\" field)")
    if first.startswith("{") and _is_json_object(first):
        texts = _read_jsonl(p, lines)
    else:
        texts = [ln.strip() for ln in lines if ln.strip()]
    if not texts:
        raise EmbdeployError(f"text file {p} has no texts")
    return texts


MAX_LINE_BYTES = 16 * 1024**2


def iter_texts(path, counter: list[int] | None = None):
    """Stream the texts of a file in `read_texts`'s formats (plain lines, JSON lines), any size.

    Nothing but the current line is held. `counter`, if given, is a one-element list that
    receives the bytes read so far (for a progress bar). Errors name the line.
    """
    from ..fsutil import check_regular_file

    p = check_regular_file(path, "text file", "pass a text file (one text per line) or JSON lines")
    fmt = None
    with open(p, "rb") as f:
        for n, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES), b""), 1):
            if counter is not None:
                counter[0] += len(raw)
            if b"\x00" in raw:
                raise EmbdeployError(f"text file {p} is binary (contains NUL bytes, line {n}); pass UTF-8 text, one text per line")
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8").strip()
            except UnicodeDecodeError as e:
                raise EmbdeployError(f"text file {p} is not UTF-8 (line {n}, bad byte at column {e.start}); save it as UTF-8") from None
            if not line:
                continue
            if fmt is None:
                fmt = "jsonl" if line.startswith("{") and _is_json_object(line) else "plain"
            if fmt == "plain":
                yield line
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EmbdeployError(f"text file {p} looks like JSON lines but line {n} is not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise EmbdeployError(f'text file {p} looks like JSON lines but line {n} is not an object with a string field "text"')
            if obj["text"].strip():
                yield obj["text"].strip()

def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _read_jsonl(p: Path, lines: list[str]) -> list[str]:
    texts, problems = [], []
    for n, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: not valid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            problems.append(f'line {n}: expected an object with a string field "text"')
            continue
        if obj["text"].strip():
            texts.append(obj["text"].strip())
        if len(problems) >= 10:
            break
    if problems:
        lines_ = "\n".join(f"  - {q}" for q in problems)
        raise EmbdeployError(f"text file {p} looks like JSON lines but has problems:\n{lines_}")
    return texts


def texts_digest(texts: list[str]) -> str:
    """sha256 of the texts joined by newlines (the same for a file and the list read from it)."""
    h = hashlib.sha256()
    for i, t in enumerate(texts):
        if i:
            h.update(b"\n")
        h.update(t.encode("utf-8"))
    return "sha256:" + h.hexdigest()


def folds_case(tokenizer) -> bool:
    """True where the tokenizer maps upper and lower case to the same ids."""
    enc = tokenizer(["Patient Data", "patient data"], add_special_tokens=False)["input_ids"]
    return enc[0] == enc[1]


def _window(text: str, start: int, end: int, chars: int = WINDOW_CHARS) -> str:
    if len(text) <= 2 * chars + (end - start):
        return text
    lo, hi = max(0, start - chars), min(len(text), end + chars)
    # cut at whitespace so no word is split in half
    if lo > 0:
        sp = text.find(" ", lo, start)
        lo = sp + 1 if sp >= 0 else lo
    if hi < len(text):
        sp = text.rfind(" ", end, hi)
        hi = sp if sp >= 0 else hi
    return text[lo:hi]


@dataclass
class Contexts:
    """Contexts per new token, in the extension's token order."""

    texts: list[str]  # unique context texts
    by_token: dict[str, list[int]]  # token -> indices into texts
    without_context: list[str] = field(default_factory=list)  # tokens that got synthetic contexts

    def summary(self) -> dict:
        return {
            "contexts": len(self.texts),
            "tokens_without_context": list(self.without_context),
        }


def harvest_contexts(ext, texts, max_per_token: int = 64, seed: int = 0, synthetic: bool = True,
                     batch: int = 256) -> Contexts:
    """Texts in which the extended tokenizer produces each new token's id, at most `max_per_token` each.

    One pass over `texts` (any iterable: a list, or lines streamed from a file), tokenized in
    batches with the extended tokenizer itself, so a token is found exactly where the tokenizer
    matches it: after its normalizer (`unterstutzt` is found in `Unterstützt` by an uncased
    BERT), never by a regular expression's idea of a word. Memory stays bounded: per token a
    seeded reservoir of at most `max_per_token` windows, never a token × corpus structure.
    A token with no context gets SYNTHETIC contexts (if `synthetic`) and is listed in `without_context`.
    """
    import random

    ids = ext.token_ids
    by_id = {i: t for t, i in ids.items()}
    first_new = min(by_id) if by_id else 0
    rng = random.Random(seed)
    reservoirs: dict[str, list[str]] = {t: [] for t in ext.tokens}
    members: dict[str, set[str]] = {t: set() for t in ext.tokens}
    seen_count: dict[str, int] = dict.fromkeys(ext.tokens, 0)

    def offer(tok: str, window: str) -> None:
        if window in members[tok]:
            return
        seen_count[tok] += 1
        res = reservoirs[tok]
        if len(res) < max_per_token:
            res.append(window)
            members[tok].add(window)
            return
        j = rng.randrange(seen_count[tok])  # reservoir sampling: every distinct window equally likely kept
        if j < max_per_token:
            members[tok].discard(res[j])
            res[j] = window
            members[tok].add(window)

    def scan(chunk: list[str]) -> None:
        enc = ext.tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
        for text, row, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
            found = set()
            for k, tid in enumerate(row):
                if tid >= first_new and tid in by_id and tid not in found:
                    found.add(tid)
                    a, b = offsets[k]
                    offer(by_id[tid], _window(text, a, b))

    chunk: list[str] = []
    for text in texts:
        if text:
            chunk.append(text)
        if len(chunk) >= batch:
            scan(chunk)
            chunk = []
    if chunk:
        scan(chunk)

    out: list[str] = []
    index: dict[str, int] = {}
    by_token: dict[str, list[int]] = {}
    missing: list[str] = []

    def add(text: str) -> int:
        if text not in index:
            index[text] = len(out)
            out.append(text)
        return index[text]

    for tok in ext.tokens:
        found = reservoirs[tok]  # in corpus order until the cap, then the seeded reservoir's
        # A window cut from a long text must still produce the id on its own.
        if found:
            enc = ext.tokenizer(found, add_special_tokens=False)["input_ids"]
            found = [f for f, e in zip(found, enc) if ids[tok] in e]
        if not found:
            missing.append(tok)
            if synthetic:
                found = [s.format(t=tok) for s in SYNTHETIC]
        by_token[tok] = [add(f) for f in found]
    return Contexts(out, by_token, missing)
