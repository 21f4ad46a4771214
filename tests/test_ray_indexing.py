"""Indexing on Ray (`retrieval.ray_indexing`, `mmretrieval index --engine ray`) on a local 2-CPU Ray cluster: the index
equals the single-process one, Parquet shards read back into it, LanceDB searches them as exact search does, and the
command line runs it and refuses bad flags in one line."""

import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_towers import noisy_png, save_tiny_pretrained_towers

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor, cli
from modeling_mmretrieval.data import load_catalogue
from modeling_mmretrieval.data.images import ImageReport
from modeling_mmretrieval.retrieval.index import ProductIndex
from modeling_mmretrieval.retrieval.index_files import IndexModelMismatchError
from modeling_mmretrieval.retrieval.parquet_embeddings import (
    product_index_from_parquet,
    read_embeddings_table,
    read_manifest,
)
from modeling_mmretrieval.retrieval.ray_indexing import index_catalogue_with_ray
from modeling_mmretrieval.retrieval.search import load_retriever
from modeling_mmretrieval.retrieval.search import build_product_index, embed_queries
from modeling_mmretrieval.retrieval.vector_database import load_parquet_into_lancedb, search_lancedb

ray = pytest.importorskip("ray")
pytest.importorskip("lancedb")

IMAGE_SIZE = 28
NUM_PRODUCTS = 45
BATCH_SIZE = 2  # read windows of 32 rows: the catalogue spans two Ray blocks
COLOURS = {"Red": (200, 30, 40), "Blue": (30, 50, 190), "Green": (40, 160, 60)}
TYPES = ("Kurta", "Tshirts", "Jeans", "Sneakers")


