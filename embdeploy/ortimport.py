"""The one place onnxruntime is imported by code that needs it, with the fix in the error."""

from __future__ import annotations

from .errors import EmbdeployError


def import_ort():
    """The onnxruntime module; an EmbdeployError naming the extra to install when it is missing."""
    try:
        import onnxruntime
    except ImportError:
        raise EmbdeployError(
            "onnxruntime is not installed; install `embdeploy[cpu]` (or `embdeploy[gpu]` on a CUDA machine)"
        ) from None
    return onnxruntime
