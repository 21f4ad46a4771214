"""Float16 screening of exact search (modeling_mmretrieval.speedups.float16_screening): same results, proven error bound."""

import logging

import numpy as np
import pytest
import torch
from test_index import assert_is_exact_top_k, random_unit_vectors, sku_ids

from modeling_mmretrieval.retrieval import exact_search
from modeling_mmretrieval.speedups import float16_screening as screening
from modeling_mmretrieval.retrieval.exact_search import SCREENING_MAX_QUERIES, SCREENING_MIN_ROWS
from modeling_mmretrieval.retrieval.index import ProductIndex
from modeling_mmretrieval.speedups.float16_screening import Float16Screen, float16_kernel_sums_in_float32


@pytest.fixture
def screen_calls(monkeypatch):
    """Counts the searches that scored the float16 copy."""
    calls = []
    original = Float16Screen.score

    def counting_score(self, queries, start, stop, out):
        calls.append(len(queries))
        return original(self, queries, start, stop, out)

    monkeypatch.setattr(Float16Screen, "score", counting_score)
    return calls


def same_results(first, second):
    return torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_screened_search_returns_the_full_precision_results(screen_calls):
    count = SCREENING_MIN_ROWS + 4_000
    catalogue = random_unit_vectors(count, 384, seed=21)
    queries = random_unit_vectors(SCREENING_MAX_QUERIES + 3, 384, seed=22)
    screened = ProductIndex.from_embeddings(catalogue, sku_ids(count))
    plain = ProductIndex.from_embeddings(catalogue, sku_ids(count)).set_backend("exact", screening=False)

    for query in queries:
        assert same_results(screened.search_positions(query, k=100), plain.search_positions(query, k=100))
    for size in (2, SCREENING_MAX_QUERIES, SCREENING_MAX_QUERIES + 1):
        assert same_results(screened.search_positions(queries[:size], k=50), plain.search_positions(queries[:size], k=50))
    # Every search of up to SCREENING_MAX_QUERIES queries went through the copy, and only those.
    assert screen_calls == [1] * len(queries) + [2, SCREENING_MAX_QUERIES]
    assert_is_exact_top_k(*screened.search_positions(queries[:3], k=100), queries[:3], catalogue, 100)


def test_screened_scores_stay_within_the_bound_on_rounding_heavy_rows():
    # Entries halfway between float16 numbers, and entries in float16's subnormal range, are the ones its
    # rounding hurts most; the bound must hold for them, and stay tight enough to leave few candidates.
    rng = np.random.default_rng(23)
    dim, count = 256, 3_000
    exponents = rng.integers(-14, -2, size=(count, dim))
    halfway = (1 + (2 * rng.integers(0, 512, size=(count, dim)) + 1) / 2048) * 2.0**exponents
    halfway *= rng.choice([-1.0, 1.0], size=(count, dim))
    tiny = rng.uniform(-2e-6, 2e-6, size=(count, dim))  # float16 subnormals
    rows = np.where(rng.random((count, dim)) < 0.2, tiny, halfway)
    catalogue = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    # Queries along some rows' rounding errors meet those errors head on: |q.(x - x')| = |x - x'|.
    rounding = catalogue[:4] - catalogue[:4].astype(np.float16).astype(np.float32)
    along_errors = rounding / np.linalg.norm(rounding, axis=1, keepdims=True)
    queries = np.concatenate([along_errors, random_unit_vectors(4, dim, seed=24).numpy()]).astype(np.float32)

    screen = Float16Screen.empty(dim).extended(catalogue)
    screened = np.empty((len(queries), count), dtype=np.float32)
    screen.score(queries, 0, count, screened)
    exact = queries.astype(np.float64) @ catalogue.astype(np.float64).T
    margin = screen.margin(queries)
    assert np.abs(screened - exact).max() <= margin < 4e-3
    assert np.abs(screened - exact)[np.arange(4), np.arange(4)].max() >= 0.9 * screen.row_error
    assert screen.row_error > 0 and 1 <= screen.row_norm < 1.01


