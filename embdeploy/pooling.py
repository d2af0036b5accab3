"""Sentence pooling as sentence-transformers computes it: one definition for training, export and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool(states: torch.Tensor, mask: torch.Tensor, pooling: dict | None) -> torch.Tensor:
    """(B, S, H) states and (B, S) mask -> (B, H): mean over real tokens (the default) or the first
    token ("cls"), then L2-normalized when `pooling["normalize"]`. The 1e-9 floor is
    sentence-transformers' own, so a fully padded row pools to zeros there and here alike."""
    mode = (pooling or {}).get("mode") or "mean"
    if mode == "cls":
        out = states[:, 0]
    else:
        m = mask.unsqueeze(-1).to(states.dtype)  # (B, S, 1)
        out = (states * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
    if (pooling or {}).get("normalize"):
        out = F.normalize(out, p=2, dim=-1)
    return out
