"""`embdeploy.json`: what an ONNX directory holds, and the sha256 of every file in it.

`verify_dir` re-hashes the files a manifest lists and refuses a directory with a
missing or changed file, or one that is an unfinished `.NAME.partial-*` output.
Every byte is covered: a file in the directory that the manifest does not list is
refused too, listed paths must stay inside the directory, and the fields that change
behaviour (mode, dtype, V, K, H, inputs, input roles, outputs) are cross-checked
against the graph itself, so an edit is caught even when the digests are edited
with it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import __version__
from ..errors import EmbdeployError, raise_all
from ..fingerprint import file_digest
from ..fsutil import PARTIAL_MARK

MANIFEST = "embdeploy.json"
KIND = "embdeploy-onnx"
FORMAT_VERSION = 1
MODES = ("base", "merged", "split", "swap")
DTYPES = {"fp32": "float32", "fp16": "float16"}  # CLI spelling -> manifest spelling
CREATED_BY = f"embdeploy {__version__}"


def dtype_name(dtype: str) -> str:
    """'fp32'/'float32' -> 'float32'; anything else is refused."""
    if dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in DTYPES.values():
        return dtype
    raise EmbdeployError(f"unknown dtype {dtype!r}; choose fp32 or fp16")


def short_dtype(dtype: str) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype_name(dtype)]


def publishable(directory: Path) -> None:
    """Give a temporary output directory the permissions of a normal one.

    atomic_output_dir creates it with mkdtemp, i.e. mode 0700: a deployed model
    directory or a shared cache would be unreadable for the service user.
    """
    from ..fsutil import umask

    os.chmod(directory, 0o777 & ~umask())


def digests(directory: Path) -> dict[str, str]:
    """sha256 of every file in `directory` (recursively, tokenizer files included) but the manifest."""
    directory = Path(directory)
    return {
        p.relative_to(directory).as_posix(): file_digest(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


# field -> the JSON type it must have (every manifest), checked before anything reads them
_FIELDS = {
    "mode": str, "task": str, "V": int, "K": int, "H": int, "dtype": str, "inputs": list, "input_roles": dict,
    "outputs": list, "model_file": str, "files": dict, "base_fingerprint": dict, "tokens": list,
    "extension_initializers": dict,
}
_EXTENDED_FIELDS = {"base_model": dict, "extension_fingerprint": str}  # merged/split/swap only
_JSON_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object"}
_ELEM = {"float32": 1, "float16": 10}  # onnx.TensorProto data types


def _json_type(v) -> str:
    return {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def _schema_problems(m: dict) -> list[str]:
    problems = []
    fields = dict(_FIELDS, **(_EXTENDED_FIELDS if m.get("mode") in ("merged", "split", "swap") else {}))
    for name, kind in fields.items():
        v = m.get(name)
        if name not in m:
            problems.append(f"{name} is missing")
        elif not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            problems.append(f"{name} is {_json_type(v)}, expected {_JSON_NAMES[kind]}")
    if problems:
        return problems
    for k in ("V", "K", "H"):
        if m[k] < 0:
            problems.append(f"{k} is {m[k]}, expected a non-negative integer")
    for j, t in enumerate(m["tokens"]):
        if not isinstance(t, dict) or not isinstance(t.get("token"), str) or not isinstance(t.get("id"), int):
            problems.append(f"tokens[{j}] is {_json_type(t)}, expected an object with a string token and an integer id")
            break
        if t["id"] != m["V"] + j:
            problems.append(f"tokens[{j}] ({t['token']!r}) has id {t['id']}, expected {m['V'] + j} (ids follow V in order)")
            break
    for name, digest in m["files"].items():
        why = _unsafe_path(name)
        if why:
            problems.append(f"files lists {name!r}: {why}")
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            problems.append(f"files[{name!r}] is {_json_type(digest)}, expected a 'sha256:…' string")
    if m["model_file"] not in m["files"]:
        problems.append(f"model_file {m['model_file']!r} is not among the hashed files")
    if any(not isinstance(x, str) for x in m["inputs"] + m["outputs"]):
        problems.append("inputs and outputs must be lists of names (strings)")
    if m["dtype"] not in _ELEM:
        problems.append(f"dtype is {m['dtype']!r}, expected one of {', '.join(_ELEM)}")
    return problems


def _unsafe_path(name: str) -> str | None:
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith("/") or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        return "absolute paths are refused; files must lie inside the export directory"
    if ".." in parts or "" in parts:
        return "'..' and empty path parts are refused; files must lie inside the export directory"
    return None


def graph_problems(directory: Path, m: dict) -> list[str]:
    """The manifest's behaviour-changing fields against the graph (read without its external data)."""
    import onnx

    from ..onnx.rewrite import EXT_EMBED
    from .graph import graph_inputs, graph_outputs

    d = Path(directory)
    try:
        g = onnx.load(str(d / m["model_file"]), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and others
        return [f"{m['model_file']} is not a readable ONNX model ({type(e).__name__})"]
    problems = []
    locations = {e.value for t in g.graph.initializer for e in t.external_data if e.key == "location"}
    for loc in sorted(locations - set(m["files"])):
        problems.append(f"the graph reads external data from {loc!r}, which files does not list (so it is not verified)")
    fed, outs = graph_inputs(g), graph_outputs(g)
    if set(fed) != set(m["inputs"]):
        problems.append(f"inputs {m['inputs']} differ from the graph's inputs {fed}")
    stray = sorted(set(m["input_roles"]) - set(fed))
    if stray:
        problems.append(f"input_roles names {', '.join(stray)}, which the graph does not take")
    if set(outs) != set(m["outputs"]):
        problems.append(f"outputs {m['outputs']} differ from the graph's outputs {outs}")
    V, K, H, mode = m["V"], m["K"], m["H"], m["mode"]
    tables = {t.name: (tuple(t.dims), t.data_type) for t in g.graph.initializer if len(t.dims) == 2 and t.dims[-1] == H}
    elem = _ELEM.get(m["dtype"])
    ops = {n.op_type for n in g.graph.node}
    want = {"base": [(V, H)], "merged": [(V + K, H)], "split": [(V, H), (K, H)], "swap": [(V, H), (K, H)]}.get(mode, [])
    for shape in want:
        if not any(s == shape and e == elem for s, e in tables.values()):
            problems.append(f"mode {mode} with V={V}, K={K}, H={H}, dtype {m['dtype']} needs a {m['dtype']} table of "
                            f"shape {shape}, and the graph has none")
    if mode in ("split", "swap"):
        if tables.get(EXT_EMBED, (None,))[0] != (K, H):
            problems.append(f"mode {mode} needs the extension table {EXT_EMBED} of shape ({K}, {H}) in the graph")
        if mode == "swap" and "Where" not in ops:
            problems.append("mode swap needs the Where that picks base or extension rows; the graph has none")
        if mode == "split" and "Concat" not in ops:
            problems.append("mode split needs the Concat that joins the tables; the graph has none")
    if mode == "merged" and EXT_EMBED in tables:
        problems.append(f"mode merged but the graph holds a separate extension table {EXT_EMBED} (a split or swap export?)")
    return problems


def write_manifest(directory: Path, manifest: dict) -> None:
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def read_manifest(directory) -> dict:
    d = Path(directory)
    if d.is_file():
        raise EmbdeployError(f"{d} is a file; pass the ONNX directory that holds model.onnx and {MANIFEST}")
    if not d.is_dir():
        raise EmbdeployError(f"ONNX directory {d} does not exist; pass a directory written by `embdeploy export`")
    path = d / MANIFEST
    if not path.is_file():
        raise EmbdeployError(f"{d} has no {MANIFEST}, so it is not an embdeploy ONNX directory; export it with `embdeploy export`")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EmbdeployError(f"{path} is not valid JSON ({e}); re-run `embdeploy export`") from None
    problems = []
    if not isinstance(m, dict) or m.get("kind") != KIND:
        raise EmbdeployError(f"{path} is not an embdeploy ONNX manifest (kind != {KIND!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise EmbdeployError(
            f"{path} has format_version {m.get('format_version')!r}; this embdeploy reads version {FORMAT_VERSION}. "
            "Re-export with this version or upgrade embdeploy"
        )
    if m.get("mode") not in MODES:
        problems.append(f"mode is {m.get('mode')!r}, expected one of {', '.join(MODES)}")
    tokens = m.get("tokens")  # the manifest is not among the hashed files: K must at least agree with it
    if isinstance(tokens, list) and isinstance(m.get("K"), int) and len(tokens) != m["K"]:
        problems.append(f"K is {m['K']} but {len(tokens)} tokens are listed")
    if isinstance(m.get("files"), dict) and not m["files"]:
        problems.append("files (the sha256 of every file) is empty")
    if not problems:
        problems += _schema_problems(m)
    raise_all(problems, f"{path} is inconsistent; re-run `embdeploy export`:")
    return m


def verify_dir(onnx_dir, *, _allow_partial: bool = False) -> dict:
    """Check every file `embdeploy.json` lists against its recorded sha256; return the manifest.

    Raises EmbdeployError naming each missing or changed file (all at once), and
    refuses `.NAME.partial-*` directories: those are unfinished exports.
    """
    d = Path(onnx_dir)
    if PARTIAL_MARK in d.name and d.name.startswith(".") and not _allow_partial:
        raise EmbdeployError(
            f"{d} is an unfinished export (a {PARTIAL_MARK}* directory left by an interrupted run); "
            "delete it and run `embdeploy export` again"
        )
    m = read_manifest(d)
    problems = []
    root = d.resolve()
    for name, want in sorted(m["files"].items()):
        p = d / name
        if not p.is_file():
            problems.append(f"{name}: missing")
        elif root not in p.resolve().parents:
            problems.append(f"{name}: resolves to {p.resolve()}, outside {d} (a symlink?); exports keep every file inside")
        elif file_digest(p) != want:
            problems.append(f"{name}: its sha256 differs from the one recorded at export (changed or corrupted)")
    listed = set(m["files"])
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        if (p.is_file() or p.is_symlink()) and rel != MANIFEST and rel not in listed:
            problems.append(f"{rel}: not listed in {MANIFEST}, so nothing vouches for it (added after export?); "
                            "remove it or re-export")
    if not problems:
        problems += graph_problems(d, m)
    raise_all(problems, f"{d} does not match its {MANIFEST}; re-run `embdeploy export` to rebuild it:")
    return m
