"""Peak memory of a block of work: host RSS of this process and its children, and the accelerator's allocator peak.

    >>> with PeakMemory() as peak:
    ...     run_stage()
    >>> peak.host_bytes, peak.device_bytes

This process's own peak is exact on Linux: the kernel's high-water mark (VmHWM) is reset on entry and read on exit,
so a peak reached while a C extension holds the GIL is not missed. Child processes (llama.cpp's quantizer,
onnxruntime-genai's builder, profiling workers) are sampled every `interval` seconds, with this process, as one
tree; elsewhere than Linux the sampling is all there is. RSS includes file pages a
process has touched through mmap (safetensors, llama.cpp's GGUF loading): memory that is resident while the stage
runs, though the kernel can reclaim it. The private peak leaves those pages out: it is what must fit in the machine's
memory (sampled, so a peak shorter than `interval` can be missed).
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType

import psutil
import torch


def _status_bytes(pid: int | str, field: str) -> int | None:
    """A size field of /proc/<pid>/status (Linux, in kB there), in bytes; None where /proc does not say."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return None


def _file_backed_bytes(pid: int) -> int:
    """Resident pages of files `pid` maps (Linux's RssFile); 0 where /proc does not say."""
    return _status_bytes(pid, "RssFile") or 0


def process_tree_memory(process: psutil.Process | None = None) -> tuple[int, int]:
    """Resident and private bytes of a process and every process it started, now.

    Resident (RSS) counts the pages of files the processes map, a safetensors checkpoint read in place or a GGUF
    llama.cpp maps; the kernel can drop those and read them again. Private is the rest (RSS less its file-backed
    pages): anonymous and shared memory, which the processes cannot give back while they run. Where /proc is
    missing, private equals resident.
    """
    process = process or psutil.Process()
    resident = private = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            rss = member.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # a child that ended between listing and reading
        resident += rss
        private += rss - _file_backed_bytes(member.pid)
    return resident, private


def reset_peak_rss() -> bool:
    """Reset this process's high-water mark to its current RSS (Linux); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss(pid: int | str = "self") -> int | None:
    """A process's high-water mark of resident memory since start or the last reset (Linux), in bytes; this
    process's by default."""
    return _status_bytes(pid, "VmHWM")


class PeakMemory:
    """Context manager recording the peak host RSS (process tree), its peak private part (`process_tree_memory`;
    sampled only, while RSS also takes the kernel's own high-water mark) and the CUDA allocator's peak of what runs
    inside."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.host_bytes = 0
        self.private_bytes = 0
        self.device_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._exact = False

    def _sample(self) -> None:
        process = psutil.Process()
        while True:
            self._record(process_tree_memory(process))
            if self._stop.wait(self.interval):
                return

    def _record(self, memory: tuple[int, int]) -> None:
        self.host_bytes = max(self.host_bytes, memory[0])
        self.private_bytes = max(self.private_bytes, memory[1])

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._exact = reset_peak_rss()
        self.host_bytes, self.private_bytes = process_tree_memory()
        self._thread = threading.Thread(target=self._sample, name="slimllm-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._record(process_tree_memory())
        own_peak = peak_rss() if self._exact else None
        if own_peak is not None:
            self.host_bytes = max(self.host_bytes, own_peak)
        if torch.cuda.is_available():
            self.device_bytes = int(torch.cuda.max_memory_allocated())

    def to_dict(self) -> dict[str, int | None]:
        return {
            "peak_host_bytes": self.host_bytes,
            "peak_host_private_bytes": self.private_bytes,
            "peak_device_bytes": self.device_bytes,
        }
