"""Tests for modeling_mmretrieval.retrieval.index (and its parts): exact/faiss search, build, save/load integrity, sharding, threads."""

import functools
import hashlib
import itertools
import json
import sys
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from modeling_mmretrieval.retrieval.index import ProductIndex
from modeling_mmretrieval.retrieval.index_files import (
    EMBEDDINGS_FILENAME,
    IDS_FILENAME,
    MAX_METADATA_CHARS,
    META_FILENAME,
    IndexIntegrityError,
    IndexModelMismatchError,
)
from modeling_mmretrieval.retrieval.product_ids import DuplicateProductIdError
from modeling_mmretrieval.retrieval.sharding import shard_row_indices

SAMPLE_CATALOGUE = Path(__file__).resolve().parents[1] / "modeling_mmretrieval" / "data" / "sample" / "train.parquet"
BRANDS = ["Nike", "Puma", "Adidas", "Reebok", "Levis", "Fabindia", "Titan", "Fastrack"]
GENDERS = ["Men", "Women", "Boys", "Girls", "Unisex"]
COLOURS = ["Black", "Navy Blue", "Red", "White", "Olive", "Mustard"]
ARTICLES = ["Running Shoes", "Polo T-shirt", "Slim Fit Jeans", "Kurta", "Analog Watch", "Backpack"]


def catalogue_rows(count, start=0):
    """Fashion catalogue rows with unique, realistic titles (generated lazily, like a streaming source)."""
    combinations = itertools.product(BRANDS, GENDERS, COLOURS, ARTICLES)
    for number, (brand, gender, colour, article) in enumerate(
        itertools.islice(combinations, start, start + count), start
    ):
        yield {"product_id": f"{10000 + number}", "title": f"{brand} {gender} {colour} {article}", "brand": brand}


@functools.cache
def trigram_hash(trigram):
    return int.from_bytes(hashlib.blake2b(trigram.encode(), digest_size=4).digest(), "little")


def embed_titles(rows, dim=64):
    """A real, deterministic text encoder: signed feature hashing of character trigrams, L2-normalised."""
    matrix = np.zeros((len(rows), dim), dtype=np.float32)
    for position, row in enumerate(rows):
        text = f"  {row['title'].lower()}  "
        for start in range(len(text) - 2):
            bucket = trigram_hash(text[start : start + 3])
            matrix[position, bucket % dim] += 1.0 if bucket >> 31 else -1.0
    return torch.nn.functional.normalize(torch.from_numpy(matrix), dim=-1)


def random_unit_vectors(count, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(count, dim, generator=generator), dim=-1)


def quarter_grid_vectors(count, dim, seed):
    """Unit vectors with four entries of +-0.5: inner products are multiples of 1/4, exact in float32,
    and repeats are common, so rankings are full of exact ties."""
    rng = np.random.default_rng(seed)
    vectors = np.zeros((count, dim), dtype=np.float32)
    for row in vectors:
        row[rng.choice(dim, size=4, replace=False)] = rng.choice([-0.5, 0.5], size=4)
    return torch.from_numpy(vectors)


def sku_ids(count):
    return [f"sku-{i:06d}" for i in range(count)]


