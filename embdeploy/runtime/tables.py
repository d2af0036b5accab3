"""Extension tables for a running swap export: read from an extension directory and checked against the export.

An extension directory (`embdeploy extend` / `embdeploy train`) holds
`extension.safetensors` (`embed.<group>`, and `head.<group>` for an untied LM
head, K_g x H each) and `extension.json`. Its rows are used at run time only
when the base they were made for is the export's base: same V, same H, same
base fingerprint (and head fingerprint when the export has an untied head).
K may differ from the export's K: a swap graph reads the table's row count at
run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EmbdeployError, FingerprintMismatch, raise_all
from ..fingerprint import rows_fingerprint


@dataclass(frozen=True)
class ExtensionTables:
    """The rows of one extension, in id order, and what identifies them."""

    directory: Path
    embed: np.ndarray  # (K, H) in the export's dtype
    head: np.ndarray | None  # (K, H) untied LM head rows, when the export has an untied head
    tokens: tuple[str, ...]  # token of id V + i at position i
    fingerprint: str  # extension_fingerprint, as `Extension.extension_fingerprint` computes it
    manifest: dict

    @property
    def K(self) -> int:
        return int(self.embed.shape[0])


def read_extension(ext_dir, export, np_dtype) -> ExtensionTables:
    """Read `ext_dir` for the export described by `export` (its ExportManifest); refuse what does not fit.

    Every mismatch (V, H, base fingerprint, head) is reported at once;
    a base fingerprint mismatch raises `FingerprintMismatch`.
    """
    from ..extend.model import WEIGHTS, read_manifest

    d = Path(ext_dir)
    m = read_manifest(d)
    fp_ext = m.get("base_fingerprint") or {}
    fp_exp = export.base_fingerprint
    if fp_ext.get("embed") != fp_exp.get("embed"):
        raise FingerprintMismatch(
            f"the extension in {d} was made for a base whose embedding table has fingerprint "
            f"{str(fp_ext.get('embed'))[:23]}…, but this export's base has {str(fp_exp.get('embed'))[:23]}…; "
            "use an extension made for this export's base model (or export that extension's base)"
        )
    problems = []
    if m["V"] != export.V:
        problems.append(f"V: the extension follows {m['V']} base rows, the export has {export.V}")
    if m["H"] != export.H:
        problems.append(f"H: the extension's rows have hidden size {m['H']}, the export's {export.H}")
    if m["K"] < 1:
        problems.append("K: the extension has no rows; a swap export needs at least one")
    untied_export = bool(export.extension_initializers.get("head"))
    if untied_export:
        if m.get("head") != "untied":
            problems.append(
                f"head: the export has an untied LM head, the extension's head is {m.get('head')!r}; "
                "use an extension of the same (untied) model"
            )
        elif fp_ext.get("head") != fp_exp.get("head"):
            problems.append("head: the extension was made for another LM head (its head fingerprint differs)")
    raise_all(problems, f"the extension in {d} does not fit the export (K may differ, V and H may not):")

    embed, head = _read_rows(d / WEIGHTS, m, untied_export)
    fingerprint = rows_fingerprint(embed, head if m.get("head") == "untied" else None)
    if fingerprint != m["extension_fingerprint"]:  # read_manifest requires it
        raise EmbdeployError(
            f"the rows in {d / WEIGHTS} do not match the extension_fingerprint in {d / 'extension.json'} "
            "(the files come from different revisions); save the extension again with `embdeploy extend`/`train`"
        )
    tokens = tuple(t["token"] for t in m["tokens"])
    return ExtensionTables(
        directory=d.resolve(),
        embed=np.ascontiguousarray(embed.astype(np_dtype, copy=False)),
        head=None if head is None or not untied_export else np.ascontiguousarray(head.astype(np_dtype, copy=False)),
        tokens=tokens,
        fingerprint=fingerprint,
        manifest=m,
    )


def _read_rows(path: Path, m: dict, need_head: bool) -> tuple[np.ndarray, np.ndarray | None]:
    from safetensors.numpy import load_file

    if not path.is_file():
        raise EmbdeployError(f"{path} is missing; the extension directory is incomplete, re-run `embdeploy extend`")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own types; bfloat16 has no numpy dtype
        raise EmbdeployError(f"cannot read {path} ({str(e).splitlines()[0]}); re-create the extension") from None
    kinds = ("embed", "head") if m.get("head") == "untied" else ("embed",)
    problems, rows = [], {k: [] for k in kinds}
    for g in m.get("groups", []):
        for kind in kinds:
            key = f"{kind}.{g['name']}"
            t = tensors.get(key)
            if t is None:
                problems.append(f"tensor {key} is missing")
            elif t.shape != (g["count"], m["H"]):
                problems.append(f"tensor {key} has shape {t.shape}, extension.json says ({g['count']}, {m['H']})")
            elif not np.isfinite(t.astype(np.float32)).all():
                problems.append(f"tensor {key} contains NaN or Inf")
            else:
                rows[kind].append(t)
    raise_all(problems, f"{path} does not match extension.json:")
    embed = np.concatenate(rows["embed"], axis=0)
    head = np.concatenate(rows["head"], axis=0) if "head" in rows else None
    if need_head and head is None:
        raise EmbdeployError(f"{path} has no head rows but the export needs them (untied LM head)")
    return embed, head
