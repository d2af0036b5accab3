"""Training checkpoints: tables and optimizer state as safetensors, the rest as JSON. No pickle.

    CHECKPOINT_DIR/step-00000200/
        tables.safetensors     the extension rows (same keys as extension.safetensors)
        optimizer.safetensors  AdamW moments and step counts, keyed "<param index>.<name>"
        state.json             step, the run's TrainConfig (asdict), data digest, optimizer hyperparameters

Each checkpoint is written to a temporary sibling and renamed when complete,
and older ones are removed only after that, so an interrupt at any moment
leaves at least one complete checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ..errors import EmbdeployError
from ..fingerprint import file_digest
from ..fsutil import atomic_output_dir
from .config import TrainConfig

STEP_RE = re.compile(r"^step-(\d{8})$")
TABLES, OPTIM, STATE = "tables.safetensors", "optimizer.safetensors", "state.json"
FORMAT = "embdeploy-train-checkpoint"
KEEP = 2
DATA_KEYS = ("data_sha256", "tokens", "base_fingerprint")


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"{pid}.{name}"] = t.detach().cpu().contiguous()
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, groups


def save_checkpoint(directory, step: int, ext, opt, state: dict) -> Path:
    from safetensors.torch import save_file

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"step-{step:08d}"
    tensors, groups = _optimizer_tensors(opt)
    for stale in root.glob(".step-*.partial-*"):  # left by an interrupted write
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_output_dir(out, overwrite=True, kind="checkpoint") as tmp:
        save_file(ext.state_tensors(), str(tmp / TABLES), metadata={"format": FORMAT})
        save_file(tensors, str(tmp / OPTIM), metadata={"format": FORMAT})
        body = {"format": FORMAT, "step": step, "optimizer_param_groups": groups, **state,
                "digests": {name: file_digest(tmp / name) for name in (TABLES, OPTIM)}}
        (tmp / STATE).write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
    for old in list_checkpoints(root)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return out


def list_checkpoints(directory) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def latest_checkpoint(directory) -> Path | None:
    cps = list_checkpoints(directory)
    return cps[-1] if cps else None


def _verify(p: Path, state: dict) -> None:
    """Every byte of the tensors is checked against the digests written with them."""
    digests = state.get("digests")
    if not isinstance(digests, dict):
        raise EmbdeployError(
            f"checkpoint {p} has no digests (written by an older embdeploy, or state.json was edited); "
            "its rows cannot be trusted: delete it and train again, or resume from a newer checkpoint"
        )
    bad = [name for name in (TABLES, OPTIM) if not (p / name).is_file() or digests.get(name) != file_digest(p / name)]
    if bad:
        raise EmbdeployError(
            f"checkpoint {p}: {', '.join(bad)} changed after it was written (its sha256 differs from state.json); "
            "delete this checkpoint to resume from an older one, or start fresh"
        )


def load_checkpoint(path, ext, opt) -> dict:
    """Put the checkpoint's rows into `ext` and its moments into `opt`; return state.json.

    Refuses a checkpoint whose files do not match their digests, or whose tensors hold NaN or Inf.
    """
    from safetensors.torch import load_file

    p = Path(path)
    try:
        state = json.loads((p / STATE).read_text())
        if isinstance(state, dict) and state.get("format") == FORMAT:
            _verify(p, state)
        tables = load_file(str(p / TABLES))
        moments = load_file(str(p / OPTIM))
    except EmbdeployError:
        raise
    except Exception as e:  # json or safetensors errors on a damaged checkpoint
        raise EmbdeployError(f"checkpoint {p} is damaged ({str(e).splitlines()[0]}); delete it to resume from an older one") from None
    if state.get("format") != FORMAT:
        raise EmbdeployError(f"{p / STATE} is not an embdeploy training checkpoint")
    own = ext.state_tensors()
    problems = [
        f"tensor {k}: checkpoint has {tuple(tables[k].shape) if k in tables else 'nothing'}, the extension {tuple(v.shape)}"
        for k, v in own.items()
        if k not in tables or tables[k].shape != v.shape
    ]
    if problems:
        raise EmbdeployError(f"checkpoint {p} does not fit this extension: " + "; ".join(problems))
    nonfinite = [k for k, t in (*tables.items(), *moments.items()) if t.is_floating_point() and not torch.isfinite(t).all()]
    if nonfinite:
        raise EmbdeployError(f"checkpoint {p} holds NaN or Inf in {', '.join(nonfinite[:5])}; delete it to resume "
                             "from an older one, or start fresh")
    with torch.no_grad():
        for name, param in ext.embed_tables.items():
            param.copy_(tables[f"embed.{name}"])
        if ext.head_mode == "untied":
            for name, param in ext.head_tables.items():
                param.copy_(tables[f"head.{name}"])
    sd_state: dict[int, dict] = {}
    for key, t in moments.items():
        pid, name = key.split(".", 1)
        sd_state.setdefault(int(pid), {})[name] = t
    groups = []
    for g in state["optimizer_param_groups"]:
        groups.append({k: (tuple(v) if k == "betas" else v) for k, v in g.items()})
    opt.load_state_dict({"state": sd_state, "param_groups": groups})
    return state


def recorded_settings(state: dict, path) -> tuple[TrainConfig, dict]:
    """The TrainConfig a checkpoint's run used, and what it learned from (DATA_KEYS).

    Checkpoints written before TrainConfig hold one flat "settings" dict of both; they are read too.
    """
    fix = "it was written by another embdeploy version: resume with that version, or start fresh without --resume"
    where = f"checkpoint {path}"
    if "config" in state:
        return TrainConfig.from_dict(state["config"], where, fix), dict(state.get("data") or {})
    flat = state.get("settings")
    if not isinstance(flat, dict):
        raise EmbdeployError(f"{where} records no training settings (state.json has neither \"config\" nor "
                             "\"settings\"); start fresh without --resume")
    config = {k: v for k, v in flat.items() if k not in DATA_KEYS}
    return TrainConfig.from_dict(config, where, fix), {k: flat.get(k) for k in DATA_KEYS}
