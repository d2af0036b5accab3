"""What the extension buys on the user's own texts: fewer tokens, end-to-end latency, fidelity.

The base export runs on the original tokenization, each extended export on its
extended tokenization, over the same texts in batches of the given sizes,
padded as the runtime pads (to the longest text of the batch). A timed call is
the whole request path: tokenize the batch, then run it. Rounds interleave every
variant on the same batch in a shuffled order, and the ratio to base is the
median of per-round ratios, as for the fixed shapes.

The base tokenizer is derived from the extended export itself: its tokenizer with
the new tokens (ids >= V) removed, so no other directory is needed.

Fidelity: cosine, per text, between the extended export's output and the base
export's output on the original tokenization. The output compared is one vector
per text, whatever the sequence lengths: the sentence embedding (or the pooled
last_hidden_state, with the export's pooling), or for a causal LM the logits of
the last position over the base vocabulary (for a masked LM their mean over
positions).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from ..errors import EmbdeployError
from .result import LatencyRow, TextRow
from .timing import Entry, run_rounds, summarize

TEXT_MIX = "your-texts"
DEFAULT_BATCH_SIZES = (1, 8, 32)
MAX_TEXTS = 2000  # texts read for the tokens and fidelity figures (and the pool batches are cut from)


def text_shape(batch: int) -> str:
    return f"texts/b{batch}"


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise EmbdeployError(f"cannot read batch sizes {text!r}; write positive integers, comma-separated, e.g. 1,8,32")
    return tuple(int(p) for p in parts)


def base_tokenizer(extended, V: int):
    """The extended tokenizer with every token of id >= V removed: the base model's own tokenization."""
    from ..models import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="embdeploy-base-tok-") as d:
        extended.save_pretrained(d)
        tj = Path(d) / "tokenizer.json"
        doc = json.loads(tj.read_text(encoding="utf-8"))
        doc["added_tokens"] = [t for t in doc.get("added_tokens", []) if t["id"] < V]
        tj.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
        cfg_file = Path(d) / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            dec = cfg.get("added_tokens_decoder")
            if isinstance(dec, dict):
                cfg["added_tokens_decoder"] = {k: v for k, v in dec.items() if int(k) < V}
            cfg_file.write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
        for extra in ("added_tokens.json",):
            (Path(d) / extra).unlink(missing_ok=True)
        tok = load_tokenizer(d)
    if len(tok) > V:
        raise EmbdeployError(f"could not remove the new tokens from the export's tokenizer ({len(tok)} tokens, V={V})")
    return tok


class _Runner:
    """One variant: its tokenizer and session; `__call__` is one timed request (tokenize + run)."""

    def __init__(self, session, tokenizer, limit):
        self.session, self.tok, self.limit = session, tokenizer, limit
        self.types = "token_type_ids" in session.metadata()["inputs"]

    def feeds(self, texts):
        enc = self.tok(texts, add_special_tokens=True, padding=True, truncation=self.limit is not None,
                       max_length=self.limit, return_tensors="np", return_token_type_ids=self.types)
        f = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
        if self.types:
            f["token_type_ids"] = enc["token_type_ids"].astype(np.int64)
        return f

    def __call__(self, texts):
        return self.session.run(self.feeds(texts))


def _vector(out: dict, mask: np.ndarray, meta) -> np.ndarray:
    """`meta`: the base export's ExportManifest (pooling, V, task)."""
    # one vector per text from an output dict (see the module docstring)
    if "sentence_embedding" in out:
        return np.asarray(out["sentence_embedding"], np.float64)
    if "last_hidden_state" in out:
        h = np.asarray(out["last_hidden_state"], np.float64)
        if (meta.pooling or {}).get("mode") == "cls":
            return h[:, 0]
        m = mask[..., None].astype(np.float64)
        return (h * m).sum(1) / np.maximum(m.sum(1), 1.0)
    if "logits" in out:
        lg = np.asarray(out["logits"], np.float64)[..., : meta.V]
        if meta.task == "text-generation":
            last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)  # last real position, either padding side
            return lg[np.arange(len(lg)), last]
        m = mask[..., None].astype(np.float64)
        return (lg * m).sum(1) / np.maximum(m.sum(1), 1.0)
    raise EmbdeployError(f"no output to compare on texts (outputs: {', '.join(out)})")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-12)


