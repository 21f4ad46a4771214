"""`mmretrieval evaluate --judgements FILE`: the search page's relevance marks, scored like any other queries.

Marks are written with `append_judgement` (what the page's buttons call) for a tiny 3tower retriever composed from
tiny pretrained towers (the real MiniLM tokenizer, a tiny DINOv2) over a generated CSV shop whose image column
points to real PNG files; the command runs in-process and its report must equal the metrics computed by hand from
the model's own ranking. Bad files and marks of products the catalogue lacks end the command in one line, before
the model is loaded. With `--filter` and a price range, every ranker ranks only the matching products and the
metrics are those of that filtered ranking against the matching relevant products, computed by hand; a bad filter
ends the command in one line, before the model is loaded.
"""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_towers import save_tiny_pretrained_towers, write_csv_catalogue

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor, cli
from modeling_mmretrieval.commands import evaluate as evaluate_command
from modeling_mmretrieval.commands.common import load_retriever
from modeling_mmretrieval.data import load_catalogue
from modeling_mmretrieval.retrieval.filters import ProductTable
from modeling_mmretrieval.retrieval.hybrid import ProductRanker
from modeling_mmretrieval.retrieval.judgements import append_judgement
from modeling_mmretrieval.retrieval.lexical import LexicalIndex
from modeling_mmretrieval.retrieval.search import build_product_index, embed_queries
from modeling_mmretrieval.towers import MissingOfflineTowerError

IMAGE_SIZE = 28
COLOURS = {"Red": (200, 30, 30), "Blue": (30, 30, 200), "Black": (10, 10, 10), "White": (245, 245, 245)}
TYPES = ("Tshirt", "Jeans", "Shirt", "Kurta")
BRANDS = ("Roadster", "Nike", "Puma")
NUM_PRODUCTS = 24
K_VALUES = (1, 3, 10)


@pytest.fixture(scope="module", autouse=True)
def single_thread(single_torch_thread):
    """Tiny models on shared cores: one intra-op thread (see conftest)."""


