"""Tests of the quantised index backends (int8, binary, faiss-ivfpq; retrieval/quantised_search.py) beside the
faiss ones: recall@100 against exact search on clustered embeddings, exact rescored scores and tie order, filters,
rows added later, a memory-mapped save/load round trip, bad settings, and the `mmretrieval search` flags."""

import json
import threading

import numpy as np
import pytest
import torch

from modeling_mmretrieval.commands import search as search_command
from modeling_mmretrieval.data import SAMPLE_DATA_DIR
from modeling_mmretrieval.retrieval.index import ProductIndex
from modeling_mmretrieval.retrieval.index_files import EMBEDDINGS_FILENAME
from modeling_mmretrieval.retrieval.quantised_search import release_mapped_rows

faiss = pytest.importorskip("faiss")

COUNT, DIM, K = 6000, 96, 100
# The recall@100 each backend must reach on the clustered catalogue below, with the settings of BACKENDS.
BACKENDS = {
    "int8": ({}, 0.99),
    "binary": ({}, 0.9),
    "faiss-ivfpq": ({"ivf_nlist": 32, "ivf_nprobe": 8, "ivf_training_rows": 4096}, 0.85),
    "faiss-hnsw": ({"hnsw_neighbors": 16, "hnsw_ef_construction": 64, "hnsw_ef_search": 256}, 0.95),
    "faiss-flat": ({}, 0.999),
}
QUANTISED = ("int8", "binary", "faiss-ivfpq")


def clustered_unit_vectors(count: int, dim: int, seed: int, *, clusters: int = 60) -> np.ndarray:
    """Embeddings with structure: unequal clusters whose centres lie in a 16-dimensional subspace, a direction
    every row shares, per-row spread and isotropic noise, L2-normalised (unlike isotropic random vectors)."""
    generator = np.random.default_rng(seed)
    structure = np.random.default_rng(1234)  # the same clusters for the catalogue and its queries
    basis = np.linalg.qr(structure.standard_normal((dim, 16)))[0].T
    centres = structure.standard_normal((clusters, 16))
    common = 1.5 * structure.standard_normal(dim) / np.sqrt(dim)
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.8
    members = generator.choice(clusters, size=count, p=weights / weights.sum())
    rows = (centres[members] + 0.35 * generator.standard_normal((count, 16))) @ basis
    rows += 0.3 * generator.standard_normal((count, dim)) + common
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def noisy_queries(count: int, dim: int, seed: int) -> torch.Tensor:
    """Noisy copies of held-out points of the same clusters."""
    held_out = clustered_unit_vectors(count, dim, seed)
    noisy = held_out + 0.25 * np.random.default_rng(seed + 1).standard_normal(held_out.shape) / np.sqrt(dim)
    return torch.nn.functional.normalize(torch.from_numpy(noisy.astype(np.float32)), dim=-1)


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, truth)]) / truth.shape[1])


def assert_exact_scores_in_exact_order(scores, positions, queries, catalogue):
    """Scores are the float cosines of the rows returned, ordered by score then catalogue position."""
    valid = positions >= 0
    true_scores = np.einsum("qkd,qd->qk", catalogue[positions.clamp(min=0).numpy()].astype(np.float64),
                            queries.numpy().astype(np.float64))
    np.testing.assert_allclose(scores.numpy()[valid.numpy()], true_scores[valid.numpy()], atol=1e-6, rtol=0)
    for row_scores, row_positions in zip(scores.tolist(), positions.tolist()):
        keys = [(-score, position) for score, position in zip(row_scores, row_positions) if position >= 0]
        assert keys == sorted(keys)


@pytest.fixture(scope="module")
def single_threaded_faiss():
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def catalogue():
    return clustered_unit_vectors(COUNT, DIM, seed=0)


@pytest.fixture(scope="module")
def queries():
    return noisy_queries(40, DIM, seed=7)


@pytest.fixture(scope="module")
def exact_top(catalogue, queries):
    return ProductIndex.from_embeddings(catalogue, list(range(COUNT))).search_positions(queries, K)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_every_backend_reaches_its_recall_at_100_with_exact_scores(
    backend, catalogue, queries, exact_top, single_threaded_faiss
):
    settings, required = BACKENDS[backend]
    index = ProductIndex.from_embeddings(catalogue, list(range(COUNT))).set_backend(backend, **settings)
    scores, positions = index.search_positions(queries, K)
    assert scores.shape == positions.shape == (len(queries), K)
    assert recall(positions, exact_top[1]) >= required
    if backend in QUANTISED:
        assert_exact_scores_in_exact_order(scores, positions, queries, catalogue)
    # One query alone gets the same answer as in a batch.
    alone_scores, alone_positions = index.search_positions(queries[3], K)
    assert torch.equal(alone_positions, positions[3])
    torch.testing.assert_close(alone_scores, scores[3], atol=1e-6, rtol=0)


