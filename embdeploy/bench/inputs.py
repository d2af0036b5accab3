"""Model inputs for one benchmark shape and token mix.

Two mixes: "base-ids" (every id < V, what the base model can take) and
"new-ids" (a fraction of positions hold ids in [V, V+K)). Every variant of a
round gets the same arrays, so time differences come from the graph alone.
"""

from __future__ import annotations

import numpy as np

from ..errors import EmbdeployError
from ..ort import ORT_TO_NUMPY, empty_past, role_arrays

BASE_MIX = "base-ids"
NEW_MIX = "new-ids"

def token_ids(batch: int, seq: int, V: int, K: int, mix: str, new_fraction: float, seed: int) -> np.ndarray:
    """(batch, seq) int64 ids; for NEW_MIX a `new_fraction` of positions (at least one) are new ids."""
    rng = np.random.default_rng(seed)
    # Skip the lowest ids: BERT-like vocabularies keep [PAD]/[unused*] there.
    low = min(1000, V // 2)
    ids = rng.integers(low, V, size=(batch, seq), dtype=np.int64)
    if mix == NEW_MIX:
        if K <= 0:
            raise ValueError("the new-ids mix needs K > 0")
        n_new = max(1, round(new_fraction * batch * seq))
        flat = ids.reshape(-1)
        pos = rng.choice(flat.size, size=n_new, replace=False)
        # Cover V and V+K-1 explicitly when there is room: the edges are where clipping bugs live.
        new = rng.integers(V, V + K, size=n_new, dtype=np.int64)
        new[0] = V
        if n_new > 1:
            new[1] = V + K - 1
        flat[pos] = new
    return ids


def session_feed(session, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The feed dict for `session`: ids plus the companion inputs its graph declares."""
    batch, seq = ids.shape
    roles = role_arrays(ids)
    feed = {}
    unsupported = []
    for inp in session.get_inputs():
        dtype = ORT_TO_NUMPY.get(inp.type)
        name = inp.name
        if name in roles:
            value = roles[name]
        elif name.startswith(("past_key_values", "past_key", "past_value")) and dtype is not None:
            value = empty_past(inp, batch)
            if value is None:
                unsupported.append(f"{name} {inp.shape}")
                continue
        else:
            unsupported.append(f"{name} {inp.type} {inp.shape}")
            continue
        if dtype is None:
            unsupported.append(f"{name} {inp.type}")
            continue
        feed[name] = value.astype(dtype, copy=False)
    if unsupported:
        raise EmbdeployError(
            "the model has inputs the benchmark cannot fill: "
            + "; ".join(unsupported)
            + ". It fills input_ids, attention_mask, token_type_ids, position_ids and an empty past_key_values cache; "
            "export without the other inputs (e.g. `embdeploy export --task feature-extraction`)"
        )
    return feed