def png(rgb, seed: int) -> bytes:
    return noisy_png(rgb, seed, size=(30, 40))


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny 3tower checkpoint saved to a folder, which every replica loads."""
    towers = tmp_path_factory.mktemp("towers")
    save_tiny_pretrained_towers(towers, IMAGE_SIZE, text_layers=1)
    model = MultimodalRetrievalModel.from_towers_pretrained(
        str(towers / "text"), str(towers / "vision"), architecture="3tower", fusion="residual", max_product_length=32
    )
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(
        str(towers / "text"), str(towers / "vision"), config=model.config
    )
    folder = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def catalogue_dir(tmp_path_factory):
    """A Parquet catalogue whose images are PNG bytes, PNG files at paths relative to it, and one missing file."""
    folder = tmp_path_factory.mktemp("catalogue")
    (folder / "images").mkdir()
    rows = []
    for position in range(NUM_PRODUCTS):
        colour = list(COLOURS)[position % 3]
        kind = TYPES[position % 4]
        encoded = png(COLOURS[colour], position)
        if position % 2:
            image = {"bytes": encoded, "path": None}
        else:
            (folder / "images" / f"{position}.png").write_bytes(encoded)
            image = {"bytes": None, "path": f"images/{position}.png"}
        rows.append({"product_id": f"sku-{position}", "title": f"{colour} {kind} {position}",
                     "description": f"A {colour.lower()} {kind.lower()} " + "in soft cotton " * (position % 7),
                     "article_type": kind, "base_colour": colour, "gender": "Women" if position % 5 else "Men",
                     "image": image})
    rows[4]["image"] = {"bytes": None, "path": "images/no-such-photo.png"}
    pq.write_table(pa.Table.from_pylist(rows), folder / "train.parquet")
    return folder


@pytest.fixture(scope="module")
def catalogue(catalogue_dir):
    return load_catalogue(str(catalogue_dir), split="train", needs_queries=False)


@pytest.fixture(scope="module")
def single_process(checkpoint, catalogue):
    model, processor = load_retriever(checkpoint, "cpu")
    report = ImageReport()
    index = build_product_index(model, processor, catalogue, batch_size=BATCH_SIZE, show_progress=False,
                                image_report=report)
    return model, processor, index, report


def assert_same_index(index: ProductIndex, reference: ProductIndex) -> None:
    assert list(index.ids) == list(reference.ids)
    np.testing.assert_allclose(index.embeddings, reference.embeddings, rtol=0, atol=1e-5)
    assert index.model_fingerprint == reference.model_fingerprint is not None
    assert index.config_hash == reference.config_hash


def test_the_ray_index_equals_the_single_process_index(ray_cluster, checkpoint, catalogue, single_process, tmp_path):
    _, _, reference, reference_report = single_process
    result = index_catalogue_with_ray(checkpoint, catalogue, tmp_path / "index", num_workers=2, batch_size=BATCH_SIZE)
    index = ProductIndex.load(tmp_path / "index")  # checksums verified
    assert_same_index(index, reference)
    assert index.model_id == reference.model_id and result.count == NUM_PRODUCTS
    assert index.metadata_for("sku-7") == reference.metadata_for("sku-7") == {"title": catalogue[7]["title"]}
    # Paths relative to the catalogue and bytes both decoded; the missing file is reported, as in one process.
    assert result.image_report.counts == reference_report.counts
    assert result.image_report.counts["ok"] == NUM_PRODUCTS - 1
    assert result.image_report.status_of("sku-4").value == "missing"


def run_cli(arguments, capsys):
    status = cli.main(["index", *arguments])
    return status, capsys.readouterr()


def cli_arguments(checkpoint, catalogue_dir) -> list[str]:
    return ["--model_name_or_path", str(checkpoint), "--dataset", str(catalogue_dir), "--split", "train",
            "--batch_size", str(BATCH_SIZE), "--no_image_feature_store"]


def test_the_command_writes_parquet_shards_that_read_back_and_rank_in_lancedb_as_exact_search(
    ray_cluster, checkpoint, catalogue_dir, catalogue, single_process, tmp_path, capsys
):
    model, processor, reference, _ = single_process
    folder = tmp_path / "embeddings"
    status, output = run_cli([*cli_arguments(checkpoint, catalogue_dir), "--engine", "ray", "--num_workers", "2",
                              "--output_format", "parquet", "--output_dir", str(folder)], capsys)
    assert status == 0, output.err[-2000:]
    assert f"Indexed {NUM_PRODUCTS} products with 2 Ray worker(s) into {folder} (parquet)" in output.out
    assert json.loads((folder / "image_report.json").read_text())["missing"] == 1
    manifest = read_manifest(folder, expected_model_fingerprint=reference.model_fingerprint)
    assert (manifest["count"], manifest["dim"], manifest["metric"]) == (NUM_PRODUCTS, reference.dim, "cosine")
    assert manifest["model_id"] == reference.model_id
    schema = pq.read_schema(folder / manifest["files"][0])
    assert schema.field("embedding").type == pa.list_(pa.float32(), reference.dim)
    assert {"product_id", "row", "title", "article_type", "base_colour", "gender"} <= set(schema.names)
    assert read_embeddings_table(folder)["base_colour"].to_pylist() == catalogue["base_colour"]
    assert_same_index(product_index_from_parquet(folder), reference)
    with pytest.raises(IndexModelMismatchError):
        read_manifest(folder, expected_model_fingerprint="another-model")

    table = load_parquet_into_lancedb(folder, tmp_path / "catalogue.lancedb")
    assert table.count_rows() == NUM_PRODUCTS
    queries = embed_queries(model, processor, ["red kurta", "blue jeans for men", "green sneakers", "tshirts"])
    scores, ids = search_lancedb(table, queries, k=10, expected_model_fingerprint=reference.model_fingerprint)
    exact_scores, exact_ids = reference.search(queries, k=10)
    assert scores.shape == (4, 10)
    np.testing.assert_allclose(scores.numpy(), exact_scores.numpy(), rtol=0, atol=1e-5)
    every_score = queries.numpy() @ np.asarray(reference.embeddings).T
    for query, (found, expected) in enumerate(zip(ids, exact_ids)):
        # Ties aside: where the rankings differ, the two products score the same.
        for got, want in zip(found, expected):
            got_score = every_score[query, reference.position_of(got)]
            assert got == want or abs(got_score - every_score[query, reference.position_of(want)]) < 1e-6
    _, filtered_ids = search_lancedb(table, queries[:1], k=5, where="gender = 'Men'")
    men = {row["product_id"] for row in catalogue if row["gender"] == "Men"}
    assert set(filtered_ids[0]) <= men and len(filtered_ids[0]) == 5
    with pytest.raises(IndexModelMismatchError):
        search_lancedb(table, queries, expected_model_fingerprint="another-model")


def test_bad_flags_are_refused_in_one_line_before_any_worker_starts(checkpoint, catalogue_dir, tmp_path, capsys):
    bad = {
        "--num_workers must be positive": ["--engine", "ray", "--num_workers", "0"],
        "--output_format needs --engine ray": ["--output_format", "parquet"],
        "no column 'name' (--title_column)": ["--engine", "ray", "--title_column", "name"],
        "cannot load a retriever": ["--engine", "ray", "--model_name_or_path", str(tmp_path / "no-model")],
    }
    for expected, flags in bad.items():
        status, output = run_cli([*cli_arguments(checkpoint, catalogue_dir), *flags,
                                  "--output_dir", str(tmp_path / "bad")], capsys)
        lines = output.err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and expected in lines[0], output.err
    assert not (tmp_path / "bad").exists()


def test_without_ray_the_command_says_how_to_install_it(checkpoint, catalogue_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    status, output = run_cli([*cli_arguments(checkpoint, catalogue_dir), "--engine", "ray",
                              "--output_dir", str(tmp_path / "index")], capsys)
    lines = output.err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "pip install" in lines[0], output.err