def assert_is_exact_top_k(scores, positions, queries, catalogue, k):
    """`positions` hold a correct top-k (up to float32 rounding) and `scores` their similarities, best first."""
    full = queries.double() @ catalogue.double().T
    expected_scores = full.sort(dim=1, descending=True).values[:, :k]
    assert scores.shape == positions.shape == (len(queries), k)
    torch.testing.assert_close(scores.double(), expected_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(full.gather(1, positions), expected_scores, atol=1e-5, rtol=0)
    assert all(len(set(row)) == k for row in positions.tolist())


@pytest.mark.parametrize(
    "num_queries, num_products, k, chunk_size",
    [
        (1, 50, 5, 7),  # single query, many small chunks
        (7, 1000, 100, 64),  # k larger than a chunk
        (13, 257, 10, 32),  # catalogue size not a multiple of the chunk size
        (4, 300, 300, 1000),  # k equals the catalogue, one chunk
        (5, 128, 16, None),  # default chunking
    ],
)
def test_exact_search_matches_brute_force(num_queries, num_products, k, chunk_size):
    catalogue = random_unit_vectors(num_products, 32, seed=num_products)
    queries = random_unit_vectors(num_queries, 32, seed=num_products + 1)
    index = ProductIndex.from_embeddings(catalogue, sku_ids(num_products))

    scores, positions = index.search_positions(queries, k=k, chunk_size=chunk_size)
    assert_is_exact_top_k(scores, positions, queries, catalogue, k)
    _, ids = index.search(queries, k=k, chunk_size=chunk_size)
    assert ids == [[f"sku-{p:06d}" for p in row] for row in positions.tolist()]


@pytest.mark.parametrize("copies", [5, 80])  # 80 copies straddle the k-th score: more than the candidate slack
def test_identical_products_tie_wherever_they_sit_in_the_catalogue(copies):
    # BLAS kernels round a row's inner product differently at tile edges, so copies of one embedding at
    # scattered positions score an ulp apart unless the search rescores them the same way.
    dim, count = 384, 20_000
    catalogue = random_unit_vectors(count, dim, seed=3)
    queries = random_unit_vectors(12, dim, seed=4)
    duplicate = torch.nn.functional.normalize(queries[0] + 0.6 * catalogue[0], dim=-1)
    positions = torch.randperm(count, generator=torch.Generator().manual_seed(5))[:copies].sort().values
    catalogue[positions] = duplicate
    index = ProductIndex.from_embeddings(catalogue, sku_ids(count))

    k = 50
    for batch in (queries[:1], queries):  # the numpy path for a few queries, the torch path for a batch
        scores, found = index.search_positions(batch, k=k)
        duplicate_scores = scores[0][torch.isin(found[0], positions)]
        assert len(duplicate_scores) == min(copies, k) and len(set(duplicate_scores.tolist())) == 1
        # Equal scores rank by catalogue order: the copies come first, lowest positions first.
        assert found[0][: min(copies, k)].tolist() == positions[: min(copies, k)].tolist()
        assert_is_exact_top_k(scores, found, batch, catalogue, k)


def test_a_query_gets_the_same_results_alone_and_in_a_batch():
    catalogue = random_unit_vectors(30_000, 256, seed=6)
    queries = random_unit_vectors(40, 256, seed=7)
    index = ProductIndex.from_embeddings(catalogue, sku_ids(len(catalogue)))
    batch_scores, batch_positions = index.search_positions(queries, k=100)
    chunked_scores, chunked_positions = index.search_positions(queries, k=100, chunk_size=7_000)
    for row, query in enumerate(queries):
        scores, positions = index.search_positions(query, k=100)
        assert torch.equal(positions, batch_positions[row]) and torch.equal(scores, batch_scores[row])
        assert torch.equal(positions, chunked_positions[row]) and torch.equal(scores, chunked_scores[row])


@pytest.mark.parametrize("chunk_size", [1, 5, 64, 600, None])
def test_exact_search_breaks_ties_by_catalogue_order(chunk_size):
    catalogue = quarter_grid_vectors(600, 8, seed=0)
    queries = quarter_grid_vectors(9, 8, seed=1)
    full = (queries.double() @ catalogue.double().T).numpy()
    expected_positions = np.argsort(-full, axis=1, kind="stable")[:, :40]

    scores, positions = ProductIndex.from_embeddings(catalogue, sku_ids(600)).search_positions(
        queries, k=40, chunk_size=chunk_size
    )
    np.testing.assert_array_equal(positions.numpy(), expected_positions)
    np.testing.assert_array_equal(scores.numpy(), np.take_along_axis(full, expected_positions, axis=1))


def test_k_larger_than_catalogue_returns_every_product():
    catalogue = random_unit_vectors(20, 16, seed=3)
    scores, ids = ProductIndex.from_embeddings(catalogue, sku_ids(20)).search(catalogue[:3], k=50, chunk_size=8)
    assert scores.shape == (3, 20)
    assert all(sorted(row) == sku_ids(20) for row in ids)


def test_single_query_vector_gives_flat_results():
    catalogue = random_unit_vectors(500, 32, seed=4)
    index = ProductIndex.from_embeddings(catalogue, sku_ids(500))
    batch_scores, batch_ids = index.search(catalogue[:3], k=10)
    for row in range(3):
        scores, ids = index.search(catalogue[row], k=10)
        assert scores.shape == (10,)
        assert ids[0] == f"sku-{row:06d}"
        torch.testing.assert_close(scores, batch_scores[row])
        assert ids == batch_ids[row]
    numpy_scores, numpy_ids = index.search(catalogue[:3].numpy(), k=10)
    torch.testing.assert_close(numpy_scores, batch_scores)
    assert numpy_ids == batch_ids


def test_search_refuses_bad_queries():
    index = ProductIndex.from_embeddings(random_unit_vectors(50, 32, seed=5), sku_ids(50))
    with pytest.raises(ValueError, match="dimension 16 but this index holds dimension-32"):
        index.search(random_unit_vectors(2, 16, seed=6))
    with pytest.raises(ValueError, match="L2-normalised"):
        index.search(torch.full((2, 32), 3.0))
    with pytest.raises(ValueError, match="NaN"):
        index.search(torch.full((32,), float("nan")))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(random_unit_vectors(1, 32, seed=7), k=0)
    with pytest.raises(ValueError, match="backend"):
        index.search(random_unit_vectors(1, 32, seed=7), backend="annoy")


def test_title_search_on_a_built_catalogue():
    rows = list(catalogue_rows(400))
    index = ProductIndex.build(
        datasets.Dataset.from_list(rows), embed_titles, batch_size=32, show_progress=False, metadata_columns=("title",)
    )
    assert len(index) == 400 and index.dim == 64
    wanted = rows[123]
    scores, ids = index.search(embed_titles([{"title": wanted["title"]}])[0], k=5)
    assert ids[0] == wanted["product_id"]
    assert scores[0].item() == pytest.approx(1.0, abs=1e-5)
    assert index.metadata_for(ids[0]) == {"title": wanted["title"]}


def test_real_catalogue_titles_retrieve_their_products():
    rows = pq.read_table(SAMPLE_CATALOGUE, columns=["product_id", "title"]).to_pylist()
    index = ProductIndex.build(
        datasets.Dataset.from_list(rows),
        lambda batch: embed_titles(batch, dim=256),
        batch_size=256,
        show_progress=False,
    )
    first_product_with_title = {}
    for row in rows:
        first_product_with_title.setdefault(row["title"].lower(), row["product_id"])
    assert len(first_product_with_title) < len(rows), "the sample should contain products sharing a title"

    _, ids = index.search(embed_titles(rows, dim=256), k=1)
    # Products sharing a (case-folded) title embed identically and tie; the earliest catalogue row wins.
    assert [found[0] for found in ids] == [first_product_with_title[row["title"].lower()] for row in rows]


def test_metadata_is_kept_to_small_display_strings():
    long_title = "Handwoven Pure Silk Banarasi Saree " * 20
    index = ProductIndex.build(
        [{"product_id": "p1", "title": long_title, "price": 1299}],
        embed_titles,
        metadata_columns=("title", "price", "colour"),
        show_progress=False,
    )
    assert index.metadata_for("p1") == {"title": long_title[:MAX_METADATA_CHARS], "price": "1299", "colour": None}
    with pytest.raises(KeyError, match="p2"):
        index.metadata_for("p2")


def test_build_from_dataset_and_generator_agree():
    rows = list(catalogue_rows(150))
    from_dataset = ProductIndex.build(
        datasets.Dataset.from_list(rows), embed_titles, batch_size=16, show_progress=False
    )
    from_generator = ProductIndex.build(catalogue_rows(150), embed_titles, batch_size=7, show_progress=False)
    assert from_dataset.ids == from_generator.ids == tuple(row["product_id"] for row in rows)
    np.testing.assert_array_equal(from_dataset.embeddings, from_generator.embeddings)


@pytest.mark.parametrize("count", [0, 1, 23])
def test_ids_file_is_the_json_dump_of_the_ids_whatever_the_batches(tmp_path, count):
    # Files written before ids.json was streamed batch by batch must keep loading, with the same checksums.
    spellings = ["sku-{}", "crème-{}", "{}", '"quoted"\n{}', "日本-{}"]
    ids = [position if position % 3 == 0 else spellings[position % 5].format(position) for position in range(count)]
    rows = [{"product_id": product_id, "title": f"product {position}"} for position, product_id in enumerate(ids)]
    index = ProductIndex.build(rows, embed_titles, batch_size=5, output_dir=tmp_path / "index", show_progress=False)
    expected = json.dumps(ids, ensure_ascii=False).encode("utf-8")
    assert (tmp_path / "index" / IDS_FILENAME).read_bytes() == expected
    recorded = json.loads((tmp_path / "index" / META_FILENAME).read_text())["ids_sha256"]
    assert recorded == hashlib.sha256(expected).hexdigest()
    assert list(index.ids) == ids
    index.save(tmp_path / "saved")
    assert (tmp_path / "saved" / IDS_FILENAME).read_bytes() == expected


def test_build_rejects_bad_rows_and_encoders():
    rows = list(catalogue_rows(10))
    with pytest.raises(DuplicateProductIdError, match=rows[3]["product_id"]):
        ProductIndex.build(rows + [rows[3]], embed_titles, batch_size=4, show_progress=False)
    with pytest.raises(KeyError, match="sku"):
        ProductIndex.build(rows, embed_titles, id_column="sku", show_progress=False)
    with pytest.raises(ValueError, match="L2-normalised"):
        ProductIndex.build(rows, lambda batch: 2 * embed_titles(batch), show_progress=False)
    with pytest.raises(ValueError, match="returned 1 embeddings for 4 rows"):
        ProductIndex.build(rows, lambda batch: embed_titles(batch[:1]), batch_size=4, show_progress=False)
    with pytest.raises(ValueError, match="expected 12 rows"):
        ProductIndex.build(iter(rows), embed_titles, num_rows=12, show_progress=False)


def test_save_load_round_trip(tmp_path):
    rows = list(catalogue_rows(300))
    built = ProductIndex.build(
        rows,
        embed_titles,
        output_dir=tmp_path / "index",
        batch_size=64,
        show_progress=False,
        model_id="org/mmretrieval",
        config_hash="abc123",
        model_fingerprint="f1e2d3",
        metadata_columns=("title", "brand"),
    )
    queries = embed_titles(rows[::37])
    expected_scores, expected_ids = built.search(queries, k=20)

    meta = json.loads((tmp_path / "index" / META_FILENAME).read_text())
    assert (meta["count"], meta["dim"], meta["model_id"], meta["config_hash"], meta["model_fingerprint"]) == (
        300,
        64,
        "org/mmretrieval",
        "abc123",
        "f1e2d3",
    )
    assert (
        meta["embeddings_sha256"]
        == hashlib.sha256((tmp_path / "index" / EMBEDDINGS_FILENAME).read_bytes()).hexdigest()
    )

    for mmap in (True, False):
        loaded = ProductIndex.load(tmp_path / "index", expected_model_fingerprint="f1e2d3", mmap=mmap)
        scores, ids = loaded.search(queries, k=20)
        assert torch.equal(scores, expected_scores) and ids == expected_ids
        assert loaded.metadata_for(rows[5]["product_id"]) == {"title": rows[5]["title"], "brand": rows[5]["brand"]}

    in_memory = ProductIndex.from_embeddings(built.embeddings, built.ids, model_id="org/mmretrieval")
    in_memory.save(tmp_path / "copy")
    resaved = ProductIndex.load(tmp_path / "copy")
    scores, ids = resaved.search(queries, k=20)
    assert torch.equal(scores, expected_scores) and ids == expected_ids
    assert not resaved.has_metadata and resaved.config_hash is None


def test_save_is_atomic_and_refuses_to_clobber(tmp_path):
    rows = list(catalogue_rows(40))
    index = ProductIndex.build(rows, embed_titles, output_dir=tmp_path / "index", show_progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        index.save(tmp_path / "index")

    def failing_encoder(batch):
        if failing_encoder.calls == 2:
            raise RuntimeError("encoder crashed")
        failing_encoder.calls += 1
        return embed_titles(batch)

    failing_encoder.calls = 0
    with pytest.raises(RuntimeError, match="encoder crashed"):
        ProductIndex.build(
            rows[:20],
            failing_encoder,
            output_dir=tmp_path / "index",
            batch_size=8,
            overwrite=True,
            show_progress=False,
        )
    # The failed rebuild left neither partial files nor a damaged previous index behind.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index"]
    assert ProductIndex.load(tmp_path / "index").ids == index.ids

    smaller = ProductIndex.build(
        rows[:20], embed_titles, output_dir=tmp_path / "index", overwrite=True, show_progress=False
    )
    assert ProductIndex.load(tmp_path / "index").ids == smaller.ids
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index"]


def test_load_refuses_other_model_or_config(tmp_path):
    ProductIndex.build(
        catalogue_rows(30),
        embed_titles,
        output_dir=tmp_path / "index",
        model_id="org/model-a",
        config_hash="hash-a",
        model_fingerprint="fingerprint-a",
        show_progress=False,
    )
    with pytest.raises(IndexModelMismatchError, match="model_fingerprint='fingerprint-a' .*'fingerprint-b'"):
        ProductIndex.load(tmp_path / "index", expected_model_fingerprint="fingerprint-b")
    assert len(ProductIndex.load(tmp_path / "index", expected_model_fingerprint="fingerprint-a")) == 30


@pytest.fixture
def saved_index(tmp_path):
    directory = tmp_path / "index"
    ProductIndex.build(catalogue_rows(120), embed_titles, output_dir=directory, show_progress=False)
    return directory


def test_load_detects_flipped_embedding_byte(saved_index):
    path = saved_index / EMBEDDINGS_FILENAME
    payload = bytearray(path.read_bytes())
    payload[4 * 64 * 50 + 17] ^= 0x01
    path.write_bytes(bytes(payload))
    with pytest.raises(IndexIntegrityError, match="checksum"):
        ProductIndex.load(saved_index)
    # Skipping the full hash is an explicit opt-out for huge indexes.
    assert len(ProductIndex.load(saved_index, verify_checksums=False)) == 120


def test_load_detects_truncated_embeddings(saved_index):
    path = saved_index / EMBEDDINGS_FILENAME
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(IndexIntegrityError, match="truncated"):
        ProductIndex.load(saved_index, verify_checksums=False)


def test_load_detects_edited_ids(saved_index):
    path = saved_index / IDS_FILENAME
    ids = json.loads(path.read_text())
    ids[0], ids[1] = ids[1], ids[0]
    path.write_text(json.dumps(ids))
    with pytest.raises(IndexIntegrityError, match=IDS_FILENAME):
        ProductIndex.load(saved_index)


@pytest.mark.parametrize("bad_row", ['["Nike Men Black Running Shoes"]', '{"title": "Nike'])
def test_load_names_the_metadata_file_for_rows_that_are_not_json_objects(tmp_path, bad_row):
    # Checksums catch edits; this is a file whose checksum was recomputed by whoever wrote the bad row.
    directory = tmp_path / "index"
    ProductIndex.build(catalogue_rows(5), embed_titles, output_dir=directory, show_progress=False,
                       metadata_columns=("title",))
    path = directory / "metadata.jsonl"
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[2] = bad_row
    path.write_text("\n".join(lines), encoding="utf-8")
    meta = json.loads((directory / META_FILENAME).read_text())
    meta["metadata_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (directory / META_FILENAME).write_text(json.dumps(meta))
    with pytest.raises(IndexIntegrityError, match="metadata.jsonl row 2"):
        ProductIndex.load(directory)


def test_load_detects_inconsistent_or_missing_meta(saved_index):
    meta_path = saved_index / META_FILENAME
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "count": meta["count"] - 1}))
    with pytest.raises(IndexIntegrityError, match="bytes"):
        ProductIndex.load(saved_index)
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(IndexIntegrityError, match="format version 99"):
        ProductIndex.load(saved_index)
    meta_path.unlink()
    with pytest.raises(IndexIntegrityError, match=META_FILENAME):
        ProductIndex.load(saved_index)


