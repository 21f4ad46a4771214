"""Encode a catalogue into a `ProductIndex`, split across processes with `accelerate launch`.

Each process encodes one contiguous shard of the catalogue into `<output_dir>.shards/shard-<rank>`; the main
process then merges the shards (checking that one model built them, by its model fingerprint: config and
weights, and that their ids are disjoint) into `<output_dir>`, whose files are byte-identical to a
single-process build.

The catalogue and the flags are checked before the model is loaded. Every run prints how many images were
decoded, missing, undecodable or refused, with example product ids, and records it in
`<output_dir>/image_report.json`; `--skip_bad_rows` leaves bad products out and lists them in
`<output_dir>/bad_rows.jsonl`.

`--engine ray` embeds the catalogue with an actor pool of `--num_workers` model replicas on a Ray cluster
(`--ray_address`, default: a local one started for the run; `--use_gpu` gives each replica a GPU) and writes the same
index, or with `--output_format parquet` Parquet shards of (product id, embedding, metadata) and a `manifest.json`
for a vector database (`retrieval.ray_indexing`, docs/scale.md).

```bash
mmretrieval index --model_name_or_path outputs/main_job/final --split test --output_dir index/
accelerate launch --num_processes 8 examples/build_index.py --model_name_or_path org/model \\
    --dataset org/catalogue --split train --output_dir index/
mmretrieval index --engine ray --ray_address auto --num_workers 8 --use_gpu --output_format parquet \\
    --model_name_or_path org/model --dataset /shared/catalogue --split train --output_dir /shared/embeddings/
```
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from modeling_mmretrieval.data.images import ImageReport
from modeling_mmretrieval.retrieval.image_feature_store import (
    image_feature_store_from_args,
)
from modeling_mmretrieval.retrieval.index import ProductIndex
from modeling_mmretrieval.retrieval.ray_indexing import OUTPUT_FORMATS
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

ENGINES = ("local", "ray")


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
    ray = parser.add_argument_group("Ray (--engine ray)")
    ray.add_argument("--engine", choices=ENGINES, default="local",
                     help="local: this process (or `accelerate launch` processes); ray: an actor pool on a Ray cluster")
    ray.add_argument("--ray_address", default=None,
                     help="the Ray cluster to join ('auto': the one `ray start` runs here; 'ray://head:10001'); "
                          "default: start a local one for this run")
    ray.add_argument("--num_workers", type=int, default=1, help="model replicas (actors), each loading the checkpoint once")
    ray.add_argument("--use_gpu", action="store_true", help="one GPU per replica (default: one CPU each)")
    ray.add_argument("--output_format", choices=OUTPUT_FORMATS, default="index",
                     help="index: a product index folder; parquet: part-*.parquet shards (product id, embedding, "
                          "metadata) and manifest.json, for vector databases")
    return parser.parse_args(argv)


def check_engine_arguments(args: argparse.Namespace) -> None:
    """The Ray flags, checked before anything is loaded: they need `--engine ray`, `--num_workers` is positive, and
    `--use_gpu` on a cluster started here needs CUDA.

    Example: `check_engine_arguments(parse_args([..., "--num_workers", "0", "--engine", "ray"]))` raises `CliError`.
    """
    if args.engine != "ray":
        given = [flag for flag, value in (("--ray_address", args.ray_address), ("--use_gpu", args.use_gpu),
                                          ("--num_workers", args.num_workers != 1),
                                          ("--output_format", args.output_format != "index")) if value]
        if given:
            raise CliError(f"{given[0]} needs --engine ray")
        return
    if args.num_workers < 1:
        raise CliError(f"--num_workers must be positive, got {args.num_workers}")
    if args.use_gpu and args.ray_address is None and not torch.cuda.is_available():
        raise CliError("--use_gpu: CUDA is not available on this machine for the local Ray cluster; "
                       "pass --ray_address of a cluster with GPUs, or leave --use_gpu out")


def build_index(args: argparse.Namespace) -> None:
    """Encodes this process's shard, then (main process) merges every shard into `args.output_dir`; with
    `--engine ray`, `build_index_on_ray`.

    Example: `build_index(parse_args(["--model_name_or_path", "outputs/run/final", "--output_dir", "index/"]))`.
    """
    check_engine_arguments(args)
    if args.engine == "ray":
        build_index_on_ray(args)
        return
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


def _check_checkpoint(name_or_path: str) -> None:
    """The checkpoint's config must load here before replicas load it everywhere (a typo fails in one line)."""
    from modeling_mmretrieval import MultimodalRetrievalConfig

    try:
        MultimodalRetrievalConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise CliError(f"cannot load a retriever from {name_or_path!r}: {error} (--model_name_or_path)") from error


def build_index_on_ray(args: argparse.Namespace) -> None:
    """Embeds the catalogue with `--num_workers` replicas on a Ray cluster (`retrieval.ray_indexing`) into
    `args.output_dir`: a product index, or Parquet shards with `--output_format parquet`. The catalogue, the flags and
    the checkpoint's config are checked before the cluster is joined; the image report is applied (`--strict_images`)
    before anything is published.

    Example: `build_index_on_ray(parse_args([..., "--engine", "ray", "--num_workers", "4", "--output_dir", "index/"]))`.
    """
    from modeling_mmretrieval.retrieval.ray_indexing import import_ray, index_catalogue_with_ray, ray_session

    output_dir = Path(args.output_dir)
    if output_dir.exists() and not args.overwrite:
        raise CliError(f"{output_dir} exists; pass --overwrite to rebuild it")
    try:
        import_ray()
    except ImportError as error:
        raise CliError(f"--engine ray: {error}") from error
    if args.batch_size < 1:
        raise CliError(f"--batch_size must be positive, got {args.batch_size}")
    check_image_arguments(args)
    _check_checkpoint(args.model_name_or_path)
    catalogue, columns = load_catalogue_from_args(args, needs_queries=False)
    with tempfile.TemporaryDirectory(prefix="mmretrieval-ray-index-") as report_dir:
        catalogue = checked_products(catalogue, columns, args, report_dir=Path(report_dir), published_dir=output_dir)
        store = image_feature_store_from_args(args)
        try:
            with ray_session(args.ray_address):
                result = index_catalogue_with_ray(
                    args.model_name_or_path, catalogue, output_dir, columns=columns, output_format=args.output_format,
                    num_workers=args.num_workers, batch_size=args.batch_size, use_gpu=args.use_gpu,
                    fetch_images=args.fetch_images, on_image_error=args.on_image_error,
                    image_feature_store_dir=None if store is None else store.directory, overwrite=args.overwrite,
                    check_images=lambda report: report_images(report, args, columns),
                )
        except ConnectionError as error:
            raise CliError(f"{error} (--ray_address)") from error
        except ValueError as error:  # a column the build needs, checked on the driver before any replica starts
            raise CliError(str(error)) from error
        for report_file in Path(report_dir).glob("*.jsonl"):  # bad_rows.jsonl
            shutil.move(report_file, output_dir / report_file.name)
    (output_dir / IMAGE_REPORT_FILENAME).write_text(json.dumps(result.image_report.to_dict(), indent=2) + "\n")
    print(f"Indexed {result.count} products with {args.num_workers} Ray worker(s) into {output_dir} "
          f"({args.output_format})")


def main(argv=None, prog: str | None = None) -> int:
    """Runs the index command; 0 on success, 2 (one line on stderr) on a user error.

    Example: `main(["--model_name_or_path", "outputs/run/final", "--split", "test", "--output_dir", "index/"])`.
    """
    return run_cli(build_index, parse_args(argv, prog), prog)
