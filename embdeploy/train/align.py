"""Two tokenizations of one text, and which positions correspond.

The teacher reads a text with the original tokenizer, the student with the
extended one. Positions are matched through character offsets: a student token
and a teacher token belong together when they cover a common non-space
character. Connected groups ("components") are then compared as units:

    "the troponin rose"   student: the | troponin        | rose
                          teacher: the | tr ##op ##oni ##n | rose
    components: (the, the), (troponin, tr ##op ##oni ##n), (rose, rose)

Outside new tokens both tokenizers agree, so components there are one to one.
Special tokens ([CLS], [SEP], <s>) carry no offsets and are paired by order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_LEN = 256


@dataclass
class Component:
    student: tuple[int, ...]  # positions in the student sequence
    teacher: tuple[int, ...]  # positions in the teacher sequence
    new: bool  # holds a new token


@dataclass
class Example:
    text: str
    student_ids: list[int]
    teacher_ids: list[int]
    components: list[Component] = field(default_factory=list)

    @property
    def new_positions(self) -> list[int]:
        return [p for c in self.components if c.new for p in c.student]


def model_device(model) -> torch.device:
    """Where the model's parameters live (the device a batch must go to)."""
    return next(model.parameters()).device


def is_causal(model) -> bool:
    """Whether position i depends only on positions <= i: changing the last input leaves earlier outputs unchanged.

    A probe, not a lookup in the config: it holds for any architecture.
    """
    emb = model.get_input_embeddings()
    V = int(getattr(emb, "num_base", emb.weight.shape[0]))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (1, 6), generator=g)
    other = ids.clone()
    other[0, -1] = (ids[0, -1] + 1) % V
    body = getattr(model, "base_model", model)
    device = model_device(model)
    ids, other = ids.to(device), other.to(device)
    with torch.no_grad():
        a = body(input_ids=ids).last_hidden_state
        b = body(input_ids=other).last_hidden_state
    return bool(torch.equal(a[:, :-1], b[:, :-1]))


def max_length(model, tokenizer) -> int:
    cfg = model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or MAX_LEN
    limit = limit if limit > 0 else MAX_LEN  # XLNet: -1, no position table
    tmax = getattr(tokenizer, "model_max_length", None) or MAX_LEN
    return int(min(MAX_LEN, limit, tmax))


def _encode(tokenizer, texts: list[str], max_len: int):
    """(ids, offsets, special masks, truncated flags) per text; only over-long texts are truncated."""
    kw = dict(return_offsets_mapping=True, return_special_tokens_mask=True)
    enc = tokenizer(texts, **kw)
    ids, offs, spec = list(enc["input_ids"]), list(enc["offset_mapping"]), list(enc["special_tokens_mask"])
    trunc = [False] * len(texts)
    for i, seq in enumerate(ids):
        if len(seq) > max_len:
            e = tokenizer(texts[i], truncation=True, max_length=max_len, **kw)
            ids[i], offs[i], spec[i], trunc[i] = e["input_ids"], e["offset_mapping"], e["special_tokens_mask"], True
    return ids, offs, spec, trunc


class _DSU:
    def __init__(self, n):
        self.p = list(range(n))

    def find(self, a):
        while self.p[a] != a:
            self.p[a] = self.p[self.p[a]]
            a = self.p[a]
        return a

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a != b:
            self.p[max(a, b)] = min(a, b)


def align(text, s_ids, s_off, s_spec, t_ids, t_off, t_spec, V, char_limit=None) -> list[Component]:
    ns, nt = len(s_ids), len(t_ids)
    dsu = _DSU(ns + nt)  # nodes: student 0..ns-1, teacher ns..ns+nt-1
    owners: dict[int, list[int]] = {}
    for base, offs, spec in ((0, s_off, s_spec), (ns, t_off, t_spec)):
        for j, (a, b) in enumerate(offs):
            if spec[j]:
                continue
            for c in range(a, b):
                if not text[c].isspace():
                    owners.setdefault(c, []).append(base + j)
    for nodes in owners.values():
        for n in nodes[1:]:
            dsu.union(nodes[0], n)
    groups: dict[int, tuple[list[int], list[int], int]] = {}
    for c, nodes in owners.items():
        for n in nodes:
            g = groups.setdefault(dsu.find(n), (set(), set(), [c]))
            (g[0] if n < ns else g[1]).add(n if n < ns else n - ns)
            g[2][0] = max(g[2][0], c)
    comps = []
    for s, t, (last_char,) in groups.values():
        if not s or not t:  # e.g. a whitespace-only token on one side
            continue
        if char_limit is not None and last_char >= char_limit:  # cut by truncation on one side
            continue
        s, t = tuple(sorted(s)), tuple(sorted(t))
        comps.append(Component(s, t, any(s_ids[p] >= V for p in s)))
    # Special tokens carry no text: pair them by order when both sides have the same ones.
    ss = [j for j in range(ns) if s_spec[j]]
    ts = [j for j in range(nt) if t_spec[j]]
    if [s_ids[j] for j in ss] == [t_ids[j] for j in ts]:
        comps += [Component((a,), (b,), False) for a, b in zip(ss, ts)]
    comps.sort(key=lambda c: c.student[0])
    return comps


def build_examples(ext, texts: list[str], causal: bool, max_len: int | None = None) -> list[Example]:
    """Tokenize each text both ways and align them.

    In a causal model the positions before the first new token see the same
    prefix in both tokenizations, so they carry no signal and are dropped.
    """
    max_len = max_len or max_length(ext.model, ext.tokenizer)
    s_ids, s_off, s_spec, s_tr = _encode(ext.tokenizer, texts, max_len)
    t_ids, t_off, t_spec, t_tr = _encode(ext.base_tokenizer, texts, max_len)
    out = []
    for i, text in enumerate(texts):
        limit = None
        for tr, offs, spec in ((s_tr[i], s_off[i], s_spec[i]), (t_tr[i], t_off[i], t_spec[i])):
            if tr:
                end = max((b for (a, b), sp in zip(offs, spec) if not sp), default=0)
                limit = end if limit is None else min(limit, end)
        comps = align(text, s_ids[i], s_off[i], s_spec[i], t_ids[i], t_off[i], t_spec[i], ext.V, limit)
        if causal:
            first = next((k for k, c in enumerate(comps) if c.new), len(comps))
            comps = comps[first:]
        out.append(Example(text, list(s_ids[i]), list(t_ids[i]), comps))
    return out
