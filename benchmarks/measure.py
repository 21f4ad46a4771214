"""Measuring tools of the benchmark suite: interleaved timing, peak memory, and this machine's limits.

Every case runs its variants side by side, one repeat of each in turn, so that a noisy neighbour slows
all variants of a repeat alike and per-repeat ratios stay stable. Peak resident memory is measured per
call by resetting the kernel's high-water mark (`/proc/self/clear_refs`), with a sampling thread where
that is not allowed.
"""

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

MIB = 1 << 20
PROC_STATUS = "/proc/self/status"
RESET_PEAK_RSS = "/proc/self/clear_refs"
SAMPLING_INTERVAL_S = 0.005
# Pause before each timed call (see measure_interleaved).
SETTLE_SECONDS = 0.05


# ----- memory -------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int | None:
    try:
        with open(PROC_STATUS, encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mib() -> float:
    """Resident memory of this process now (0 where /proc is unavailable)."""
    return (_status_kib("VmRSS") or 0) / 1024


def _reset_peak_rss() -> bool:
    """Sets the kernel's peak-RSS counter (VmHWM) to the current RSS; False where that is not permitted."""
    try:
        with open(RESET_PEAK_RSS, "w", encoding="ascii") as handle:
            handle.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


class PeakMemory:
    """Peak resident memory (and peak GPU memory on CUDA) of this process during a `with` block.

    Example:
    ```python
    >>> with PeakMemory() as memory:
    ...     data = bytearray(200 << 20)
    >>> memory.growth_mib >= 199
    True
    ```
    """

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.before_mib = self.peak_mib = 0.0
        self.gpu_peak_mib = None
        self._sampler = None
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        self.before_mib = current_rss_mib()
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if not _reset_peak_rss():
            self.peak_mib = self.before_mib
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLING_INTERVAL_S):
            self.peak_mib = max(self.peak_mib, current_rss_mib())

    def __exit__(self, *exc_info) -> None:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self.peak_mib = max(self.peak_mib, current_rss_mib())
        else:
            self.peak_mib = (_status_kib("VmHWM") or 0) / 1024
        if self.device is not None and self.device.type == "cuda":
            self.gpu_peak_mib = torch.cuda.max_memory_allocated(self.device) / MIB

    @property
    def growth_mib(self) -> float:
        """How far memory rose above its level at the start of the block."""
        return max(self.peak_mib - self.before_mib, 0.0)


# ----- timing -------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Samples:
    """Repeated measurements of one variant: seconds per repeat and memory of the worst repeat."""

    seconds: list[float] = field(default_factory=list)
    peak_rss_mib: float = 0.0
    rss_growth_mib: float = 0.0
    gpu_peak_mib: float | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread_pct(self) -> float:
        """(slowest - fastest) / median, in percent: how much the repeats disagree."""
        return 100 * (max(self.seconds) - min(self.seconds)) / self.median_s if self.seconds else float("nan")

    def rate(self, work: float) -> float:
        """`work` units per second at the median time (e.g. pairs/s, images/s)."""
        return work / self.median_s

    def add(self, seconds: float, memory: PeakMemory) -> None:
        self.seconds.append(seconds)
        self.peak_rss_mib = max(self.peak_rss_mib, memory.peak_mib)
        self.rss_growth_mib = max(self.rss_growth_mib, memory.growth_mib)
        if memory.gpu_peak_mib is not None:
            self.gpu_peak_mib = max(self.gpu_peak_mib or 0.0, memory.gpu_peak_mib)


def time_call(run: Callable[[], object], device: torch.device) -> tuple[float, PeakMemory]:
    """Wall time (GPU work included) and peak memory of one call."""
    with PeakMemory(device) as memory:
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        elapsed = time.perf_counter() - start
    return elapsed, memory


