"""Configuration of one named extension group, validated on construction."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ..errors import EmbdeployError, raise_all

INIT_METHODS = ("subword-mean", "mean", "mean-noise", "copy-token", "reference", "zeros", "normal", "vectors")
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOKENS = 200_000
MAX_TOKEN_CHARS = 256


@dataclass
class ExtensionConfig:
    """One named group of new tokens and how their rows start.

    init:
      subword-mean  mean of the base rows of the token's pieces under the original tokenizer (default)
      mean          mean of all base rows
      mean-noise    mean of all base rows plus noise with the rows' covariance scaled by 1e-5
      copy-token    the row of `init_token`, an existing single-piece token
      reference     rows of `init_source` (another model or extension dir) for tokens it knows,
                    subword-mean for the others
      zeros, normal zeros, or N(0, std of the base rows)
      vectors       rows from the safetensors file `init_source`: a tensor `vectors` (K×H, token
                    order) or one tensor per token string; optional `head_vectors` for an untied head
    """

    tokens: list[str]
    name: str = "default"
    init: str = "subword-mean"
    init_token: str | None = None
    init_source: str | None = None
    seed: int = 0
    strict: bool = False  # tokens already in the vocabulary: error instead of skip

    def __post_init__(self):
        problems = []
        if not NAME_RE.match(self.name or ""):
            problems.append(f"extension name {self.name!r} must be 1-64 letters, digits, '_' or '-'")
        if self.init not in INIT_METHODS:
            problems.append(f"unknown init {self.init!r}; choose one of {', '.join(INIT_METHODS)}")
        if self.init == "copy-token" and not self.init_token:
            problems.append("init 'copy-token' needs init_token (CLI: --init-token TOKEN)")
        if self.init in ("reference", "vectors") and not self.init_source:
            problems.append(f"init {self.init!r} needs init_source (CLI: --init-source PATH)")
        if not isinstance(self.tokens, (list, tuple)):
            problems.append("tokens must be a list of strings")
        else:
            problems += token_list_problems(list(self.tokens))
        raise_all(problems, "invalid extension config:")
        self.tokens = list(self.tokens)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("tokens")
        return d


# Zero-width (non-)joiners are part of how emoji sequences and several scripts (Persian, Indic) are written.
_ALLOWED_FORMAT = {"\u200c", "\u200d"}


def invisible_characters(token: str) -> list[str]:
    """The control, format (zero-width, bidi) and line/paragraph separator characters in `token`, named."""
    import unicodedata

    found = []
    for c in dict.fromkeys(token):
        cat = unicodedata.category(c)
        if cat in ("Cc", "Zl", "Zp") or (cat == "Cf" and c not in _ALLOWED_FORMAT):
            found.append(f"U+{ord(c):04X} ({unicodedata.name(c, 'control character')})")
    return found


def token_list_problems(tokens: list) -> list[str]:
    problems = []
    if not tokens:
        problems.append("the token list is empty; give at least one new token")
        return problems
    if len(tokens) > MAX_TOKENS:
        problems.append(f"{len(tokens)} tokens is more than the {MAX_TOKENS} supported in one extension; split the list")
        return problems
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens, 1):
        if not isinstance(t, str):
            problems.append(f"token #{i} is a {type(t).__name__}, not a string")
            continue
        if not t.strip():
            problems.append(f"token #{i} is empty or whitespace only; remove that line")
            continue
        if t != t.strip():
            problems.append(f"token #{i} {t!r} has leading or trailing whitespace; strip it")
        if len(t) > MAX_TOKEN_CHARS:
            problems.append(f"token #{i} is {len(t)} characters long (max {MAX_TOKEN_CHARS}); is this a token list?")
        hidden = invisible_characters(t)
        if hidden:
            problems.append(f"token #{i} {t!r} contains {', '.join(hidden)}: invisible or control characters make "
                            "the token differ from what users type; remove them")
        if t in seen:
            problems.append(f"token {t!r} appears twice (#{seen[t]} and #{i}); keep one")
        else:
            seen[t] = i
    return problems


def read_token_file(path, notes: list | None = None) -> list[str]:
    """Read one token per line (UTF-8); '#' starts a comment line. Raises on any problem, all listed.

    `notes`, if given, receives what happened to lines that are not tokens (comments, blank lines).
    """
    from pathlib import Path

    from ..fsutil import check_regular_file

    p = check_regular_file(path, "token file", "pass a text file with one new token per line")
    size = p.stat().st_size
    if size > 16 * 1024 * 1024:
        raise EmbdeployError(f"token file {p} is {size / 2**20:.0f} MiB; a token list over 16 MiB is not a token list (wrong file?)")
    raw = p.read_bytes()
    if b"\x00" in raw:
        raise EmbdeployError(f"token file {p} is binary (contains NUL bytes); pass a UTF-8 text file, one token per line")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise EmbdeployError(f"token file {p} is not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8") from None
    lines = [ln.rstrip("\r") for ln in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    tokens = [ln for ln in lines if not ln.lstrip().startswith("#")]
    comments = len(lines) - len(tokens)
    if notes is not None and comments:
        notes.append(f"{comments} line(s) of {p.name} start with '#' and were read as comments, not tokens")
    if not any(t.strip() for t in tokens):
        raise EmbdeployError(f"token file {p} has no tokens; write one new token per line")
    raise_all(token_list_problems(tokens), f"token file {p} has problems:")
    return tokens