def test_more_candidates_raise_binary_recall(catalogue, queries, exact_top):
    index = ProductIndex.from_embeddings(catalogue, list(range(COUNT)))
    few = recall(index.set_backend("binary", rescore_candidates=2).search_positions(queries, K)[1], exact_top[1])
    many = recall(index.set_backend("binary", rescore_candidates=30).search_positions(queries, K)[1], exact_top[1])
    assert few < many and many >= 0.99


@pytest.mark.parametrize("backend", ["int8", "binary"])
def test_ties_are_ordered_as_the_exact_search_orders_them(backend):
    # Every product four times over: equal codes and equal float scores, so catalogue order must decide.
    distinct = clustered_unit_vectors(500, 32, seed=3)
    catalogue = np.repeat(distinct, 4, axis=0)
    index = ProductIndex.from_embeddings(catalogue, list(range(len(catalogue))))
    queries = torch.from_numpy(distinct[:5])
    exact_scores, exact_positions = index.search_positions(queries, 12, backend="exact")
    # Enough candidates that both find the exact top 12 (32 bits per row rank coarsely): what is tested is the order.
    candidates = {"int8": 8, "binary": 40}[backend]
    scores, positions = index.set_backend(backend, rescore_candidates=candidates).search_positions(queries, 12)
    assert torch.equal(positions, exact_positions)
    torch.testing.assert_close(scores, exact_scores, atol=0, rtol=0)


@pytest.mark.parametrize("backend", QUANTISED)
def test_filters_rank_only_allowed_products(backend, catalogue, queries, single_threaded_faiss):
    settings, required = BACKENDS[backend]
    index = ProductIndex.from_embeddings(catalogue, list(range(COUNT))).set_backend(backend, **settings)
    allowed = np.random.default_rng(5).random(COUNT) < 0.3
    _, truth = index.search_positions(queries, K, backend="exact", allowed=allowed)
    scores, positions = index.search_positions(queries, K, allowed=allowed)
    filled = positions >= 0
    assert allowed[positions[filled].numpy()].all()
    assert recall(positions, truth) >= required - 0.05
    assert_exact_scores_in_exact_order(scores, positions, queries, catalogue)
    # Fewer allowed products than k: exactly those come back, as the exact search ranks them.
    few = np.zeros(COUNT, dtype=bool)
    few[[11, 500, 2999, 5998]] = True
    few_scores, few_positions = index.search_positions(queries[:3], 10, allowed=few)
    exact_scores, exact_positions = index.search_positions(queries[:3], 10, backend="exact", allowed=few)
    if backend == "faiss-ivfpq":  # the clusters visited may hold none of them
        assert set(few_positions[few_positions >= 0].tolist()) <= {11, 500, 2999, 5998}
    else:
        assert torch.equal(few_positions, exact_positions)
        torch.testing.assert_close(few_scores, exact_scores, atol=0, rtol=0)


