"""Performance benchmark suite: training, indexing, search and image preprocessing, in one command.

    python benchmarks/run.py                                # full suite, offline towers (<= 10 min on 2 cores)
    python benchmarks/run.py --quick --output /tmp/x.json   # smoke run with tiny towers (<= 2 min)

Prints a table (median rate, spread over repeats, peak memory), the targets of the performance issue as
measured ratios, and the correctness checks of every fast path; writes everything to JSON. The exit
status is 1 when a correctness check fails, never because a timing target is missed. See
docs/performance.md for how to read the numbers.
"""

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

CASES = ("preprocessing", "search", "indexing", "training", "quantised", "onnx", "ray")
DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny towers, small sizes (<= 2 min)")
    parser.add_argument("--output", type=Path, default=Path("benchmark_results.json"), help="JSON results file")
    parser.add_argument("--towers", choices=("offline", "tiny"), help="default: offline, or tiny with --quick")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (search and preprocessing stay on the CPU)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="compute dtype of training and indexing (autocast); bf16 indexing is also measured "
                             "automatically where the hardware has native bf16")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch, faiss, BLAS)")
    parser.add_argument("--repeats", type=int, help="repeats per measurement (default 3)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--data", type=Path, help="catalogue directory (default: shared data, else the sample)")
    parser.add_argument("--markdown", type=Path, help="also write the results and targets as markdown tables "
                                                      "(the format of docs/performance.md)")
    args = parser.parse_args(argv)
    args.cases = [case.strip() for case in args.cases.split(",") if case.strip()]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    args.towers = args.towers or ("tiny" if args.quick else "offline")
    args.repeats = args.repeats or 3
    return args


def pin_threads(threads: int) -> None:
    """Thread pools read these when the libraries load, so this runs before torch and numpy are imported."""
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[variable] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _format_rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _gpu_peak(row: dict) -> str:
    return f"{row['gpu_peak_mib']:,.0f}M" if row.get("gpu_peak_mib") else "-"