def test_build_streams_with_bounded_memory(tmp_path):
    num_rows, dim, batch_size = 50_000, 256, 1000
    matrix_bytes, batch_bytes = num_rows * dim * 4, batch_size * dim * 4
    progress = {"produced": 0, "embedded": 0, "largest_batch": 0, "largest_backlog": 0}

    def rows():
        for number in range(num_rows):
            progress["produced"] += 1
            yield {"product_id": number}

    def embed_batch(batch):
        progress["largest_batch"] = max(progress["largest_batch"], len(batch))
        progress["largest_backlog"] = max(progress["largest_backlog"], progress["produced"] - progress["embedded"])
        progress["embedded"] += len(batch)
        # numpy allocations are visible to tracemalloc, so anything the index keeps of them is measured.
        vectors = np.random.default_rng(batch[0]["product_id"]).standard_normal((len(batch), dim), dtype=np.float32)
        return torch.from_numpy(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))

    def peak_traced_bytes(**build_options):
        tracemalloc.start()
        try:
            index = ProductIndex.build(
                rows(), embed_batch, batch_size=batch_size, show_progress=False, **build_options
            )
            return index, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    on_disk, disk_peak = peak_traced_bytes(output_dir=tmp_path / "index")
    assert progress == {
        "produced": num_rows,
        "embedded": num_rows,
        "largest_batch": batch_size,
        "largest_backlog": batch_size,
    }
    assert len(on_disk) == num_rows
    # Streaming to disk keeps ids and a few batches, far less than the matrix itself.
    assert disk_peak < matrix_bytes / 2

    progress.update(produced=0, embedded=0)
    in_memory, memory_peak = peak_traced_bytes()
    assert memory_peak < disk_peak + matrix_bytes + 4 * batch_bytes
    np.testing.assert_array_equal(in_memory.embeddings[::997], on_disk.embeddings[::997])


