"""What every case shares: the run settings (`Context`) and the records a case returns (`CaseResult`)."""

import contextlib
from dataclasses import dataclass, field

import torch
from measure import Samples
from towers import Towers


@dataclass
class Context:
    """Settings of one run of the suite, and this machine's limits measured at its start."""

    device: torch.device
    dtype: torch.dtype
    threads: int
    quick: bool
    repeats: int
    towers: Towers
    catalogue: object  # datasets.DatasetDict with train/validation/test
    matmul_gflops: float = 0.0
    copy_gbps: float = 0.0
    read_gbps: float = 0.0

    def autocast(self):
        """Autocast to the compute dtype (no-op in float32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


@dataclass
class Row:
    """One measured variant: a median rate with its spread over repeats, and its peak memory."""

    case: str
    variant: str
    value: float
    unit: str
    spread_pct: float
    peak_rss_mib: float | None = None
    rss_growth_mib: float | None = None
    gpu_peak_mib: float | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_samples(cls, case: str, variant: str, samples: Samples, work: float, unit: str, **extra) -> "Row":
        """A rate row: `work` units (pairs, products, queries, images) per median second."""
        return cls(
            case, variant, samples.rate(work), unit, samples.spread_pct, samples.peak_rss_mib, samples.rss_growth_mib,
            samples.gpu_peak_mib, {"median_s": samples.median_s, "seconds": samples.seconds, **extra},
        )


@dataclass
class Target:
    """A performance target of the issue: the measured ratio against the required one."""

    name: str
    measured: float
    required: float
    detail: str

    @property
    def met(self) -> bool:
        return self.measured >= self.required


@dataclass
class Check:
    """A correctness check of a fast path, measured in the same run (a failure fails the run)."""

    name: str
    passed: bool
    detail: str

    def __post_init__(self):
        self.passed = bool(self.passed)  # numpy booleans would be written to the JSON as strings


@dataclass
class CaseResult:
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def extend(self, other: "CaseResult") -> None:
        self.rows += other.rows
        self.targets += other.targets
        self.checks += other.checks
        self.notes += other.notes
