"""Human-readable summaries of extension and export directories."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from .errors import EmbdeployError


def _size(p: Path) -> str:
    n = p.stat().st_size
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def describe(path) -> dict:
    p = Path(path)
    if (p / "extension.json").is_file():
        from .extend.model import read_manifest

        m = read_manifest(p)
        kind = "extension"
    elif (p / "embdeploy.json").is_file():
        from .export.manifest import ExportManifest

        m = ExportManifest.read(p).to_json()  # one reader: the same checks as every other stage
        kind = f"ONNX export ({m['mode']})"
    else:
        raise EmbdeployError(f"{p} is neither an extension directory (extension.json) nor an ONNX export (embdeploy.json)")
    t = Table(title=f"{p} — {kind}", show_header=False, title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value")
    base = m.get("base_model", {})
    rows = [
        ("base model", base.get("ref", m.get("base_onnx", "")) if isinstance(base, dict) else str(base)),
        ("task", (base.get("task") if isinstance(base, dict) else None) or m.get("task", "")),
        ("V (base rows)", str(m.get("V"))),
        ("K (new rows)", str(m.get("K"))),
        ("H (hidden)", str(m.get("H"))),
        ("dtype", str(m.get("dtype"))),
        ("LM head", str(m.get("head"))),
        ("base fingerprint", str((m.get("base_fingerprint") or {}).get("embed", ""))[:30] + "…"),
    ]
    if "groups" in m:
        rows.append(("groups", ", ".join(f"{g['name']} ({g['count']}, init {g['init'].get('init')})" for g in m["groups"])))
    toks = m.get("tokens", [])
    shown = ", ".join(f"{x['token']}={x['id']}" for x in toks[:8]) + (" …" if len(toks) > 8 else "")
    rows.append(("tokens", shown))
    if m.get("training"):
        last = m["training"][-1]
        rows.append(("training", f"{len(m['training'])} run(s); last: {last.get('objective')} {last.get('steps')} steps, loss {_loss(last.get('final_loss'))}"))
    if "validation" in m and isinstance(m["validation"], dict):
        rows.append(("validation", "passed" if m["validation"].get("passed") else "FAILED"))
    files = sorted(f for f in p.rglob("*") if f.is_file())
    rows.append(("files", ", ".join(f"{f.relative_to(p)} ({_size(f)})" for f in files[:12])))
    for k, v in rows:
        t.add_row(k, v)
    return {"manifest": m, "table": t, "kind": kind}


def _loss(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)
