"""Initial values for new rows (and matching head rows).

Every function returns float32-compatible tensors (K×H) in the base table's dtype
and a list of notes for the user (fallbacks taken), never silently.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import EmbdeployError, raise_all
from .config import ExtensionConfig


def piece_ids(tokenizer, token: str) -> list[int]:
    """Ids of `token` under the original tokenizer, without special tokens."""
    return list(tokenizer(token, add_special_tokens=False)["input_ids"])


def _subword_mean(table: torch.Tensor, tokenizer, tokens, notes, V) -> torch.Tensor:
    rows = []
    fallback = table.float().mean(0)
    for t in tokens:
        ids = [i for i in piece_ids(tokenizer, t) if 0 <= i < V]
        if ids:
            rows.append(table[ids].float().mean(0))
        else:
            notes.append(f"{t!r}: the original tokenizer gives no pieces for it; used the mean of all rows")
            rows.append(fallback)
    return torch.stack(rows)


def _mean_noise(table: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    # As transformers' mean resizing: sample around the mean with the rows' covariance × 1e-5,
    # so new rows are distinct yet stay inside the base distribution.
    x = table.float()
    mu = x.mean(0)
    centered = x - mu
    cov = centered.T @ centered / max(x.shape[0] - 1, 1)
    try:
        dist = torch.distributions.MultivariateNormal(mu, covariance_matrix=1e-5 * cov)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        return dist.sample((k,))
    except (ValueError, RuntimeError):  # covariance not positive definite (tiny or degenerate tables)
        std = centered.std(0) * (1e-5**0.5)
        return mu + torch.randn(k, x.shape[1], generator=gen) * std


def _single_id(tokenizer, token: str, V: int) -> int:
    ids = piece_ids(tokenizer, token)
    if len(ids) != 1 or not 0 <= ids[0] < V:
        raise EmbdeployError(
            f"init token {token!r} is not a single existing token (the tokenizer gives {len(ids)} pieces: {ids}); "
            "pick a token from the vocabulary"
        )
    return ids[0]


def _load_vectors(path: str, tokens, H: int):
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise EmbdeployError(f"vectors file {p} does not exist; pass a .safetensors file")
    try:
        with safe_open(str(p), framework="pt") as f:
            keys = set(f.keys())
            data = {k: f.get_tensor(k) for k in keys}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise EmbdeployError(f"cannot read {p} as safetensors ({e}); vectors must be a safetensors file") from None
    K = len(tokens)
    problems = []
    if "vectors" in data:
        emb = data["vectors"]
        head = data.get("head_vectors")
    else:
        missing = [t for t in tokens if t not in data]
        if missing:
            raise EmbdeployError(
                f"vectors file {p} has neither a `vectors` tensor nor tensors for tokens {missing[:5]}"
                + (" …" if len(missing) > 5 else "")
                + "; store `vectors` (K×H, token order) or one tensor per token string"
            )
        emb = torch.stack([data[t].reshape(-1) for t in tokens])
        head = None
    for name, t in (("vectors", emb), ("head_vectors", head)):
        if t is None:
            continue
        if t.shape != (K, H):
            problems.append(f"{name} has shape {tuple(t.shape)}, expected ({K}, {H}) = (tokens, hidden size)")
        elif not torch.isfinite(t.float()).all():
            bad = (~torch.isfinite(t.float())).any(1).nonzero().flatten().tolist()
            problems.append(f"{name} has NaN or Inf in rows {bad[:5]} (tokens {[tokens[i] for i in bad[:5]]})")
    raise_all(problems, f"vectors file {p} cannot be used:")
    return emb, head


def _reference_rows(source: str, tokens):
    """Rows from another model's table for tokens with the same string (None where unknown)."""
    from ..models import load_base

    model, tok, _ = load_base(source)
    table = model.get_input_embeddings().weight.detach()
    vocab = tok.get_vocab()
    out = {}
    for t in tokens:
        i = vocab.get(t)
        if i is not None and i < table.shape[0]:
            out[t] = table[i]
    return out, table.shape[1]


def initial_rows(cfg: ExtensionConfig, tokens, base_table, base_tokenizer, head_table=None):
    """(embed_rows K×H, head_rows K×H or None, notes) for `tokens` under `cfg`."""
    V, H = base_table.shape
    K = len(tokens)
    notes: list[str] = []
    gen = torch.Generator().manual_seed(cfg.seed)
    dtype = base_table.dtype
    table = base_table.detach()
    head = head_table.detach() if head_table is not None else None
    head_rows = None

    if cfg.init == "subword-mean":
        rows = _subword_mean(table, base_tokenizer, tokens, notes, V)
        if head is not None:
            head_rows = _subword_mean(head, base_tokenizer, tokens, [], V)
    elif cfg.init == "mean":
        rows = table.float().mean(0).expand(K, H).clone()
        if head is not None:
            head_rows = head.float().mean(0).expand(K, H).clone()
    elif cfg.init == "mean-noise":
        rows = _mean_noise(table, K, gen)
        if head is not None:
            head_rows = _mean_noise(head, K, gen)
    elif cfg.init == "copy-token":
        i = _single_id(base_tokenizer, cfg.init_token, V)
        rows = table[i].float().expand(K, H).clone()
        if head is not None:
            head_rows = head[i].float().expand(K, H).clone()
    elif cfg.init == "zeros":
        rows = torch.zeros(K, H)
        head_rows = torch.zeros(K, H) if head is not None else None
    elif cfg.init == "normal":
        rows = torch.randn(K, H, generator=gen) * table.float().std()
        if head is not None:
            head_rows = torch.randn(K, H, generator=gen) * head.float().std()
    elif cfg.init == "vectors":
        rows, head_rows = _load_vectors(cfg.init_source, tokens, H)
        rows = rows.float()
        if head is not None and head_rows is None:
            head_rows = _subword_mean(head, base_tokenizer, tokens, [], V)
            notes.append("vectors file has no head_vectors; head rows use subword-mean")
        elif head is None:
            head_rows = None
    elif cfg.init == "reference":
        ref, ref_h = _reference_rows(cfg.init_source, tokens)
        if ref_h != H:
            raise EmbdeployError(
                f"reference model {cfg.init_source} has hidden size {ref_h}, this base has {H}; "
                "a reference table must have the same width"
            )
        fallback = _subword_mean(table, base_tokenizer, tokens, [], V)
        rows = torch.stack([ref[t].float() if t in ref else fallback[j] for j, t in enumerate(tokens)])
        unknown = [t for t in tokens if t not in ref]
        if unknown:
            notes.append(f"{len(unknown)} token(s) not in the reference vocabulary used subword-mean: {unknown[:5]}")
        if head is not None:
            head_rows = _subword_mean(head, base_tokenizer, tokens, [], V)
    else:  # guarded by ExtensionConfig
        raise AssertionError(cfg.init)
    return rows.to(dtype), (head_rows.to(dtype) if head_rows is not None else None), notes