@pytest.fixture
def single_threaded_faiss():
    """faiss's OpenMP threads crawl when the cores are oversubscribed (as on shared CI machines)."""
    faiss = pytest.importorskip("faiss")
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def test_faiss_flat_backend_matches_exact(single_threaded_faiss):
    catalogue = random_unit_vectors(3000, 48, seed=8)
    queries = random_unit_vectors(25, 48, seed=9)
    index = ProductIndex.from_embeddings(catalogue, sku_ids(3000))
    exact_scores, exact_positions = index.search_positions(queries, k=30)
    faiss_scores, faiss_positions = index.search_positions(queries, k=30, backend="faiss-flat")
    assert_is_exact_top_k(faiss_scores, faiss_positions, queries, catalogue, 30)
    torch.testing.assert_close(faiss_scores, exact_scores, atol=1e-5, rtol=0)
    assert (faiss_positions == exact_positions).float().mean() > 0.99


def test_faiss_hnsw_backend_has_high_recall_and_follows_adds(single_threaded_faiss):
    catalogue = random_unit_vectors(1000, 32, seed=10)
    noise = random_unit_vectors(100, 32, seed=11)
    queries = torch.nn.functional.normalize(catalogue[:100] + 0.3 * noise, dim=-1)
    index = ProductIndex.from_embeddings(catalogue, sku_ids(1000)).set_backend(
        "faiss-hnsw", hnsw_neighbors=16, hnsw_ef_construction=40, hnsw_ef_search=64
    )
    _, exact = index.search_positions(queries, k=10, backend="exact")
    _, approximate = index.search_positions(queries, k=10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate.tolist(), exact.tolist())])
    assert recall > 0.9

    new_vector = random_unit_vectors(1, 32, seed=12)
    index.add(new_vector, ["sku-new"])
    assert index.search(new_vector[0], k=1)[1] == ["sku-new"]


