"""Versioned JSON files: the one reader for every manifest and settings file embdeploy writes.

    doc = read_versioned(path, kind="embdeploy-onnx", what="an embdeploy ONNX manifest",
                         fix="re-run `embdeploy export`")

Each file names its kind (under `kind_key`, "kind" unless the format predates
that name) and a `format_version`; a file of another kind or version is refused
with the fix, never half-read.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import EmbdeployError


def json_type(value) -> str:
    """The JSON name of `value`'s type, for messages ("a string", "null", …)."""
    return {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def read_json(path, fix: str) -> object:
    """The parsed contents of `path`; a clear error (with `fix`) for unreadable or invalid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EmbdeployError(f"{path} is not valid JSON ({e}); {fix}") from None
    except OSError as e:
        raise EmbdeployError(f"cannot read {path}: {e.strerror}; {fix}") from None


def read_versioned(path, *, kind: str, what: str, fix: str, versions=(1,), kind_key: str = "kind",
                   upgrade: str | None = None) -> dict:
    """`path` as a dict whose `kind_key` is `kind` and whose format_version is one of `versions`.

    `what` names the file in messages ("an embdeploy ONNX manifest"); `fix` says how to rebuild it;
    `upgrade` (default: `fix` or upgrading embdeploy) is the advice for another format version.
    """
    path = Path(path)
    doc = read_json(path, fix)
    if not isinstance(doc, dict):
        raise EmbdeployError(f"{path} does not hold a JSON object ({json_type(doc)}), so it is not {what}; {fix}")
    if doc.get(kind_key) != kind:
        raise EmbdeployError(f"{path} is not {what} ({kind_key} != {kind!r}); {fix}")
    if doc.get("format_version") not in versions:
        readable = ", ".join(map(str, versions))
        raise EmbdeployError(
            f"{path} has format_version {doc.get('format_version')!r}; this embdeploy reads version {readable}. "
            f"{upgrade or fix.capitalize() + ' with this version or upgrade embdeploy'}"
        )
    return doc


def write_json(path, doc: dict) -> None:
    Path(path).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
