"""ONNX Runtime sessions configured the way the benchmark measures them.

Threads: one intra-op thread, one inter-op thread, sequential execution by
default. With two intra-op threads on a shared two-core machine, two identical
graphs differed by up to 15% at p50 from one run to the next; with one thread
the interleaved ratios repeat within a few percent (see perf/README.md).
"""

from __future__ import annotations

import numpy as np

from ..errors import EmbdeployError
from ..ortimport import import_ort

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


ort = import_ort  # kept as a name: callers in this package use it


def provider_name(provider: str) -> str:
    try:
        return PROVIDERS[provider.lower()]
    except KeyError:
        raise EmbdeployError(
            f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)} (e.g. --providers cpu,cuda)"
        ) from None


def session_options(threads: int = 1, disable_prepacking: bool = False):
    rt = ort()
    so = rt.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = rt.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if disable_prepacking:
        # MatMul/Gemm weights are otherwise re-laid out into a private buffer per session.
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def provider_list(provider: str):
    name = provider_name(provider)
    if name == "CUDAExecutionProvider":
        # kSameAsRequested: the arena grows by what is asked, so reported GPU memory means something.
        return [(name, {"device_id": 0, "arena_extend_strategy": "kSameAsRequested"}), "CPUExecutionProvider"]
    return [name]


def create_session(model_path, provider: str = "cpu", threads: int = 1, so=None):
    rt = ort(cuda=provider_name(provider) == "CUDAExecutionProvider")
    so = so if so is not None else session_options(threads)
    try:
        return rt.InferenceSession(str(model_path), so, providers=provider_list(provider))
    except Exception as e:  # ORT raises its own exception types with the cause in the message
        raise EmbdeployError(f"onnxruntime could not load {model_path}: {e}") from None


def cuda_unavailable_reason() -> str | None:
    """None when CUDA sessions can run here, else why not (said plainly, never guessed)."""
    rt = ort()
    available = rt.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        return (
            f"onnxruntime {rt.__version__} here has no CUDAExecutionProvider (available: {', '.join(available)}); "
            "install `embdeploy[gpu]` (onnxruntime-gpu, not alongside onnxruntime) on a machine with an NVIDIA GPU"
        )
    return None


def add_table(so, name: str, table: np.ndarray, keep: list) -> None:
    """Supply initializer `name` from `table` instead of the file.

    ORT keeps a pointer into the numpy buffer, not a reference to it: the array
    and its OrtValue must outlive every session made from `so` (a freed
    OrtValue crashed session creation in measurement), hence `keep`.
    """
    rt = ort()
    table = np.ascontiguousarray(table)
    value = rt.OrtValue.ortvalue_from_numpy(table)
    keep.append((table, value))
    so.add_initializer(name, value)


def swap_options(ext_name: str, table: np.ndarray, threads: int, keep: list, disable_prepacking: bool = False):
    """SessionOptions that give a swap export another (K, H) extension table.

    Goes through embdeploy.onnx.rewrite.swap_session_options, the call a
    production service makes, when `ext_name` is the name that rewrite uses.
    """
    from ..onnx.rewrite import EXT_EMBED, swap_session_options

    so = session_options(threads, disable_prepacking)
    if ext_name == EXT_EMBED:
        keep.append(table)
        return swap_session_options(so, table)
    add_table(so, ext_name, table, keep)
    return so
