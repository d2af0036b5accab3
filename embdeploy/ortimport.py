"""The one place onnxruntime is imported by code that needs it, with the fix in the error."""

from __future__ import annotations

import contextlib
import io

from .errors import EmbdeployError

CUDA = "CUDAExecutionProvider"
_preloaded = False


def import_ort(cuda: bool = False):
    """The onnxruntime module; an EmbdeployError naming the extra to install when it is missing.

    cuda=True (the caller is about to open a CUDA session) first loads the CUDA
    and cuDNN libraries that onnxruntime-gpu's `cuda`/`cudnn` extras install as
    nvidia-* wheels. Without that, a process that has not imported a CUDA build
    of torch finds none of them and ORT quietly falls back to the CPU.
    """
    try:
        import onnxruntime
    except ImportError:
        raise EmbdeployError(
            "onnxruntime is not installed; install `embdeploy[cpu]` (or `embdeploy[gpu]` on a CUDA machine)"
        ) from None
    if cuda:
        _preload_cuda(onnxruntime)
    return onnxruntime


def _preload_cuda(ort) -> None:
    global _preloaded
    if _preloaded or CUDA not in ort.get_available_providers() or not hasattr(ort, "preload_dlls"):
        return
    _preloaded = True
    # preload_dlls prints its findings to stdout, which would spoil `--json` output.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
        ort.preload_dlls()
    # What is still missing shows as a session that runs on CPU; callers check for that and say so.


def wants_cuda(providers) -> bool:
    """Whether an ORT provider list (names or (name, options) pairs) asks for CUDA."""
    return any((p[0] if isinstance(p, (tuple, list)) else p) == CUDA for p in providers)


def require_provider(sess, wanted: str, model_path) -> None:
    """Refuse a session that silently fell back from `wanted` (ORT only logs a warning)."""
    used = sess.get_providers()
    if wanted not in used:
        raise EmbdeployError(
            f"ONNX Runtime could not start {wanted} for {model_path} (the session would run on {', '.join(used)}); "
            "check nvidia-smi and that onnxruntime-gpu's CUDA and cuDNN libraries are installed "
            "(`pip install onnxruntime-gpu[cuda,cudnn]`), or use the CPU provider"
        )
