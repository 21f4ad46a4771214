"""A synthetic product index far larger than memory's float32 budget, built on disk and served with int8.

Builds `--rows` products of `--dim` dimensions (the clustered embeddings of `bench_quantised`, generated block by
block, so the float32 matrix is never held in memory: 10M x 384 is a 15.4 GB file), loads it memory-mapped,
searches it with the int8 backend (codes resident, candidates rescored from the mapped float32 rows), and reports
peak resident memory per phase, build and encoding times, batch-1 latency and recall@100 against the exact top
100. The exact answers of the queries are computed while the index is written (each block is searched as it is
generated), so no second pass over the file is needed.

    python benchmarks/large_index.py --rows 10000000 --dim 384 --dir /tmp/large_index
    python benchmarks/large_index.py --rows 1000000 --dim 384 --dir /tmp/large_index --queries 200

Resident memory is reported as the kernel counts it: `peak_rss_mib` (VmHWM, the largest of the phases' peaks)
includes file pages mapped into
the process; `rss_anon_mib` is the process's own memory (codes, ids, libraries' heaps), `rss_file_mib` all mapped files
(libraries included), `float32_file_rss_mib` the pages of the float32 file mapped in (page cache the kernel can
reclaim; it maps cached neighbours of each page a search reads).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantised import (  # noqa: E402  (the benchmarks folder is not a package)
    CLUSTERS_PER_MILLION,
    GENERATION_BLOCK_ROWS,
    MIN_CLUSTERS,
    ClusteredEmbeddings,
    mapped_resident_bytes,
    recall_at,
)
from measure import PeakMemory  # noqa: E402

from modeling_mmretrieval.atomic_files import atomic_directory  # noqa: E402
from modeling_mmretrieval.retrieval.exact_search import exact_top_k, order_candidates  # noqa: E402
from modeling_mmretrieval.retrieval.index import ProductIndex  # noqa: E402
from modeling_mmretrieval.retrieval.index_files import EMBEDDINGS_FILENAME, write_index_files  # noqa: E402

K = 100


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="products in the index")
    parser.add_argument("--dim", type=int, default=384, help="embedding dimension")
    parser.add_argument("--dir", type=Path, required=True, help="where the index is written (replaced if present)")
    parser.add_argument("--queries", type=int, default=300, help="batch-1 queries served and scored for recall")
    parser.add_argument("--rescore_candidates", type=int, default=None, help="int8: candidates as a multiple of k")
    parser.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the index folder (default: delete it at the end)")
    parser.add_argument("--output", type=Path, default=None, help="also write the report here as JSON")
    args = parser.parse_args(argv)
    for name in ("rows", "dim", "queries", "threads", "rescore_candidates"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be a positive integer, got {value}")
    return args


def status_mib(key: str) -> float:
    """A memory line of /proc/self/status in MiB (0 where it is missing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def memory_now(embeddings_file: Path) -> dict:
    """Resident memory now: all of it, the process's own, all mapped files (libraries included), the float32 file."""
    return {"rss_mib": status_mib("VmRSS"), "rss_anon_mib": status_mib("RssAnon"), "rss_file_mib": status_mib("RssFile"),
            "float32_file_rss_mib": mapped_resident_bytes(embeddings_file) / (1 << 20)}


def build(args, stream: ClusteredEmbeddings, queries: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Writes the index block by block and returns the exact top-k positions of `queries` over all rows."""
    best_scores = torch.empty((len(queries), 0))
    best_positions = torch.empty((len(queries), 0), dtype=torch.long)

    def blocks():
        nonlocal best_scores, best_positions
        for start in range(0, args.rows, GENERATION_BLOCK_ROWS):
            stop = min(start + GENERATION_BLOCK_ROWS, args.rows)
            rows = stream.rows(start, stop)
            scores, positions = exact_top_k(rows, queries, min(K, len(rows)), len(rows))
            best_scores, best_positions = order_candidates(
                torch.cat([best_scores, scores], dim=1), torch.cat([best_positions, positions + start], dim=1), K
            )
            yield rows, list(range(start, stop)), None
            if (start // GENERATION_BLOCK_ROWS) % 64 == 0:
                print(f"  wrote {stop:,} of {args.rows:,} rows", file=sys.stderr, flush=True)

    start = time.perf_counter()
    with PeakMemory() as memory, atomic_directory(args.dir, overwrite=True) as staging:
        write_index_files(Path(staging), blocks(), with_metadata=False, model_id="synthetic clustered embeddings")
    return best_positions, {"seconds": time.perf_counter() - start, "peak_rss_mib": memory.peak_mib}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import faiss

    if args.threads is not None:
        faiss.omp_set_num_threads(args.threads)
    clusters = max(MIN_CLUSTERS, CLUSTERS_PER_MILLION * args.rows // 1_000_000)
    stream = ClusteredEmbeddings(args.dim, clusters, seed=0)
    queries = torch.from_numpy(stream.queries(args.queries))
    report = {"rows": args.rows, "dim": args.dim, "float32_gib": args.rows * args.dim * 4 / (1 << 30),
              "queries": args.queries, "k": K}

    print(f"building {args.rows:,} x {args.dim} in {args.dir} ...", file=sys.stderr, flush=True)
    truth, report["build"] = build(args, stream, queries)

    embeddings_file = (args.dir / EMBEDDINGS_FILENAME).resolve()
    start = time.perf_counter()
    with PeakMemory() as memory:
        index = ProductIndex.load(args.dir, mmap=True, verify_checksums=False)
    report["load"] = {"seconds": time.perf_counter() - start, "peak_rss_mib": memory.peak_mib, **memory_now(embeddings_file)}

    print("encoding int8 codes ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with PeakMemory() as memory:
        index.set_backend("int8", rescore_candidates=args.rescore_candidates).prepare_backend()
    report["encode_int8"] = {"seconds": time.perf_counter() - start, "peak_rss_mib": memory.peak_mib,
                             "codes_mib": index._quantised.resident_bytes("int8") / (1 << 20), **memory_now(embeddings_file)}

    print(f"serving {args.queries} batch-1 queries ...", file=sys.stderr, flush=True)
    latencies, found = [], []
    with PeakMemory() as memory:
        for query in queries:
            start = time.perf_counter()
            _, positions = index.search_positions(query, K)
            latencies.append(time.perf_counter() - start)
            found.append(positions)
    # The first queries fault the candidates' pages in from disk; the percentiles show the spread.
    milliseconds = 1e3 * np.array(latencies)
    report["serve"] = {
        "latency_ms_p50": float(np.percentile(milliseconds, 50)),
        "latency_ms_p90": float(np.percentile(milliseconds, 90)),
        "latency_ms_p99": float(np.percentile(milliseconds, 99)),
        "recall_at_100": recall_at(torch.stack(found), truth),
        "peak_rss_mib": memory.peak_mib,
        **memory_now(embeddings_file),
    }
    report["peak_rss_mib"] = max(report[phase]["peak_rss_mib"] for phase in ("build", "load", "encode_int8", "serve"))
    del index
    if not args.keep:
        import shutil

        shutil.rmtree(args.dir, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