def format_report(report: dict) -> str:
    """The human-readable table of a results dictionary."""
    on_gpu = any(row.get("gpu_peak_mib") for row in report["rows"])
    lines = [f"{'case':<14}{'variant':<58}{'median':>12} {'unit':<11}{'spread':>8}{'peak RSS':>11}{'growth':>10}"
             + (f"{'GPU peak':>10}" if on_gpu else "")]
    for row in report["rows"]:
        peak = f"{row['peak_rss_mib']:,.0f}M" if row["peak_rss_mib"] else "-"
        growth = f"+{row['rss_growth_mib']:,.0f}M" if row["rss_growth_mib"] is not None else "-"
        lines.append(
            f"{row['case']:<14}{row['variant']:<58}{_format_rate(row['value']):>12} {row['unit']:<11}"
            f"{row['spread_pct']:>7.1f}%{peak:>11}{growth:>10}" + (f"{_gpu_peak(row):>10}" if on_gpu else "")
        )
    lines.append("\nTargets (ratios measured side by side in this run)")
    for target in report["targets"]:
        status = "met " if target["met"] else "MISS"
        lines.append(f"  [{status}] {target['name']}: {target['measured']:.2f} (target >= {target['required']:g})"
                     f"  -- {target['detail']}")
    lines.append("\nCorrectness checks")
    for check in report["checks"]:
        lines.append(f"  [{'pass' if check['passed'] else 'FAIL'}] {check['name']}: {check['detail']}")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    rates = report["machine_rates"]
    lines.append(
        f"\nmachine: {report['machine']['cpu']}, {report['machine']['torch_threads']} threads; fp32 matmul "
        f"{rates['matmul_gflops']:.1f} GFLOP/s (start {rates['matmul_gflops_start']:.1f}, end "
        f"{rates['matmul_gflops_end']:.1f}), copy bandwidth {rates['copy_gbps']:.1f} GB/s (read only "
        f"{rates['read_gbps']:.1f} GB/s); "
        f"{report['elapsed_s']:.0f} s in all"
    )
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    """The rows and targets of a results dictionary as markdown tables, for docs/performance.md."""
    on_gpu = any(row.get("gpu_peak_mib") for row in report["rows"])
    lines = ["| case | variant | median | unit | spread | peak RSS | growth |" + (" GPU peak |" if on_gpu else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if on_gpu else "")]
    for row in report["rows"]:
        peak = f"{row['peak_rss_mib']:,.0f} MiB" if row["peak_rss_mib"] else "–"
        growth = f"+{row['rss_growth_mib']:,.0f} MiB" if row["rss_growth_mib"] is not None else "–"
        gpu_peak = f" {row['gpu_peak_mib']:,.0f} MiB |" if row.get("gpu_peak_mib") else " – |"
        lines.append(f"| {row['case']} | {row['variant']} | {_format_rate(row['value'])} | {row['unit']} | "
                     f"{row['spread_pct']:.0f}% | {peak} | {growth} |" + (gpu_peak if on_gpu else ""))
    lines += ["", "| target | measured | required | status | detail |", "|---|---|---|---|---|"]
    for target in report["targets"]:
        status = "met" if target["met"] else "MISS"
        lines.append(f"| {target['name']} | {target['measured']:.2f} | {target['required']:g} | {status} | "
                     f"{target['detail']} |")
    failed = [check["name"] for check in report["checks"] if not check["passed"]]
    lines += ["", f"Correctness checks: {len(report['checks']) - len(failed)} of {len(report['checks'])} passed"
                  + (f"; failed: {', '.join(failed)}." if failed else ".")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pin_threads(args.threads)
    # Imported only now: torch, numpy and faiss size their thread pools when they load.
    import statistics

    import datasets
    import torch
    import transformers
    from common import CaseResult, Check, Context
    from measure import copy_bandwidth_gbps, machine_description, matmul_gflops, read_bandwidth_gbps
    from towers import Towers

    from modeling_mmretrieval.data import load_catalogue

    started = time.perf_counter()
    # Loading bars and tower-composition warnings would bury the table.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    matmul_size, bandwidth_mib = (1024, 256) if args.quick else (2048, 512)
    flops = 2.0 * matmul_size**3
    matmul_start = matmul_gflops(device, matmul_size, repeats=5)
    copy_samples, copied_bytes = copy_bandwidth_gbps(bandwidth_mib, repeats=5)
    read_samples, read_bytes = read_bandwidth_gbps(bandwidth_mib, repeats=5)
    ctx = Context(
        device=device,
        dtype=getattr(torch, args.dtype),
        threads=args.threads,
        quick=args.quick,
        repeats=args.repeats,
        towers=Towers.load(args.towers),
        catalogue=load_catalogue(args.data),
        matmul_gflops=matmul_start.rate(flops) / 1e9,
        copy_gbps=copy_samples.rate(copied_bytes) / 1e9,
        read_gbps=read_samples.rate(read_bytes) / 1e9,
    )

    def report_so_far(matmul_end=None) -> dict:
        matmul_seconds = matmul_start.seconds + (matmul_end.seconds if matmul_end is not None else [])
        return {
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "complete": matmul_end is not None,
            "settings": {"quick": args.quick, "towers": args.towers, "device": args.device, "dtype": args.dtype,
                         "threads": args.threads, "repeats": args.repeats, "cases": args.cases,
                         "tower_weights": "random stand-ins" if ctx.towers.stand_in_weights else "as loaded"},
            "machine": machine_description(device, args.threads),
            "machine_rates": {
                "matmul_gflops": flops / statistics.median(matmul_seconds) / 1e9,
                "matmul_gflops_start": matmul_start.rate(flops) / 1e9,
                "matmul_gflops_end": (matmul_end or matmul_start).rate(flops) / 1e9,
                "matmul_size": matmul_size,
                "copy_gbps": ctx.copy_gbps,
                "read_gbps": ctx.read_gbps,
            },
            "rows": [asdict(row) for row in results.rows],
            "targets": [{**asdict(target), "met": target.met} for target in results.targets],
            "checks": [asdict(check) for check in results.checks],
            "notes": results.notes + (["offline towers carry random stand-in weights (benchmarks/stand_in_towers.py): "
                                       "rates and memory hold, quality figures do not"]
                                      if ctx.towers.stand_in_weights else []),
            "elapsed_s": time.perf_counter() - started,
        }

    results = CaseResult()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for case in args.cases:
        case_started = time.perf_counter()
        print(f"[{time.perf_counter() - started:6.0f}s] {case} ...", file=sys.stderr, flush=True)
        try:
            results.extend(importlib.import_module(f"bench_{case}").run(ctx))
        except Exception as error:  # one broken case must not lose the others' measurements
            traceback.print_exc()
            results.checks.append(Check(f"{case}: ran to completion", False, f"{type(error).__name__}: {error}"))
        print(f"[{time.perf_counter() - started:6.0f}s] {case} done in {time.perf_counter() - case_started:.0f}s",
              file=sys.stderr, flush=True)
        # Written after every case, so a run stopped part-way (a timeout, Ctrl-C) keeps what it measured.
        args.output.write_text(json.dumps(report_so_far(), indent=2, default=str), encoding="utf-8")

    report = report_so_far(matmul_end=matmul_gflops(device, matmul_size, repeats=5))
    print(format_report(report))
    args.output.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    print(f"results written to {args.output}", file=sys.stderr)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(format_markdown(report), encoding="utf-8")
    return 0 if all(check.passed for check in results.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