def measure_texts(base_art, variant_arts, labels, texts: list[str], batch_sizes, rounds: int, warmup: int,
                  threads: int, say) -> tuple[list[LatencyRow], list[TextRow]]:
    """Latency rows (shape texts/bN, mix your-texts) and one TextRow per extended variant."""
    from ..runtime import Session

    if not texts:
        raise EmbdeployError("no texts to benchmark: pass a file with one text per line (or JSON lines)")
    texts = texts[:MAX_TEXTS]
    say(f"on your texts: {len(texts)} texts, batch sizes {', '.join(map(str, batch_sizes))}")
    sessions = {label: Session(a.path, providers="cpu", threads=threads) for label, a in zip(labels, variant_arts)}
    first = next(iter(sessions.values()))
    limit = first.max_length
    base_sess = Session(base_art.path, providers="cpu", threads=threads)
    runners = {"base": _Runner(base_sess, base_tokenizer(first.tokenizer, base_art.V), limit)}
    for label, s in sessions.items():
        runners[label] = _Runner(s, s.tokenizer, limit)
    meta = base_art

    # tokens and fidelity, all texts, batch 32 (not timed)
    vecs, tokens, truncated = {}, {}, {}
    for name, r in runners.items():
        parts, n_tok, cut = [], [], 0
        for i in range(0, len(texts), 32):
            f = r.feeds(texts[i:i + 32])
            out = r.session.run(f)
            parts.append(_vector(out, f["attention_mask"], meta))
            n_tok += f["attention_mask"].sum(1).tolist()
            if limit is not None:
                cut += int((f["attention_mask"].sum(1) >= limit).sum())
        vecs[name], tokens[name], truncated[name] = np.concatenate(parts), np.array(n_tok), cut
    rows = []
    for label, a in zip(labels, variant_arts):
        cos = _cosines(vecs[label], vecs["base"])
        rows.append(TextRow(
            variant=label, mode=a.mode, texts=len(texts),
            tokens_total=int(tokens[label].sum()), tokens_mean=float(tokens[label].mean()),
            base_tokens_total=int(tokens["base"].sum()), base_tokens_mean=float(tokens["base"].mean()),
            token_reduction=1.0 - float(tokens[label].sum()) / float(tokens["base"].sum()),
            fidelity_mean=float(cos.mean()), fidelity_min=float(cos.min()),
            fidelity_output=_what(meta, a.outputs), truncated=truncated[label], base_truncated=truncated["base"],
        ))

    # latency, interleaved: every entry walks the same batches in step (one call per round slot), so
    # in each round all variants run the same texts
    lat = []
    modes = {"base": "base", **{lab: a.mode for lab, a in zip(labels, variant_arts)}}
    for b in batch_sizes:
        batches = [texts[i:i + b] for i in range(0, len(texts) - b + 1, b)] or [texts[:b]]
        entries = [Entry((n, TEXT_MIX), _cycling(runners[n], batches), b) for n in runners]
        run_rounds(entries, rounds, warmup, inner=1, seed=b)
        for e in entries:
            lat.append(LatencyRow(provider="cpu", shape=text_shape(b), variant=e.key[0], mode=modes[e.key[0]],
                                  mix=TEXT_MIX, **summarize(e, entries[0])))
        say(f"  batch {b}: " + ", ".join(f"{r.variant} {r.ratio_to_base:.3f}" for r in lat[-len(entries):]
                                         if r.variant != "base"))
    return lat, rows


def _cycling(runner, batches):
    state = {"i": 0}

    def run():
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        return runner(batch)

    return run


def _what(meta, outputs) -> str:
    if "sentence_embedding" in outputs:
        return "sentence_embedding"
    if "last_hidden_state" in outputs:
        return f"last_hidden_state, {(meta.pooling or {}).get('mode') or 'mean'}-pooled"
    if meta.task == "text-generation":
        return "logits at the last position (base vocabulary)"
    return "logits, mean over positions (base vocabulary)"
