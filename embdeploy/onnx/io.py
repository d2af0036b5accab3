"""Write and read ONNX models with their weights in external data files.

`save_model` puts every large initializer in `<filename>.data` next to the
model, except the ones named in `separate`, which get their own files (the
extension of a split/swap export, so it can be shipped or replaced alone).
`load_model` loads the weights back but refuses external-data locations that
could read outside the model's directory. ONNX files hold no pickle; nothing
here unpickles anything.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PureWindowsPath

import onnx
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model

from embdeploy.errors import EmbdeployError, raise_all

SIZE_THRESHOLD = 1024  # bytes; smaller initializers stay inside model.onnx
_ALIGN_LARGE = 1 << 16  # tensors >= 1 MiB start on 64 KiB boundaries, so they can be memory-mapped
_ALIGN_SMALL = 16
_PROTO_LIMIT = 2**31 - 1

_DATA_FIELDS = {
    "raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data",
    "uint64_data", "external_data", "data_location",
}


def save_model(
    model: onnx.ModelProto,
    directory: str | os.PathLike,
    filename: str = "model.onnx",
    separate: dict[str, str] | None = None,
) -> Path:
    """Write `model` to directory/filename with its initializers as external data.

    Initializers of at least SIZE_THRESHOLD bytes go to `<filename>.data`; those
    named in `separate` ({initializer name: file name}) go to that file whatever
    their size. `model` is not modified and its weights are not copied in memory.
    Returns the path of the model file.
    """
    directory = Path(directory)
    separate = dict(separate or {})
    main_data = f"{filename}.data"
    names = {t.name for t in model.graph.initializer}
    problems = [
        f"file name {n!r} must be a plain file name, without directories"
        for n in sorted({filename, *separate.values()})
        if not _plain(n)
    ]
    problems += [
        f"separate file {f!r} for {t!r} collides with the model or its main data file"
        for t, f in separate.items()
        if f in (filename, main_data)
    ]
    problems += [f"separate names initializer {t!r}, which the model does not have" for t in separate if t not in names]
    raise_all(problems, f"cannot save {directory / filename}:")

    directory.mkdir(parents=True, exist_ok=True)
    out = copy_without(model, "graph")
    out.graph.CopyFrom(copy_without(model.graph, "initializer"))
    files: dict[str, object] = {}
    try:
        for init in model.graph.initializer:
            _add_initializer(out.graph, init, separate.get(init.name), main_data, directory, files)
    finally:
        for f in files.values():
            f.close()
    if out.ByteSize() > _PROTO_LIMIT:
        raise EmbdeployError(
            f"{filename} would exceed protobuf's 2 GiB limit even with external initializers "
            "(large Constant nodes or subgraph tensors?); fold them into initializers first"
        )
    path = directory / filename
    path.write_bytes(out.SerializeToString())
    return path


def _plain(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not re.search(r"[\\/]", name) and not PureWindowsPath(name).drive


def copy_without(msg, *skip: str):
    """A copy of a protobuf message without some (big) fields, without copying those fields first."""
    new = type(msg)()
    for field, value in msg.ListFields():
        if field.name in skip:
            continue
        target = getattr(new, field.name)
        if hasattr(value, "extend") or isinstance(value, (list, tuple)):
            target.extend(value)
        elif hasattr(value, "CopyFrom"):
            target.CopyFrom(value)
        else:
            setattr(new, field.name, value)
    return new


def _add_initializer(graph, init: TensorProto, own_file: str | None, main_data: str, directory: Path, files: dict) -> None:
    if init.data_location == TensorProto.EXTERNAL:
        location = ExternalDataInfo(init).location
        raise EmbdeployError(
            f"initializer {init.name!r} still refers to external data {location!r} that was never loaded; "
            "load the model with embdeploy.onnx.io.load_model before saving it"
        )
    if init.data_type == TensorProto.STRING:
        graph.initializer.add().CopyFrom(init)
        return
    data = init.raw_data if init.HasField("raw_data") else numpy_helper.to_array(init).tobytes()
    location = own_file or (main_data if len(data) >= SIZE_THRESHOLD else None)
    if location is None:
        graph.initializer.add().CopyFrom(init)
        return
    if location not in files:
        files[location] = open(directory / location, "wb")
    f = files[location]
    align = _ALIGN_LARGE if len(data) >= (1 << 20) else _ALIGN_SMALL
    offset = -(-f.tell() // align) * align
    f.write(b"\0" * (offset - f.tell()))
    f.write(data)
    tensor = graph.initializer.add()
    for field, value in init.ListFields():
        if field.name in _DATA_FIELDS:
            continue
        target = getattr(tensor, field.name)
        if hasattr(value, "extend"):
            target.extend(value)
        elif hasattr(value, "CopyFrom"):
            target.CopyFrom(value)
        else:
            setattr(tensor, field.name, value)
    set_location(tensor, location, offset, len(data))


def set_location(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    """Point `tensor` at external data (onnx's set_external_data wants raw_data still present)."""
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = TensorProto.EXTERNAL


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model (file, or directory holding model.onnx) with its external data.

    Refuses, naming the tensor and the location, external data that is absolute,
    contains '..', resolves (through symlinks) outside the model's directory, is
    a symlink at all (onnx would refuse it later), is missing, or is shorter than
    the tensor claims. Checks every tensor: graph and
    subgraph initializers, Constant/attribute tensors, function bodies.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise EmbdeployError(f"no ONNX model at {path}; pass the model file or the directory holding model.onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise EmbdeployError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e})") from None
    base = path.parent
    root = base.resolve()
    problems = []
    for tensor in _tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        try:
            info = ExternalDataInfo(tensor)
        except ValueError as e:  # negative offset or length
            problems.append(f"tensor {tensor.name!r}: {e}")
            continue
        problems.extend(_location_problems(tensor.name, info, base, root))
    raise_all(problems, f"refusing to load {path}: its external data points outside the model directory or is broken")
    load_external_data_for_model(model, str(base))
    for tensor in _tensors(model):
        # onnx sets data_location=DEFAULT explicitly; clear it so a round trip gives back the same proto.
        if tensor.HasField("data_location") and tensor.data_location == TensorProto.DEFAULT:
            tensor.ClearField("data_location")
    return model


def _location_problems(name: str, info: ExternalDataInfo, base: Path, root: Path) -> list[str]:
    loc = info.location or ""
    where = f"tensor {name!r} has external data location {loc!r}"
    if not loc:
        return [f"{where}: empty"]
    if os.path.isabs(loc) or PureWindowsPath(loc).is_absolute() or PureWindowsPath(loc).drive or loc.startswith(("/", "\\")):
        return [f"{where}: absolute paths are refused; keep data files next to the model"]
    if ".." in re.split(r"[\\/]", loc):
        return [f"{where}: '..' is refused; keep data files inside the model directory"]
    target = (base / loc).resolve()
    if not target.is_relative_to(root):
        return [f"{where}: it resolves to {target}, outside {root} (symlink?); copy the file into the model directory"]
    if (base / loc).is_symlink():
        return [f"{where}: it is a symbolic link, which onnx refuses to read; put the file itself there"]
    if not target.is_file():
        return [f"{where}: no such file in {root}"]
    offset = int(info.offset or 0)
    size = target.stat().st_size
    if info.length is not None and offset + int(info.length) > size or offset > size:
        return [f"{where}: offset {offset} + length {info.length} is beyond the file's {size} bytes (truncated copy?)"]
    return []


def _tensors(model: onnx.ModelProto):
    """Every TensorProto in the model, including subgraphs and function bodies."""

    def in_graph(graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            yield from in_node(node)

    def in_node(node):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from in_graph(attr.g)
            for g in attr.graphs:
                yield from in_graph(g)

    yield from in_graph(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from in_node(node)