def measure_interleaved(
    variants: Mapping[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, Samples]:
    """Runs every variant once per repeat, in turn, and collects their `Samples`.

    Interleaving keeps ratios stable when the machine's speed drifts: a slow stretch hits every variant.

    Example:
    ```python
    >>> samples = measure_interleaved({"sorted": lambda: sorted(data), "heap": lambda: heapq.nsmallest(10, data)},
    ...                               repeats=5, device=torch.device("cpu"))
    >>> paired_ratio(samples["sorted"], samples["heap"])  # how many times faster "heap" is
    ```
    """
    results = {name: Samples() for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            # Untimed: lets the worker threads the previous variant woke (OpenMP, OpenBLAS, faiss) stop
            # spinning, so that no variant pays for another's thread pool on shared cores.
            time.sleep(SETTLE_SECONDS)
            results[name].add(*time_call(run, device))
    return results


def keeping_results(variants: Mapping[str, Callable[[], object]]) -> tuple[dict[str, Callable[[], None]], dict]:
    """`(wrapped variants, results)`: each wrapped variant stores what it returns in `results[name]`, so the
    correctness checks reuse the outputs of the timed runs instead of paying for extra ones."""
    results = {}

    def keeping(name: str, run: Callable[[], object]) -> Callable[[], None]:
        return lambda: results.__setitem__(name, run())

    return {name: keeping(name, run) for name, run in variants.items()}, results


def paired_ratio(slow: Samples, fast: Samples) -> float:
    """Median over repeats of `slow / fast` time: the speed-up of `fast`, paired within each repeat."""
    return statistics.median(a / b for a, b in zip(slow.seconds, fast.seconds))


# ----- this machine's limits ------------------------------------------------------------------------------------
def matmul_gflops(device: torch.device, size: int, repeats: int, dtype: torch.dtype = torch.float32) -> Samples:
    """Achieved rate of a square `size` matrix product, the reference for the towers' FLOP rate."""
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(size, size, generator=generator).to(device, dtype)
    right = torch.randn(size, size, generator=generator).to(device, dtype)
    product = torch.empty_like(left)
    torch.mm(left, right, out=product)  # first call allocates workspaces
    return measure_interleaved({"matmul": lambda: torch.mm(left, right, out=product)}, repeats, device)["matmul"]


def copy_probe(megabytes: int, copies: int = 1) -> tuple[Callable[[], None], float]:
    """`(run, bytes moved per run)`: `run` copies a float32 buffer far larger than the caches `copies` times.

    Bandwidth counts bytes read plus bytes written (the STREAM "copy" convention): a search that reads
    a matrix once cannot move its bytes faster than this. The buffers live as long as `run`.
    """
    source = torch.ones(megabytes * MIB // 4)
    destination = torch.zeros_like(source)  # touched now, so no page faults are timed

    def run() -> None:
        for _ in range(copies):
            destination.copy_(source)

    return run, 2.0 * copies * source.numel() * source.element_size()


def copy_bandwidth_gbps(megabytes: int, repeats: int) -> tuple[Samples, float]:
    """`(samples, bytes moved per copy)` of `copy_probe`."""
    run, moved_bytes = copy_probe(megabytes)
    return measure_interleaved({"copy": run}, repeats, torch.device("cpu"))["copy"], moved_bytes


def read_bandwidth_gbps(megabytes: int, repeats: int) -> tuple[Samples, float]:
    """`(samples, bytes read per pass)` of summing a float32 buffer far larger than the caches: the speed of
    a pure scan, which moves no bytes back and so beats the copy bandwidth per byte read."""
    buffer = torch.ones(megabytes * MIB // 4)
    samples = measure_interleaved({"read": lambda: buffer.sum()}, repeats, torch.device("cpu"))["read"]
    return samples, float(buffer.numel() * buffer.element_size())


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def machine_description(device: torch.device, threads: int) -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    except OSError:
        pass
    description = {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1)
        if hasattr(os, "sysconf") else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "native_bf16": native_bf16(device),
    }
    if device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
    return description