@pytest.mark.parametrize("copies", [3, 400])  # 400 near-copies around the k-th score: far past the slack
def test_screening_keeps_ties_and_near_duplicates_exact(copies):
    dim, count, k = 128, SCREENING_MIN_ROWS, 100
    catalogue = random_unit_vectors(count, dim, seed=25)
    query = random_unit_vectors(1, dim, seed=26)[0]
    # Rows scoring within float16 rounding of each other, and of the k-th best score.
    kth_score = torch.sort(catalogue @ query, descending=True).values[k - 1]
    base = torch.nn.functional.normalize(kth_score * query + torch.sqrt(1 - kth_score**2) * catalogue[0], dim=0)
    noise = 1e-5 * random_unit_vectors(copies, dim, seed=27)
    positions = torch.randperm(count, generator=torch.Generator().manual_seed(28))[:copies]
    catalogue[positions] = torch.nn.functional.normalize(base + noise, dim=-1)

    screened = ProductIndex.from_embeddings(catalogue, sku_ids(count)).search_positions(query, k=k)
    plain = ProductIndex.from_embeddings(catalogue, sku_ids(count)).set_backend("exact", screening=False)
    assert same_results(screened, plain.search_positions(query, k=k))
    assert_is_exact_top_k(screened[0][None], screened[1][None], query[None], catalogue, k)


def test_screening_follows_adds_and_can_be_switched_off():
    index = ProductIndex.from_embeddings(random_unit_vectors(500, 64, seed=29), sku_ids(500))
    index.set_backend("exact", screening=True)
    query = random_unit_vectors(1, 64, seed=30)[0]
    index.search(query, k=5)
    assert index._screening.copy.count == 500
    index.add(query[None], ["exact-match"])
    assert index.search(query, k=1)[1] == ["exact-match"]
    assert index._screening.copy.count == 501
    index.set_backend("exact", screening=False)
    assert index._screening.copy is None and index.search(query, k=1)[1] == ["exact-match"]
    with pytest.raises(ValueError, match="screening"):
        index.set_backend("exact", screening="yes")


def test_memory_mapped_catalogues_are_screened_only_when_asked(tmp_path, screen_calls):
    count = SCREENING_MIN_ROWS
    catalogue = random_unit_vectors(count, 32, seed=31)
    ProductIndex.from_embeddings(catalogue, sku_ids(count)).save(tmp_path / "index")
    mapped = ProductIndex.load(tmp_path / "index", mmap=True)
    query = catalogue[7]
    expected = mapped.search_positions(query, k=10)
    assert screen_calls == []  # the default leaves a memory-mapped catalogue's memory alone
    mapped.set_backend("exact", screening=True)
    assert same_results(mapped.search_positions(query, k=10), expected) and screen_calls == [1]


def test_unrepresentable_values_fall_back_to_full_precision(caplog):
    catalogue = random_unit_vectors(300, 16, seed=32).numpy()
    catalogue[5, 3] = np.inf  # a damaged row that the constructor, which trusts its caller, lets through
    index = ProductIndex(catalogue, sku_ids(300)).set_backend("exact", screening=True)
    query = torch.from_numpy(catalogue[9])
    with caplog.at_level(logging.WARNING, logger="modeling_mmretrieval.retrieval.exact_search"):
        assert index.search(query, k=1)[1] == ["sku-000009"]
    assert "without float16 screening" in caplog.text and "rows 0 to 299" in caplog.text
    assert index._screening.copy is None


def test_the_probe_rejects_a_kernel_that_sums_in_float16(monkeypatch):
    assert float16_kernel_sums_in_float32(384)  # torch's CPU kernel sums in float32

    def float16_summing_mm(left, right):
        products = (left[:, :, None].float() * right[None].float()).half()  # exact products, rounded
        total = torch.zeros(products.shape[0], products.shape[2], dtype=torch.float16)
        for term in products.unbind(1):  # a running float16 sum
            total = total + term
        return total

    screening._probe_result.cache_clear()
    monkeypatch.setattr(screening.torch, "mm", float16_summing_mm)
    try:
        assert not float16_kernel_sums_in_float32(384)
    finally:
        monkeypatch.undo()
        screening._probe_result.cache_clear()


def test_search_does_not_screen_where_the_kernel_fails_the_probe(monkeypatch, screen_calls):
    monkeypatch.setattr(exact_search, "float16_kernel_sums_in_float32", lambda dim: False)
    count = SCREENING_MIN_ROWS
    catalogue = random_unit_vectors(count, 48, seed=33)
    index = ProductIndex.from_embeddings(catalogue, sku_ids(count)).set_backend("exact", screening=True)
    scores, positions = index.search_positions(catalogue[:2], k=20)
    assert screen_calls == []
    assert_is_exact_top_k(scores, positions, catalogue[:2], catalogue, 20)