def test_missing_faiss_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    index = ProductIndex.from_embeddings(random_unit_vectors(10, 8, seed=13), sku_ids(10))
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        index.search(random_unit_vectors(1, 8, seed=14), k=3, backend="faiss-flat")
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        index.set_backend("faiss-hnsw")


def test_shard_row_indices_partition_the_rows():
    for total, world_size, strategy in itertools.product([0, 1, 7, 100, 101], [1, 2, 3, 8], ["contiguous", "strided"]):
        shards = [shard_row_indices(total, rank, world_size, strategy) for rank in range(world_size)]
        assert sorted(itertools.chain.from_iterable(shards)) == list(range(total))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize(
    "strategy, source", [("contiguous", "dataset"), ("strided", "generator"), ("strided", "dataset")]
)
def test_sharded_build_and_merge_equals_single_build(tmp_path, strategy, source):
    num_rows, world_size = 101, 3
    single = ProductIndex.build(
        catalogue_rows(num_rows),
        embed_titles,
        output_dir=tmp_path / "single",
        batch_size=8,
        model_id="org/m",
        metadata_columns=("title",),
        show_progress=False,
    )
    shard_dirs = []
    for rank in range(world_size):
        rows = (
            datasets.Dataset.from_list(list(catalogue_rows(num_rows)))
            if source == "dataset"
            else catalogue_rows(num_rows)
        )
        shard_dir = tmp_path / f"shard-{rank}"
        shard = ProductIndex.build(
            rows,
            embed_titles,
            output_dir=shard_dir,
            batch_size=8,
            model_id="org/m",
            metadata_columns=("title",),
            shard=(rank, world_size),
            shard_strategy=strategy,
            show_progress=False,
        )
        assert len(shard) == len(shard_row_indices(num_rows, rank, world_size, strategy))
        shard_dirs.append(shard_dir)

    merged = ProductIndex.merge(shard_dirs[::-1], tmp_path / "merged")
    assert merged.ids == single.ids
    np.testing.assert_array_equal(merged.embeddings, single.embeddings)
    assert merged.metadata_for("10050") == single.metadata_for("10050")
    for name in (EMBEDDINGS_FILENAME, IDS_FILENAME):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()


