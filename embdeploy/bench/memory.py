"""Session cost, measured in child processes (see _child.py for what is measured)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..errors import EmbdeployError
from ..export.manifest import ExportManifest
from .result import MultiSessionRow, SessionCost

CHILD_TIMEOUT_S = 900


def _run_child(command: str, spec: dict) -> dict:
    # The child imports the same embdeploy as this process, installed or not.
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "embdeploy.bench._child", command, json.dumps(spec)],
            capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env,
        )
    except subprocess.TimeoutExpired:
        raise EmbdeployError(
            f"the memory measurement of {spec['model']} took over {CHILD_TIMEOUT_S} s and was stopped; "
            "measure fewer sessions (--sessions) or a smaller model"
        ) from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        out = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise EmbdeployError(
            f"the memory measurement of {spec['model']} died (exit {proc.returncode}):\n{tail}\n"
            "run `python -m embdeploy.bench._child` with the same arguments to see the full error"
        ) from None
    if "error" in out:
        raise EmbdeployError(f"measuring {spec['model']} failed: {out['error']}")
    return out


def session_cost(art: ExportManifest, label: str, provider: str, threads: int) -> SessionCost:
    """Creation time and memory of one session of `art`, alone in a fresh process."""
    spec = {"model": str(art.model_path), "provider": provider, "threads": threads, "V": art.V, "K": art.K}
    out = _run_child("session", spec)
    return SessionCost(provider=provider, variant=label, mode=art.mode, **out)


def multi_session(art: ExportManifest, n: int, threads: int, prepacking: bool, provider: str = "cpu") -> MultiSessionRow:
    """N sessions of a swap or merged export in one fresh process, each with a different extension.

    provider "cuda" measures GPU memory per tenant (see _child.measure_multi_cuda).
    """
    if art.mode not in ("swap", "merged"):
        raise ValueError("multi-session measurement is for swap and merged exports")
    spec = {"model": str(art.model_path), "mode": art.mode, "n": n, "threads": threads, "prepacking": prepacking,
            "V": art.V, "K": art.K, "H": art.H, "ext_name": art.ext_embed, "provider": provider}
    out = _run_child("multi", spec)
    config = art.mode if prepacking else f"{art.mode} (no prepacking)"
    if provider != "cpu":
        config = f"{provider}: {config}"
    return MultiSessionRow(config=config, mode=art.mode, n=n, prepacking=prepacking, **out)
