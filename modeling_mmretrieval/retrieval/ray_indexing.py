"""Indexing on Ray: a catalogue embedded by an actor pool of model replicas (Ray Data `map_batches`), on one machine
or a cluster, written as a `ProductIndex` or as Parquet embedding shards (`retrieval.parquet_embeddings`).

Each replica loads the checkpoint once and embeds every batch it is given with `catalogue_embedder`, the code path
of a single-process build (collation, image decoding, length-sorted batches, the image-feature store), so the result
equals a single-process index within float rounding: the same ids, the same row order (the catalogue's), the same
vectors and the same model provenance (`index_provenance`). Every replica reports its model fingerprint; replicas
that loaded different weights (a stale copy of the checkpoint on one node) stop the build.

The catalogue is a `datasets.Dataset` (as `data.load_catalogue` reads local parquet / csv / jsonl files or a Hub
dataset: ids, titles and images checked, relative image paths made absolute) or a list of rows. It is cut into blocks
of whole read windows (`LENGTH_SORT_WINDOW_BATCHES` batches), the windows a single-process build reads, and handed to
Ray through its object store; image bytes travel with their rows, image paths must be readable where the replicas run
(shared storage on a cluster: docs/scale.md).

Example:
```python
>>> from modeling_mmretrieval.data import load_catalogue
>>> catalogue = load_catalogue("shop/", split="train", needs_queries=False)
>>> result = index_catalogue_with_ray("outputs/run/final", catalogue, "index/", num_workers=4)
>>> index = ProductIndex.load("index/")
>>> index_catalogue_with_ray("outputs/run/final", catalogue, "embeddings/", output_format="parquet")
```
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ..atomic_files import atomic_directory
from ..data.catalogue import CatalogueColumns
from ..data.images import ImageReport
from .index_files import bounded_metadata, write_index_files
from .parquet_embeddings import (
    EMBEDDING_COLUMN,
    ID_COLUMN,
    RESERVED_COLUMNS,
    embedding_matrix,
    embedding_table,
    write_manifest,
)
from .image_feature_store import ImageFeatureStore
from .search import LENGTH_SORT_WINDOW_BATCHES, catalogue_embedder, index_provenance, load_retriever

OUTPUT_FORMATS = ("index", "parquet")
# The catalogue's position of every row, carried through Ray so the output keeps the catalogue's order.
_POSITION_COLUMN = "__mmretrieval_row__"
# Ray Data logs a progress table to stdout every few seconds by default; a build prints its own summary instead.
_RAY_INIT_OPTIONS = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}


def import_ray():
    """The `ray` module with Ray Data, or an `ImportError` saying how to install it.

    Example: `ray = import_ray()`.
    """
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data ships in `ray[data]`)
    except ImportError as error:
        raise ImportError("indexing on Ray needs Ray Data: pip install 'modeling_mmretrieval[scale]' "
                          "(or 'ray[data]')") from error
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[None]:
    """Connects to the Ray cluster at `address` ("auto": the one `ray start` runs on this machine; "ray://host:10001":
    a remote one) or, without one, starts a local cluster of `num_cpus` CPUs, and shuts it down afterwards. A process
    already connected to Ray keeps its connection (and it stays open).

    Example:
    ```python
    >>> with ray_session("auto"):
    ...     index_catalogue_with_ray("outputs/run/final", catalogue, "index/", num_workers=8)
    ```
    """
    ray = import_ray()
    if ray.is_initialized():
        yield
        return
    options = dict(_RAY_INIT_OPTIONS)
    if address is None:
        options["num_cpus"] = num_cpus
    else:
        options["address"] = address
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ConnectionError(f"cannot connect to the Ray cluster at {address!r}: {' '.join(str(error).split())}") from error
    try:
        yield
    finally:
        ray.shutdown()


class ImageReportCollector:
    """A Ray actor that merges the `ImageReport` of every batch and the model provenance of every replica, so the
    driver can print one report and check that every replica ran the same model.

    Example: `collector = ray.remote(ImageReportCollector).remote(); ray.get(collector.report.remote()).summary()`.
    """

    def __init__(self):
        self._report = ImageReport()
        self._provenances: dict[str, dict] = {}

    def merge(self, report: ImageReport) -> None:
        """Adds a batch's report."""
        self._report.merge(report)

    def record_provenance(self, replica: str, provenance: dict) -> None:
        """Records what one replica loaded (`index_provenance`)."""
        self._provenances[replica] = provenance

    def report(self) -> ImageReport:
        """Every batch's report, merged."""
        return self._report

    def provenances(self) -> dict[str, dict]:
        """Each replica's `index_provenance`, keyed by host and process."""
        return dict(self._provenances)