def png_bytes(colour, shade: int) -> bytes:
    image = Image.new("RGB", (24, 32), colour)
    image.putpixel((shade % 24, shade % 32), (shade * 9 % 256, 128, 64))  # no two photos alike
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    """A CSV catalogue of clothes, each with a PNG photo of its colour in the catalogue's folder."""
    folder = tmp_path_factory.mktemp("shop")
    (folder / "images").mkdir()
    products = []
    for number in range(NUM_PRODUCTS):
        colour, article_type = list(COLOURS)[number % 4], TYPES[(number // 4) % 4]
        (folder / f"images/{number}.png").write_bytes(png_bytes(COLOURS[colour], number))
        products.append({
            "product_id": f"p{number:03d}", "title": f"{BRANDS[number % 3]} {colour} {article_type}",
            "brand": BRANDS[number % 3], "description": f"A {colour.lower()} {article_type.lower()} in soft cotton",
            "image": f"images/{number}.png", "price": 100 + 50 * number,
        })
    return write_csv_catalogue(folder / "products.csv", products)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny 3tower retriever (residual fusion) composed from tiny pretrained towers, saved as a checkpoint."""
    root = tmp_path_factory.mktemp("towers")
    try:
        text, vision = save_tiny_pretrained_towers(root, IMAGE_SIZE, text_layers=1)
    except MissingOfflineTowerError as error:
        pytest.skip(str(error))
    model = MultimodalRetrievalModel.from_towers_pretrained(
        str(text), str(vision), architecture="3tower", fusion="residual", max_product_length=32)
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(str(text), str(vision), config=model.config)
    folder = root / "run" / "final"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    status = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def evaluate_args(checkpoint, shop, marks, *extra):
    return ["evaluate", "--model_name_or_path", checkpoint, "--dataset", shop, "--split", "train", "--device", "cpu",
            "--judgements", marks, "--k_values", *K_VALUES, *extra]


def error_line(stderr: str) -> str:
    """The one error line of a refused command, without a traceback."""
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if "error" in line]
    assert line.startswith("mmretrieval evaluate: error: ") and stderr.rstrip().endswith(line)
    return line


def by_hand(run: dict[str, list[str]], relevant: dict[str, set[str]]) -> dict[str, float]:
    """Recall, precision, MRR and nDCG at each cut-off, averaged over the queries: the textbook formulas."""
    metrics = {}
    for k in K_VALUES:
        per_query = {"recall": [], "precision": [], "mrr": [], "ndcg": []}
        for query, wanted in relevant.items():
            top = run[query][:k]
            hits = [rank for rank, product_id in enumerate(top, start=1) if product_id in wanted]
            per_query["recall"].append(len(hits) / len(wanted))
            per_query["precision"].append(len(hits) / k)
            per_query["mrr"].append(1 / hits[0] if hits else 0.0)
            ideal = sum(1 / math.log2(rank + 1) for rank in range(1, min(k, len(wanted)) + 1))
            per_query["ndcg"].append(sum(1 / math.log2(rank + 1) for rank in hits) / ideal)
        metrics.update({f"{name}@{k}": sum(values) / len(values) for name, values in per_query.items()})
    return metrics


@pytest.fixture()
def marks(tmp_path) -> Path:
    """What a merchandiser's clicks leave: three queries, a corrected mis-click, and a query nothing suited."""
    path = tmp_path / "marks" / "judgements.jsonl"
    for query, product_id, relevance, label in [
        ("blue kurta", "p013", 1, "dense"), ("blue kurta", "p005", 0, "dense"), ("blue kurta", "p001", 1, "hybrid"),
        ("black jeans", "p006", 1, "lexical"), ("black jeans", "p002", 1, "dense"),
        ("black jeans", "p002", 0, "dense"),  # the mis-click, corrected: the latest mark wins
        ("nike shirt", "p010", 1, "dense"), ("nike shirt", "p011", 1, "dense"), ("nike shirt", "p022", 1, "lexical"),
        ("gold watch", "p000", 0, "dense"), ("gold watch", "p004", 0, "hybrid"),  # every mark "not relevant"
    ]:
        append_judgement(path, query, product_id, relevance, label=label)
    return path


RELEVANT = {"blue kurta": {"p013", "p001"}, "black jeans": {"p006"}, "nike shirt": {"p010", "p011", "p022"}}


def test_evaluate_scores_the_marks_of_the_search_page_as_computed_by_hand(checkpoint, shop, marks, tmp_path, capsys):
    report_file = tmp_path / "report.json"
    status, out, err = run_cli(capsys, *evaluate_args(checkpoint, shop, marks, "--ranker", "dense", "lexical",
                                                     "--output_file", report_file, "--save_run", tmp_path / "run.json"))
    assert status == 0, err
    report = json.loads(report_file.read_text())

    # The model's own ranking of the judged queries, from the library (as `search` ranks them)
    model, processor = load_retriever(str(checkpoint), "cpu")
    catalogue = load_catalogue(shop, split="train", needs_queries=False)
    index = build_product_index(model, processor, catalogue, show_progress=False)
    queries = list(RELEVANT)
    _, ids = index.search(embed_queries(model, processor, queries), k=max(K_VALUES))
    dense_run = dict(zip(queries, ids, strict=True))
    fields = ("title", "brand", "description")
    lexical = LexicalIndex.from_products(ProductTable.from_catalogue(catalogue, index.ids, names=fields).records(fields),
                                         fields)
    _, ids = ProductRanker(index, lexical, ranker="lexical").search(queries, k=max(K_VALUES))
    lexical_run = {query: [product_id for product_id in ranked if product_id is not None]
                   for query, ranked in zip(queries, ids, strict=True)}

    assert json.loads((tmp_path / "run.json").read_text()) == dense_run  # keyed by the query text
    for ranker, run in (("dense", dense_run), ("lexical", lexical_run)):
        reported = report["rankers"][ranker]["metrics"]
        assert reported["num_queries"] == 3
        for name, value in by_hand(run, RELEVANT).items():
            assert reported[name] == pytest.approx(value), (ranker, name)
    # BM25 finds the one product whose title holds both words first: a real ranking, not zeros
    assert lexical_run["black jeans"][0] == "p006" and report["rankers"]["lexical"]["metrics"]["recall@1"] > 0
    assert report["metrics"] == report["rankers"]["dense"]["metrics"]
    assert report["queries"] == {"source": str(marks), "kind": "judgements", "num_judged": 4, "num_skipped": 1,
                                 "num_judgements": 10}  # the corrected mark counts once
    assert report["num_queries"] == 3
    assert f"{NUM_PRODUCTS} products, 3 queries judged in {marks} (1 skipped: no product marked relevant)" in out
    assert "recall@3" in out and "[lexical]" in out


def test_a_malformed_judgements_file_ends_in_one_line_before_the_model_loads(checkpoint, shop, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setattr(evaluate_command, "load_retriever", lambda *args: pytest.fail("the model was loaded"))
    marks = tmp_path / "marks.jsonl"
    append_judgement(marks, "blue kurta", "p013", 1)
    with marks.open("a") as handle:
        handle.write('{"query": "blue kurta", "product_id": "p001", "relevance": "yes"}\n')
    for path, message in [
        (marks, f"{marks} line 2: relevance must be 0 or 1, got 'yes' (--judgements)"),
        (tmp_path / "missing.jsonl", "No such file or directory (--judgements)"),
        (tmp_path, "Is a directory (--judgements)"),
    ]:
        status, _, err = run_cli(capsys, *evaluate_args(checkpoint, shop, path))
        assert status == 2 and error_line(err).endswith(message), err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    status, _, err = run_cli(capsys, *evaluate_args(checkpoint, shop, empty))
    assert status == 2 and error_line(err).endswith(f"{empty} holds no judgement (--judgements)")


def test_marks_of_a_product_the_catalogue_lacks_or_with_nothing_relevant_are_refused(checkpoint, shop, tmp_path,
                                                                                     capsys, monkeypatch):
    monkeypatch.setattr(evaluate_command, "load_retriever", lambda *args: pytest.fail("the model was loaded"))
    marks = tmp_path / "other-split.jsonl"
    append_judgement(marks, "blue kurta", "p013", 1)
    append_judgement(marks, "blue kurta", "p999", 0)  # a product of another split
    status, _, err = run_cli(capsys, *evaluate_args(checkpoint, shop, marks))
    line = error_line(err)
    assert status == 2 and "product 'p999', marked for the query 'blue kurta', is not in the evaluated catalogue" in line
    assert line.endswith(f"(--judgements {marks})")
    # the same mark inside a --max_products slice that leaves the product out
    status, _, err = run_cli(capsys, *evaluate_args(checkpoint, shop, marks, "--max_products", "10"))
    assert status == 2 and "product 'p013'" in error_line(err)

    nothing = tmp_path / "nothing.jsonl"
    append_judgement(nothing, "gold watch", "p000", 0)
    status, _, err = run_cli(capsys, *evaluate_args(checkpoint, shop, nothing))
    assert status == 2 and error_line(err).endswith(
        f"none of the 1 judged queries of {nothing} has a product marked relevant, so there is nothing to find "
        "(--judgements)")

    status, _, err = run_cli(capsys, *evaluate_args(checkpoint, shop, nothing, "--queries_file", nothing))
    assert status == 2 and "give either --queries_file or --judgements" in err


# ----- filters: the filtered search, evaluated ---------------------------------------------------------------------
def nike_up_to_800(product_id: str) -> bool:
    """The shop's rule: brand cycles Roadster, Nike, Puma; price is 100 + 50 * number."""
    number = int(product_id[1:])
    return BRANDS[number % 3] == "Nike" and 100 + 50 * number <= 800


def test_evaluate_with_a_filter_scores_the_filtered_ranking_as_computed_by_hand(checkpoint, shop, marks, tmp_path,
                                                                                capsys):
    report_file = tmp_path / "report.json"
    status, out, err = run_cli(capsys, *evaluate_args(
        checkpoint, shop, marks, "--ranker", "dense", "lexical", "--filter", "brand=nike", "--max_price", "800",
        "--output_file", report_file, "--save_run", tmp_path / "run.json"))
    assert status == 0, err
    report = json.loads(report_file.read_text())

    # The filtered ranking, from the library: the allowed products' mask inside each ranker's search
    model, processor = load_retriever(str(checkpoint), "cpu")
    catalogue = load_catalogue(shop, split="train", needs_queries=False)
    index = build_product_index(model, processor, catalogue, show_progress=False)
    allowed = np.array([nike_up_to_800(str(product_id)) for product_id in index.ids])
    assert allowed.sum() == 5  # p001, p004, p007, p010, p013
    relevant = {query: {product_id for product_id in wanted if nike_up_to_800(product_id)}
                for query, wanted in RELEVANT.items()}
    relevant = {query: wanted for query, wanted in relevant.items() if wanted}
    assert relevant == {"blue kurta": {"p013", "p001"}, "nike shirt": {"p010"}}  # "black jeans" has none left
    queries = list(relevant)
    _, ids = index.search(embed_queries(model, processor, queries), k=max(K_VALUES), allowed=allowed)
    dense_run = {query: [product_id for product_id in ranked if product_id is not None]
                 for query, ranked in zip(queries, ids, strict=True)}
    fields = ("title", "brand", "description")
    lexical = LexicalIndex.from_products(ProductTable.from_catalogue(catalogue, index.ids, names=fields).records(fields),
                                         fields)
    _, ids = ProductRanker(index, lexical, ranker="lexical").search(queries, k=max(K_VALUES), allowed=allowed)
    lexical_run = {query: [product_id for product_id in ranked if product_id is not None]
                   for query, ranked in zip(queries, ids, strict=True)}

    assert json.loads((tmp_path / "run.json").read_text()) == dense_run
    assert all(len(ranked) == 5 and all(map(nike_up_to_800, ranked)) for ranked in dense_run.values())
    for ranker, run in (("dense", dense_run), ("lexical", lexical_run)):
        reported = report["rankers"][ranker]["metrics"]
        assert reported["num_queries"] == 2
        for name, value in by_hand(run, relevant).items():
            assert reported[name] == pytest.approx(value), (ranker, name)
    assert lexical_run["nike shirt"][0] == "p010"  # the one matching product with both words in its title
    assert report["filter"] == {"filter": "brand=nike, price <= 800", "values": {"brand": ["nike"]},
                                "ranges": {"price": [None, 800.0]}, "num_products": 5, "num_queries_skipped": 1}
    assert report["num_queries"] == 2
    assert ("filtered by brand=nike, price <= 800 (5 products; 1 queries skipped: no matching relevant product)"
            in out)


def test_a_bad_filter_ends_evaluate_in_one_line_before_the_model_loads(checkpoint, shop, marks, capsys, monkeypatch):
    monkeypatch.setattr(evaluate_command, "load_retriever", lambda *args: pytest.fail("the model was loaded"))
    for extra, message in [
        (["--filter", "season=Summer"], "cannot filter on 'season' (--filter season=...): the catalogue has no such "
                                        "column; its columns are ["),
        (["--filter", "brand"], "--filter 'brand' must read COLUMN=VALUE"),
        (["--min_price", "500", "--max_price", "100"], "--min_price 500 is above --max_price 100"),
        (["--filter", "brand=Gucci"], f"no product of the {NUM_PRODUCTS} evaluated matches the filter brand=Gucci "
                                      "(--filter, --min_price, --max_price)"),
        (["--filter", "brand=Puma", "--max_price", "300"], "the filter brand=Puma, price <= 300 lets through 1 "
                                                           "products, none of them relevant to any of the 3 queries"),
        (["--min_price", "10", "--price_column", "cost"], "cannot filter on 'cost' (--min_price/--max_price with "
                                                          "--price_column)"),
    ]:
        status, _, err = run_cli(capsys, *evaluate_args(checkpoint, shop, marks, *extra))
        assert status == 2 and message in error_line(err), (extra, err)
