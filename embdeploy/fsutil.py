"""Atomic directory output: write into a temporary sibling, rename when complete.

An interrupted run (exception, Ctrl-C, SIGKILL) leaves at most a directory named
`.<name>.partial-*`, which nothing takes for a finished artifact and the next
run removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import EmbdeployError

PARTIAL_MARK = ".partial-"


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise EmbdeployError(
            f"output directory {out} already exists; pass --overwrite to replace it "
            "or choose another --out"
        )
    if out.exists() and not out.is_dir():
        raise EmbdeployError(f"output path {out} exists and is not a directory; choose another --out")
    parent = out.resolve().parent
    if parent.exists() and not parent.is_dir():  # caught here, not after minutes of work
        raise EmbdeployError(f"cannot create {out}: {parent} is a file, not a directory; choose a writable --out")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EmbdeployError(f"cannot create the parent directory of {out}: {e.strerror}; choose a writable --out") from None
    if not os.access(parent, os.W_OK):
        raise EmbdeployError(f"cannot write to {parent} (read-only or no permission); choose a writable --out")


def _owner_alive(name: str) -> bool:
    """Partial dirs are named .NAME.partial-PID-XXXX; True while PID is a running process."""
    rest = name.rsplit(PARTIAL_MARK, 1)[-1]
    pid = rest.split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary directory; on success it replaces `out` in one rename."""
    out = Path(out)
    check_output_dir(out, overwrite)
    parent = out.resolve().parent
    for stale in parent.glob(f".{out.name}{PARTIAL_MARK}*"):
        if not _owner_alive(stale.name):  # leave another live process's work in progress alone
            shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL_MARK}{os.getpid()}-", dir=parent))
        tmp.chmod(0o755)
    except OSError as e:
        raise EmbdeployError(f"cannot write to {parent}: {e.strerror}; choose a writable --out") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = parent / f".{out.name}{PARTIAL_MARK}old"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