@dataclass(frozen=True)
class ReplicaSettings:
    """What every model replica needs: where the checkpoint is, how to embed, which columns to keep.

    Example: `ReplicaSettings("outputs/run/final", CatalogueColumns(), batch_size=64)`.
    """

    model_name_or_path: str
    columns: CatalogueColumns
    batch_size: int = 64
    device: str = "cpu"
    torch_threads: int | None = None
    metadata_columns: tuple[str, ...] = ()
    fetch_images: bool = False
    on_image_error: str = "mask"
    image_feature_store_dir: str | None = None


class ProductEmbeddingReplica:
    """One model replica of the actor pool: loads the checkpoint once, then turns each batch of catalogue rows (an
    Arrow table) into a table of `product_id`, `embedding`, `row` and the metadata columns, with `build_product_index`'s
    own embedding path (`catalogue_embedder`).

    Example: `dataset.map_batches(ProductEmbeddingReplica, fn_constructor_args=(settings, collector), ...)`.
    """

    def __init__(self, settings: ReplicaSettings, collector=None):
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.collector = collector
        self.model, self.processor = load_retriever(settings.model_name_or_path, settings.device)
        self.store = None
        if settings.image_feature_store_dir is not None:
            self.store = ImageFeatureStore(settings.image_feature_store_dir)
        if collector is not None:
            import ray

            replica = f"{socket.gethostname()}:{os.getpid()}"
            ray.get(collector.record_provenance.remote(replica, index_provenance(self.model)))

    def __call__(self, batch: pa.Table) -> pa.Table:
        settings = self.settings
        rows = batch.drop_columns([_POSITION_COLUMN]).to_pylist()
        report = ImageReport()
        embed_window, rows_per_read = catalogue_embedder(
            self.model, self.processor, columns=settings.columns, batch_size=settings.batch_size,
            fetch_images=settings.fetch_images, image_report=report, on_image_error=settings.on_image_error,
            image_feature_store=self.store,
        )
        embeddings = torch.cat([embed_window(rows[start : start + rows_per_read])
                                for start in range(0, len(rows), rows_per_read)])
        if self.store is not None:
            self.store.flush()
        if self.collector is not None:
            import ray

            ray.get(self.collector.merge.remote(report))
        metadata = {name: batch[name] for name in settings.metadata_columns}
        return embedding_table(batch[settings.columns.product_id], embeddings.numpy(),
                               rows=batch[_POSITION_COLUMN], metadata=metadata)


def catalogue_table(catalogue) -> pa.Table:
    """The catalogue as one Arrow table with its rows in catalogue order: a `datasets.Dataset` (its selected rows;
    images stay encoded, `{"bytes", "path"}`), an Arrow table, or a list of row dicts.

    Example: `catalogue_table(load_catalogue("shop.csv", split="train", needs_queries=False)).num_rows`.
    """
    import datasets

    if isinstance(catalogue, datasets.Dataset):
        return catalogue.with_format("arrow")[:]
    if isinstance(catalogue, pa.Table):
        return catalogue
    if isinstance(catalogue, Sequence):
        return pa.Table.from_pylist([dict(row) for row in catalogue])
    raise TypeError(f"the catalogue must be a datasets.Dataset, a pyarrow.Table or a list of rows, "
                    f"got {type(catalogue).__name__}")


