"""Per-job peak memory: CUDA peak statistics on GPU; on CPU the kernel's peak RSS (reset per job), else sampled."""

from __future__ import annotations

from typing import Any

import torch


def max_rss() -> int:
    """This process's lifetime peak resident set size (ru_maxrss), in bytes."""
    import resource
    import sys

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim), so resident memory is what is in use."""
    import contextlib
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # another C library (musl) has no malloc_trim
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak resident set size (VmHWM) of this process to its current size (Linux >= 4.0:
    '5' to /proc/self/clear_refs); False where that file is absent or not writable (macOS, some containers)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return peak_rss() is not None
    except OSError:
        return False


def peak_rss() -> int | None:
    """VmHWM, the peak resident set size since the process started or since `reset_peak_rss`, in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss() -> int | None:
    """This process's resident set size now, in bytes: /proc/self/statm, else psutil when installed, else None."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


class JobMemory:
    """The peak memory of one job, also when several jobs run in one process (Hydra's basic launcher, joblib workers).

    `start()` at the beginning of the job collects what earlier jobs left (gc, CUDA's cached blocks, the C heap's
    free pages) and resets the peaks; `read()` is the peak since then, as (bytes, kind):
    - cuda_max_allocated: torch.cuda.max_memory_allocated on a CUDA job, its peak statistics reset at start;
    - cpu_job_peak_rss: the kernel's peak resident set size (VmHWM), reset at start through /proc/self/clear_refs;
    - cpu_job_sampled_rss: where that cannot be reset, the largest resident size a daemon thread saw, every 20 ms
      (a shorter peak between two samples is missed);
    - cpu_max_rss: where neither works, the process's lifetime peak (ru_maxrss), which includes earlier jobs.
    """

    SAMPLE_S = 0.02

    def __init__(self) -> None:
        self.kind = "cpu_max_rss"
        self.device: torch.device | None = None  # where the job computes (FineTuneModule sets it); None: not known yet
        self._sampled = 0
        self._stop: Any = None
        self._thread: Any = None

    def start(self) -> JobMemory:
        import gc

        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # else nothing ran there: its peaks are 0
            torch.cuda.empty_cache()
            for device in range(torch.cuda.device_count()):  # the job may compute on another one than the last
                torch.cuda.reset_peak_memory_stats(device)
        release_free_heap()
        if reset_peak_rss():
            self.kind = "cpu_job_peak_rss"
        elif current_rss() is not None:
            self.kind = "cpu_job_sampled_rss"
            self._start_sampling()
        return self

    def _start_sampling(self) -> None:
        import threading

        self._sampled = current_rss() or 0
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.SAMPLE_S):
                self._sampled = max(self._sampled, current_rss() or 0)

        self._thread = threading.Thread(target=sample, name="lit-peft-job-memory", daemon=True)
        self._thread.start()

    def read(self) -> tuple[int, str]:
        """(peak bytes since start, kind)."""
        if self.device is not None:
            on_cuda = self.device.type == "cuda"
        else:
            on_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if on_cuda:
            return int(torch.cuda.max_memory_allocated(self.device)), "cuda_max_allocated"
        if self.kind == "cpu_job_peak_rss":
            peak = peak_rss()
            if peak is not None:
                return peak, self.kind
        if self.kind == "cpu_job_sampled_rss":
            return max(self._sampled, current_rss() or 0), self.kind
        return max_rss(), "cpu_max_rss"

    def stop(self) -> None:
        """End the sampling thread (if any); `read` keeps answering with what was seen."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
