"""Measuring tools shared by the benchmarks: timing, the machine's matmul peak, peak memory, the page cache (cold
reads and the thread-pool `pread` floor), the machine's description, and the printed table and JSON file every
benchmark ends with."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from mole_jax.row_sources import release_pages
from mole_jax.train_step import matmul_peak_flops  # noqa: F401  (bench's peak: one function)


def block(x):
    return jax.block_until_ready(x)


def time_calls(fn: Callable[[], Any], *, warmup: int = 2, iters: int = 10) -> list[float]:
    """Seconds per call of `fn` (which must return JAX values; we block on them), after `warmup` calls."""
    for _ in range(warmup):
        block(fn())
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        block(fn())
        out.append(time.perf_counter() - t0)
    return out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def peak_rss_bytes() -> int:
    """Peak resident memory of this process's program so far: Linux's VmHWM, the high-water mark of the address
    space its exec made. Not ru_maxrss, which Linux carries over an exec from the address space replaced (a worker
    spawned by a parent of 2 GiB reports at least 2 GiB); ru_maxrss only where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def drop_page_cache(root: str | Path) -> int:
    """Evict every file under `root` from the page cache (flushed first: dirty pages cannot be dropped), so that
    the next read of it goes to the disk. Returns the bytes dropped; 0 where the OS has no posix_fadvise (the
    caller's first-read timing then shows a warm cache)."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    dropped = 0
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            dropped += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return dropped


def release_mapped(arrays) -> None:
    """Drop this process's pages of memory-mapped arrays (numpy arrays, or JAX CPU arrays aliasing a mapping): a
    file mapping then faults its pages in again, from the page cache or, after drop_page_cache, from the disk."""
    for a in arrays:
        release_pages(a.ctypes.data if isinstance(a, np.ndarray) else a.unsafe_buffer_pointer(), a.nbytes)


def read_seconds(path: str | Path, chunk: int = 1 << 20) -> float:
    """Seconds to read the whole file once (to tell a cold read from a warm one)."""
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(chunk):
            pass
    return time.perf_counter() - t0


class PreadPool:
    """Concurrent `os.pread`s of byte ranges: every range of a batch in flight at once (queue depth = the batch),
    the floor that a storage reader is compared against."""

    def __init__(self, workers: int = 32):
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.fds: dict[str, int] = {}

    def read(self, ranges: Sequence[tuple[str, int, int]]) -> list[bytes]:
        """The bytes of each (path, offset, size), read concurrently."""
        for path, _, _ in ranges:
            if path not in self.fds:
                self.fds[path] = os.open(path, os.O_RDONLY)
        return list(self.pool.map(lambda r: os.pread(self.fds[r[0]], r[2], r[1]), ranges))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.pool.shutdown()


def machine() -> dict[str, Any]:
    """What a figure was measured on: the device, and the host's CPU and the cores this process may use (on CPU
    they are the device; elsewhere they feed it), so that two machines' figures can be told apart."""
    dev = jax.devices()[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
            "device_count": jax.device_count(), "jax": jax.__version__, "host_cpu": host_cpu(), "host_cores": cores}


def host_cpu() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(rows: list[dict[str, Any]], columns: Sequence[str], file=sys.stdout) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)), file=file)
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)), file=file)


def write_json(path: str | Path | None, payload: Any) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