def check_catalogue_columns(table: pa.Table, columns: CatalogueColumns, metadata_columns: Sequence[str]) -> None:
    """Raises a one-line `ValueError` naming the first column the build needs that the catalogue lacks, or a metadata
    column whose name the Parquet layout reserves.

    Example: `check_catalogue_columns(table, CatalogueColumns(product_id="sku"), ["title"])`.
    """
    available = sorted(table.column_names)
    needed = {"product id": columns.product_id, "title": columns.title}
    needed.update({f"metadata {name}": name for name in metadata_columns})
    for what, name in needed.items():
        if name not in table.column_names:
            raise ValueError(f"the catalogue has no {what} column {name!r}; available columns: {available}")
    for name in metadata_columns:
        if name in RESERVED_COLUMNS:
            raise ValueError(f"metadata column {name!r} clashes with a column of the Parquet layout {RESERVED_COLUMNS}")


def block_rows(num_rows: int, batch_size: int, num_workers: int) -> int:
    """Rows per Ray block (and per replica call): one read window of a single-process build (`batch_size *
    LENGTH_SORT_WINDOW_BATCHES`), so both sort the same rows by length and batch them alike; a catalogue smaller than
    one window per worker is cut into one block per worker instead, so every replica gets work.

    Example: `block_rows(100_000, 64, 4)` gives 1024; `block_rows(200, 64, 2)` gives 100.
    """
    window = batch_size * LENGTH_SORT_WINDOW_BATCHES
    return max(1, min(window, -(-num_rows // num_workers)))


@dataclass
class RayIndexingResult:
    """What a Ray build produced: where, how many products, the output format, the merged image report and the
    model provenance every replica shared.

    Example: `print(f"{result.count} products into {result.output_dir}")`.
    """

    output_dir: Path
    output_format: str
    count: int
    image_report: ImageReport
    provenance: dict = field(default_factory=dict)


def _shared_provenance(provenances: Mapping[str, dict]) -> dict:
    if not provenances:  # no replica has started: no row was embedded
        return {"model_id": None, "config_hash": None, "model_fingerprint": None}
    fingerprints = {replica: provenance["model_fingerprint"] for replica, provenance in provenances.items()}
    if len(set(fingerprints.values())) > 1:
        raise ValueError(
            f"the replicas loaded different models (model fingerprints {fingerprints}): every node must read the same "
            "checkpoint (shared storage or a Hub revision)"
        )
    return next(iter(provenances.values()))


def _parquet_filename_provider():
    from ray.data.datasource import FilenameProvider

    class _ShardNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:05d}-{write_uuid}.parquet"

    return _ShardNames()


def _index_blocks(batches, metadata_columns: Sequence[str]):
    for batch in batches:
        ids = batch[ID_COLUMN].to_pylist()
        metadata = None
        if metadata_columns:
            values = {name: batch[name].to_pylist() for name in metadata_columns}
            metadata = [bounded_metadata({name: values[name][row] for name in metadata_columns})
                        for row in range(batch.num_rows)]
        yield embedding_matrix(batch[EMBEDDING_COLUMN]), ids, metadata


def index_catalogue_with_ray(
    model_name_or_path: str,
    catalogue,
    output_dir: str | os.PathLike,
    *,
    columns: CatalogueColumns | None = None,
    output_format: str = "index",
    num_workers: int = 1,
    batch_size: int = 64,
    use_gpu: bool = False,
    cpus_per_worker: int = 1,
    metadata_columns: Sequence[str] | None = None,
    fetch_images: bool = False,
    on_image_error: str = "mask",
    image_feature_store_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    check_images: Callable[[ImageReport], None] | None = None,
) -> RayIndexingResult:
    """Embeds `catalogue` with `num_workers` replicas of the checkpoint on the connected Ray cluster (`ray_session`;
    a local one is started when none is connected) and writes `output_dir` atomically.

    Args:
        output_format: `"index"`: a `ProductIndex` folder, equal to a single-process `build_product_index` of the
            same catalogue (metadata: the title); `"parquet"`: `part-*.parquet` shards written by the workers and a
            `manifest.json` (`retrieval.parquet_embeddings`; metadata: the title and the facet columns present).
        use_gpu: one GPU per replica (`cpus_per_worker` CPUs otherwise, which is also each replica's torch threads).
        metadata_columns: the catalogue columns kept beside each embedding (defaults above).
        image_feature_store_dir: an `ImageFeatureStore` folder every replica reads and fills (shared storage on a
            cluster); None computes image features afresh.
        check_images: called with the merged `ImageReport` before anything is published; raising leaves no output.

    Example:
    ```python
    >>> with ray_session():
    ...     result = index_catalogue_with_ray("outputs/run/final", catalogue, "index/", num_workers=2)
    >>> result.image_report.summary()
    ```
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    for name, value in (("num_workers", num_workers), ("batch_size", batch_size), ("cpus_per_worker", cpus_per_worker)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    columns = columns or CatalogueColumns()
    table = catalogue_table(catalogue)
    if metadata_columns is None:
        wanted = (columns.title,) if output_format == "index" else (columns.title, *columns.facet_columns)
        metadata_columns = tuple(name for name in wanted if name in table.column_names)
    metadata_columns = tuple(metadata_columns)
    check_catalogue_columns(table, columns, metadata_columns)
    ray = import_ray()
    settings = ReplicaSettings(
        model_name_or_path=str(model_name_or_path), columns=columns, batch_size=batch_size,
        device="cuda" if use_gpu else "cpu", torch_threads=None if use_gpu else cpus_per_worker,
        metadata_columns=metadata_columns, fetch_images=fetch_images, on_image_error=on_image_error,
        image_feature_store_dir=None if image_feature_store_dir is None else str(image_feature_store_dir),
    )
    output_dir = Path(output_dir)
    with ray_session():
        collector = ray.remote(ImageReportCollector).options(num_cpus=0).remote()
        window = block_rows(table.num_rows, batch_size, num_workers)
        table = table.append_column(_POSITION_COLUMN, pa.array(np.arange(table.num_rows, dtype=np.int64)))
        blocks = [table.slice(start, window) for start in range(0, table.num_rows, window)] or [table]
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        embedded = ray.data.from_arrow(blocks).map_batches(
            ProductEmbeddingReplica, fn_constructor_args=(settings, collector), batch_size=window,
            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=num_workers),
            num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else cpus_per_worker,
        )
        try:
            with atomic_directory(output_dir, overwrite=overwrite) as staging:
                if output_format == "parquet":
                    embedded.write_parquet(str(staging), filename_provider=_parquet_filename_provider())
                    provenance = _shared_provenance(ray.get(collector.provenances.remote()))
                    count = write_manifest(staging, **provenance, metadata_columns=metadata_columns)["count"]
                else:
                    batches = iter(embedded.iter_batches(batch_format="pyarrow", batch_size=None))
                    first = next(batches, None)  # once a batch is back, its replica has recorded what it loaded
                    provenance = _shared_provenance(ray.get(collector.provenances.remote()))
                    blocks = _index_blocks(itertools.chain([first] if first is not None else [], batches), metadata_columns)
                    count = write_index_files(staging, blocks, with_metadata=bool(metadata_columns), **provenance)["count"]
                    # Replicas started after the first batch must have loaded the same model too.
                    _shared_provenance(ray.get(collector.provenances.remote()))
                report = ray.get(collector.report.remote())
                if check_images is not None:
                    check_images(report)
        finally:
            ray.kill(collector)
    return RayIndexingResult(output_dir, output_format, count, report, provenance)
