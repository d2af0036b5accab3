"""The merged pass (embdeploy/onnx/merged.py): what it alone does. Shared cases: test_onnx_passes.py."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx_graphs import BASE, EMB, EXT, H, IDS, K, V, graph, inits, rows, run

from embdeploy.onnx.rewrite import rewrite_merged

SHIFT = np.arange(H, dtype=np.float32)


@pytest.mark.parametrize("in_place", [False, True])
def test_replaced_table_and_untouched_initializers(in_place):
    model = graph(EMB.replace("emb =", "e =") + "\nemb = Add(e, shift)", table=BASE, shift=SHIFT)
    shift = model.graph.initializer[1]
    new, changed = rewrite_merged(model, BASE, EXT, in_place=in_place)
    onnx.checker.check_model(new, full_check=True)
    assert changed and [t.name for t in new.graph.initializer] == ["table", "shift"]
    assert inits(new)["table"].shape == (V + K, H) and np.array_equal(inits(new)["shift"], SHIFT)
    assert np.array_equal(run(new, IDS)[0], rows(IDS) + SHIFT)
    # protobuf hands back the same Python object for the same message: `shift` is still the
    # input's tensor in place (not copied), and a copy of it otherwise.
    assert any(t is shift for t in new.graph.initializer) == in_place
    if not in_place:
        assert inits(model)["table"].shape == (V, H)
