import gc
import os

import pytest
import torch

from lexlora.training import memory
from lexlora.training.memory import (
    current_rss_bytes,
    describe_memory,
    max_peaks,
    peak_memory,
    peak_rss_bytes,
    reset_peak,
)

MB = 1024 * 1024
# The kernel syncs its per-thread RSS counters lazily: the peak can trail the current RSS a little.
SLACK = 4 * MB


def kernel_peak_rss():
    """The kernel's high-water mark of this process, read independently of lexlora (Linux: KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_cpu_report_is_the_process_peak_rss():
    reset_peak("cpu")  # a no-op on the CPU
    before = kernel_peak_rss()
    report = peak_memory("cpu")
    after = kernel_peak_rss()
    assert set(report) == {"device", "peak_rss_bytes"} and report["device"] == "cpu"
    assert before <= report["peak_rss_bytes"] <= after  # a high-water mark only grows
    assert report["peak_rss_bytes"] + SLACK >= current_rss_bytes()
    assert peak_memory()["device"] == "cpu"


def test_peak_rss_is_a_high_water_mark():
    # Collect earlier tests' garbage first: a collection between the readings would move the RSS by
    # more than the block under test (this failed once in the full suite).
    gc.collect()
    before = current_rss_bytes()
    block = torch.ones(96 * MB // 4)  # 96 MB, every page touched
    during = current_rss_bytes()
    assert during - before > 64 * MB
    del block
    assert peak_rss_bytes() + SLACK >= during
    assert current_rss_bytes() < during - 64 * MB  # freed: the current RSS falls, the peak stays


def test_current_rss_falls_back_to_the_peak_without_proc(monkeypatch):
    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(memory, "open", no_proc, raising=False)
    before = kernel_peak_rss()
    fallback = current_rss_bytes()
    assert before <= fallback <= kernel_peak_rss()


def test_peak_rss_falls_back_to_the_current_rss_without_getrusage(monkeypatch):
    monkeypatch.setattr(memory, "resource", None)
    with open("/proc/self/statm", encoding="ascii") as handle:
        pages = int(handle.read().split()[1])
    # The RSS moves a little between two readings; both are the resident pages of now, not the peak.
    assert abs(peak_rss_bytes() - pages * os.sysconf("SC_PAGE_SIZE")) < SLACK
    assert peak_rss_bytes() <= kernel_peak_rss() + SLACK


def test_describe_memory():
    assert describe_memory({"device": "cpu", "peak_rss_bytes": 512 * MB}) == (
        "peak memory on cpu: 512 MB resident (process peak RSS)"
    )
    cuda = {"device": "cuda:0", "peak_cuda_allocated_bytes": 1536 * MB, "peak_cuda_reserved_bytes": 2048 * MB}
    assert describe_memory(cuda) == "peak memory on cuda:0: 1,536 MB allocated, 2,048 MB reserved by PyTorch"


def test_max_peaks_takes_the_largest_figure_per_process():
    one = {"device": "cuda:0", "peak_cuda_allocated_bytes": 10, "peak_rss_bytes": 7}
    two = {"device": "cuda:1", "peak_cuda_allocated_bytes": 12, "peak_rss_bytes": 5}
    assert max_peaks([one]) == one
    merged = max_peaks([one, two])
    assert merged["peak_cuda_allocated_bytes"] == 12 and merged["peak_rss_bytes"] == 7
    assert merged["processes"] == 2 and merged["device"].startswith("cuda x2")


def test_cuda_device_without_cuda_reports_rss(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reset_peak("cuda")
    assert set(peak_memory("cuda")) == {"device", "peak_rss_bytes"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_follows_allocations_and_resets():
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.empty_cache()
    reset_peak(device)
    base = torch.cuda.memory_allocated(device)
    block = torch.empty(256 * MB, dtype=torch.uint8, device=device)
    report = peak_memory(device)
    assert report["device"] == f"cuda:{device.index}"
    assert report["peak_cuda_allocated_bytes"] >= base + 256 * MB
    assert report["peak_cuda_reserved_bytes"] >= report["peak_cuda_allocated_bytes"]
    del block
    reset_peak(device)
    assert peak_memory(device)["peak_cuda_allocated_bytes"] < base + 256 * MB
    assert "MB allocated" in describe_memory(report)


def test_without_resource_or_proc_the_figures_are_unknown_not_a_crash(monkeypatch):
    import sys

    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` raises ImportError
    monkeypatch.setattr(memory, "resource", None, raising=False)
    monkeypatch.setattr(memory, "open", no_proc, raising=False)
    assert peak_rss_bytes() is None and current_rss_bytes() is None
    report = peak_memory("cpu")
    assert report == {"device": "cpu", "peak_rss_bytes": None}
    assert describe_memory(report) == "peak memory on cpu: unknown (no process RSS figure on this system)"
    assert max_peaks([report, report])["peak_rss_bytes"] is None
    assert max_peaks([report, {"device": "cpu", "peak_rss_bytes": 5}])["peak_rss_bytes"] == 5
