"""The files sentence-transformers reads, written into the export of a sentence-transformers base.

    SentenceTransformer(onnx_dir, backend="onnx")   # sentence-transformers 5 with optimum-onnx

Without `modules.json`, sentence-transformers takes any directory for a bare transformers
model and adds mean pooling of its own, without normalization. With it (read in
sentence_transformers/base/model.py, `_load_config_modules`), each module listed is loaded
from its path: the Transformer from the export itself, where `backend="onnx"` finds
`model.onnx` at the top first (backend/utils.py, `backend_should_export`: `<file_name>` before
`onnx/<file_name>`, file_name defaulting to optimum's "model.onnx"), so no copy under `onnx/`
and no `model_kwargs={"file_name": ...}` are needed; its `max_seq_length` and `do_lower_case`
come from `sentence_bert_config.json`; Pooling reads `1_Pooling/config.json`; Normalize reads
no file (its `load` takes none), so it needs no directory.

Written only where the result is the export's own `sentence_embedding` output: the base's
modules are a Transformer, one Pooling whose one mode is the one the export pools with, and
a Normalize exactly when the export normalizes. Other module stacks (Dense layers, several
pooling modes) are left out, with the reason, rather than written to compute something else.
Only JSON configuration files are copied; they are then hashed into embdeploy.json like
every other file of the export.
"""

from __future__ import annotations

import json
from pathlib import Path

ST_CONFIGS = ("sentence_bert_config.json", "config_sentence_transformers.json")
_OLD_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                     "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                     "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


def _kind(module: dict) -> str:
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def _pooling_modes(cfg: dict) -> list[str]:
    """The pooling modes a 1_Pooling/config.json turns on (sentence-transformers 5 writes `pooling_mode`,
    earlier versions one boolean per mode)."""
    mode = cfg.get("pooling_mode")
    if isinstance(mode, str):
        return [mode]
    if isinstance(mode, list):
        return [str(m) for m in mode]
    return [name for key, name in _OLD_POOLING_KEYS.items() if cfg.get(key)]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def st_layout_plan(base_dir, pooling: dict | None) -> tuple[dict[str, bytes], str | None]:
    """({relative path: bytes} to write, None) for a sentence-transformers base; ({}, why not) otherwise.

    `pooling` is the export's {"mode", "normalize"} (None: the export has no sentence_embedding).
    """
    if not pooling or base_dir is None or not Path(base_dir).is_dir():
        return {}, "not a sentence-transformers model" if not pooling else "the base is not a local directory"
    base = Path(base_dir)
    modules = _read_json(base / "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        return {}, "its modules.json is missing or unreadable"
    kinds = [_kind(m) for m in modules]
    if sorted(set(kinds) - {"Normalize"}) != ["Pooling", "Transformer"] or kinds.count("Pooling") != 1 \
            or kinds.count("Transformer") != 1:
        return {}, f"its modules ({', '.join(kinds)}) are not Transformer, Pooling[, Normalize]"
    pool_module = modules[kinds.index("Pooling")]
    pool_dir = str(pool_module.get("path") or "1_Pooling")
    if Path(pool_dir).is_absolute() or ".." in Path(pool_dir).parts:
        return {}, f"its Pooling path {pool_dir!r} leaves the model directory"
    pool_cfg = _read_json(base / pool_dir / "config.json")
    modes = _pooling_modes(pool_cfg) if isinstance(pool_cfg, dict) else []
    if modes != [pooling.get("mode")]:
        return {}, f"its pooling ({', '.join(modes) or 'unreadable'}) is not the export's ({pooling.get('mode')})"
    if ("Normalize" in kinds) != bool(pooling.get("normalize")):
        return {}, "its Normalize module and the export's normalization disagree"
    # The Transformer is the export directory itself, whatever subfolder the base kept it in.
    layout = [{**m, "path": ""} if _kind(m) == "Transformer" else m for m in modules]
    files = {"modules.json": (json.dumps(layout, indent=2) + "\n").encode(),
             f"{pool_dir}/config.json": (base / pool_dir / "config.json").read_bytes()}
    for name in ST_CONFIGS:
        if (base / name).is_file() and isinstance(_read_json(base / name), dict):
            files[name] = (base / name).read_bytes()
    return files, None


def write_st_layout(directory, base_dir, pooling: dict | None, say=None) -> list[str]:
    """Write what `st_layout_plan` lists into the export `directory`; returns the paths written."""
    files, why_not = st_layout_plan(base_dir, pooling)
    if why_not and pooling and say:
        say(f"no sentence-transformers layout: {why_not}")
    for rel, data in files.items():
        target = Path(directory) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return sorted(files)
