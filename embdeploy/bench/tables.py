"""Where a graph keeps its initializers: embedded, or which external file and range.

Read from the graph without its external data, so nothing large is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EmbdeployError


@dataclass(frozen=True)
class InitializerInfo:
    name: str
    dims: tuple[int, ...]
    elem_type: int
    file: Path | None  # None: embedded in model.onnx
    offset: int
    length: int


def initializers(model_path) -> dict[str, InitializerInfo]:
    import onnx

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            file = (model_path.parent / info["location"]).resolve()
            out[t.name] = InitializerInfo(t.name, tuple(t.dims), t.data_type, file, int(info.get("offset", 0)),
                                          int(info.get("length", 0)))
        else:
            out[t.name] = InitializerInfo(t.name, tuple(t.dims), t.data_type, None, 0, 0)
    return out


def external_files(model_path) -> set[Path]:
    return {i.file for i in initializers(model_path).values() if i.file is not None}


def find_table(inits: dict[str, InitializerInfo], rows: int, H: int, exclude=()) -> InitializerInfo:
    """The (rows, H) float initializer; by shape, since the exporter's names are not ours to rely on."""
    hits = [i for i in inits.values() if i.dims == (rows, H) and i.name not in exclude]
    if not hits:
        raise EmbdeployError(
            f"the graph has no ({rows}, {H}) initializer to use as the embedding table; "
            "check that embdeploy.json's V, K and H describe this model, or re-export it"
        )
    return hits[0]


def numpy_dtype(info: InitializerInfo):
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(info.elem_type)


def read_table(model_path, info: InitializerInfo) -> np.ndarray:
    """The table's values (a read-only memory map when the data is external)."""
    import onnx
    from onnx import numpy_helper

    if info.file is not None:
        return np.memmap(info.file, dtype=numpy_dtype(info), mode="r", offset=info.offset, shape=info.dims)
    model = onnx.load(str(model_path), load_external_data=False)
    for t in model.graph.initializer:
        if t.name == info.name:
            return numpy_helper.to_array(t)
    raise EmbdeployError(f"initializer {info.name} vanished from {model_path}; re-export the model")
