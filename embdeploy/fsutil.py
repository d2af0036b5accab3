"""Safe output: write into a temporary sibling, rename when complete, never destroy what embdeploy did not write.

An interrupted run (exception, Ctrl-C, SIGTERM, SIGKILL) leaves at most a
directory named `.<name>.partial-*`, which nothing takes for a finished
artifact and the next run removes.

`--overwrite` replaces only an artifact of the kind being written (a directory
holding that kind's manifest), never an input of the same command, the current
directory or one of its parents. The existence check is repeated at the final
rename, so a second writer that finished first is not silently replaced.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

from .errors import EmbdeployError

PARTIAL_MARK = ".partial-"

# kind -> (the file that marks a directory as that kind of embdeploy artifact, what users call it)
ARTIFACTS = {
    "extension": ("extension.json", "an extension directory"),
    "export": ("embdeploy.json", "an ONNX export directory"),
    "merged-model": ("embdeploy-merge.json", "a merged model directory (embdeploy merge)"),
    "checkpoint": ("state.json", "a training checkpoint"),
}
_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _absolute(p: str | Path) -> Path:
    """The absolute path with its parent resolved and its last component kept (a symlink stays a symlink)."""
    a = Path(os.path.abspath(p))
    return a.parent.resolve() / a.name if a.name else a.resolve()


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def artifact_kind(d: Path) -> str | None:
    """Which kind of embdeploy artifact `d` is (by its manifest file), or None."""
    for kind, (marker, _) in ARTIFACTS.items():
        if (d / marker).is_file():
            return kind
    return None


def _refuse_overwrite(out: Path, kind: str | None) -> str | None:
    """Why `--overwrite` may not replace the existing directory `out`, or None when it may."""
    found = artifact_kind(out)
    want = ARTIFACTS[kind][1] if kind else "an embdeploy artifact"
    if found is None:
        try:
            n = sum(1 for _ in out.iterdir())
        except OSError:
            n = 0
        if n == 0:
            return None  # an empty directory loses nothing
        return (f"--overwrite replaces only what embdeploy wrote, and {out} is not {want} "
                f"(no {ARTIFACTS[kind][0] if kind else 'embdeploy manifest'}; it holds {n} other entr{'y' if n == 1 else 'ies'}); "
                "nothing was deleted. Choose another --out, or move that directory away yourself")
    if kind is not None and found != kind:
        return (f"--overwrite would replace {out}, which is {ARTIFACTS[found][1]}, with {ARTIFACTS[kind][1]}; "
                "nothing was deleted. Choose another --out")
    return None


def check_output_dir(out: str | Path, overwrite: bool, kind: str | None = None, inputs=()) -> None:
    """Refuse an output path before any work: taken, unsafe to replace, an input, or not writable.

    `kind` is the ARTIFACTS kind about to be written (what `--overwrite` may replace);
    `inputs` are the paths the command reads, which its output may neither be nor contain.
    """
    given = Path(out)
    out = _absolute(out)
    cwd = Path.cwd().resolve()
    if _is_within(cwd, out.resolve() if out.exists() else out):
        raise EmbdeployError(
            f"--out {given} is the current directory or one of its parents; writing it would replace the "
            "directory you are working in. Pass a new directory, e.g. --out ./out"
        )
    for src in inputs:
        if src is None or not str(src) or not Path(src).exists():
            continue
        src_abs = Path(src).resolve()
        target = out.resolve() if out.exists() else out
        if _is_within(src_abs, target):
            what = "is" if src_abs == target else "contains"
            raise EmbdeployError(
                f"--out {given} {what} {src}, an input of this command; writing it would destroy the input. "
                "Choose another --out"
            )
    if out.is_symlink():
        target = os.readlink(out)
        raise EmbdeployError(
            f"--out {given} is a symbolic link (to {target}{'' if out.exists() else ', which does not exist'}); "
            "embdeploy replaces a directory in one rename and will not follow or replace a link. "
            "Pass the real directory path, or another --out"
        )
    if out.exists() and not out.is_dir():
        raise EmbdeployError(f"output path {given} exists and is not a directory; choose another --out")
    if out.exists():
        if not overwrite:
            raise EmbdeployError(
                f"output directory {given} already exists; pass --overwrite to replace it or choose another --out"
            )
        why = _refuse_overwrite(out, kind)
        if why:
            raise EmbdeployError(why)
    parent = out.parent
    if parent.exists() and not parent.is_dir():  # caught here, not after minutes of work
        raise EmbdeployError(f"cannot create {given}: {parent} is a file, not a directory; choose a writable --out")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EmbdeployError(f"cannot create the parent directory of {given}: {e.strerror}; choose a writable --out") from None
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


def _size_mb(d: Path) -> float:
    total = 0
    for root, _, files in os.walk(d):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total / 1e6


def no_space(e: BaseException) -> bool:
    """True for 'disk full' however the library that hit it reports it (OSError, or a wrapped message)."""
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
        return True
    text = str(e)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def _space_error(where: Path, written_mb: float) -> EmbdeployError:
    try:
        free = shutil.disk_usage(where).free / 1e6
        free_text = f", {free:.0f} MB free now"
    except OSError:
        free_text = ""
    return EmbdeployError(
        f"no space left on the device holding {where} (this run had written {written_mb:.0f} MB when it ran out"
        f"{free_text}; it needs at least that much more); the partial output was removed. Free space, or "
        "choose an --out (and --cache-dir) on another disk"
    )


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False, kind: str | None = None, inputs=()):
    """Yield a temporary directory; on success it becomes `out` in one rename.

    The checks of `check_output_dir` run again at the rename: something that appeared at
    `out` meanwhile is refused (the finished output is discarded, with a message) unless
    `overwrite`, and even then only if it is an artifact of the same kind.
    """
    given = out
    check_output_dir(out, overwrite, kind, inputs)
    out = _absolute(out)
    parent = out.parent
    for stale in parent.glob(f".{out.name}{PARTIAL_MARK}*"):
        if not _owner_alive(stale.name):  # leave another live process's work in progress alone
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    stale.unlink()
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL_MARK}{os.getpid()}-", dir=parent))
        tmp.chmod(0o755)
    except OSError as e:
        raise EmbdeployError(f"cannot write to {parent}: {e.strerror}; choose a writable --out") from None
    try:
        yield tmp
        _commit(tmp, out, given, overwrite, kind)
    except BaseException as e:
        written = _size_mb(tmp) if tmp.exists() else 0.0
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, EmbdeployError) and no_space(e):
            raise _space_error(parent, written) from None
        raise


def umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _publish(tmp: Path) -> None:
    """Every file and directory gets the mode a normal one would (some writers use 0600 temp files)."""
    mask = umask()
    for root, dirs, files in os.walk(tmp):
        os.chmod(root, 0o777 & ~mask)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def _commit(tmp: Path, out: Path, given, overwrite: bool, kind: str | None) -> None:
    _publish(tmp)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise EmbdeployError(
            f"{given} appeared while this run was writing and is not a directory; this run's output was "
            "discarded. Choose another --out"
        )
    if out.exists():
        if not overwrite:
            raise EmbdeployError(
                f"output directory {given} appeared while this run was writing (another run writing to the same "
                "--out?); it was left as it is and this run's output was discarded. Pass --overwrite to replace "
                "it, or choose another --out"
            )
        why = _refuse_overwrite(out, kind)
        if why:
            raise EmbdeployError(why)
        old = out.parent / f".{out.name}{PARTIAL_MARK}{os.getpid()}-old"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            old.rename(out)  # put the previous artifact back rather than leave nothing
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        # rename(2) onto an existing non-empty directory fails (ENOTEMPTY/EEXIST), so a writer that
        # won the race after the check above is still not replaced.
        os.rename(tmp, out)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise EmbdeployError(
                f"output directory {given} appeared while this run was writing (another run writing to the same "
                "--out?); it was left as it is and this run's output was discarded. Pass --overwrite to replace "
                "it, or choose another --out"
            ) from None
        raise EmbdeployError(f"cannot move the finished output into {given}: {e.strerror}; choose another --out") from None


def check_regular_file(path: str | Path, what: str, fix: str) -> Path:
    """Refuse a path that is not a regular file (a FIFO, /dev/zero, a socket, a directory) before reading it."""
    p = Path(path)
    if not p.exists():
        raise EmbdeployError(f"{what} {p} does not exist; {fix}")
    if p.is_dir():
        raise EmbdeployError(f"{what} {p} is a directory; {fix}")
    mode = p.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
                else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise EmbdeployError(f"{what} {p} is {kind}, which embdeploy will not read (it may never end); {fix}")
    return p
