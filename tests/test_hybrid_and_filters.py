"""Issue 17: hybrid lexical + dense ranking, metadata filters applied inside the search, facet counts, and the
search command's damaged-index refusal.

The library parts run on random unit vectors and small generated catalogues; the command-line parts run in-process
(`modeling_mmretrieval.cli.main`) on a generated shop catalogue (a CSV whose image column points to real PNG files
made with PIL) with a tiny text-only retriever built from the MiniLM tokenizer.
"""

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_towers import make_config, write_csv_catalogue
from transformers import AutoTokenizer

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor, cli
from modeling_mmretrieval.data.catalogue import CatalogueColumns
from modeling_mmretrieval.retrieval.filters import FilterError, ProductFilter, ProductTable, facet_counts
from modeling_mmretrieval.retrieval.hybrid import Fusion, ProductRanker, normalised_scores, reciprocal_rank_fusion
from modeling_mmretrieval.retrieval.index import ProductIndex
from modeling_mmretrieval.retrieval.index_files import META_FILENAME
from modeling_mmretrieval.towers import MissingOfflineTowerError, get_minilm_path

pytest.importorskip("bm25s")

BRANDS = ("Nike", "Puma", "Adidas", "Levis", "Fabindia")
GENDERS = ("Women", "Men")
COLOURS = {"Red": (200, 30, 30), "Blue": (30, 30, 200), "Black": (10, 10, 10), "White": (245, 245, 245)}
TYPES = ("Tshirts", "Jeans", "Shirts", "Kurtas")
NUM_PRODUCTS = 60


def unit_rows(count: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(count, dim, generator=generator), dim=-1)


