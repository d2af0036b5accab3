"""`embdeploy.json`: what an ONNX directory holds, and the sha256 of every file in it.

`verify_dir` re-hashes the files a manifest lists and refuses a directory with a
missing or changed file, or one that is an unfinished `.NAME.partial-*` output.
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
    for k in ("V", "K", "H"):
        if not isinstance(m.get(k), int) or m[k] < 0:
            problems.append(f"{k} is {m.get(k)!r}, expected a non-negative integer")
    tokens = m.get("tokens")  # the manifest is not among the hashed files: K must at least agree with it
    if isinstance(tokens, list) and isinstance(m.get("K"), int) and len(tokens) != m["K"]:
        problems.append(f"K is {m['K']} but {len(tokens)} tokens are listed")
    if not isinstance(m.get("files"), dict) or not m.get("files"):
        problems.append("files (the sha256 of every file) is missing")
    if not isinstance(m.get("inputs"), list) or not isinstance(m.get("outputs"), list):
        problems.append("inputs/outputs are missing")
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
    for name, want in sorted(m["files"].items()):
        p = d / name
        if not p.is_file():
            problems.append(f"{name}: missing")
        elif file_digest(p) != want:
            problems.append(f"{name}: its sha256 differs from the one recorded at export (changed or corrupted)")
    raise_all(problems, f"{d} does not match its {MANIFEST}; re-run `embdeploy export` to rebuild it:")
    return m
