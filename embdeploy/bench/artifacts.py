"""Read the ONNX directories that `embdeploy export` writes, for benchmarking.

Each directory's `embdeploy.json` is read and verified (every file against its
digest, the fields against the graph), so a benchmark times what validation
vouched for; tables are read lazily by the memory measurements that need them.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import EmbdeployError, raise_all
from ..export.manifest import ExportManifest

def load_artifact(path: str | Path) -> ExportManifest:
    """Read and verify one export directory; every problem with it is raised at once."""
    return ExportManifest.verify(path)


def _recorded_base(a: ExportManifest) -> Path | None:
    return Path(a.base_onnx) if a.base_onnx else None


def resolve_artifacts(onnx_dirs, base_dir=None) -> tuple[ExportManifest, list[ExportManifest]]:
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
        recorded = {_recorded_base(a) for a in arts if a.base_onnx}
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


def own_bases(base: ExportManifest, variants: list[ExportManifest]) -> list[ExportManifest]:
    """The base exports the variants were rewritten from, where they differ in precision from `base`.

    An int8 export benchmarked against the fp32 base: its int8 base is timed in the same rounds too,
    so one run gives both what int8 buys (against the fp32 base) and what the extension costs (against
    its own base). Bases of the same precision (a copy, the cache entry) add nothing and are not added.
    """
    have = {base.path} | {v.path for v in variants}
    extra = []
    for v in variants:
        if not v.base_onnx:
            continue
        p = Path(v.base_onnx).resolve()
        if p in have or not (p / "embdeploy.json").is_file():
            continue
        own = load_artifact(p)
        if own.mode == "base" and own.precision != base.precision and (own.V, own.H) == (base.V, base.H):
            extra.append(own)
            have.add(p)
    return extra


def variant_labels(base: ExportManifest, variants: list[ExportManifest]) -> list[str]:
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