def test_merge_refuses_incomplete_or_incompatible_shards(tmp_path):
    def build_shard(name, rank, world_size=3, model_fingerprint="fingerprint-m"):
        ProductIndex.build(
            catalogue_rows(30),
            embed_titles,
            output_dir=tmp_path / name,
            shard=(rank, world_size),
            num_rows=30,
            model_id="org/m",
            model_fingerprint=model_fingerprint,
            show_progress=False,
        )

    for rank in range(3):
        build_shard(f"rank-{rank}", rank)
    build_shard("other-model", 2, model_fingerprint="fingerprint-other")
    with pytest.raises(ValueError, match=r"got ranks \[0, 2\]"):
        ProductIndex.merge([tmp_path / "rank-0", tmp_path / "rank-2"], tmp_path / "merged")
    with pytest.raises(IndexModelMismatchError, match="other-model has 'fingerprint-other'"):
        ProductIndex.merge([tmp_path / "rank-0", tmp_path / "rank-1", tmp_path / "other-model"], tmp_path / "merged")

    ProductIndex.build(catalogue_rows(10), embed_titles, output_dir=tmp_path / "plain-a", show_progress=False)
    ProductIndex.build(catalogue_rows(10, start=5), embed_titles, output_dir=tmp_path / "plain-b", show_progress=False)
    with pytest.raises(DuplicateProductIdError, match="10005"):
        ProductIndex.merge([tmp_path / "plain-a", tmp_path / "plain-b"], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_concurrent_searches_equal_sequential_ones():
    catalogue = random_unit_vectors(5000, 64, seed=15)
    queries = random_unit_vectors(48, 64, seed=16)
    index = ProductIndex.from_embeddings(catalogue, sku_ids(5000))
    sequential = [index.search(query, k=25, chunk_size=700) for query in queries]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(lambda query: index.search(query, k=25, chunk_size=700), queries))
    for (expected_scores, expected_ids), (scores, ids) in zip(sequential, concurrent):
        assert torch.equal(scores, expected_scores) and ids == expected_ids


