"""Encode a catalogue into a `ProductIndex`, split across processes with `accelerate launch`.

Each process encodes one contiguous shard of the catalogue into `<output_dir>.shards/shard-<rank>`; the main
process then merges the shards (checking model id, config fingerprint and ids) into `<output_dir>`, whose
files are byte-identical to a single-process build.

```bash
mmretrieval index --model_name_or_path outputs/main_job/final --split test --output_dir index/
accelerate launch --num_processes 8 examples/build_index.py --model_name_or_path org/model \\
    --dataset org/catalogue --split train --output_dir index/
```
"""

import argparse
import shutil
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from modeling_mmretrieval.retrieval.index import ProductIndex
from modeling_mmretrieval.retrieval.search import build_product_index

from .common import CliError, catalogue_columns_from_args, load_catalogue_from_args, load_retriever, retriever_parser


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    """The index command's arguments; `prog` names the program in usage and error lines.

    Example: `parse_args(["--model_name_or_path", "outputs/run/final", "--output_dir", "index/"]).overwrite`
    is False.
    """
    parser = retriever_parser(__doc__.split("\n\n")[0], prog)
    parser.add_argument("--output_dir", required=True, help="where the merged index is written")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing index at --output_dir")
    return parser.parse_args(argv)


def build_index(args: argparse.Namespace) -> None:
    """Encodes this process's shard, then (main process) merges every shard into `args.output_dir`.

    Example: `build_index(parse_args(["--model_name_or_path", "outputs/run/final", "--output_dir", "index/"]))`.
    """
    # Without a GPU, processes started by `accelerate launch` still form one CPU (gloo) group.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    output_dir = Path(args.output_dir)
    shards_root = output_dir.with_name(output_dir.name + ".shards")
    if output_dir.exists() and not args.overwrite:
        raise CliError(f"{output_dir} exists; pass --overwrite to rebuild it")
    model, processor = load_retriever(args.model_name_or_path, device=str(accelerator.device))
    columns = catalogue_columns_from_args(args)
    catalogue = load_catalogue_from_args(args, columns)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    build_product_index(
        model, processor, catalogue, columns=columns, batch_size=args.batch_size,
        output_dir=shards_root / f"shard-{rank:05d}", shard=(rank, world_size),
        show_progress=accelerator.is_local_main_process,
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shard_dirs = sorted(shards_root.glob("shard-*"))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        index = ProductIndex.merge(shard_dirs, output_dir)
        shutil.rmtree(shards_root)
        print(f"Indexed {len(index)} products with {world_size} process(es) into {output_dir}")
    accelerator.wait_for_everyone()


def main(argv=None, prog: str | None = None) -> int:
    """Runs the index command; 0 on success, 2 (one line on stderr) on a user error.

    Example: `main(["--model_name_or_path", "outputs/run/final", "--split", "test", "--output_dir", "index/"])`.
    """
    args = parse_args(argv, prog)
    try:
        build_index(args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
