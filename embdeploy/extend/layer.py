"""Modules that put extension rows beside a frozen base table.

The base module is kept as an attribute, not copied: its weight stays the very
same Parameter (frozen), so base rows cannot change and a tied head stays tied.
Only `embdeploy_tables` (one K_g×H Parameter per named group, concatenated in
group order) are trainable. Every extension parameter name contains
`embdeploy_tables`, so "save the extension only" is a key filter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EmbdeployError

EXT_KEY = "embdeploy_tables"


def _concat(tables: nn.ParameterDict, like: torch.Tensor) -> torch.Tensor:
    if len(tables) == 0:
        return like.new_zeros((0, like.shape[1]))
    if len(tables) == 1:
        return next(iter(tables.values()))
    return torch.cat(list(tables.values()), dim=0)


class ExtendedEmbedding(nn.Module):
    """Input embedding with rows V..V+K-1 from the extension tables.

    lookup(id) = base(id) if id < V else ext[id - V] * scale, where `base(id)` is the
    original module's own forward (so padding_idx and any `embed_scale` behave
    as before) and `scale` is the original module's `embed_scale`, if it has one.
    """

    def __init__(self, base: nn.Embedding, tables: nn.ParameterDict):
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise EmbdeployError(
                f"the input embedding is a {type(base).__name__}, not an nn.Embedding; "
                "embdeploy extends nn.Embedding tables (and subclasses) only"
            )
        self.base = base
        self.base.weight.requires_grad_(False)
        self.embdeploy_tables = tables
        self.num_base = base.weight.shape[0]
        self._check_forward_is_lookup()

    def _scale(self, dtype):
        s = getattr(self.base, "embed_scale", None)
        if s is None:
            return None
        return s.to(dtype) if torch.is_tensor(s) else s

    def _check_forward_is_lookup(self):
        # The extension reproduces the base module's forward as "row × scale"; refuse
        # modules that do anything else (a norm, a projection) instead of silently diverging.
        ids = torch.arange(min(self.num_base, 8), device=self.base.weight.device)
        with torch.no_grad():
            got = self.base(ids)
            want = F.embedding(ids, self.base.weight)
            s = self._scale(want.dtype)
            if s is not None:
                want = want * s
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-6, atol=0):
            raise EmbdeployError(
                f"{type(self.base).__name__}.forward does more than a row lookup (times embed_scale); "
                "embdeploy cannot reproduce it for new rows. Report the model class to the maintainers."
            )

    @property
    def weight(self) -> torch.Tensor:
        """The base table (V×H); code that asks an input embedding for its dtype or device keeps working."""
        return self.base.weight

    @property
    def padding_idx(self):
        return self.base.padding_idx

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def num_embeddings(self) -> int:
        return self.num_base + self.num_new

    @property
    def num_new(self) -> int:
        return sum(t.shape[0] for t in self.embdeploy_tables.values())

    def extension_table(self) -> torch.Tensor:
        """The K×H new rows, in id order."""
        return _concat(self.embdeploy_tables, self.base.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        V, K = self.num_base, self.num_new
        base_out = self.base(input_ids.clamp(max=V - 1))
        if K == 0:
            return base_out
        is_new = input_ids >= V
        if not bool(is_new.any()):
            return base_out  # bit-identical to the original model on base-only inputs
        ext = self.extension_table()
        ext_out = F.embedding((input_ids - V).clamp(0, K - 1), ext)  # (..., H)
        s = self._scale(ext_out.dtype)
        if s is not None:
            ext_out = ext_out * s
        return torch.where(is_new.unsqueeze(-1), ext_out.to(base_out.dtype), base_out)

    def extra_repr(self) -> str:
        return f"V={self.num_base}, K={self.num_new}, H={self.embedding_dim}"


class ExtendedLMHead(nn.Module):
    """LM head with K extra output columns: logits = [base(h), h @ ext^T].

    Tied heads share the embedding's `embdeploy_tables` (the same Parameters);
    untied heads own theirs. New columns get no bias. The base logits are the
    original module's output, so they are bit-identical to before.
    """

    def __init__(self, base: nn.Linear, tables: nn.ParameterDict, tied: bool):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise EmbdeployError(
                f"the output head is a {type(base).__name__}, not an nn.Linear; embdeploy extends linear LM heads only"
            )
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.embdeploy_tables = tables
        self.tied = tied

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    @property
    def out_features(self) -> int:
        return self.base.out_features + sum(t.shape[0] for t in self.embdeploy_tables.values())

    @property
    def in_features(self) -> int:
        return self.base.in_features

    def extension_table(self) -> torch.Tensor:
        return _concat(self.embdeploy_tables, self.base.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base(hidden)  # (..., V)
        if len(self.embdeploy_tables) == 0:
            return logits
        new = F.linear(hidden, self.extension_table().to(hidden.dtype))  # (..., K)
        return torch.cat([logits, new.to(logits.dtype)], dim=-1)
