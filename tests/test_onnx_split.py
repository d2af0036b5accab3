"""The split pass (embdeploy/onnx/split.py): what it alone does. Shared cases: test_onnx_passes.py."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper
from onnx_graphs import BASE, EMB, EXT, H, IDS, V, graph, rows, run

from embdeploy.errors import EmbdeployError
from embdeploy.onnx.rewrite import EXT_EMBED, rewrite_merged, rewrite_split, rewrite_swap


def test_other_readers_of_the_table_block_merged_and_split():
    model = graph("emb = Gather(table, ids)\nn = Shape(table)", outputs="float[B,S,4] emb, int64[2] n", table=BASE)
    for rewrite in (rewrite_merged, rewrite_split):
        with pytest.raises(EmbdeployError, match=r"(?s)use mode 'swap'.*'table' is also read by Shape node #1 \(unnamed\) -> 'n'"):
            rewrite(model, BASE, EXT)
    new, _ = rewrite_swap(model, BASE, EXT)  # swap leaves the table alone
    assert run(new, IDS)[1].tolist() == [V, H]


@pytest.mark.parametrize("in_place", [False, True])
def test_base_table_is_kept_and_the_extension_added(in_place):
    model = graph(EMB, table=BASE)
    table = model.graph.initializer[0]
    new, changed = rewrite_split(model, BASE, EXT, in_place=in_place)
    assert changed and [t.name for t in new.graph.initializer] == ["table", EXT_EMBED]
    assert np.array_equal(numpy_helper.to_array(new.graph.initializer[0]), BASE)
    # The same Python object for the same protobuf message: in place the base tensor was not copied.
    assert (new.graph.initializer[0] is table) == in_place
    assert np.array_equal(run(new, IDS)[0], rows(IDS))
