"""`embdeploy.json`: what an ONNX directory holds, and the sha256 of every file in it.

One frozen type, `ExportManifest`, read, verified and written here and taken by
every stage (export, validate, runtime, bench, inspect); a new field is one edit.

    m = ExportManifest.verify(onnx_dir)    # every file re-hashed, fields checked against the graph
    m = ExportManifest.read(onnx_dir)      # the fields only (schema and consistency)
    dataclasses.replace(m, validation=report.to_json()).write(tmp)

`verify` refuses a directory with a missing or changed file, or one that is an
unfinished `.NAME.partial-*` output. Every byte is covered: a file in the
directory that the manifest does not list is refused too, listed paths must stay
inside the directory, and the fields that change behaviour (mode, dtype, V, K, H,
inputs, input roles, outputs) are cross-checked against the graph itself, so an
edit is caught even when the digests are edited with it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import EmbdeployError, raise_all
from ..fingerprint import file_digest
from ..fsutil import PARTIAL_MARK
from ..jsonfile import json_type, read_versioned, write_json

MANIFEST = "embdeploy.json"
KIND = "embdeploy-onnx"
FORMAT_VERSION = 1
MODES = ("base", "merged", "split", "swap")
EXPORT_MODES = ("merged", "split", "swap")  # the modes an extension is exported in; "base" is the cache's
FORMATS = ("onnx", "genai")  # genai: also what onnxruntime-genai reads (genai_config.json)
DTYPES = {"fp32": "float32", "fp16": "float16"}  # CLI spelling -> manifest spelling
CREATED_BY = f"embdeploy {__version__}"
_ELEM = {"float32": 1, "float16": 10}  # onnx.TensorProto data types


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


@dataclass(frozen=True)
class ExportManifest:
    """The contents of `embdeploy.json`. Token j of `tokens` has id V + j."""

    mode: str  # base | merged | split | swap
    task: str  # feature-extraction | fill-mask | text-generation | …
    V: int  # base rows
    K: int  # extension rows (0 for a base export)
    H: int
    dtype: str  # of the tables: float32 | float16 (an int8 export keeps float tables; see quantization)
    inputs: tuple[str, ...]  # the graph's inputs
    input_roles: dict  # {graph input: input_ids | attention_mask | token_type_ids | position_ids | past_key_values}
    outputs: tuple[str, ...]
    files: dict  # {path relative to the directory: "sha256:…"}, every file but the manifest
    base_fingerprint: dict  # {"embed": "sha256:…", "head": "sha256:…" | None}
    tokens: tuple[str, ...] = ()
    model_file: str = "model.onnx"
    extension_initializers: dict = field(default_factory=lambda: {"embed": None, "head": None})
    kv_cache: dict = field(default_factory=dict)  # {past input: present output}; empty without a KV cache
    base_onnx: str | None = None  # the base export this one was rewritten from
    extension_fingerprint: str | None = None
    extension_dir: str | None = None
    base_model: dict | None = None  # the base model's reference, as extension.json records it
    head: str | None = None  # tied | untied | None
    base_tokenizer: dict | None = None  # the base tokenizer's behavioural fingerprint
    pooling: dict | None = None  # {"mode": "mean" | "cls", "normalize": bool} for sentence embeddings
    quantization: dict | None = None  # {"precision": "int8", "scheme": …} or None
    source: dict | None = None  # base exports: what the cache entry was built from
    format: str = "onnx"  # onnx | genai (a genai export also holds genai_config.json for onnxruntime-genai)
    validation: dict | None = None
    created_by: str = CREATED_BY
    directory: Path | None = field(default=None, compare=False, repr=False)  # where it was read; not written

    # ------------------------------------------------------------------ derived
    @property
    def path(self) -> Path:
        """The directory this manifest was read from (resolved)."""
        if self.directory is None:
            raise EmbdeployError("this manifest was not read from a directory")
        return self.directory

    @property
    def model_path(self) -> Path:
        return self.path / self.model_file

    @property
    def roles(self) -> dict[str, str]:
        """{graph input: role}, every graph input included."""
        return {n: self.input_roles.get(n, n) for n in self.inputs}

    @property
    def ext_embed(self) -> str | None:
        """The initializer holding the (K, H) extension table: split and swap exports only."""
        return self.extension_initializers.get("embed") if self.mode in ("split", "swap") else None

    @property
    def ext_head(self) -> str | None:
        return self.extension_initializers.get("head") if self.mode in ("split", "swap") else None

    @property
    def precision(self) -> str:
        """float32 | float16 | int8: the dtype of the weights that decide the tolerance."""
        return (self.quantization or {}).get("precision") or self.dtype

    @property
    def token_ids(self) -> dict[str, int]:
        return {t: self.V + j for j, t in enumerate(self.tokens)}

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict:
        doc = {"format_version": FORMAT_VERSION, "kind": KIND}
        for f in dataclasses.fields(self):
            if f.name == "directory":
                continue
            value = getattr(self, f.name)
            if f.name == "tokens":
                value = [{"token": t, "id": self.V + j} for j, t in enumerate(value)]
            elif isinstance(value, tuple):
                value = list(value)
            doc[f.name] = value
        return doc

    @classmethod
    def from_json(cls, doc: dict, where: str = MANIFEST, directory: Path | None = None) -> "ExportManifest":
        """Check `doc` (a parsed embdeploy.json) and build the manifest; every problem is raised at once."""
        raise_all(_schema_problems(doc), f"{where} is inconsistent; re-run `embdeploy export`:")
        known = {f.name for f in dataclasses.fields(cls)} - {"directory", "tokens"}
        values = {k: v for k, v in doc.items() if k in known}
        for k in ("inputs", "outputs"):
            values[k] = tuple(doc[k])
        values["extension_initializers"] = dict(doc.get("extension_initializers") or {"embed": None, "head": None})
        values["kv_cache"] = dict(doc.get("kv_cache") or {})
        return cls(**values, tokens=tuple(t["token"] for t in doc["tokens"]), directory=directory)

    def write(self, directory) -> None:
        write_json(Path(directory) / MANIFEST, self.to_json())

    def with_files(self, directory) -> "ExportManifest":
        """This manifest with `files` the digests of what `directory` holds now."""
        return dataclasses.replace(self, files=digests(directory))

    # ------------------------------------------------------------------ reading
    @classmethod
    def read(cls, directory, *, allow_partial: bool = False) -> "ExportManifest":
        """The manifest of ONNX directory `directory`, its fields checked (no file is hashed).

        `.NAME.partial-*` directories are refused: those are unfinished exports.
        """
        d = Path(directory).expanduser()
        if PARTIAL_MARK in d.name and d.name.startswith(".") and not allow_partial:
            raise EmbdeployError(
                f"{d} is an unfinished export (a {PARTIAL_MARK}* directory left by an interrupted run); "
                "delete it and run `embdeploy export` again"
            )
        if d.is_file():
            raise EmbdeployError(f"{d} is a file; pass the ONNX directory that holds model.onnx and {MANIFEST}")
        if not d.is_dir():
            raise EmbdeployError(f"ONNX directory {d} does not exist; pass a directory written by `embdeploy export`")
        path = d / MANIFEST
        if not path.is_file():
            raise EmbdeployError(f"{d} has no {MANIFEST}, so it is not an embdeploy ONNX directory; pass a directory "
                                 "written by `embdeploy export` (a base export: the cached one each export records "
                                 f"as base_onnx in its {MANIFEST})")
        doc = read_versioned(path, kind=KIND, what="an embdeploy ONNX manifest", fix="re-run `embdeploy export`",
                             versions=(FORMAT_VERSION,),
                             upgrade="Re-export with this version or upgrade embdeploy")
        return cls.from_json(doc, str(path), d.resolve())

    @classmethod
    def verify(cls, directory, *, allow_partial: bool = False) -> "ExportManifest":
        """Check every file `embdeploy.json` lists against its recorded sha256, and the fields against the graph.

        Raises EmbdeployError naming each missing or changed file (all at once), and
        refuses `.NAME.partial-*` directories: those are unfinished exports.
        """
        d = Path(directory).expanduser()
        m = cls.read(d, allow_partial=allow_partial)
        problems = []
        root = d.resolve()
        for name, want in sorted(m.files.items()):
            p = d / name
            if not p.is_file():
                problems.append(f"{name}: missing")
            elif root not in p.resolve().parents:
                problems.append(f"{name}: resolves to {p.resolve()}, outside {d} (a symlink?); exports keep every file inside")
            elif file_digest(p) != want:
                problems.append(f"{name}: its sha256 differs from the one recorded at export (changed or corrupted)")
        listed = set(m.files)
        for p in sorted(d.rglob("*")):
            rel = p.relative_to(d).as_posix()
            if (p.is_file() or p.is_symlink()) and rel != MANIFEST and rel not in listed:
                problems.append(f"{rel}: not listed in {MANIFEST}, so nothing vouches for it (added after export?); "
                                "remove it or re-export")
        if not problems:
            problems += graph_problems(d, m)
        raise_all(problems, f"{d} does not match its {MANIFEST}; re-run `embdeploy export` to rebuild it:")
        return m


# field -> the JSON type it must have (every manifest), checked before anything reads them
_FIELDS = {
    "mode": str, "task": str, "V": int, "K": int, "H": int, "dtype": str, "inputs": list, "input_roles": dict,
    "outputs": list, "model_file": str, "files": dict, "base_fingerprint": dict, "tokens": list,
    "extension_initializers": dict,
}
_EXTENDED_FIELDS = {"base_model": dict, "extension_fingerprint": str}  # merged/split/swap only
_OPTIONAL = {"kv_cache": dict, "base_onnx": str, "extension_dir": str, "head": str, "base_tokenizer": dict,
             "pooling": dict, "quantization": dict, "source": dict, "validation": dict, "created_by": str,
             "format": str}
_JSON_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


def _schema_problems(m: dict) -> list[str]:
    problems = []
    mode = m.get("mode")
    if mode not in MODES:
        problems.append(f"mode is {mode!r}, expected one of {', '.join(MODES)}")
    fields = dict(_FIELDS, **(_EXTENDED_FIELDS if mode in EXPORT_MODES else {}))
    for name, kind in fields.items():
        v = m.get(name)
        if name not in m:
            problems.append(f"{name} is missing")
        elif not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            problems.append(f"{name} is {json_type(v)}, expected {_JSON_NAMES[kind]}")
    for name, kind in _OPTIONAL.items():
        v = m.get(name)
        if v is not None and not isinstance(v, kind):
            problems.append(f"{name} is {json_type(v)}, expected {_JSON_NAMES[kind]} or null")
    for k in ("V", "K", "H"):
        if isinstance(m.get(k), int) and m[k] < 0:
            problems.append(f"{k} is {m[k]}, expected a non-negative integer")
    if mode == "base" and m.get("K") not in (0, None):
        problems.append(f"a base export must have K=0, found K={m.get('K')}")
    if mode in EXPORT_MODES and m.get("K") == 0:
        problems.append(f"a {mode} export must have K>0 new rows, found K=0")
    tokens = m.get("tokens")  # the manifest is not among the hashed files: K must at least agree with it
    if isinstance(tokens, list) and isinstance(m.get("K"), int) and len(tokens) != m["K"]:
        problems.append(f"K is {m['K']} but {len(tokens)} tokens are listed")
    if isinstance(m.get("files"), dict) and not m["files"]:
        problems.append("files (the sha256 of every file) is empty")
    inputs, roles = m.get("inputs"), m.get("input_roles")
    if isinstance(inputs, list) and isinstance(roles, dict) and not any(
            isinstance(n, str) and roles.get(n, n) == "input_ids" for n in inputs):
        problems.append(f"inputs is {inputs}, expected a list that contains 'input_ids' (an input with that role)")
    if problems:
        return problems
    for j, t in enumerate(m["tokens"]):
        if not isinstance(t, dict) or not isinstance(t.get("token"), str) or not isinstance(t.get("id"), int):
            problems.append(f"tokens[{j}] is {json_type(t)}, expected an object with a string token and an integer id")
            break
        if t["id"] != m["V"] + j:
            problems.append(f"tokens[{j}] ({t['token']!r}) has id {t['id']}, expected {m['V'] + j} (ids follow V in order)")
            break
    for name, digest in m["files"].items():
        why = _unsafe_path(name)
        if why:
            problems.append(f"files lists {name!r}: {why}")
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            problems.append(f"files[{name!r}] is {json_type(digest)}, expected a 'sha256:…' string")
    if m["model_file"] not in m["files"]:
        problems.append(f"model_file {m['model_file']!r} is not among the hashed files")
    if any(not isinstance(x, str) for x in m["inputs"] + m["outputs"]):
        problems.append("inputs and outputs must be lists of names (strings)")
    if m.get("format", "onnx") not in FORMATS:
        problems.append(f"format is {m['format']!r}, expected one of {', '.join(FORMATS)}")
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


def graph_problems(directory: Path, m: ExportManifest) -> list[str]:
    """The manifest's behaviour-changing fields against the graph (read without its external data)."""
    import onnx

    from ..onnx import EXT_EMBED
    from .graph import graph_inputs, graph_outputs

    d = Path(directory)
    try:
        g = onnx.load(str(d / m.model_file), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and others
        return [f"{m.model_file} is not a readable ONNX model ({type(e).__name__})"]
    problems = []
    locations = {e.value for t in g.graph.initializer for e in t.external_data if e.key == "location"}
    for loc in sorted(locations - set(m.files)):
        problems.append(f"the graph reads external data from {loc!r}, which files does not list (so it is not verified)")
    fed, outs = graph_inputs(g), graph_outputs(g)
    if set(fed) != set(m.inputs):
        problems.append(f"inputs {list(m.inputs)} differ from the graph's inputs {fed}")
    stray = sorted(set(m.input_roles) - set(fed))
    if stray:
        problems.append(f"input_roles names {', '.join(stray)}, which the graph does not take")
    if set(outs) != set(m.outputs):
        problems.append(f"outputs {list(m.outputs)} differ from the graph's outputs {outs}")
    V, K, H, mode = m.V, m.K, m.H, m.mode
    tables = {t.name: (tuple(t.dims), t.data_type) for t in g.graph.initializer if len(t.dims) == 2 and t.dims[-1] == H}
    elem = _ELEM.get(m.dtype)
    ops = {n.op_type for n in g.graph.node}
    want = {"base": [(V, H)], "merged": [(V + K, H)], "split": [(V, H), (K, H)], "swap": [(V, H), (K, H)]}.get(mode, [])
    # A genai swap export takes its (K, H) tables as graph inputs (onnxruntime-genai feeds no overridable
    # initializer); the exported rows are in a hashed file beside the graph (export/genai.py).
    fed_tables = m.format == "genai" and mode == "swap"
    if fed_tables:
        want = [(V, H)]
    for shape in want:
        if not any(s == shape and e == elem for s, e in tables.values()):
            problems.append(f"mode {mode} with V={V}, K={K}, H={H}, dtype {m.dtype} needs a {m.dtype} table of "
                            f"shape {shape}, and the graph has none")
    if mode in ("split", "swap"):
        if fed_tables:
            if EXT_EMBED not in fed:
                problems.append(f"a genai swap export takes the extension table {EXT_EMBED} as a graph input; "
                                "the graph has no such input")
        elif tables.get(EXT_EMBED, (None,))[0] != (K, H):
            problems.append(f"mode {mode} needs the extension table {EXT_EMBED} of shape ({K}, {H}) in the graph")
        if mode == "swap" and "Where" not in ops:
            problems.append("mode swap needs the Where that picks base or extension rows; the graph has none")
        if mode == "split" and "Concat" not in ops:
            problems.append("mode split needs the Concat that joins the tables; the graph has none")
    if mode == "merged" and EXT_EMBED in tables:
        problems.append(f"mode merged but the graph holds a separate extension table {EXT_EMBED} (a split or swap export?)")
    return problems


def read_manifest(directory) -> ExportManifest:
    """`ExportManifest.read(directory)`."""
    return ExportManifest.read(directory)


def verify_dir(onnx_dir, *, allow_partial: bool = False) -> ExportManifest:
    """`ExportManifest.verify(onnx_dir)`: every file re-hashed, the fields checked against the graph."""
    return ExportManifest.verify(onnx_dir, allow_partial=allow_partial)
