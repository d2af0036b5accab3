"""Read the ONNX directories that `embdeploy export` writes, for benchmarking.

Only `embdeploy.json` and the ONNX graph (without its external data) are read
here; tables are read lazily by the memory measurements that need them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import EmbdeployError, raise_all

MODES = ("base", "merged", "split", "swap")
SUPPORTED_FORMAT_VERSIONS = (1,)


@dataclass(frozen=True)
class OnnxArtifact:
    """One export directory: where it is and what its embdeploy.json says."""

    path: Path
    mode: str
    task: str
    V: int  # base rows
    K: int  # new rows, 0 for a base export
    H: int
    dtype: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    model_file: str
    ext_embed: str | None  # initializer name of the (K, H) extension table (split/swap)
    ext_head: str | None
    base_onnx: Path | None

    @property
    def model_path(self) -> Path:
        return self.path / self.model_file

    def describe(self) -> dict:
        return {"path": str(self.path), "mode": self.mode, "task": self.task, "V": self.V, "K": self.K, "H": self.H,
                "dtype": self.dtype}


def load_artifact(path: str | Path) -> OnnxArtifact:
    """Read one export directory; every problem with it is raised at once."""
    path = Path(path).expanduser()
    if not path.exists():
        raise EmbdeployError(f"ONNX directory {path} does not exist; pass a directory written by `embdeploy export`")
    if not path.is_dir():
        raise EmbdeployError(
            f"{path} is a file, not an ONNX directory; pass the directory that holds model.onnx and embdeploy.json"
        )
    meta_path = path / "embdeploy.json"
    if not meta_path.is_file():
        raise EmbdeployError(
            f"{path} has no embdeploy.json, so it is not an embdeploy ONNX directory; pass a directory written by "
            "`embdeploy export` (for the base model's own export, the cached one each export records as "
            "base_onnx in its embdeploy.json)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EmbdeployError(f"{meta_path} is not valid JSON ({e}); re-run `embdeploy export` to rewrite it") from None
    if not isinstance(meta, dict):
        raise EmbdeployError(f"{meta_path} does not hold a JSON object; re-run `embdeploy export` to rewrite it")

    problems = []
    if meta.get("kind") != "embdeploy-onnx":
        problems.append(f"kind is {meta.get('kind')!r}, expected 'embdeploy-onnx'")
    if meta.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        problems.append(
            f"format_version {meta.get('format_version')!r} is not one this embdeploy reads "
            f"({', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); re-export with this version or upgrade embdeploy"
        )
    mode = meta.get("mode")
    if mode not in MODES:
        problems.append(f"mode is {mode!r}, expected one of {', '.join(MODES)}")
    for key in ("V", "K", "H"):
        if not isinstance(meta.get(key), int) or meta[key] < 0:
            problems.append(f"{key} is {meta.get(key)!r}, expected a non-negative integer")
    if mode == "base" and meta.get("K") not in (0, None):
        problems.append(f"a base export must have K=0, found K={meta.get('K')}")
    if mode in ("merged", "split", "swap") and meta.get("K") == 0:
        problems.append(f"a {mode} export must have K>0 new rows, found K=0")
    inputs = meta.get("inputs")
    if not isinstance(inputs, list) or "input_ids" not in inputs:
        problems.append(f"inputs is {inputs!r}, expected a list that contains 'input_ids'")
    model_file = meta.get("model_file", "model.onnx")
    if not (path / model_file).is_file():
        problems.append(f"model file {model_file} is missing from the directory")
    ext = meta.get("extension_initializers") or {}
    if mode in ("split", "swap") and not ext.get("embed"):
        problems.append(f"a {mode} export must name its extension table in extension_initializers.embed")
    raise_all(problems, f"{meta_path} cannot be benchmarked; re-run `embdeploy export` to rewrite it:")

    base_onnx = meta.get("base_onnx")
    return OnnxArtifact(
        path=path.resolve(),
        mode=mode,
        task=meta.get("task", "feature-extraction"),
        V=meta["V"],
        K=meta["K"],
        H=meta["H"],
        dtype=meta.get("dtype", "float32"),
        inputs=tuple(inputs),
        outputs=tuple(meta.get("outputs") or ()),
        model_file=model_file,
        ext_embed=ext.get("embed"),
        ext_head=ext.get("head"),
        base_onnx=Path(base_onnx) if base_onnx else None,
    )


def resolve_artifacts(onnx_dirs, base_dir=None) -> tuple[OnnxArtifact, list[OnnxArtifact]]:
    """Return (base, variants).

    The base is `base_dir` when given, else a mode-"base" directory among
    `onnx_dirs`, else the `base_onnx` that the variants record. A base export
    passed again among `onnx_dirs` is timed once, as the base; another base
    directory (a copy, another build) is a variant like any other.
    """
    if isinstance(onnx_dirs, (str, Path)):
        onnx_dirs = [onnx_dirs]
    if not onnx_dirs and base_dir is None:
        raise EmbdeployError("nothing to benchmark: pass one or more ONNX directories written by `embdeploy export`")
    arts = [load_artifact(d) for d in onnx_dirs]

    if base_dir is not None:
        base = load_artifact(base_dir)
        if base.mode != "base":
            raise EmbdeployError(
                f"--base {base.path} is a {base.mode!r} export; pass the base model's own export (mode 'base': "
                "the cached one each export records as base_onnx in its embdeploy.json)"
            )
    else:
        bases = [a for a in arts if a.mode == "base"]
        recorded = {a.base_onnx for a in arts if a.base_onnx is not None}
        if bases:
            base = bases[0]
        elif len(recorded) == 1:
            recorded_path = recorded.pop()
            if not (recorded_path / "embdeploy.json").is_file():
                raise EmbdeployError(
                    f"the exports record their base export as {recorded_path}, which is missing or has no "
                    "embdeploy.json; pass --base DIR with the base model's export (mode 'base')"
                )
            base = load_artifact(recorded_path)
        elif len(recorded) > 1:
            listed = ", ".join(sorted(str(p) for p in recorded))
            raise EmbdeployError(
                f"the exports record different base exports ({listed}); pass --base DIR to choose the one to compare against"
            )
        else:
            raise EmbdeployError(
                "no base to compare against: none of the directories is a base export and none records one "
                "(base_onnx); pass --base DIR with the base model's export (mode 'base')"
            )

    variants, seen = [], {base.path}
    for a in arts:
        if a.path in seen:
            continue
        seen.add(a.path)
        variants.append(a)

    problems = []
    for a in variants:
        if a.V != base.V or a.H != base.H:
            problems.append(
                f"{a.path} has V={a.V}, H={a.H} but the base {base.path} has V={base.V}, H={base.H}; "
                "pass the base export of the model these were exported from"
            )
    raise_all(problems, "the exports do not extend this base:")
    return base, variants


def variant_labels(base: OnnxArtifact, variants: list[OnnxArtifact]) -> list[str]:
    """Short unique names: the mode, or mode:dirname when a mode repeats ('base' is the base itself)."""
    modes = [v.mode for v in variants]
    labels = []
    for v in variants:
        label = v.mode if modes.count(v.mode) == 1 and v.mode != "base" else f"{v.mode}:{v.path.name}"
        n, unique = 2, label
        while unique in labels or unique == "base":
            unique, n = f"{label}#{n}", n + 1
        labels.append(unique)
    return labels
