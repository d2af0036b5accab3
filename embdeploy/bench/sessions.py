"""ONNX Runtime sessions configured the way the benchmark measures them.

Threads: one intra-op thread, one inter-op thread, sequential execution by
default. With two intra-op threads on a shared two-core machine, two identical
graphs differed by up to 15% at p50 from one run to the next; with one thread
the interleaved ratios repeat within a few percent (see perf/README.md).
"""

from __future__ import annotations

import numpy as np

from .. import ort as _ort
from ..errors import EmbdeployError

ort = _ort.import_ort


def provider_name(provider: str) -> str:
    try:
        return _ort.PROVIDER_ALIASES[provider.lower()]
    except KeyError:
        raise EmbdeployError(
            f"unknown provider {provider!r}; use one of {', '.join(_ort.PROVIDER_ALIASES)} (e.g. --providers cpu,cuda)"
        ) from None


def session_options(threads: int = 1, disable_prepacking: bool = False):
    return _ort.session_options(threads, sequential=True, disable_prepacking=disable_prepacking)


def provider_list(provider: str):
    name = provider_name(provider)
    if name == _ort.CUDA:
        # kSameAsRequested: the arena grows by what is asked, so reported GPU memory means something.
        return [(name, {"device_id": 0, "arena_extend_strategy": "kSameAsRequested"}), _ort.CPU]
    return [name]


def create_session(model_path, provider: str = "cpu", threads: int = 1, so=None):
    """A session timed as the benchmark measures; a provider that falls back is refused (no CPU timings as CUDA)."""
    return _ort.create_session(model_path, provider_list(provider), so if so is not None else session_options(threads))


def cuda_unavailable_reason() -> str | None:
    """None when CUDA sessions can run here, else why not (said plainly, never guessed)."""
    rt = ort()
    available = rt.get_available_providers()
    if _ort.CUDA not in available:
        return (
            f"onnxruntime {rt.__version__} here has no CUDAExecutionProvider (available: {', '.join(available)}); "
            "install `embdeploy[gpu]` (onnxruntime-gpu, not alongside onnxruntime) on a machine with an NVIDIA GPU"
        )
    return None


def add_table(so, name: str, table: np.ndarray, keep: list) -> None:
    """Supply initializer `name` from `table` instead of the file; `keep` holds the array for the caller."""
    table = np.ascontiguousarray(table)
    keep.append(table)
    _ort.add_initializer(so, name, table)


def swap_options(ext_name: str, table: np.ndarray, threads: int, keep: list, disable_prepacking: bool = False):
    """SessionOptions that give a swap export another (K, H) extension table.

    Goes through embdeploy.ort.swap_session_options, the call a production
    service makes, when `ext_name` is the name the rewrite uses.
    """
    from ..onnx import EXT_EMBED

    so = session_options(threads, disable_prepacking)
    if ext_name == EXT_EMBED:
        keep.append(table)
        return _ort.swap_session_options(so, table)
    add_table(so, ext_name, table, keep)
    return so
