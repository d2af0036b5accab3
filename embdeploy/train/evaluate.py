"""How close the extended model stays to the original on held-out text.

For each held-out text that contains new tokens, the same text is read twice:
with the new tokens (extended tokenizer) and with the original tokenization.

  sentence cosine  cosine of the two sentence embeddings (the model's pooling
                   where it has one, else the mean of the last hidden states)
  token cosine     the new token's last-layer state against the mean of its
                   original pieces' states (the last piece in causal models)
  retrieval        the text with the new token must find its original-tokenization
                   twin among the same template filled with each other new token
                   (also in original tokenization); ties count as found

The original side never changes during training, so an `Evaluator` computes it
once and `run()` only re-reads the extended side.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..errors import EmbdeployError
from .align import build_examples, is_causal, model_device
from .objectives import collate, pad_id, pool
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
    retrieval_accuracy: float | None  # None with a single new token (nothing to tell apart)
    candidates: int  # candidates per retrieval query (the twin included)
    embedding: str  # what "sentence embedding" means for this model
    per_token: dict[str, dict] = field(default_factory=dict)
    worst: list[dict] = field(default_factory=list)  # lowest sentence cosines
    tokens_not_covered: list[str] = field(default_factory=list)  # new tokens no held-out text contains

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
        table = Table(title=f"{title}: {self.texts} texts, {self.pairs} token uses")
        table.add_column("metric")
        if before is not None:
            table.add_column("before", justify="right")
        table.add_column("after" if before is not None else "value", justify="right")
        rows = [
            ("sentence cosine, mean", "sentence_cos_mean"),
            ("sentence cosine, min", "sentence_cos_min"),
            ("token cosine, mean", "token_cos_mean"),
            ("token cosine, min", "token_cos_min"),
            (f"retrieval accuracy (1 of {self.candidates})", "retrieval_accuracy"),
        ]
        for label, key in rows:
            vals = ([getattr(before, key)] if before is not None else []) + [getattr(self, key)]
            table.add_row(label, *("n/a" if v is None else f"{v:.3f}" for v in vals))
        console.print(table)
        console.print(f"sentence embedding: {self.embedding}")
        if self.worst:
            w = self.worst[0]
            console.print(f"lowest sentence cosine {w['cos']:.3f}: {w['text']!r}")
        if self.tokens_not_covered:
            n = len(self.tokens_not_covered)
            console.print(f"{n} new token(s) appear in no held-out text: {', '.join(self.tokens_not_covered[:10])}" + (" …" if n > 10 else ""))


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
        seqs = self.ext.base_tokenizer(texts)["input_ids"]
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
        # Retrieval candidates: the template (text with the token replaced) filled with each other new token.
        ignore_case = folds_case(ext.base_tokenizer)
        self.queries = []  # (pair index, [candidate row indices]); row of the twin comes first
        cand_texts: dict[str, int] = {}
        for n, (k, tok) in enumerate(self.pairs):
            text = self.examples[k].text
            pat = re.compile(r"(?<!\w)" + re.escape(tok) + r"(?!\w)", re.IGNORECASE if ignore_case else 0)
            if not pat.search(text) or len(ext.tokens) < 2:
                continue
            rows = []
            for other in ext.tokens:
                if other == tok:
                    continue
                filled = pat.sub(lambda m, o=other: _match_case(m.group(0), o), text)
                rows.append(cand_texts.setdefault(filled, len(cand_texts)))
            self.queries.append((n, rows))
        self.cand_emb = self._embed_texts(list(cand_texts)) if cand_texts else None

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
        for n, rows in self.queries:
            k = self.pairs[n][0]
            q = pooled[k]
            twin = float(F.cosine_similarity(q, self.ref_sentence[k], dim=0))
            others = F.cosine_similarity(q.unsqueeze(0), self.cand_emb[rows], dim=-1)
            hits[n] = bool((others > twin).sum() == 0)

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
            candidates=len(self.ext.tokens),
            embedding=_describe(self.pooling),
            per_token=per_token,
            worst=[{"text": self.examples[i].text, "cos": round(float(sent[i]), 6)} for i in order],
            tokens_not_covered=self.not_covered,
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
