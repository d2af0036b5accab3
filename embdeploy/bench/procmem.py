"""Process memory as the kernel counts it (Linux /proc; psutil elsewhere).

RSS alone misleads here: ONNX Runtime memory-maps external-data initializers,
a page counts in RSS only once touched, and the same file page mapped by two
sessions counts twice in RSS but exists once in the page cache. So three
numbers are kept apart:

- private: anonymous resident memory (RssAnon), copies the process owns;
- mapped: bytes of the given files mapped into the process, each file range
  counted once however many sessions map it (virtual size: what becomes
  resident once every row has been looked up);
- rss: the plain resident set, for reference.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

MB = 1 << 20


def status() -> dict[str, float]:
    """{'rss', 'private', 'hwm'} in bytes."""
    if sys.platform.startswith("linux") and os.path.exists("/proc/self/status"):
        out = {}
        keys = {"VmRSS": "rss", "RssAnon": "private", "VmHWM": "hwm"}
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[keys[k]] = int(v.split()[0]) * 1024
        return out
    import psutil

    info = psutil.Process().memory_full_info()
    import resource

    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm = hwm if sys.platform == "darwin" else hwm * 1024
    return {"rss": info.rss, "private": getattr(info, "uss", info.rss), "hwm": hwm}


def mapped_bytes(files) -> dict[str, int]:
    """Bytes of each file in `files` mapped into this process, overlapping mappings counted once."""
    files = {str(Path(f).resolve()) for f in files}
    ranges: dict[str, list[tuple[int, int]]] = {}
    if not os.path.exists("/proc/self/maps"):
        return {}
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 6:
                continue
            path = parts[5].strip()
            if path not in files:
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            offset = int(parts[2], 16)
            ranges.setdefault(path, []).append((offset, offset + end - start))
    return {path: _union_size(r) for path, r in ranges.items()}


def mapped_ranges(path) -> list[tuple[int, int]]:
    """File ranges of `path` mapped into this process."""
    path = str(Path(path).resolve())
    out = []
    if not os.path.exists("/proc/self/maps"):
        return out
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == path:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                offset = int(parts[2], 16)
                out.append((offset, offset + end - start))
    return out


def covered(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether [start, end) lies inside the union of `ranges`."""
    pos = start
    for a, b in sorted(ranges):
        if a > pos:
            break
        pos = max(pos, b)
        if pos >= end:
            return True
    return pos >= end


def _union_size(ranges: list[tuple[int, int]]) -> int:
    total, cur_a, cur_b = 0, None, None
    for a, b in sorted(ranges):
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        total += cur_b - cur_a
    return total


def _nvidia_smi(*query: str) -> list[str] | None:
    """nvidia-smi's CSV lines for `query`; None where it is missing or fails."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", *query], capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    return out.strip().splitlines()


def gpu_used_mb(pid: int | None = None) -> float | None:
    """GPU memory that process `pid` holds, from nvidia-smi; None when it cannot be read."""
    pid = os.getpid() if pid is None else pid
    lines = _nvidia_smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
    if lines is None:
        return None
    total, found = 0.0, False
    for line in lines:
        p, _, used = line.partition(",")
        if p.strip() == str(pid):
            found = True
            try:
                total += float(used)
            except ValueError:
                return None
    # In a container nvidia-smi may not see this PID namespace: say "unknown", not 0.
    return total if found else None


def gpu_description() -> str | None:
    """'NAME, N MiB, driver D' for the first GPU, from nvidia-smi; None without one."""
    lines = _nvidia_smi("--query-gpu=name,memory.total,driver_version", "--format=csv,noheader")
    if not lines:
        return None
    name, memory, driver = (x.strip() for x in (lines[0].split(",") + ["", ""])[:3])
    return f"{name}, {memory}, driver {driver}"
