"""How close the extended model stays to the original on held-out text.

For each held-out text that contains new tokens, the same text is read twice:
with the new tokens (extended tokenizer) and with the original tokenization.

  sentence cosine  cosine of the two sentence embeddings (the model's pooling
                   where it has one, else the mean of the last hidden states)
  token cosine     the new token's last-layer state against the mean of its
                   original pieces' states (the last piece in causal models)
  retrieval        the text with the new token must find its original-tokenization
                   twin among every other held-out text and the same template filled
                   with each other new token (all in original tokenization); ties
                   count as found, so chance is about 1 in the number of candidates

Texts without a new token read the same with both tokenizers (identical outputs,
cosine 1 by construction), so they enter only as retrieval candidates.

The original side never changes during training, so an `Evaluator` computes it
once and `run()` only re-reads the extended side.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..errors import EmbdeployError
from ..pooling import pool
from .align import build_examples, is_causal, max_length, model_device
from .objectives import collate, pad_id
from .texts import folds_case

BATCH = 64


@dataclass
class QualityReport:
    texts: int  # held-out texts that contain a new token
    pairs: int  # (text, new token) pairs
    sentence_cos_mean: float
    sentence_cos_min: float
    token_cos_mean: float
    token_cos_min: float
    retrieval_accuracy: float | None  # None when there is nothing to tell apart (one text, one new token)
    candidates: int  # most candidates of a retrieval query (the twin included)
    embedding: str  # what "sentence embedding" means for this model
    per_token: dict[str, dict] = field(default_factory=dict)
    worst: list[dict] = field(default_factory=list)  # lowest sentence cosines
    tokens_not_covered: list[str] = field(default_factory=list)  # new tokens no held-out text contains
    texts_given: int = 0  # distinct held-out texts read (0 in reports written before it was recorded)
    candidates_min: int | None = None  # fewest candidates of a query (fills can coincide with held-out texts)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "QualityReport":
        from dataclasses import fields

        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def render(self, console=None, before: QualityReport | None = None, title: str = "held-out quality") -> None:
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        of = f" of {self.texts_given}" if self.texts_given else ""
        table = Table(title=f"{title}: {self.texts}{of} texts hold a new token, {self.pairs} token uses")
        table.add_column("metric")
        if before is not None:
            table.add_column("before", justify="right")
        table.add_column("after" if before is not None else "value", justify="right")
        rows = [
            ("sentence cosine, mean", "sentence_cos_mean"),
            ("sentence cosine, min", "sentence_cos_min"),
            ("token cosine, mean", "token_cos_mean"),
            ("token cosine, min", "token_cos_min"),
            (f"retrieval accuracy (1 of {self.candidates_label()})", "retrieval_accuracy"),
        ]
        for label, key in rows:
            vals = ([getattr(before, key)] if before is not None else []) + [getattr(self, key)]
            table.add_row(label, *("n/a" if v is None else f"{v:.3f}" for v in vals))
        console.print(table)
        for line in self.explanation():
            console.print(line, highlight=False, markup=False)
        console.print(f"sentence embedding: {self.embedding}")
        if self.worst:
            w = self.worst[0]
            console.print(f"lowest sentence cosine {w['cos']:.3f}: {w['text']!r}")
        if self.tokens_not_covered:
            n = len(self.tokens_not_covered)
            console.print(f"{n} new token(s) appear in no held-out text: {', '.join(self.tokens_not_covered[:10])}" + (" …" if n > 10 else ""))


    def candidates_label(self) -> str:
        lo = self.candidates_min
        return str(self.candidates) if lo is None or lo == self.candidates else f"{lo}-{self.candidates}"

    def explanation(self) -> list[str]:
        """The metrics in words, printed under the table."""
        lines = [
            "sentence cosine: each text that holds a new token is embedded twice, with the new tokens and with the "
            "original tokenization; 1.000 means the same vector",
            "token cosine: the new token's output state against the mean of its original pieces' states "
            "(the last piece in causal models)",
            f"retrieval accuracy: the share of (text, new token) uses whose embedding with the new token is at "
            f"least as close to its own original-tokenization twin as to any other candidate: "
            f"{self.candidates_label()} in all, the twin, the other held-out texts, and the same sentence with "
            f"each other new token, all in original tokenization; chance is at most 1 in "
            f"{self.candidates_min or self.candidates}",
        ]
        rest = self.texts_given - self.texts
        if rest > 0:
            lines.append(f"the other {rest} held-out text(s) hold no new token: both tokenizers read them the "
                         "same, so their outputs are identical; they serve as retrieval candidates only")
        return lines


def _describe(pooling) -> str:
    if not pooling:
        return "mean of last hidden states"
    return f"{pooling.get('mode') or 'mean'} pooling" + (", normalized" if pooling.get("normalize") else "")


class Evaluator:
    """Held-out quality of an extension; the original-tokenization side is computed once."""

    def __init__(self, ext, texts: list[str], batch_size: int = BATCH):
        self.ext = ext
        self.batch_size = batch_size
        self.pooling = ext.base_info.pooling
        self.body = getattr(ext.model, "base_model", ext.model)
        self.pad = pad_id(ext.tokenizer)
        self.causal = is_causal(ext.model)
        V = ext.V
        texts = list(dict.fromkeys(texts))
        self.held = texts  # every distinct held-out text: all of them are retrieval candidates
        enc = ext.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        chosen = list(dict.fromkeys(t for t, ids in zip(texts, enc) if any(i >= V for i in ids)))
        if not chosen:
            raise EmbdeployError(
                f"none of the {len(texts)} evaluation texts contains a new token; pass held-out texts that use them "
                f"(e.g. {', '.join(ext.tokens[:3])})"
            )
        self.examples = [e for e in build_examples(ext, chosen, self.causal) if e.new_positions]
        tokens = ext.tokens
        self.pairs = []  # (example index, token)
        for k, e in enumerate(self.examples):
            for tid in dict.fromkeys(i for i in e.student_ids if i >= V):
                self.pairs.append((k, tokens[tid - V]))
        covered = {t for _, t in self.pairs}
        self.not_covered = [t for t in tokens if t not in covered]
        with torch.no_grad():
            self._reference()

    # ------------------------------------------------------------------ model calls
    def _forward(self, seqs: list[list[int]]):
        """(pooled N×H, last states per sequence) in a fixed length-sorted batching."""
        order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
        pooled = [None] * len(seqs)
        states = [None] * len(seqs)
        for k in range(0, len(order), self.batch_size):
            idx = order[k : k + self.batch_size]
            ids, mask = collate([seqs[i] for i in idx], self.pad, model_device(self.body))
            last = self.body(input_ids=ids, attention_mask=mask).last_hidden_state
            p = pool(last, mask, self.pooling)
            for b, i in enumerate(idx):
                pooled[i] = p[b]
                states[i] = last[b, : len(seqs[i])]
        return torch.stack(pooled), states

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        limit = max_length(self.ext.model, self.ext.base_tokenizer)
        seqs = self.ext.base_tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
        return self._forward(list(seqs))[0]

    # ------------------------------------------------------------------ original side
    def _reference(self):
        ext = self.ext
        pooled, states = self._forward([e.teacher_ids for e in self.examples])
        self.ref_sentence = pooled
        self.ref_token = []  # per example: list of (student position, target vector)
        for e, st in zip(self.examples, states):
            rows = []
            for c in e.components:
                if c.new:
                    t = list(c.teacher)
                    rows.append((c.student[0], st[t[-1]] if self.causal else st[t].mean(0)))
            self.ref_token.append(rows)
        # Retrieval candidates: every other held-out text, and the template (the text with the token
        # replaced) filled with each other new token, which only the new token's row tells apart.
        ignore_case = folds_case(ext.base_tokenizer)
        # Rows 0..len(held)-1 of cand_emb are the held-out texts, the fills follow.
        self.queries = []  # (pair index, row of its own text, [rows of its fills that are not held-out texts])
        cand_texts: dict[str, int] = {t: i for i, t in enumerate(self.held)}
        for n, (k, tok) in enumerate(self.pairs):
            text = self.examples[k].text
            fills = {}
            pat = re.compile(r"(?<!\w)" + re.escape(tok) + r"(?!\w)", re.IGNORECASE if ignore_case else 0)
            if pat.search(text):
                for other in ext.tokens:
                    if other != tok:
                        filled = pat.sub(lambda m, o=other: _match_case(m.group(0), o), text)
                        fills[cand_texts.setdefault(filled, len(cand_texts))] = None
            fills = [r for r in fills if r >= len(self.held)]
            if len(self.held) > 1 or fills:  # the text itself, in original tokenization, is the twin
                self.queries.append((n, cand_texts[text], fills))
        self.cand_emb = F.normalize(self._embed_texts(list(cand_texts)), dim=-1) if self.queries else None

    # ------------------------------------------------------------------ extended side
    def run(self) -> QualityReport:
        was_training = self.ext.model.training
        self.ext.model.eval()
        try:
            with torch.no_grad():
                return self._run()
        finally:
            self.ext.model.train(was_training)

    def _run(self) -> QualityReport:
        pooled, states = self._forward([e.student_ids for e in self.examples])
        sent = F.cosine_similarity(pooled, self.ref_sentence, dim=-1)  # one per example
        tok_cos_by_example = []
        for st, rows in zip(states, self.ref_token):
            tok_cos_by_example.append([float(F.cosine_similarity(st[p], ref, dim=0)) for p, ref in rows])
        all_tok = [c for cs in tok_cos_by_example for c in cs]

        hits: dict[int, bool] = {}
        n_held = len(self.held)
        for c in range(0, len(self.queries), 256):  # a (chunk × held texts) similarity matrix at a time
            chunk = self.queries[c : c + 256]
            ks = [self.pairs[n][0] for n, _, _ in chunk]
            q = F.normalize(pooled[ks], dim=-1)
            twin = (q * F.normalize(self.ref_sentence[ks], dim=-1)).sum(-1)
            sims = q @ self.cand_emb[:n_held].T
            sims[torch.arange(len(chunk)), torch.tensor([own for _, own, _ in chunk])] = -2.0  # below any cosine
            beaten = (sims > twin[:, None]).any(dim=1)
            for i, (n, _, fills) in enumerate(chunk):
                fill_beats = bool((self.cand_emb[fills] @ q[i] > twin[i]).any()) if fills else False
                hits[n] = not (bool(beaten[i]) or fill_beats)
        sizes = [n_held + len(fills) for _, _, fills in self.queries]  # the other held texts, fills, the twin

        per_token: dict[str, dict] = {}
        for n, (k, tok) in enumerate(self.pairs):
            d = per_token.setdefault(tok, {"texts": 0, "sentence_cos": 0.0, "retrieved": 0, "queries": 0})
            d["texts"] += 1
            d["sentence_cos"] += float(sent[k])
            if n in hits:
                d["queries"] += 1
                d["retrieved"] += int(hits[n])
        for d in per_token.values():
            d["sentence_cos"] = round(d["sentence_cos"] / d["texts"], 6)
        order = torch.argsort(sent)[:5].tolist()
        return QualityReport(
            texts=len(self.examples),
            pairs=len(self.pairs),
            sentence_cos_mean=float(sent.mean()),
            sentence_cos_min=float(sent.min()),
            token_cos_mean=sum(all_tok) / len(all_tok) if all_tok else float("nan"),
            token_cos_min=min(all_tok) if all_tok else float("nan"),
            retrieval_accuracy=(sum(hits.values()) / len(hits)) if hits else None,
            candidates=max(sizes, default=0),
            candidates_min=min(sizes, default=0),
            embedding=_describe(self.pooling),
            per_token=per_token,
            worst=[{"text": self.examples[i].text, "cos": round(float(sent[i]), 6)} for i in order],
            tokens_not_covered=self.not_covered,
            texts_given=len(self.held),
        )


def _match_case(found: str, other: str) -> str:
    if found[:1].isupper() and other[:1].islower():
        return other[:1].upper() + other[1:]
    return other


def evaluate(ext, texts, batch_size: int = BATCH) -> QualityReport:
    """Held-out quality of `ext` on `texts` (a list of strings or a path read with `read_texts`)."""
    from .texts import read_texts

    if not isinstance(texts, (list, tuple)):
        texts = read_texts(texts)
    return Evaluator(ext, list(texts), batch_size).run()
