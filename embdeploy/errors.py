"""User-facing errors.

Every error a user can cause by what they pass in is an `EmbdeployError`: the CLI
prints its message (no traceback) and exits non-zero. Messages name the thing
that is wrong and what to do instead.
"""

from __future__ import annotations


class EmbdeployError(Exception):
    """A problem with the user's input, files or environment, with the fix in the message."""

    exit_code = 2


class FingerprintMismatch(EmbdeployError):
    """An artifact was attached to a base model whose embedding table differs."""


class ValidationFailed(EmbdeployError):
    """ONNX Runtime outputs did not match PyTorch within tolerance."""

    exit_code = 3


class RegressionDetected(EmbdeployError):
    """A benchmark ratio got worse than the committed baseline by more than the margin."""

    exit_code = 4


def raise_all(problems: list[str], header: str) -> None:
    """Raise once with every problem listed, so users fix them in one run."""
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise EmbdeployError(f"{header}\n{lines}")
