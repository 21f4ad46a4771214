"""Encode a catalogue into a `ProductIndex`, split across processes with `accelerate launch`.

Each process encodes one contiguous shard of the catalogue into `<output_dir>.shards/shard-<rank>`; the main
process then merges the shards (checking that one model built them, by its model fingerprint: config and
weights, and that their ids are disjoint) into `<output_dir>`, whose files are byte-identical to a
single-process build.

The catalogue and the flags are checked before the model is loaded. Every run prints how many images were
decoded, missing, undecodable or refused, with example product ids, and records it in
`<output_dir>/image_report.json`; `--skip_bad_rows` leaves bad products out and lists them in
`<output_dir>/bad_rows.jsonl`.

```bash
mmretrieval index --model_name_or_path outputs/main_job/final --split test --output_dir index/
accelerate launch --num_processes 8 examples/build_index.py --model_name_or_path org/model \\
    --dataset org/catalogue --split train --output_dir index/
```
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from modeling_mmretrieval.data.images import ImageReport
from modeling_mmretrieval.retrieval.image_feature_store import (
    image_feature_store_from_args,
)
from modeling_mmretrieval.retrieval.index import ProductIndex
from modeling_mmretrieval.retrieval.search import build_product_index

from .common import (
    IMAGE_REPORT_FILENAME,
    CliError,
    add_bad_rows_argument,
    add_image_arguments,
    check_image_arguments,
    check_retriever_settings,
    checked_products,
    load_catalogue_from_args,
    load_retriever,
    report_images,
    retriever_parser,
    run_cli,
)


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    """The index command's arguments; `prog` names the program in usage and error lines.

    Example: `parse_args(["--model_name_or_path", "outputs/run/final", "--output_dir", "index/"]).overwrite`
    is False.
    """
    parser = retriever_parser(__doc__.split("\n\n")[0], prog)
    parser.add_argument("--output_dir", required=True, help="where the merged index is written")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing index at --output_dir")
    add_bad_rows_argument(parser)
    add_image_arguments(parser)
    return parser.parse_args(argv)


def build_index(args: argparse.Namespace) -> None:
    """Encodes this process's shard, then (main process) merges every shard into `args.output_dir`.

    Example: `build_index(parse_args(["--model_name_or_path", "outputs/run/final", "--output_dir", "index/"]))`.
    """
    output_dir = Path(args.output_dir)
    shards_root = output_dir.with_name(output_dir.name + ".shards")
    if output_dir.exists() and not args.overwrite:
        raise CliError(f"{output_dir} exists; pass --overwrite to rebuild it")
    # Everything that can be checked without the model is, before it is loaded.
    check_retriever_settings(args)
    check_image_arguments(args)
    catalogue, columns = load_catalogue_from_args(args, needs_queries=False)
    # Without a GPU, processes started by `accelerate launch` still form one CPU (gloo) group.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    report_dir = shards_root if accelerator.is_main_process else None
    catalogue = checked_products(catalogue, columns, args, report_dir=report_dir, published_dir=output_dir)
    model, processor = load_retriever(args.model_name_or_path, device=str(accelerator.device))
    rank, world_size = accelerator.process_index, accelerator.num_processes
    image_report = ImageReport()
    build_product_index(
        model, processor, catalogue, columns=columns, batch_size=args.batch_size,
        output_dir=shards_root / f"shard-{rank:05d}", shard=(rank, world_size),
        show_progress=accelerator.is_local_main_process, metadata_columns=(columns.title,),
        fetch_images=args.fetch_images, image_report=image_report,
        image_feature_store=image_feature_store_from_args(args),
    )
    reports = gather_object([image_report])  # every process's report, on every process
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for other in reports[1:]:
            image_report.merge(other)
        try:
            report_images(image_report, args, columns)  # before the index is published: a strict failure leaves none
        except CliError:
            shutil.rmtree(shards_root, ignore_errors=True)
            raise
        shard_dirs = sorted(shards_root.glob("shard-*"))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        index = ProductIndex.merge(shard_dirs, output_dir)
        for report_file in shards_root.glob("*.jsonl"):  # bad_rows.jsonl, written before the shards existed
            shutil.move(report_file, output_dir / report_file.name)
        shutil.rmtree(shards_root)
        (output_dir / IMAGE_REPORT_FILENAME).write_text(json.dumps(image_report.to_dict(), indent=2) + "\n")
        print(f"Indexed {len(index)} products with {world_size} process(es) into {output_dir}")
    accelerator.wait_for_everyone()


def main(argv=None, prog: str | None = None) -> int:
    """Runs the index command; 0 on success, 2 (one line on stderr) on a user error.

    Example: `main(["--model_name_or_path", "outputs/run/final", "--split", "test", "--output_dir", "index/"])`.
    """
    return run_cli(build_index, parse_args(argv, prog), prog)
