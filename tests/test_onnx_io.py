"""Saving ONNX models with external data, and refusing external data that points outside the model dir."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import ExternalDataInfo

from embdeploy.errors import EmbdeployError
from embdeploy.onnx.io import load_model, save_model, set_location
from embdeploy.onnx.rewrite import EXT_EMBED, rewrite_swap
from embdeploy.ort import swap_session_options

ort = pytest.importorskip("onnxruntime")

V, H, K = 300, 4, 3  # 300x4 float32 = 4800 bytes: external; the (2,) shift stays inline
RNG = np.random.default_rng(1)
BASE = RNG.standard_normal((V, H)).astype(np.float32)
EXT = RNG.standard_normal((K, H)).astype(np.float32)
SHIFT = np.array([0.5, -0.5], np.float32)


def model() -> onnx.ModelProto:
    m = onnx.parser.parse_model(
        '<ir_version: 9, opset_import: ["" : 18]>\n'
        "g (int64[B,S] ids) => (float[B,S,4] emb, float[2] s) {\n"
        "  emb = Gather(table, ids)\n  s = Identity(shift)\n}"
    )
    m.graph.initializer.extend([numpy_helper.from_array(BASE, "table"), numpy_helper.from_array(SHIFT, "shift")])
    return m


def locations(path) -> dict[str, str | None]:
    m = onnx.load(str(path), load_external_data=False)
    return {
        t.name: ExternalDataInfo(t).location if t.data_location == TensorProto.EXTERNAL else None
        for t in m.graph.initializer
    }


def run(path, ids, so=None):
    so = so or ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"ids": ids})


def test_round_trip(tmp_path):
    m = model()
    before = m.SerializeToString()
    path = save_model(m, tmp_path / "out")
    assert m.SerializeToString() == before, "saving must not modify the model"
    assert path == tmp_path / "out" / "model.onnx"
    assert locations(path) == {"table": "model.onnx.data", "shift": None}
    loaded = load_model(tmp_path / "out")  # a directory means its model.onnx
    onnx.checker.check_model(loaded, full_check=True)
    assert loaded.SerializeToString() == before
    assert np.array_equal(run(path, np.array([[0, V - 1]]))[0], BASE[[[0, V - 1]]])


def test_separate_file_holds_only_the_extension(tmp_path):
    new, _ = rewrite_swap(model(), BASE, EXT)
    path = save_model(new, tmp_path, separate={EXT_EMBED: "extension.onnx.data"})
    locs = locations(path)
    assert locs["table"] == "model.onnx.data" and locs[EXT_EMBED] == "extension.onnx.data"
    assert [n for n, loc in locs.items() if loc == "extension.onnx.data"] == [EXT_EMBED]
    assert (tmp_path / "extension.onnx.data").read_bytes() == EXT.tobytes()  # small, but separate
    assert EXT.tobytes() not in (tmp_path / "model.onnx.data").read_bytes()
    loaded = load_model(path)
    assert np.array_equal(numpy_helper.to_array(next(t for t in loaded.graph.initializer if t.name == EXT_EMBED)), EXT)
    ids = np.array([[1, V, V + K - 1]])
    assert np.array_equal(run(path, ids)[0], np.concatenate([BASE, EXT])[ids])
    other = RNG.standard_normal((5, H)).astype(np.float32)
    emb = run(path, np.array([[V + 4]]), so=swap_session_options(ort.SessionOptions(), other))[0]
    assert np.array_equal(emb[0, 0], other[4])


def test_large_tensors_are_aligned(tmp_path):
    m = model()
    big = np.ones((1 << 18, 2), np.float32)  # 2 MiB
    m.graph.initializer.append(numpy_helper.from_array(big, "big"))
    m.graph.output.append(onnx.helper.make_tensor_value_info("big", TensorProto.FLOAT, [1 << 18, 2]))
    path = save_model(m, tmp_path)
    info = next(ExternalDataInfo(t) for t in onnx.load(str(path), load_external_data=False).graph.initializer if t.name == "big")
    assert info.offset % (1 << 16) == 0 and info.length == big.nbytes
    assert np.array_equal(numpy_helper.to_array(next(t for t in load_model(path).graph.initializer if t.name == "big")), big)


def test_save_errors(tmp_path):
    with pytest.raises(EmbdeployError, match=r"(?s)separate names initializer 'nope', which the model does not have"):
        save_model(model(), tmp_path, separate={"nope": "x.data"})
    with pytest.raises(EmbdeployError, match=r"(?s)file name '\.\./x\.data' must be a plain file name"):
        save_model(model(), tmp_path, separate={"table": "../x.data"})
    with pytest.raises(EmbdeployError, match="collides with the model or its main data file"):
        save_model(model(), tmp_path, separate={"table": "model.onnx.data"})
    m = model()
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    set_location(t, "gone.data", 0, BASE.nbytes)
    with pytest.raises(EmbdeployError, match="initializer 'table' still refers to external data 'gone.data'.*load_model"):
        save_model(m, tmp_path)


def _point_table_at(directory, location: str):
    """Save normally, then rewrite model.onnx so 'table' reads from `location`."""
    path = save_model(model(), directory)
    m = onnx.load(str(path), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.name == "table")
    set_location(t, location, 0, BASE.nbytes)
    onnx.save(m, str(path))
    return path


def test_refuses_parent_directory(tmp_path):
    (tmp_path / "secret.bin").write_bytes(BASE.tobytes())
    path = _point_table_at(tmp_path / "m", "../secret.bin")
    with pytest.raises(EmbdeployError, match=r"(?s)refusing to load .*tensor 'table' has external data location '\.\./secret\.bin': '\.\.' is refused"):
        load_model(path)


def test_refuses_absolute_path(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(BASE.tobytes())
    path = _point_table_at(tmp_path / "m", str(secret))
    with pytest.raises(EmbdeployError, match=r"tensor 'table' has external data location '.*secret\.bin': absolute paths are refused"):
        load_model(path)


def test_refuses_symlink_out_of_the_directory(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(BASE.tobytes())
    path = _point_table_at(tmp_path / "m", "weights.bin")
    os.symlink(secret, tmp_path / "m" / "weights.bin")
    with pytest.raises(EmbdeployError, match=r"tensor 'table' has external data location 'weights\.bin': it resolves to .*secret\.bin, outside"):
        load_model(path)


def test_refuses_symlink_inside_the_directory(tmp_path):
    # onnx's own loader refuses every symlink; say so before it fails with a less clear message.
    path = _point_table_at(tmp_path, "alias.bin")
    os.symlink(tmp_path / "model.onnx.data", tmp_path / "alias.bin")
    with pytest.raises(EmbdeployError, match="location 'alias.bin': it is a symbolic link"):
        load_model(path)


def test_refuses_missing_and_truncated_files(tmp_path):
    path = _point_table_at(tmp_path, "missing.bin")
    with pytest.raises(EmbdeployError, match="location 'missing.bin': no such file"):
        load_model(path)
    (tmp_path / "short.bin").write_bytes(b"\0" * 10)
    path = _point_table_at(tmp_path, "short.bin")
    with pytest.raises(EmbdeployError, match=r"location 'short\.bin': offset 0 \+ length 4800 is beyond the file's 10 bytes"):
        load_model(path)


def test_not_a_model(tmp_path):
    with pytest.raises(EmbdeployError, match="no ONNX model at"):
        load_model(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"\xff\xff not protobuf")
    with pytest.raises(EmbdeployError, match="is not a readable ONNX model"):
        load_model(tmp_path)