@pytest.mark.parametrize("screening", [None, True])  # True: searches also extend the float16 copy as rows arrive
def test_add_while_searching_is_safe(tmp_path, screening):
    half = 16
    original = torch.nn.functional.normalize(
        torch.cat([random_unit_vectors(2000, half, seed=17), torch.zeros(2000, half)], 1), dim=-1
    )
    # New products live in the other half of the space: they score 0 against every query, so they never
    # enter a top-5 that already holds positive scores, and results must not change while they arrive.
    added = torch.cat([torch.zeros(600, half), random_unit_vectors(600, half, seed=18)], 1)
    queries = torch.nn.functional.normalize(
        torch.cat([random_unit_vectors(40, half, seed=19), torch.zeros(40, half)], 1), dim=-1
    )
    ProductIndex.from_embeddings(original, sku_ids(2000)).save(tmp_path / "index")
    index = ProductIndex.load(tmp_path / "index", mmap=True).set_backend("exact", screening=screening)
    expected = [index.search(query, k=5) for query in queries]
    stop_adding = threading.Event()

    def add_products():
        for start in range(0, 600, 20):
            index.add(added[start : start + 20], [f"new-{i}" for i in range(start, start + 20)])
        stop_adding.set()

    adder = threading.Thread(target=add_products)
    adder.start()
    with ThreadPoolExecutor(max_workers=4) as pool:
        rounds = 0
        while not stop_adding.is_set() or rounds == 0:
            results = list(pool.map(lambda query: index.search(query, k=5), queries))
            assert all(torch.equal(s, es) and i == ei for (s, i), (es, ei) in zip(results, expected))
            rounds += 1
    adder.join()

    assert len(index) == 2600
    assert index.search(added[123], k=1)[1] == ["new-123"]
    with pytest.raises(DuplicateProductIdError, match="new-5"):
        index.add(added[:2], ["fresh", "new-5"])
    assert len(index) == 2600 and "fresh" not in index
    index.save(tmp_path / "grown")
    assert ProductIndex.load(tmp_path / "grown").ids == index.ids


@pytest.mark.parametrize("bad_value, message", [(float("nan"), "holds NaN or infinite values"), (3.0, "has L2 norm 3, not 1")])
def test_load_refuses_a_row_that_is_not_finite_and_unit_norm_even_without_checksums(tmp_path, bad_value, message):
    """A NaN row loaded without checksum verification used to rank first for every query (and crash `k=1`)."""
    vectors = random_unit_vectors(300, 16, seed=23)
    ProductIndex.from_embeddings(vectors, sku_ids(300)).save(tmp_path / "index")
    embeddings_file = tmp_path / "index" / "embeddings.f32"
    corrupted = np.fromfile(embeddings_file, dtype="<f4").reshape(300, 16)
    corrupted[137] = bad_value if np.isnan(bad_value) else corrupted[137] * bad_value
    corrupted.tofile(embeddings_file)
    for mmap in (True, False):
        with pytest.raises(IndexIntegrityError, match=rf"product id 'sku-000137' \(row 137\) {message}"):
            ProductIndex.load(tmp_path / "index", verify_checksums=False, mmap=mmap)
    with pytest.raises(IndexIntegrityError, match="checksum"):  # with checksums, the hash mismatch is found first
        ProductIndex.load(tmp_path / "index")