def png_bytes(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def shop_products(count: int = NUM_PRODUCTS) -> list[dict]:
    """A fashion-like catalogue: every attribute cycles with a different period, so combinations vary; one price
    in nine is missing and one colour in eleven is a placeholder-free blank."""
    products = []
    for number in range(count):
        brand, gender = BRANDS[number % 5], GENDERS[number % 2]
        colour, article_type = list(COLOURS)[number % 4], TYPES[(number // 3) % 4]
        products.append({
            "product_id": f"p{number:03d}",
            "title": f"{brand} {gender} {colour} {article_type.rstrip('s')} {number}",
            "description": f"A {colour.lower()} {article_type.lower().rstrip('s')} in soft cotton, style {number}",
            "brand": brand,
            "gender": gender if number % 7 else gender.upper(),  # spelling varies: filters must not care
            "article_type": article_type,
            "base_colour": "" if number % 11 == 10 else colour,
            "price": "" if number % 9 == 8 else str(300 + 97 * number % 2700),
            "image": f"images/{number}.png",
        })
    return products


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shop")
    (folder / "images").mkdir()
    products = shop_products()
    for product in products:
        colour = COLOURS.get(product["base_colour"], (128, 128, 128))
        (folder / product["image"]).write_bytes(png_bytes(colour))
    return write_csv_catalogue(folder / "products.csv", products)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random text-only retriever with the real MiniLM tokenizer."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    except MissingOfflineTowerError as error:
        pytest.skip(str(error))
    folder = tmp_path_factory.mktemp("tiny-text-only")
    config = make_config("text_only")
    config.text_config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    MultimodalRetrievalModel(config).save_pretrained(folder)
    MultimodalRetrievalProcessor(tokenizer, max_query_length=16, max_product_length=32).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- filters inside the index search -------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size, screening", [(None, False), (256, False), (300, True)])
def test_filtered_search_equals_searching_only_the_allowed_products(chunk_size, screening):
    vectors, queries = unit_rows(1500, 24, seed=1), unit_rows(5, 24, seed=2)
    ids = [f"sku-{number}" for number in range(1500)]
    index = ProductIndex.from_embeddings(vectors, ids).set_backend("exact", screening=screening)
    allowed = np.random.default_rng(3).random(1500) < 0.1
    allowed[700:900] = False  # whole chunks without an allowed row are skipped
    kept = np.flatnonzero(allowed)
    subset = ProductIndex.from_embeddings(vectors[kept], [ids[position] for position in kept])
    for batch in (queries, queries[0]):  # a batch, and a single vector
        scores, found = index.search(batch, k=20, allowed=allowed, chunk_size=chunk_size)
        expected_scores, expected = subset.search(batch, k=20)
        assert found == expected
        assert torch.equal(scores, expected_scores)


def test_filtered_search_returns_k_after_filtering_and_caps_k_at_the_allowed_count():
    vectors = unit_rows(400, 16, seed=4)
    index = ProductIndex.from_embeddings(vectors, [f"sku-{number}" for number in range(400)])
    allowed = np.zeros(400, dtype=bool)
    allowed[::50] = True  # 8 products
    # The query is product 1, which the filter excludes: unfiltered top 10 then filtered would leave almost none.
    _, unfiltered = index.search(vectors[1], k=10)
    assert len([product for product in unfiltered if int(product[4:]) % 50 == 0]) < 8
    scores, found = index.search(vectors[1], k=5, allowed=allowed)
    assert len(found) == 5 and all(int(product[4:]) % 50 == 0 for product in found)
    assert scores.tolist() == sorted(scores.tolist(), reverse=True)
    _, everything = index.search(vectors[1], k=50, allowed=allowed)
    assert sorted(everything) == sorted(f"sku-{number}" for number in range(0, 400, 50))
    scores, nothing = index.search(vectors[:2], k=5, allowed=np.zeros(400, dtype=bool))
    assert nothing == [[], []] and scores.shape == (2, 0)


def test_search_refuses_a_mask_that_is_not_one_boolean_per_product():
    index = ProductIndex.from_embeddings(torch.eye(4), ["a", "b", "c", "d"])
    with pytest.raises(TypeError, match="boolean mask"):
        index.search(torch.eye(4)[0], k=2, allowed=np.array([0, 2]))  # positions, not a mask
    with pytest.raises(ValueError, match="3 entries but the index holds 4"):
        index.search(torch.eye(4)[0], k=2, allowed=np.ones(3, dtype=bool))


@pytest.mark.parametrize("backend", ["faiss-flat", "faiss-hnsw"])
def test_faiss_backends_filter_inside_the_search(backend):
    faiss = pytest.importorskip("faiss")
    faiss.omp_set_num_threads(1)
    vectors, queries = unit_rows(800, 16, seed=5), unit_rows(4, 16, seed=6)
    index = ProductIndex.from_embeddings(vectors, [f"sku-{number}" for number in range(800)])
    allowed = np.random.default_rng(7).random(800) < 0.25
    _, exact = index.search(queries, k=10, allowed=allowed)
    _, found = index.set_backend(backend, hnsw_ef_search=400).search(queries, k=10, allowed=allowed)
    allowed_ids = {f"sku-{position}" for position in np.flatnonzero(allowed)}
    assert all(product in allowed_ids for row in found for product in row if product is not None)
    if backend == "faiss-flat":
        assert found == exact
    else:  # approximate: most of the exact filtered top 10
        assert sum(len(set(row) & set(expected)) for row, expected in zip(found, exact)) >= 0.8 * 40


# --- ProductFilter, ProductTable, facets ---------------------------------------------------------------------


def test_filters_match_case_insensitively_or_within_a_column_and_across_columns():
    products = shop_products()
    table = ProductTable.from_catalogue(products, [p["product_id"] for p in reversed(products)],
                                        names=["gender", "article_type", "base_colour", "price"])
    product_filter = ProductFilter.from_arguments(
        ["gender=women", "article_type=Tshirts", "article_type=jeans"], min_price=500, max_price=2000
    )
    mask = table.allowed(product_filter)
    by_id = {product["product_id"]: product for product in products}
    expected = [
        by_id[product_id]["gender"].lower() == "women"
        and by_id[product_id]["article_type"] in ("Tshirts", "Jeans")
        and by_id[product_id]["price"] != "" and 500 <= float(by_id[product_id]["price"]) <= 2000
        for product_id in table.ids
    ]
    assert mask.tolist() == expected and 0 < mask.sum() < len(products) // 4
    # An upper-case "WOMEN" row matches too, and a missing price never matches a price range.
    assert any(by_id[i]["gender"] == "WOMEN" for i, keep in zip(table.ids, mask) if keep)
    missing_price = np.array([by_id[i]["price"] == "" for i in table.ids])
    assert not (table.allowed(ProductFilter.from_arguments(min_price=0)) & missing_price).any()


def test_filter_columns_resolve_through_the_catalogue_mapping_and_errors_name_the_flag():
    columns = CatalogueColumns(base_colour="colour_name", article_type="category")
    resolved = ProductFilter.from_arguments(["colour=Red", "article_type=Jeans", "season=Summer"]).resolved(
        columns, ["colour_name", "category", "season"]
    )
    assert resolved.values == {"colour_name": ("Red",), "category": ("Jeans",), "season": ("Summer",)}
    with pytest.raises(FilterError, match=r"cannot filter on 'fabric' \(--filter fabric=\.\.\.\)"):
        ProductFilter.from_arguments(["fabric=Silk"]).resolved(columns, ["colour_name", "category"])
    with pytest.raises(FilterError, match=r"cannot filter on 'price' \(--min_price/--max_price with --price_column\)"):
        ProductFilter.from_arguments(max_price=100).resolved(columns, ["colour_name"])
    with pytest.raises(FilterError, match="COLUMN=VALUE"):
        ProductFilter.from_arguments(["gender"])
    with pytest.raises(FilterError, match="--min_price 900 is above --max_price 100"):
        ProductFilter.from_arguments(min_price=900, max_price=100)


def test_product_table_names_an_index_product_the_catalogue_lacks():
    with pytest.raises(ValueError, match="product id 'p999'"):
        ProductTable.from_catalogue(shop_products(5), ["p001", "p999"], names=["brand"])


def test_facet_counts_over_the_catalogue_a_filter_and_search_results():
    products = shop_products()
    table = ProductTable.from_catalogue(products, [p["product_id"] for p in products], names=["gender", "base_colour"])
    everything = facet_counts(table, ["gender", "base_colour"])
    assert everything["gender"] == {"Men": 30, "Women": 30}  # "WOMEN" and "Women" are one value
    assert sum(everything["base_colour"].values()) == NUM_PRODUCTS - 5  # 5 blank colours are not counted
    women = table.allowed(ProductFilter({"gender": ("Women",)}))
    assert facet_counts(table, ["gender"], allowed=women) == {"gender": {"Women": 30}}
    assert facet_counts(table, ["base_colour"], positions=[0, 4, 8, 1, -1]) == {"base_colour": {"Red": 3, "Blue": 1}}
    # Blanks fall on Black twice and once on each other colour: 14 Blue, Red and White, 13 Black; ties alphabetical.
    assert facet_counts(table, ["base_colour"], limit=2) == {"base_colour": {"Blue": 14, "Red": 14}}


# --- lexical and hybrid ranking ------------------------------------------------------------------------------


def shop_lexical_index(products):
    from modeling_mmretrieval.retrieval.lexical import LexicalIndex

    return LexicalIndex.from_products(products, ("title", "brand", "description"))


def test_lexical_search_ranks_matches_only_by_score_then_row_and_filters():
    from modeling_mmretrieval.retrieval.lexical import LexicalIndex

    lexical = LexicalIndex(["red cotton shirt", "blue denim jeans", "red silk shirt", "red cotton shirt"])
    scores, positions = lexical.search(["red cotton shirt", "green hat"], k=4)
    assert positions[0].tolist() == [0, 3, 2, -1]  # products 0 and 3 tie: row order; "blue denim jeans" is no match
    assert scores[0, 0] == scores[0, 1] > scores[0, 2] > 0 and scores[0, 3] == float("-inf")
    assert positions[1].tolist() == [-1, -1, -1, -1]
    _, positions = lexical.search(["red shirt"], k=4, allowed=np.array([False, True, True, False]))
    assert positions[0].tolist() == [2, -1, -1, -1]
    _, everything = lexical.search(["red shirt"], k=4, matches_only=False)
    assert sorted(everything[0].tolist()) == [0, 1, 2, 3]


def test_reciprocal_rank_fusion_and_score_normalisation_follow_their_formulas():
    fused = reciprocal_rank_fusion([[4, 2, -1], [2, 9]], rrf_k=10)
    assert fused == pytest.approx({4: 1 / 11, 2: 1 / 12 + 1 / 11, 9: 1 / 12})
    assert normalised_scores(np.array([1.0, 3.0, 2.0]), "zscore") == pytest.approx([-1.2247449, 1.2247449, 0.0])
    with pytest.raises(ValueError, match="fusion must be one of"):
        Fusion("mean")
    with pytest.raises(ValueError, match="alpha"):
        Fusion("score", alpha=1.5)


@pytest.fixture(scope="module")
def shop_index():
    """A dense index of the shop whose embeddings know nothing of brands (random), and its products."""
    products = shop_products()
    index = ProductIndex.from_embeddings(unit_rows(len(products), 32, seed=8), [p["product_id"] for p in products])
    return index, products


@pytest.mark.parametrize("fusion", [Fusion("rrf", rrf_k=60, depth=15), Fusion("score", alpha=0.3, depth=15),
                                    Fusion("score", alpha=0.6, normalisation="zscore", depth=15)])
def test_hybrid_ranking_fuses_the_dense_and_lexical_lists_as_documented(shop_index, fusion):
    index, products = shop_index
    lexical = shop_lexical_index(products)
    query, text = unit_rows(1, 32, seed=9), "fabindia red kurta"
    ranker = ProductRanker(index, lexical, ranker="hybrid", fusion=fusion)
    scores, ids = ranker.search([text], k=10, query_embeddings=query)

    # The same fusion, recomputed from the two rankers' own lists and scores.
    _, dense_ids = index.search(query, k=15)
    lexical_scores, lexical_positions = lexical.search([text], 15)
    lexical_ids = [index.ids[p] for p in lexical_positions[0].tolist() if p >= 0]
    candidates = list(dict.fromkeys(dense_ids[0] + lexical_ids))
    if fusion.method == "rrf":
        fused = {c: sum(1 / (60 + ranked.index(c) + 1) for ranked in (dense_ids[0], lexical_ids) if c in ranked)
                 for c in candidates}
    else:
        rows = [index.position_of(c) for c in candidates]
        dense = normalised_scores(index.embeddings[rows].astype(np.float64) @ query[0].double().numpy(),
                                  fusion.normalisation)
        bm25 = normalised_scores(lexical.scores(text)[rows], fusion.normalisation)
        fused = dict(zip(candidates, fusion.alpha * dense + (1 - fusion.alpha) * bm25))
    expected = sorted(candidates, key=lambda c: (-fused[c], index.position_of(c)))[:10]
    assert ids[0] == expected
    assert scores[0].tolist() == pytest.approx([fused[c] for c in expected], rel=1e-6)
    # BM25 brings the Fabindia kurtas, which random embeddings rank nowhere in particular, to the top.
    assert products[index.position_of(ids[0][0])]["brand"] == "Fabindia"


def test_hybrid_and_lexical_rankers_return_k_allowed_products(shop_index):
    index, products = shop_index
    table = ProductTable.from_catalogue(products, index.ids, names=["gender", "price"])
    allowed = table.allowed(ProductFilter.from_arguments(["gender=Men"], max_price=2500))
    lexical = shop_lexical_index(products)
    for name in ("dense", "lexical", "hybrid"):
        ranker = ProductRanker(index, lexical, ranker=name, fusion=Fusion("rrf", depth=5))
        _, ids = ranker.search(["nike shirt"], k=8, query_embeddings=unit_rows(1, 32, seed=10), allowed=allowed)
        found = [product for product in ids[0] if product is not None]
        assert all(allowed[index.position_of(product)] for product in found)
        assert len(found) == 8 if name != "lexical" else 0 < len(found) <= 8
    with pytest.raises(ValueError, match="needs a LexicalIndex"):
        ProductRanker(index, None, ranker="hybrid")


# --- the search and evaluate commands ------------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    status = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def search_args(checkpoint, shop, index_dir, *extra):
    return ["search", "--model_name_or_path", checkpoint, "--dataset", shop, "--split", "train",
            "--index_dir", index_dir, "--device", "cpu", "--output_format", "json", *extra]


def test_search_command_filters_inside_each_ranker(capsys, caplog, checkpoint, shop, tmp_path):
    caplog.set_level(logging.INFO)
    index_dir = tmp_path / "index"
    filters = ["--filter", "gender=Women", "--filter", "article_type=Tshirts", "--filter", "article_type=Jeans",
               "--min_price", "300", "--max_price", "2500"]
    allowed_ids = {
        p["product_id"] for p in shop_products()
        if p["gender"].lower() == "women" and p["article_type"] in ("Tshirts", "Jeans") and p["price"]
        and 300 <= float(p["price"]) <= 2500
    }
    assert len(allowed_ids) > 5
    results = {}
    for ranker in ("dense", "lexical", "hybrid"):
        status, out, err = run_cli(capsys, *search_args(checkpoint, shop, index_dir, "--query", "puma red tshirt",
                                                         "--top_k", 5, "--ranker", ranker, *filters))
        assert status == 0, err
        (search,) = json.loads(out)
        found = results[ranker] = [record["product_id"] for record in search["results"]]
        assert search["ranker"] == ranker and set(found) <= allowed_ids
        assert len(found) == 5 if ranker != "lexical" else len(found) >= 1
        assert f"{len(allowed_ids)} of {NUM_PRODUCTS} products" in caplog.text
        if ranker != "dense":  # later runs reuse the saved index, reading the catalogue only for its columns
            assert "Loaded the index" in caplog.text and "Built an index" not in caplog.text
        caplog.clear()
    # Puma dresses only men here: within the filter, BM25's best match is a red tshirt.
    titles = {p["product_id"]: p["title"] for p in shop_products()}
    assert "Red Tshirt" in titles[results["lexical"][0]]
    status, out, err = run_cli(capsys, *search_args(checkpoint, shop, index_dir, "--query", "puma red tshirt",
                                                     "--top_k", 5, "--ranker", "hybrid", *filters,
                                                     "--output_format", "table"))
    assert status == 0, err
    assert out.splitlines()[0] == "text query: puma red tshirt (hybrid)"
    assert [line.split()[2] for line in out.splitlines()[2:]] == results["hybrid"]


def test_search_command_refuses_an_unknown_filter_column_before_loading_the_model(capsys, shop, tmp_path):
    status, _, err = run_cli(capsys, *search_args("no/such-model", shop, tmp_path / "index", "--query", "red",
                                                   "--filter", "fabric=Silk"))
    assert status == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "cannot filter on 'fabric'" in err


def test_search_command_refuses_a_damaged_index_and_rebuilds_it_only_when_asked(capsys, checkpoint, shop, tmp_path):
    index_dir = tmp_path / "index"
    status, _, err = run_cli(capsys, *search_args(checkpoint, shop, index_dir, "--query", "red shirt"))
    assert status == 0, err
    (index_dir / META_FILENAME).unlink()  # a damaged index: the rest of its files are still there
    leftover = sorted(path.name for path in index_dir.iterdir())

    status, out, err = run_cli(capsys, *search_args("no/such-model", shop, index_dir, "--query", "red shirt"))
    assert status == 2 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "no index_meta.json" in err and "--rebuild_index" in err
    assert sorted(path.name for path in index_dir.iterdir()) == leftover  # nothing rebuilt behind the user's back

    status, out, err = run_cli(capsys, *search_args(checkpoint, shop, index_dir, "--query", "red shirt",
                                                     "--rebuild_index"))
    assert status == 0, err
    assert (index_dir / META_FILENAME).is_file() and len(ProductIndex.load(index_dir)) == NUM_PRODUCTS
    assert len(json.loads(out)[0]["results"]) == 10


def test_evaluate_command_reports_the_three_rankers_side_by_side(capsys, checkpoint, shop, tmp_path):
    queries = tmp_path / "queries.jsonl"
    products = shop_products()
    lines = [{"query": f"{brand} {article_type.rstrip('s')}".lower(),
              "relevant_ids": [p["product_id"] for p in products
                               if p["brand"] == brand and p["article_type"] == article_type]}
             for brand in BRANDS for article_type in TYPES]
    queries.write_text("".join(json.dumps(line) + "\n" for line in lines if line["relevant_ids"]), encoding="utf-8")
    common = ["evaluate", "--model_name_or_path", checkpoint, "--dataset", shop, "--split", "train",
              "--queries_file", queries,
              "--device", "cpu", "--k_values", 5, 10]

    status, out, err = run_cli(capsys, *common, "--ranker", "dense", "lexical", "hybrid", "--fusion", "score",
                               "--output_file", tmp_path / "all.json")
    assert status == 0, err
    report = json.loads((tmp_path / "all.json").read_text())
    assert list(report["rankers"]) == ["dense", "lexical", "hybrid"] and report["ranker"] == "dense"
    assert report["hybrid_fusion"]["method"] == "score" and "[hybrid: score fusion" in out
    metrics = {name: section["metrics"] for name, section in report["rankers"].items()}
    # BM25 reads the brand and type words of every relevant title; the random tiny model does not.
    assert metrics["lexical"]["ndcg@10"] > 0.8 > metrics["dense"]["ndcg@10"]
    assert metrics["hybrid"]["ndcg@10"] > metrics["dense"]["ndcg@10"]

    status, _, err = run_cli(capsys, *common, "--output_file", tmp_path / "dense.json")
    assert status == 0, err
    dense_only = json.loads((tmp_path / "dense.json").read_text())
    assert dense_only["metrics"] == metrics["dense"]  # the same dense run, with or without the other rankers


def test_fused_ranker_fuses_id_rankings_by_reciprocal_rank():
    from modeling_mmretrieval.retrieval.hybrid import fused_ranker

    dense = lambda products, texts, k: [["sku-1", "sku-2", "sku-3"][:k] for _ in texts]  # noqa: E731
    lexical = lambda products, texts, k: [["sku-3", "sku-2", "sku-4"][:k] for _ in texts]  # noqa: E731
    ranked = fused_ranker([dense, lexical], rrf_k=60, depth=3)(None, ["red shirt", "blue jeans"], 3)
    # sku-3: 1/63 + 1/61 > sku-2: 2/62 > sku-1: 1/61 > sku-4: 1/63
    assert ranked == [["sku-3", "sku-2", "sku-1"]] * 2
    assert fused_ranker([dense, lexical], depth=3)(None, ["q"], 4)[0] == ["sku-3", "sku-2", "sku-1", "sku-4"]
