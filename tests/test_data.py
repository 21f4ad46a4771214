"""Catalogue loading (catalogue), attribute-derived queries (queries), relevance sets and hard negatives (relevance)
and the data-stats command (stats)."""

import dataclasses
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from modeling_mmretrieval.data import catalogue
from modeling_mmretrieval.data.catalogue import (
    SAMPLE_DATA_DIR,
    CatalogueColumnError,
    CatalogueColumns,
    default_data_dir,
    load_catalogue,
)
from modeling_mmretrieval.data.images import load_product_image
from modeling_mmretrieval.data.queries import (
    QUERY_ATTRIBUTES_COLUMN,
    EvaluationQuery,
    article_type_phrases,
    derive_query,
    make_evaluation_queries,
    make_training_pairs,
)
from modeling_mmretrieval.data.relevance import find_hard_negatives, product_matches
from modeling_mmretrieval.data.stats import catalogue_stats, count_image_problems, run_data_stats

SHARED_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-products"
ADULT_GENDERS = {"men", "women"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("datasets_cache")


@pytest.fixture(scope="module")
def sample(cache_dir) -> datasets.DatasetDict:
    return load_catalogue(SAMPLE_DATA_DIR, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def train_records(sample) -> list[dict]:
    return sample["train"].remove_columns(["image", "description"]).to_list()


@pytest.fixture(scope="module")
def train_values(train_records) -> dict[str, dict]:
    """Per product id, its column values merged with its parsed attributes JSON (columns win)."""
    return {product["product_id"]: {**json.loads(product["attributes"]), **product} for product in train_records}


@pytest.fixture(scope="module")
def evaluation_queries(sample) -> list[EvaluationQuery]:
    return make_evaluation_queries(sample["train"], seed=7, num_queries=300)


def satisfies(values: dict, key: str, wanted: str) -> bool:
    """The documented relevance rule, written out independently of the module's index."""
    actual = values.get(key)
    if actual is None:
        return False
    if actual.lower() == wanted.lower():
        return True
    return key == "gender" and wanted.lower() in ADULT_GENDERS and actual.lower() == "unisex"


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def test_committed_sample_loads_with_lazy_images(sample):
    assert list(sample) == ["train", "validation", "test"]
    for name, split in sample.items():
        assert len(split) == pq.ParquetFile(SAMPLE_DATA_DIR / f"{name}.parquet").metadata.num_rows
    assert 3000 <= sum(len(split) for split in sample.values()) <= 5000
    train = sample["train"]
    assert train.features["image"] == datasets.Image(decode=False)
    assert train.features["product_id"] == datasets.Value("string")
    row = train[0]
    assert isinstance(row["image"]["bytes"], bytes)
    assert load_product_image(row["image"]).image.size[1] == 80
    assert len(set(train["product_id"])) == len(train)


def test_committed_sample_is_small_and_stratified(sample):
    total_bytes = sum(path.stat().st_size for path in SAMPLE_DATA_DIR.glob("*.parquet"))
    assert total_bytes <= 10_000_000
    type_counts = Counter(sample["train"]["article_type"])
    assert len(type_counts) >= 100
    common_types = [name for name, _ in type_counts.most_common(30)]
    assert all(type_counts[name] >= 10 for name in common_types)


def test_sample_splits_do_not_share_products(sample):
    ids = [set(split["product_id"]) for split in sample.values()]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]


@pytest.mark.skipif(
    not SHARED_DATA_DIR.is_dir(), reason="the shared catalogue is absent; the sample is tested instead"
)
def test_real_catalogue_split_loads_from_the_shared_parquet_files(cache_dir):
    validation = load_catalogue(SHARED_DATA_DIR, split="validation", cache_dir=cache_dir)
    assert isinstance(validation, datasets.Dataset)
    assert len(validation) == pq.ParquetFile(SHARED_DATA_DIR / "validation.parquet").metadata.num_rows
    assert validation.features["image"] == datasets.Image(decode=False)
    decoded = [load_product_image(image) for image in validation.select(range(50))["image"]]
    assert all(result.has_image and result.image.mode == "RGB" for result in decoded)


@pytest.mark.skipif(not SHARED_DATA_DIR.is_dir(), reason="the shared catalogue is absent")
def test_default_source_is_the_shared_catalogue_when_present(monkeypatch):
    monkeypatch.delenv(catalogue.DATA_DIR_ENV, raising=False)
    assert default_data_dir() == SHARED_DATA_DIR.resolve()


def test_default_source_falls_back_to_the_sample(monkeypatch, tmp_path):
    monkeypatch.delenv(catalogue.DATA_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(catalogue, "_REPO_ROOT", tmp_path)
    assert default_data_dir() == SAMPLE_DATA_DIR


def test_environment_variable_chooses_the_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(catalogue.DATA_DIR_ENV, str(SAMPLE_DATA_DIR))
    assert default_data_dir() == SAMPLE_DATA_DIR
    monkeypatch.setenv(catalogue.DATA_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=catalogue.DATA_DIR_ENV):
        default_data_dir()


def test_unknown_split_lists_the_available_ones(cache_dir):
    with pytest.raises(KeyError, match="validation"):
        load_catalogue(SAMPLE_DATA_DIR, split="dev", cache_dir=cache_dir)


def test_missing_column_error_names_it_and_the_available_columns(tmp_path, cache_dir):
    table = pq.read_table(SAMPLE_DATA_DIR / "validation.parquet").drop_columns(["title"])
    pq.write_table(table, tmp_path / "validation.parquet")
    with pytest.raises(CatalogueColumnError) as raised:
        load_catalogue(tmp_path, cache_dir=cache_dir)
    message = str(raised.value)
    assert isinstance(raised.value, KeyError)
    assert "'title'" in message and "CatalogueColumns.title" in message and "'description'" in message


def test_catalogue_with_queries_needs_no_attribute_columns(tmp_path, cache_dir):
    table = pq.read_table(SAMPLE_DATA_DIR / "validation.parquet").select(
        ["product_id", "title", "description", "image"]
    )
    table = table.append_column("query", pa.array(["a query"] * table.num_rows))
    pq.write_table(table, tmp_path / "catalogue.parquet")
    loaded = load_catalogue(tmp_path / "catalogue.parquet", cache_dir=cache_dir)
    assert list(loaded) == ["train"] and loaded["train"][0]["query"] == "a query"


def test_products_only_load_needs_neither_queries_nor_attributes_nor_images(tmp_path, cache_dir):
    rows = [{"sku": f"sku-{n}", "name": f"Red mug {n}", "desc": "a mug", "colour": "Red"} for n in range(4)]
    csv_path = tmp_path / "shop.csv"
    pa_csv.write_csv(pa.Table.from_pylist(rows), csv_path)
    text_only = CatalogueColumns(product_id="sku", title="name", description="desc", image=None, query=None,
                                 article_type=None, gender=None, base_colour="colour", usage=None, brand=None,
                                 attributes=None)
    # Queries can neither be read nor derived: refused unless only the products are wanted.
    with pytest.raises(ValueError, match="needs_queries=False"):
        load_catalogue(csv_path, columns=text_only, cache_dir=cache_dir)
    loaded = load_catalogue(csv_path, split="train", columns=text_only, needs_queries=False, cache_dir=cache_dir)
    assert loaded.column_names == ["sku", "name", "desc", "colour"] and loaded[0]["sku"] == "sku-0"
    # An image column that is named must exist; the error says which field is missing.
    with pytest.raises(CatalogueColumnError) as raised:
        load_catalogue(csv_path, columns=dataclasses.replace(text_only, image="img"), needs_queries=False,
                       cache_dir=cache_dir)
    assert raised.value.fields == ("image",) and "'img' (CatalogueColumns.image)" in str(raised.value)
    # needs_queries=False still checks the columns every product needs.
    with pytest.raises(CatalogueColumnError) as raised:
        load_catalogue(csv_path, columns=dataclasses.replace(text_only, title="title"), needs_queries=False,
                       cache_dir=cache_dir)
    assert raised.value.fields == ("title",)


def test_csv_catalogue_with_its_own_column_names_and_image_paths(tmp_path, cache_dir):
    jpegs = pq.read_table(SAMPLE_DATA_DIR / "test.parquet", columns=["image"]).column("image").to_pylist()[:3]
    rows = []
    for position, (colour, image) in enumerate(zip(["Red", "Blue", "Red"], jpegs, strict=True)):
        path = tmp_path / f"{position}.jpg"
        path.write_bytes(image["bytes"])
        rows.append(
            {"sku": 100 + position, "name": f"{colour} Tee", "colour": colour, "kind": "Tshirts", "image": str(path)}
        )
    csv_path = tmp_path / "products.csv"
    pa_csv.write_csv(pa.Table.from_pylist(rows), csv_path)
    columns = CatalogueColumns(
        product_id="sku",
        title="name",
        description=None,
        base_colour="colour",
        article_type="kind",
        gender=None,
        usage=None,
        brand=None,
        attributes=None,
    )
    catalogue = load_catalogue(csv_path, split="train", columns=columns, cache_dir=cache_dir)
    assert catalogue.features["sku"] == datasets.Value("string")
    assert load_product_image(catalogue[0]["image"]).has_image
    queries = make_evaluation_queries(catalogue, seed=0, num_queries=10, columns=columns)
    red = [query for query in queries if query.attributes.get("colour") == "Red"]
    assert all(query.relevant_ids == {"100", "102"} for query in red)


# --------------------------------------------------------------------------------------------------------------
# Attribute-derived queries and relevance
# --------------------------------------------------------------------------------------------------------------


def test_relevance_sets_hold_exactly_the_products_matching_every_attribute(evaluation_queries, train_values):
    assert len(evaluation_queries) == 300
    for query in evaluation_queries:
        assert query.source_product_id in query.relevant_ids
        matching = {
            product_id
            for product_id, values in train_values.items()
            if all(satisfies(values, key, wanted) for key, wanted in query.attributes.items())
        }
        assert matching == query.relevant_ids, query.text


def test_product_matches_agrees_with_the_relevance_sets(evaluation_queries, train_records):
    for query in evaluation_queries[:20]:
        for product in train_records:
            assert product_matches(product, query.attributes) == (product["product_id"] in query.relevant_ids)


def test_most_relevance_sets_go_beyond_the_source_product(evaluation_queries):
    larger = [query for query in evaluation_queries if len(query.relevant_ids) > 1]
    assert len(larger) > len(evaluation_queries) / 2


def test_query_text_expresses_each_of_its_attributes(evaluation_queries):
    for query in evaluation_queries:
        assert "article_type" in query.attributes and 2 <= len(query.attributes) <= 4
        for value in query.attributes.values():
            for word in value.lower().split():
                assert any(form in query.text for form in (word, word[:-1], word[:-2])), (query.text, value)
        if "base_colour" in query.attributes:
            assert query.attributes["base_colour"].lower() in query.text  # colour words are kept intact


def test_query_texts_are_deduplicated(evaluation_queries):
    texts = [query.text for query in evaluation_queries]
    assert len(set(texts)) == len(texts)
    assert len({query.query_id for query in evaluation_queries}) == len(texts)


def test_queries_are_deterministic_per_seed_and_vary_across_seeds(sample, evaluation_queries):
    global_state = random.getstate()
    again = make_evaluation_queries(sample["train"], seed=7, num_queries=300)
    assert random.getstate() == global_state
    assert [(q.text, q.relevant_ids) for q in again] == [(q.text, q.relevant_ids) for q in evaluation_queries]
    other_seed = make_evaluation_queries(sample["train"], seed=8, num_queries=300)
    overlap = {q.text for q in other_seed} & {q.text for q in evaluation_queries}
    assert len(overlap) < 100


def test_phrasings_vary(evaluation_queries):
    templates = Counter(query.template for query in evaluation_queries)
    assert len(templates) >= 10
    assert max(templates.values()) < len(evaluation_queries) / 3
    texts = [query.text for query in evaluation_queries]
    assert any(" for men" in text or " for women" in text for text in texts)
    assert any(text.startswith(("men's ", "women's ", "mens ", "womens ")) for text in texts)
    assert any(" in " in query.template for query in evaluation_queries)
    tshirt_texts = [text for text in texts if "tshirt" in text]
    assert any("tshirts" in text for text in tshirt_texts) and any("tshirts" not in text for text in tshirt_texts)


@pytest.mark.parametrize(
    "article_type, phrases",
    [
        ("Tshirts", ("tshirts", "tshirt")),
        ("Dresses", ("dresses", "dress")),
        ("Watches", ("watches", "watch")),
        ("Sports Shoes", ("sports shoes", "sports shoe")),
        ("Kurtis", ("kurtis", "kurti")),
        ("Jeans", ("jeans",)),
        ("Track Pants", ("track pants",)),
        ("Briefs", ("briefs",)),
        ("Heels", ("heels",)),
        ("Booties", ("booties",)),
        ("Perfume and Body Mist", ("perfume and body mist",)),
        ("Bra", ("bra",)),
        # Not in the catalogue: the rules generalise.
        ("T-Shirts", ("t-shirts", "t-shirt")),
        ("Blazers", ("blazers", "blazer")),
        ("Gloves", ("gloves", "glove")),
        ("Running Shorts", ("running shorts",)),
        ("Hoodies", ("hoodies",)),
    ],
)
def test_article_types_get_natural_phrasings(article_type, phrases):
    assert article_type_phrases(article_type) == phrases


def test_derive_query_generalises_to_an_unseen_product():
    product = {
        "product_id": "x1",
        "article_type": "Rain Ponchos",
        "gender": "Girls",
        "base_colour": "Sea Green",
        "usage": "Travel",
        "brand": "Acme",
        "attributes": json.dumps({"Pattern": "Polka Dots", "Fit": "Loose Fit"}),
    }
    texts = {derive_query(product, random.Random(seed)).text for seed in range(60)}
    assert len(texts) > 20
    assert all("rain poncho" in text for text in texts)
    assert any("for girls" in text for text in texts) and any("girls' " in text for text in texts)
    assert any("sea green" in text for text in texts)


def test_derive_query_skips_placeholder_attributes_and_needs_an_article_type():
    product = {"product_id": "7", "article_type": "Caps", "gender": "NA", "base_colour": "", "usage": "Other"}
    query = derive_query(product, random.Random(0))
    assert query.attributes == {"article_type": "Caps"} and query.text in {"caps", "cap"}
    with pytest.raises(ValueError, match="article type"):
        derive_query({"product_id": "8", "gender": "Men"}, random.Random(0))


def test_unisex_products_answer_adult_queries_only():
    unisex_black = {"gender": "Unisex", "base_colour": "Black", "article_type": "Backpacks"}
    assert product_matches(unisex_black, {"gender": "Men", "article_type": "backpacks"})
    assert product_matches(unisex_black, {"gender": "women"})
    assert not product_matches(unisex_black, {"gender": "Boys"})
    assert not product_matches({"gender": "Men"}, {"gender": "Unisex"})
    assert not product_matches({"gender": "Men", "base_colour": "Black"}, {"base_colour": "Navy Blue"})


def test_relevance_bounds_are_honoured(sample):
    queries = make_evaluation_queries(sample["train"], seed=1, num_queries=100, min_relevant=3, max_relevant=20)
    assert queries and all(3 <= len(query.relevant_ids) <= 20 for query in queries)
    with pytest.raises(ValueError, match="min_relevant"):
        make_evaluation_queries(sample["train"], seed=1, num_queries=5, min_relevant=0)


def test_colour_absent_slice_matches_the_titles(evaluation_queries, train_values):
    titles = {product_id: values["title"].lower() for product_id, values in train_values.items()}
    flagged = 0
    for query in evaluation_queries:
        colour = query.attributes.get("base_colour")
        if colour is None:
            assert not query.colour_absent_from_titles
            continue
        mentioned = any(
            word in titles[product_id].replace("-", " ").split()
            for product_id in query.relevant_ids
            for word in colour.lower().split()
        )
        assert query.colour_absent_from_titles == (not mentioned), query.text
        flagged += query.colour_absent_from_titles
    assert flagged > 0


# --------------------------------------------------------------------------------------------------------------
# Training pairs and hard negatives
# --------------------------------------------------------------------------------------------------------------


def test_training_pairs_keep_products_and_lazy_images(sample):
    validation = sample["validation"]
    pairs = make_training_pairs(validation, seed=3, queries_per_product=2)
    assert len(pairs) == 2 * len(validation)
    assert set(validation.column_names) | {"query", QUERY_ATTRIBUTES_COLUMN} == set(pairs.column_names)
    assert pairs.features["image"] == datasets.Image(decode=False)
    first_round, second_round = pairs.select(range(len(validation))), pairs.select(range(len(validation), len(pairs)))
    assert first_round["product_id"] == second_round["product_id"] == validation["product_id"]
    assert sum(a != b for a, b in zip(first_round["query"], second_round["query"], strict=True)) > len(validation) / 2
    for row in pairs.remove_columns(["image"]).select(range(0, len(pairs), 7)):
        attributes = json.loads(row[QUERY_ATTRIBUTES_COLUMN])
        assert product_matches(row, attributes) and row["query"].strip() == row["query"]


def test_training_queries_depend_on_the_product_not_the_row_order(sample):
    validation = sample["validation"]
    original = make_training_pairs(validation, seed=3)
    shuffled = make_training_pairs(validation.shuffle(seed=0), seed=3)
    assert dict(zip(original["product_id"], original["query"], strict=True)) == dict(
        zip(shuffled["product_id"], shuffled["query"], strict=True)
    )


def test_training_pairs_reject_bad_arguments(sample):
    with pytest.raises(ValueError, match="queries_per_product"):
        make_training_pairs(sample["validation"], seed=0, queries_per_product=0)
    with_queries = make_training_pairs(sample["validation"], seed=0)
    with pytest.raises(ValueError, match="already has"):
        make_training_pairs(with_queries, seed=0)


def test_hard_negatives_share_the_article_type_but_differ_in_colour_or_gender(sample, train_values):
    negatives = find_hard_negatives(sample["train"], seed=5, negatives_per_product=3)
    assert negatives == find_hard_negatives(sample["train"], seed=5, negatives_per_product=3)
    products = train_values
    assert set(negatives) == set(products)
    for product_id, negative_ids in negatives.items():
        product = products[product_id]
        assert len(negative_ids) <= 3 and len(set(negative_ids)) == len(negative_ids)
        for negative_id in negative_ids:
            negative = products[negative_id]
            assert negative["article_type"] == product["article_type"]
            other_colour = negative["base_colour"] != product["base_colour"]
            other_gender = not (
                satisfies(negative, "gender", product["gender"]) or satisfies(product, "gender", negative["gender"])
            )
            assert other_colour or other_gender
    assert sum(len(ids) == 3 for ids in negatives.values()) > 0.8 * len(negatives)
    assert find_hard_negatives(sample["train"], seed=6, negatives_per_product=3) != negatives


# --------------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------------


def test_count_image_problems_classifies_each_image():
    good = pq.read_table(SAMPLE_DATA_DIR / "test.parquet", columns=["image"]).column("image")[0].as_py()["bytes"]
    images = [good, b"\xff\xd8not really", None, good[: len(good) // 2], good]
    dataset = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image(decode=False))
    assert count_image_problems(dataset) == (2, {"undecodable": 1, "missing": 1, "truncated": 1})


def test_catalogue_stats_summarise_queries_and_images(sample):
    validation = sample["validation"]
    stats = catalogue_stats(validation, seed=0, num_queries=50)["validation"]
    queries = make_evaluation_queries(validation, seed=0, num_queries=50)
    sizes = [len(query.relevant_ids) for query in queries]
    assert stats.products == len(validation) and stats.derived_queries == len(queries)
    assert stats.relevant_per_query_max == max(sizes) and stats.relevant_per_query_mean == sum(sizes) / len(sizes)
    assert stats.article_types == len(set(validation["article_type"]))
    assert stats.images_ok == len(validation) and stats.image_problems == {}


def test_data_stats_command_prints_the_split_summary(capsys, monkeypatch):
    monkeypatch.setenv(catalogue.DATA_DIR_ENV, str(SAMPLE_DATA_DIR))
    assert run_data_stats(["--split", "validation", "--num-queries", "40", "--skip-images"]) == 0
    output = capsys.readouterr().out
    assert "attribute-derived" in output
    article_types = pq.read_table(SAMPLE_DATA_DIR / "validation.parquet", columns=["article_type"])["article_type"]
    row = next(line for line in output.splitlines() if line.startswith("validation"))
    products, types, queries = row.split()[1:4]
    assert (int(products), int(types), int(queries)) == (
        pq.ParquetFile(SAMPLE_DATA_DIR / "validation.parquet").metadata.num_rows,
        len(set(article_types.to_pylist())),
        40,
    )


def test_data_stats_command_reports_a_bad_source_and_reads_one_without_images(capsys, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.csv").write_text("product_id,name\n1,Red Tee\n")
    assert run_data_stats(["--source", str(tmp_path / "bad"), "--skip-images"]) == 2
    assert "'title' (--title_column)" in capsys.readouterr().err
    (tmp_path / "text_only").mkdir()
    (tmp_path / "text_only" / "train.csv").write_text("product_id,title\n1,Red Tee\n2,Blue Mug\n")
    assert run_data_stats(["--source", str(tmp_path / "text_only")]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("has no image column 'image' (--image_column)") == 1
    assert "train: images: none (no image column" in captured.out


def test_data_stats_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "modeling_mmretrieval.data.stats", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stdout.startswith("usage: data-stats")


def test_package_re_exports_its_public_api():
    import modeling_mmretrieval.data as package

    assert all(getattr(package, name, None) is not None for name in package.__all__)
    assert (package.load_catalogue, package.make_training_pairs, package.product_matches, package.run_data_stats) == (
        load_catalogue,
        make_training_pairs,
        product_matches,
        run_data_stats,
    )
