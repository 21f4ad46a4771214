"""How much resident memory the text tower keeps after running batches of many different widths.

torch's CPU backend caches a compiled kernel per input shape for some operations (GELU goes through
oneDNN), and each cached kernel pins heap memory that glibc cannot return afterwards. This script runs the
offline MiniLM tower over batches of every width from 1 to `--max_width`, once with the widths as they are
and once rounded up to multiples of 8 (what `MultimodalRetrievalProcessor(pad_to_multiple_of=8)` does),
each in a fresh process, and prints the growth of resident memory:

    python benchmarks/shape_cache_memory.py              # 64 rows a batch, widths 1..128
    python benchmarks/shape_cache_memory.py --rows 16    # quicker, smaller effect
"""

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from measure import current_rss_mib


def grow(rows: int, max_width: int, multiple: int, threads: int) -> tuple[float, float]:
    """`(MiB of resident memory gained, seconds)` running the tower once at each width, in this process."""
    from transformers import AutoModel

    from modeling_mmretrieval.towers import get_minilm_path

    torch.set_num_threads(threads)
    tower = AutoModel.from_pretrained(get_minilm_path(), attn_implementation="sdpa").eval()
    generator = torch.Generator().manual_seed(0)
    before, start = current_rss_mib(), time.perf_counter()
    with torch.no_grad():
        for length in range(1, max_width + 1):
            width = -(-length // multiple) * multiple
            input_ids = torch.randint(1000, 20000, (rows, width), generator=generator)
            attention_mask = torch.ones_like(input_ids)
            attention_mask[:, length:] = 0
            tower(input_ids=input_ids, attention_mask=attention_mask)
    return current_rss_mib() - before, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="rows per batch")
    parser.add_argument("--max_width", type=int, default=128, help="widths 1..max_width are run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")  # a fresh heap for each measurement
    print(f"MiniLM, {args.rows} rows a batch, widths 1..{args.max_width}")
    for multiple in (1, 8):
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as executor:
            grown, seconds = executor.submit(grow, args.rows, args.max_width, multiple, args.threads).result()
        label = "every width" if multiple == 1 else f"widths rounded up to multiples of {multiple}"
        print(f"{label:40s} resident memory +{grown:,.0f} MiB  ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
