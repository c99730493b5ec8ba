"""Peak memory of a block of work: host RSS of this process and its children, and the accelerator's allocator peak.

    >>> with PeakMemory() as peak:
    ...     run_stage()
    >>> peak.host_bytes, peak.device_bytes

Host memory is sampled (every `interval` seconds) because the kernel keeps only a process-lifetime maximum; child
processes count (llama.cpp's quantizer, onnxruntime-genai's builder, profiling workers). RSS includes file pages a
process has touched through mmap (safetensors, llama.cpp's GGUF loading): memory that is resident while the stage
runs, though the kernel can reclaim it.
"""

from __future__ import annotations

import threading
from types import TracebackType

import psutil
import torch


def process_tree_rss(process: psutil.Process | None = None) -> int:
    """Resident bytes of a process and every process it started, now."""
    process = process or psutil.Process()
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # a child that ended between listing and reading
    return total


class PeakMemory:
    """Context manager recording the peak host RSS (process tree) and CUDA allocator peak of what runs inside."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.host_bytes = 0
        self.device_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        process = psutil.Process()
        while True:
            self.host_bytes = max(self.host_bytes, process_tree_rss(process))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.host_bytes = process_tree_rss()
        self._thread = threading.Thread(target=self._sample, name="slimllm-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.host_bytes = max(self.host_bytes, process_tree_rss())
        if torch.cuda.is_available():
            self.device_bytes = int(torch.cuda.max_memory_allocated())

    def to_dict(self) -> dict[str, int | None]:
        return {"peak_host_bytes": self.host_bytes, "peak_device_bytes": self.device_bytes}
