"""Peak memory of a run: CUDA memory allocated (and reserved) by PyTorch on a GPU, the process's peak
resident set size (RSS) on the CPU. Training records it in the run's metrics and the adapter metadata.

On CUDA the peak is PyTorch's own counter, reset by `reset_peak` at the start of the run. On the CPU
it is the kernel's high-water mark of the process (getrusage's ru_maxrss), which cannot be reset: it
covers the whole process up to now, the data preparation and model loading included. A figure the
system does not give (neither getrusage nor /proc) is None, "unknown": never a failed run.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

try:
    import resource
except ImportError:  # not POSIX (Windows): no getrusage
    resource = None

MB = 1024 * 1024


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def peak_rss_bytes() -> int | None:
    """The process's peak resident set size so far (its high-water mark), in bytes; without
    getrusage, the current RSS is the best there is; None where neither can be read."""
    peak = _rusage_peak()
    return peak if peak is not None else _statm_rss()


def current_rss_bytes() -> int | None:
    """The process's resident set size now, in bytes (/proc/self/statm; the peak where there is
    none; None where neither can be read)."""
    now = _statm_rss()
    return now if now is not None else _rusage_peak()


def _rusage_peak() -> int | None:
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _statm_rss() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def reset_peak(device: str | torch.device | None = None) -> None:
    """Start a new peak on a CUDA device (a no-op on the CPU, whose high-water mark cannot be reset)."""
    device = _device(device)
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: str | torch.device | None = None) -> dict[str, Any]:
    """The peak since `reset_peak` on a CUDA device, else the process's peak RSS, as a JSON-ready dict:

    - CUDA: {"device": "cuda:0", "peak_cuda_allocated_bytes": ..., "peak_cuda_reserved_bytes": ...,
      "peak_rss_bytes": ...} (the RSS of the host process too, for completeness);
    - CPU:  {"device": "cpu", "peak_rss_bytes": ...}.
    """
    device = _device(device)
    if _is_cuda(device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.synchronize(index)
        return {
            "device": f"cuda:{index}",
            "peak_cuda_allocated_bytes": int(torch.cuda.max_memory_allocated(index)),
            "peak_cuda_reserved_bytes": int(torch.cuda.max_memory_reserved(index)),
            "peak_rss_bytes": peak_rss_bytes(),
        }
    return {"device": str(device), "peak_rss_bytes": peak_rss_bytes()}


def describe_memory(report: dict[str, Any]) -> str:
    """One line for people, from `peak_memory`'s dict."""
    device = report.get("device", "cpu")
    if "peak_cuda_allocated_bytes" in report:
        return (
            f"peak memory on {device}: {report['peak_cuda_allocated_bytes'] / MB:,.0f} MB allocated, "
            f"{report['peak_cuda_reserved_bytes'] / MB:,.0f} MB reserved by PyTorch"
        )
    if report.get("peak_rss_bytes") is None:
        return f"peak memory on {device}: unknown (no process RSS figure on this system)"
    return f"peak memory on {device}: {report['peak_rss_bytes'] / MB:,.0f} MB resident (process peak RSS)"


def max_peaks(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Several processes' `peak_memory` dicts as one: the largest figure of each kind, and the
    number of processes (e.g. `max_peaks(accelerate.utils.gather_object([peak_memory(device)]))`)."""
    merged: dict[str, Any] = {}
    for report in reports:
        for key, value in report.items():
            if key.endswith("_bytes"):  # None: unknown on that process
                known = [int(v) for v in (value, merged.get(key)) if v is not None]
                merged[key] = max(known) if known else None
            else:
                merged.setdefault(key, value)
    if len(reports) > 1:
        merged["device"] = f"{merged.get('device', '?').split(':')[0]} x{len(reports)} (largest per process)"
        merged["processes"] = len(reports)
    return merged