@pytest.mark.parametrize("backend", QUANTISED)
def test_added_rows_are_encoded_and_found(backend, catalogue, queries, single_threaded_faiss):
    settings, required = BACKENDS[backend]
    first, later = catalogue[:4000], catalogue[4000:]
    index = ProductIndex.from_embeddings(first, [f"sku-{i}" for i in range(4000)]).set_backend(backend, **settings)
    index.search_positions(queries[0], K)  # encodes the first rows
    before = index._quantised._searchers[backend]
    index.add(later, [f"sku-{i}" for i in range(4000, COUNT)])
    index.add(queries[:1].numpy(), ["the query itself"])
    scores, ids = index.search(queries[:1], k=5)
    assert ids[0][0] == "the query itself" and scores[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    after = index._quantised._searchers[backend]
    assert after is not before and after.count == COUNT + 1 and before.count == 4000  # extended, old one intact
    _, truth = index.search_positions(queries, K, backend="exact")
    assert recall(index.search_positions(queries, K)[1], truth) >= required - 0.03


def test_concurrent_searches_during_adds_see_whole_rows(catalogue, queries):
    index = ProductIndex.from_embeddings(catalogue[:3000], list(range(3000))).set_backend("int8")
    failures = []

    def search_repeatedly():
        try:
            for query in queries[:10]:
                scores, positions = index.search_positions(query, 20)
                rows = index.embeddings  # at least as many rows as the search saw
                np.testing.assert_allclose(scores.numpy(), rows[positions.numpy()] @ query.numpy(), atol=1e-5)
        except Exception as error:  # noqa: BLE001 (reported by the main thread)
            failures.append(error)

    threads = [threading.Thread(target=search_repeatedly) for _ in range(3)]
    for thread in threads:
        thread.start()
    for start in range(3000, COUNT, 1000):
        index.add(catalogue[start : start + 1000], list(range(start, start + 1000)))
    for thread in threads:
        thread.join()
    assert not failures
    assert index._quantised._searchers["int8"].count <= len(index) == COUNT


def mapped_resident_bytes(path) -> int:
    """Rss of `path`'s mappings in this process (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            fields = line.split()
            if len(fields) >= 5 and "-" in fields[0] and len(fields[1]) == 4:
                inside = len(fields) >= 6 and fields[5] == str(path)
            elif inside and fields[:1] == ["Rss:"]:
                total += int(fields[1]) * 1024
    return total


@pytest.mark.parametrize("backend", QUANTISED)
def test_save_load_round_trip_searches_the_memory_mapped_vectors(backend, tmp_path, catalogue, queries):
    settings, _ = BACKENDS[backend]
    ids = [f"sku-{i}" for i in range(COUNT)]
    in_memory = ProductIndex.from_embeddings(catalogue, ids).set_backend(backend, **settings)
    expected = in_memory.search(queries, k=20)
    in_memory.save(tmp_path / "index")
    loaded = ProductIndex.load(tmp_path / "index", mmap=True).set_backend(backend, **settings)
    assert isinstance(loaded._state.storage, np.memmap)
    scores, found = loaded.search(queries, k=20)
    assert found == expected[1]
    torch.testing.assert_close(scores, expected[0], atol=0, rtol=0)


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_DONTNEED"), reason="needs madvise(MADV_DONTNEED)")
def test_a_loaded_int8_index_keeps_the_codes_resident_not_the_float_file(tmp_path, catalogue, queries):
    ProductIndex.from_embeddings(catalogue, list(range(COUNT))).save(tmp_path / "index")
    path = (tmp_path / "index" / EMBEDDINGS_FILENAME).resolve()
    index = ProductIndex.load(tmp_path / "index", mmap=True).set_backend("int8").prepare_backend()
    assert mapped_resident_bytes(path) < path.stat().st_size / 10  # the load's check and the encoding dropped pages
    # Rescoring maps the candidates' pages back in (the kernel maps neighbouring cached pages with them).
    assert index.search_positions(queries[0], 10)[1].tolist() == index.search_positions(queries[0], 10, backend="exact")[1].tolist()
    assert mapped_resident_bytes(path) > 0
    release_mapped_rows(index._state.storage, 0, COUNT)
    assert mapped_resident_bytes(path) <= 2 * 4096  # at most the partial pages at the ends
    assert index.search_positions(queries[1], 10)[1].tolist() == index.search_positions(queries[1], 10, backend="exact")[1].tolist()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"backend": "int4"}, "backend must be one of"),
        ({"backend": "int8", "rescore_candidates": 0}, "rescore_candidates must be a positive integer, got 0"),
        ({"backend": "binary", "rescore_candidates": 2.5}, "rescore_candidates must be a positive integer"),
        ({"backend": "faiss-ivfpq", "ivf_m": 7}, f"ivf_m must divide the embedding dimension {DIM}, got 7"),
        ({"backend": "faiss-ivfpq", "ivf_nbits": 17}, "ivf_nbits must be at most 16"),
        ({"backend": "faiss-ivfpq", "ivf_nprobe": -1}, "ivf_nprobe must be a positive integer"),
        ({"backend": "faiss-hnsw", "hnsw_ef_search": 0}, "hnsw_ef_search must be a positive integer"),
    ],
)
def test_bad_settings_are_refused_in_one_line(settings, message, catalogue):
    index = ProductIndex.from_embeddings(catalogue[:300], list(range(300)))
    settings = dict(settings)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as error:
        index.set_backend(settings.pop("backend"), **settings)
    assert "\n" not in str(error.value)
    assert index.backend == "exact"  # a refused setting changes nothing


def test_ivfpq_with_too_few_rows_to_train_names_the_setting(catalogue, queries):
    index = ProductIndex.from_embeddings(catalogue[:300], list(range(300))).set_backend("faiss-ivfpq", ivf_nlist=512)
    with pytest.raises(ValueError, match="trains on 300 rows .* needs at least 512 .*lower ivf_nlist or ivf_nbits"):
        index.prepare_backend()
    index.set_backend("faiss-ivfpq", ivf_nlist=16, ivf_nbits=6).prepare_backend()
    assert index.search_positions(queries[0], 5)[1].tolist() == index.search_positions(queries[0], 5, backend="exact")[1].tolist()


# --- mmretrieval search flags ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ivf_nprobe", "8"], "--ivf_nprobe applies to --index_backend faiss-ivfpq, not exact"),
        (["--index_backend", "int8", "--hnsw_ef_search", "64"], "--hnsw_ef_search applies to --index_backend faiss-hnsw"),
        (["--index_backend", "binary", "--rescore_candidates", "0"], "--rescore_candidates must be a positive integer"),
        (["--index_backend", "annoy"], "invalid choice: 'annoy'"),
    ],
)
def test_search_refuses_bad_backend_flags_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        search_command.parse_args(["--model_name_or_path", "unused", "--query", "red shoes", *flags], prog="mmretrieval")
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0]


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    """all-MiniLM-L6-v2 as a text-only retriever, saved as a checkpoint (as tests/test_cli.py makes it)."""
    from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
    from modeling_mmretrieval.towers import MissingOfflineTowerError, get_minilm_path

    try:
        minilm_path = get_minilm_path()
    except MissingOfflineTowerError as error:
        pytest.skip(str(error))
    folder = tmp_path_factory.mktemp("minilm-text-only")
    model = MultimodalRetrievalModel.from_towers_pretrained(minilm_path, pooling="mean", projection_dim=None)
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(minilm_path, config=model.config,
                                                                    max_product_length=32)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_search_flags_choose_the_backend_and_its_settings(tmp_path, text_checkpoint, capsys):
    common = ["--model_name_or_path", str(text_checkpoint), "--index_dir", str(tmp_path / "index"), "--query",
              "black leather shoes for men", "--top_k", "5", "--output_format", "json"]
    catalogue = ["--dataset", str(SAMPLE_DATA_DIR), "--split", "test", "--max_products", "40"]
    assert search_command.main([*common, *catalogue], prog="mmretrieval") == 0
    exact = json.loads(capsys.readouterr().out)
    # 8 x 5 candidates cover the 40 products: the rescored results are the exact ones.
    for flags in (["--index_backend", "int8", "--rescore_candidates", "8"],
                  ["--index_backend", "binary", "--rescore_candidates", "8"]):
        assert search_command.main([*common, *flags], prog="mmretrieval") == 0
        assert json.loads(capsys.readouterr().out) == exact
    assert search_command.main([*common, "--index_backend", "faiss-ivfpq"], prog="mmretrieval") == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("mmretrieval: error: --index_backend faiss-ivfpq: faiss-ivfpq trains on 40 rows")
    assert "lower ivf_nlist" in error[-1]


def test_int8_shards_scan_side_by_side_and_find_what_one_scan_finds(monkeypatch, catalogue, queries):
    """Cut into shards (one per faiss thread) the int8 codes give a single query candidates from every shard, so its
    results are at least those of one scan; batches, filters and added rows go through the shards too."""
    import faiss

    from modeling_mmretrieval.retrieval import quantised_search

    unsharded = ProductIndex(catalogue, list(range(COUNT))).set_backend("int8")
    monkeypatch.setattr(quantised_search, "MIN_SHARD_ROWS", 1000)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(3)
    try:
        sharded = ProductIndex(catalogue, list(range(COUNT))).set_backend("int8").prepare_backend()
    finally:
        faiss.omp_set_num_threads(threads)
    assert len(sharded._quantised._searchers["int8"]._shards) == 3
    _, truth = unsharded.search_positions(queries, K, backend="exact")
    single = torch.stack([sharded.search_positions(query, K)[1] for query in queries[:20]])
    assert recall(single, truth[:20]) >= recall(torch.stack([unsharded.search_positions(query, K)[1]
                                                             for query in queries[:20]]), truth[:20])
    scores, batch = sharded.search_positions(queries, K)
    assert recall(batch, truth) >= 0.99
    assert_exact_scores_in_exact_order(scores, batch, queries, catalogue)
    allowed = np.zeros(COUNT, dtype=bool)
    allowed[::7] = True
    _, filtered = sharded.search_positions(queries[:5], 10, allowed=allowed)
    assert allowed[filtered.numpy()].all()
    sharded.add(-catalogue[:3], ["neg-0", "neg-1", "neg-2"])  # rows added later land in the last shard
    _, found = sharded.search_positions(torch.from_numpy(-catalogue[0]), 1)
    assert found.tolist() == [COUNT]
    assert len(sharded._quantised._searchers["int8"]._shards) == 3
