"""Bring-your-own catalogues (issue 15), library side: images resolved, fetched or refused, counted and reported;
image-less batches on every path; bad products found up front and named by id and column.

Catalogues are generated per test: CSV, JSONL and Parquet files with their own column names (`sku`, `name`, `desc`,
`img_path`), real PNG and JPEG files next to them under relative paths, and the runs read them from another
working directory. URLs are served by a local `http.server` on 127.0.0.1 (no internet is needed).
"""

import dataclasses
import http.server
import io
import json
import logging
import threading
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from hostile_images import png_header_only
from PIL import Image
from tiny_towers import IMAGE_SIZE, make_config
from transformers import AutoTokenizer, CLIPImageProcessorPil

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
from modeling_mmretrieval.data import (
    BadProduct,
    CatalogueColumns,
    ImageDecodeError,
    ImageFailureError,
    ImageProblem,
    ImageReport,
    RetrievalCollator,
    find_bad_products,
    load_catalogue,
    load_product_image,
)
from modeling_mmretrieval.data import EvaluationQuery
from modeling_mmretrieval.data import images as images_module
from modeling_mmretrieval.retrieval.evaluator import RetrievalEvaluator
from modeling_mmretrieval.retrieval.held_out_evaluation import model_ranker
from modeling_mmretrieval.retrieval.search import build_product_index
from modeling_mmretrieval.speedups.fast_image_processing import FastImageProcessor
from modeling_mmretrieval.towers import get_minilm_path
from modeling_mmretrieval.training.cached_loss import CachedNTXentLoss
from modeling_mmretrieval.training.image_feature_cache import (
    ImageFeatureCache,
    check_cached_image_features,
    precompute_image_features,
)

# A shop's own column names; no fashion attributes (queries come from a `query` column when training).
SHOP_COLUMNS = CatalogueColumns(
    product_id="sku", title="name", description="desc", image="img_path", query="query",
    gender=None, base_colour=None, article_type=None, usage=None, brand=None, attributes=None,
)
COLOURS = ["red", "navy", "green", "white", "black", "yellow", "grey", "pink"]
NOUNS = ["shirt", "mug", "lamp", "sneaker", "backpack", "scarf", "kettle", "chair"]


def photo_bytes(index: int, image_format: str = "PNG") -> bytes:
    """A small real photo-like image (a gradient with a coloured block), encoded with PIL."""
    image = Image.new("RGB", (24 + index % 5, 32), (index * 37 % 256, 90, 200 - index % 150))
    image.paste((255 - index % 256, 20, 60), (4, 4, 14, 18))
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def write_catalogue(folder: Path, num_products: int, *, file_format: str = "csv", missing: set = frozenset(),
                    corrupt: set = frozenset(), urls: dict | None = None, no_value: set = frozenset()) -> Path:
    """Writes `shop.<format>` and its images under `folder/img/`; returns the data file.

    `missing` products point at a file that does not exist, `corrupt` ones at a file that is not an image,
    `no_value` ones have an empty image cell, `urls` maps a product position to its image URL.
    """
    (folder / "img").mkdir(parents=True, exist_ok=True)
    urls = urls or {}
    rows = []
    for index in range(num_products):
        relative = f"img/{index}.{'jpg' if index % 2 else 'png'}"
        if index in corrupt:
            (folder / relative).write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
        elif index not in missing and index not in urls and index not in no_value:
            (folder / relative).write_bytes(photo_bytes(index, "JPEG" if index % 2 else "PNG"))
        image = urls.get(index, None if index in no_value else relative)
        colour, noun = COLOURS[index % len(COLOURS)], NOUNS[index // len(COLOURS) % len(NOUNS)]
        rows.append({"sku": f"sku-{index}", "name": f"{colour} {noun} {index}", "desc": f"a {colour} {noun}",
                     "img_path": image, "query": f"{colour} {noun}"})
    data_file = folder / f"shop.{file_format}"
    if file_format == "csv":
        datasets.Dataset.from_list(rows).to_csv(data_file, index=False)
    elif file_format == "jsonl":
        data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        datasets.Dataset.from_list(rows).to_parquet(data_file)
    return data_file


@pytest.fixture(scope="module")
def tiny_3tower():
    tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    config = make_config("3tower-dinov2")
    config.text_config.vocab_size = tokenizer.vocab_size
    config.text_config.max_position_embeddings = 128
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = MultimodalRetrievalProcessor(tokenizer, image_processor, max_product_length=32,
                                             product_text_fields=("title", "description"))
    model = MultimodalRetrievalModel(config).eval()
    model.lock_image_tower()
    return model, processor


@pytest.fixture()
def elsewhere(tmp_path, monkeypatch):
    """The catalogue's folder; the working directory is another one, as when a run starts from the repository."""
    catalogue_dir = tmp_path / "shop"
    catalogue_dir.mkdir()
    working_dir = tmp_path / "somewhere_else"
    working_dir.mkdir()
    monkeypatch.chdir(working_dir)
    return catalogue_dir


def load_shop(data_file: Path) -> datasets.Dataset:
    return load_catalogue(data_file, columns=SHOP_COLUMNS, split="train")


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    files: dict = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def image_server():
    """A local HTTP server: `serve(path, bytes)` publishes an image; yields (base URL, serve)."""
    handler = type("Handler", (_ImageHandler,), {"files": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def serve(path: str, body: bytes) -> str:
        handler.files[path] = body
        return f"http://127.0.0.1:{server.server_address[1]}{path}"

    yield f"http://127.0.0.1:{server.server_address[1]}", serve
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------------------------------------------------
# Relative paths, statuses, the report
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_format", ["csv", "jsonl", "parquet"])
def test_relative_image_paths_resolve_against_the_data_file_not_the_working_directory(
    file_format, elsewhere, tiny_3tower
):
    _, processor = tiny_3tower
    data_file = write_catalogue(elsewhere, 6, file_format=file_format)
    products = load_shop(data_file)
    assert [Path(image["path"]) for image in products["img_path"]] == [
        (elsewhere / f"img/{i}.{'jpg' if i % 2 else 'png'}").resolve() for i in range(6)
    ]
    collator = RetrievalCollator(processor, SHOP_COLUMNS, with_queries=False)
    batch = collator(products.to_list())
    assert batch["image_mask"].all()
    assert collator.image_report.summary() == "images: 6 ok, 0 missing, 0 undecodable, 0 refused"


def test_every_image_status_is_counted_with_example_products(elsewhere, tiny_3tower):
    _, processor = tiny_3tower
    # 20 products: 20% missing (2 absent files, 2 empty cells), 5% corrupt, one URL without the opt-in.
    data_file = write_catalogue(elsewhere, 20, missing={3, 7}, no_value={11, 15}, corrupt={5},
                                urls={9: "https://images.example/9.png"})
    products = load_shop(data_file)
    collator = RetrievalCollator(processor, SHOP_COLUMNS, with_queries=False)
    rows = products.to_list()
    batch = collator(rows[:10])
    collator(rows[10:])
    collator(rows[:10])  # a second epoch counts nobody twice
    assert batch["image_mask"].tolist() == [i not in (3, 5, 7, 9) for i in range(10)]
    report = collator.image_report
    assert (report.counts["ok"], report.counts["missing"], report.counts["undecodable"], report.counts["refused"]) == (
        14, 4, 1, 1
    )
    assert report.total == 20 and report.failure_share == pytest.approx(0.3) and collator.image_problems == 6
    examples = report.to_dict()["examples"]
    assert [example["product_id"] for example in examples["missing"]] == ["sku-3", "sku-7", "sku-11", "sku-15"]
    assert "img/3.jpg" in examples["missing"][0]["reason"]
    assert examples["undecodable"][0]["product_id"] == "sku-5"
    assert examples["refused"] == [{"product_id": "sku-9", "reason": "image URL 'https://images.example/9.png' "
                                    "not fetched; pass --fetch_images (fetch_images=True) to download it"}]
    summary = report.summary()
    assert "\n" not in summary
    assert summary.startswith("images: 14 ok, 4 missing (e.g. 'sku-3': no image: there is no file at ")
    assert "1 undecodable (e.g. 'sku-5': undecodable image" in summary and "1 refused (e.g. 'sku-9': image URL" in summary


def test_check_warns_loudly_over_the_share_and_strict_raises_one_line(caplog):
    report = ImageReport()
    for index in range(4):
        report.add(f"sku-{index}", load_product_image(photo_bytes(index)))
    report.add("sku-8", load_product_image(None))
    assert report.check(max_failure_share=0.5) is True  # 20% failed: within the limit, quiet
    report.check(max_failure_share=0.5, strict=False)
    assert not caplog.records
    with pytest.raises(ImageFailureError) as raised:
        report.check(strict=True)  # strict: any failure is an error
    assert isinstance(raised.value, ValueError) and "\n" not in str(raised.value)
    assert str(raised.value).startswith("1 of 5 product images failed and strict images are required")
    for index in range(9, 13):
        report.add(f"sku-{index}", load_product_image(f"missing/{index}.jpg"))
    with caplog.at_level(logging.WARNING):
        assert report.check(max_failure_share=0.5) is False  # 5 of 9 failed
    assert "56% of product images failed, more than the 50% allowed" in caplog.text
    with pytest.raises(ValueError, match="max_failure_share must be between 0 and 1"):
        report.check(max_failure_share=1.5)
    clean = ImageReport()
    clean.add("sku-0", load_product_image(photo_bytes(0)))
    assert clean.check(strict=True) is True


def test_reports_merge_without_counting_a_product_twice():
    first, second = ImageReport(), ImageReport()
    first.add("a", load_product_image(photo_bytes(1)))
    first.add("b", load_product_image(None))
    second.add("b", load_product_image(None))
    second.add("c", load_product_image(b"not an image"))
    merged = ImageReport().merge(first).merge(second)
    assert merged.to_dict()["total"] == 3
    assert merged.to_dict()["examples"]["undecodable"][0]["product_id"] == "c"
    assert merged.summary().startswith("images: 1 ok, 1 missing (e.g. 'b': no image")


def test_a_zero_size_or_degenerate_image_is_undecodable_never_a_zero_division():
    report = ImageReport()
    report.add("empty", load_product_image(Image.new("RGB", (0, 0))))
    report.add("strip", load_product_image(Image.new("RGB", (1, 300))))
    report.add("header", load_product_image(png_header_only(0, 0)))
    assert report.counts["undecodable"] == 3 and report.counts["ok"] == 0
    assert load_product_image(Image.new("RGB", (1, 300))).reason is ImageProblem.DEGENERATE
    fast = FastImageProcessor.from_image_processor(
        CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    )
    for size in [(0, 0), (0, 12), (12, 0)]:
        with pytest.raises(ValueError, match="without pixels"):
            fast(images=[Image.new("RGB", size)])


# ----------------------------------------------------------------------------------------------------------------
# URLs
# ----------------------------------------------------------------------------------------------------------------


def test_urls_are_refused_by_default_and_fetched_with_the_opt_in(image_server, elsewhere, tiny_3tower, monkeypatch):
    _, processor = tiny_3tower
    base, serve = image_server
    urls = {index: serve(f"/img/{index}.png", photo_bytes(index)) for index in range(4)}
    urls[4] = f"{base}/img/gone.png"  # 404
    urls[5] = serve("/img/huge.png", photo_bytes(5) + b"\0" * 4096)
    monkeypatch.setattr(images_module, "MAX_IMAGE_DOWNLOAD_BYTES", 2048)
    products = load_shop(write_catalogue(elsewhere, 6, file_format="jsonl", urls=urls)).to_list()

    refusing = RetrievalCollator(processor, SHOP_COLUMNS, with_queries=False)
    assert not refusing(products)["image_mask"].any()
    assert refusing.image_report.counts["refused"] == 6

    fetching = RetrievalCollator(processor, SHOP_COLUMNS, with_queries=False, fetch_images=True)
    assert fetching(products)["image_mask"].tolist() == [True] * 4 + [False, False]
    report = fetching.image_report.to_dict()
    assert (report["ok"], report["missing"], report["refused"]) == (4, 1, 1)
    assert "could not be downloaded: HTTPError" in report["examples"]["missing"][0]["reason"]
    assert "download cap" in report["examples"]["refused"][0]["reason"]
    fetched = load_product_image(urls[0], fetch_urls=True).image
    assert fetched.size == Image.open(io.BytesIO(photo_bytes(0))).size
    with pytest.raises(ImageDecodeError, match="not fetched"):
        RetrievalCollator(processor, SHOP_COLUMNS, with_queries=False, on_image_error="raise")(products[:1])


def test_the_feature_cache_fetches_urls_on_request_and_its_check_agrees(image_server, elsewhere, tiny_3tower):
    model, processor = tiny_3tower
    _, serve = image_server
    urls = {index: serve(f"/p/{index}.png", photo_bytes(index)) for index in range(3)}
    products = load_shop(write_catalogue(elsewhere, 3, urls=urls))
    cache = precompute_image_features(model, processor, products, columns=SHOP_COLUMNS, show_progress=False,
                                      fetch_images=True)
    assert all(feature is not None for feature in cache.values())
    assert cache.image_report.counts["ok"] == 3
    assert check_cached_image_features(model, processor, products.to_list(), cache, columns=SHOP_COLUMNS) < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Batches without a single image, on every path
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def image_less_pairs(elsewhere):
    """Training rows (with a query column) of a catalogue whose images are all missing or URLs."""
    urls = {index: f"https://cdn.example/{index}.jpg" for index in range(0, 8, 2)}
    data_file = write_catalogue(elsewhere, 8, missing=set(range(1, 8, 2)), urls=urls)
    return load_shop(data_file)


def test_an_all_image_less_catalogue_caches_and_trains_with_cached_features(image_less_pairs, tiny_3tower):
    model, processor = tiny_3tower
    report = ImageReport()
    cache = precompute_image_features(model, processor, image_less_pairs, columns=SHOP_COLUMNS, batch_size=4,
                                      show_progress=False, report=report)
    assert isinstance(cache, ImageFeatureCache) and cache.image_report is report
    assert cache.feature_size == model.image_feature_size and all(value is None for value in cache.values())
    assert (report.counts["missing"], report.counts["refused"]) == (4, 4)
    collator = RetrievalCollator(processor, SHOP_COLUMNS, image_features=cache)
    batch = collator(image_less_pairs.to_list()[:4])
    assert batch["image_features"].shape == (4, model.image_feature_size) and not batch["image_mask"].any()
    assert collator.image_report.counts["refused"] == 2  # copied from the cache's report, with its reasons
    assert "not fetched" in collator.image_report.summary()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    # A plain dict of None features does not know its width: the batch then leaves the zeros to the model.
    plain = RetrievalCollator(processor, SHOP_COLUMNS, image_features=dict(cache))
    plain_batch = plain(image_less_pairs.to_list()[:4])
    assert "image_features" not in plain_batch and not plain_batch["image_mask"].any()
    with torch.no_grad():
        assert torch.allclose(model(**plain_batch).loss, loss)
    assert plain.image_report.counts["missing"] == 4  # known only as image-less in the cache


def test_an_all_image_less_batch_trains_uncached_and_under_grad_cache(image_less_pairs, tiny_3tower):
    model, processor = tiny_3tower
    collator = RetrievalCollator(processor, SHOP_COLUMNS)
    batch = collator(image_less_pairs.to_list()[:6])
    assert not batch["image_mask"].any()
    with torch.no_grad():
        plain_loss = model(**batch).loss
    assert torch.isfinite(plain_loss)
    cache = precompute_image_features(model, processor, image_less_pairs, columns=SHOP_COLUMNS, show_progress=False)
    cached_batch = RetrievalCollator(processor, SHOP_COLUMNS, image_features=cache)(image_less_pairs.to_list()[:6])
    try:  # eval mode: no dropout, so GradCache must reproduce the plain loss
        grad_cache_loss = CachedNTXentLoss(mini_batch_size=2)(model, cached_batch)
        grad_cache_loss.backward()
        gradients = [p.grad for p in model.parameters() if p.grad is not None]
        assert gradients and all(torch.isfinite(grad).all() for grad in gradients)
    finally:
        model.zero_grad()
    assert torch.isfinite(grad_cache_loss)
    assert grad_cache_loss.item() == pytest.approx(plain_loss.item(), abs=1e-4)


def test_an_all_image_less_catalogue_is_indexed_with_and_without_cached_features(image_less_pairs, tiny_3tower):
    model, processor = tiny_3tower
    report = ImageReport()
    index = build_product_index(model, processor, image_less_pairs, columns=SHOP_COLUMNS, batch_size=3,
                                show_progress=False, image_report=report)
    assert len(index) == 8 and (report.counts["missing"], report.counts["refused"]) == (4, 4)
    cache = precompute_image_features(model, processor, image_less_pairs, columns=SHOP_COLUMNS, show_progress=False)
    for features in (cache, dict(cache)):
        cached_report = ImageReport()
        cached = build_product_index(model, processor, image_less_pairs, columns=SHOP_COLUMNS, batch_size=3,
                                     show_progress=False, image_features=features, image_report=cached_report)
        assert np.isfinite(cached.embeddings).all()
        np.testing.assert_allclose(cached.embeddings, index.embeddings, atol=1e-5)
        assert cached_report.failures == 8


@pytest.mark.parametrize("file_format", ["csv", "jsonl", "parquet"])
def test_a_catalogue_without_an_image_column_indexes_as_if_every_image_were_missing(elsewhere, tiny_3tower,
                                                                                    file_format):
    model, processor = tiny_3tower
    with_column = load_shop(write_catalogue(elsewhere, 6, no_value=set(range(6)), file_format=file_format))
    without_column = with_column.remove_columns("img_path")
    data_file = elsewhere / f"text-only.{file_format}"
    if file_format == "csv":
        without_column.to_csv(data_file, index=False)
    elif file_format == "jsonl":
        without_column.to_json(data_file, lines=True)
    else:
        without_column.to_parquet(data_file)
    with pytest.raises(KeyError, match="'img_path' \\(CatalogueColumns.image\\)"):
        load_catalogue(data_file, columns=SHOP_COLUMNS, split="train")
    text_only = dataclasses.replace(SHOP_COLUMNS, image=None)
    products = load_catalogue(data_file, columns=text_only, split="train")
    assert products.column_names == ["sku", "name", "desc", "query"]
    reports = ImageReport(), ImageReport()
    indexes = [
        build_product_index(model, processor, rows, columns=columns, batch_size=4, show_progress=False,
                            image_report=report)
        for rows, columns, report in ((products, text_only, reports[0]), (with_column, SHOP_COLUMNS, reports[1]))
    ]
    assert np.isfinite(indexes[0].embeddings).all() and list(indexes[0].ids) == list(indexes[1].ids)
    np.testing.assert_allclose(indexes[0].embeddings, indexes[1].embeddings, atol=1e-6)
    assert reports[0].counts["missing"] == reports[1].counts["missing"] == 6


def test_the_evaluators_fetch_urls_on_request_and_count_each_image_once(image_server, elsewhere, tiny_3tower):
    model, processor = tiny_3tower
    _, serve = image_server
    urls = {index: serve(f"/e/{index}.png", photo_bytes(index)) for index in range(3)}
    products = load_shop(write_catalogue(elsewhere, 8, urls=urls, missing={4}, corrupt={5}))
    queries = [
        EvaluationQuery(query_id=f"q{position}", text=row["query"], attributes={}, relevant_ids={row["sku"]},
                        source_product_id=row["sku"], colour_absent_from_titles=False, template="query column")
        for position, row in enumerate(products.select(range(4)))
    ]
    refusing = RetrievalEvaluator(products, queries, processor, columns=SHOP_COLUMNS, k_values=(5,))
    fetching = RetrievalEvaluator(products, queries, processor, columns=SHOP_COLUMNS, k_values=(5,),
                                  fetch_images=True, image_report=ImageReport())
    for _ in range(2):  # as during training: a product is counted once, however often it is evaluated
        refusing(model)
    fetching(model)
    counted = {name: (evaluator.image_report.counts["ok"], evaluator.image_report.counts["missing"],
                      evaluator.image_report.counts["undecodable"], evaluator.image_report.counts["refused"])
               for name, evaluator in (("refusing", refusing), ("fetching", fetching))}
    assert counted == {"refusing": (3, 1, 1, 3), "fetching": (6, 1, 1, 0)}
    assert "--fetch_images" in refusing.image_report.summary()
    # The held-out evaluation's ranker reports the same way.
    report = ImageReport()
    rank = model_ranker(model, processor, columns=SHOP_COLUMNS, image_report=report, fetch_images=True)
    ranked = rank(products.to_list(), ["red shirt"], 5)
    assert len(ranked[0]) == 5 and (report.counts["ok"], report.total) == (6, 8)


# ----------------------------------------------------------------------------------------------------------------
# Bad products: found up front, named by id and column
# ----------------------------------------------------------------------------------------------------------------


def test_find_bad_products_names_ids_and_columns_on_a_generated_catalogue(elsewhere):
    data_file = write_catalogue(elsewhere, 12)
    rows = load_shop(data_file).to_list()
    rows[2]["name"], rows[2]["desc"] = "   ", None  # blank text
    rows[4]["name"] = "broken \ud800 title"  # lone surrogate
    rows[6]["sku"] = rows[1]["sku"]  # duplicate id
    rows[7]["sku"] = None  # missing id
    rows[8]["desc"] = ["a", "list"]  # wrong type
    rows[9]["sku"], rows[10]["sku"] = 1, "1"  # mixed types that collide as text
    bad = find_bad_products(rows, SHOP_COLUMNS)
    assert [item.line() for item in bad] == [
        "product 'sku-2', column 'name': blank text (no text in 'name' and 'desc')",
        "product 'sku-4', column 'name': not valid Unicode text (lone surrogate)",
        "product 'sku-1', column 'sku': duplicate id (first at row 1)",
        "row 7, column 'sku': missing product id",
        "product 'sku-8', column 'desc': wrong type: list, expected text",
        "product '1', column 'sku': duplicate id: 1 (int, row 9) and '1' (str) are the same id as text",
    ]
    assert find_bad_products(load_shop(data_file), SHOP_COLUMNS) == []  # a Dataset is read column-wise, no images
    assert bad[0] == BadProduct("sku-2", "name", "blank text (no text in 'name' and 'desc')", 2)


def test_a_bad_product_in_an_index_build_is_named_by_id_and_column(elsewhere, tiny_3tower):
    model, processor = tiny_3tower
    rows = load_shop(write_catalogue(elsewhere, 10)).to_list()
    rows[6]["name"], rows[6]["desc"] = "", "  "
    with pytest.raises(ValueError) as raised:
        build_product_index(model, processor, rows, columns=SHOP_COLUMNS, batch_size=4, show_progress=False)
    assert str(raised.value) == "product 'sku-6', column 'name': blank text (no text in 'name' and 'desc')"
    rows[6]["name"] = "odd \udcff title"
    with pytest.raises(ValueError, match=r"^product 'sku-6', column 'name': not valid Unicode text"):
        build_product_index(model, processor, rows, columns=SHOP_COLUMNS, batch_size=4, show_progress=False)


def test_a_lone_surrogate_in_a_product_text_is_a_value_error_naming_the_field(tiny_3tower):
    _, processor = tiny_3tower
    with pytest.raises(ValueError, match=r"Product 1: Product field 'description' is not valid Unicode text"):
        processor.encode_products([{"title": "fine"}, {"title": "ok", "description": "bad \ud83d half emoji"}])
    collator = RetrievalCollator(processor, SHOP_COLUMNS)
    row = {"sku": "sku-3", "name": "blue mug", "desc": None, "img_path": None, "query": "mug \udc80"}
    with pytest.raises(ValueError, match=r"^product 'sku-3', column 'query': not valid Unicode text"):
        collator([row])


# ----------------------------------------------------------------------------------------------------------------
# A training run reports its images
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_towers(tmp_path_factory):
    """Tiny pretrained text and vision towers on disk, as `--text_model` / `--vision_model` take them."""
    from transformers import BertConfig, BertModel, Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("towers")
    tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=128)).save_pretrained(root / "text")
    tokenizer.save_pretrained(root / "text")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                             image_size=IMAGE_SIZE, patch_size=14)).save_pretrained(root / "vision")
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                          crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(root / "vision")
    return root


def test_a_training_run_reports_and_checks_its_images(tiny_towers, elsewhere, tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    from modeling_mmretrieval.commands import train as train_command
    from modeling_mmretrieval.training.trainer import run_training

    # Two splits of a shop catalogue (own column names, a query column), 20% of the images missing.
    for split, offset in (("train", 0), ("validation", 100)):
        folder = elsewhere / split
        data_file = write_catalogue(folder, 20, missing={2, 7, 12, 17})
        rows = datasets.Dataset.from_csv(str(data_file)).to_list()
        for row in rows:
            row["sku"] = f"sku-{int(row['sku'].split('-')[1]) + offset}"
            row["img_path"] = f"{split}/{row['img_path']}"
        datasets.Dataset.from_list(rows).to_csv(elsewhere / f"{split}.csv", index=False)
    argv = ["--dataset", str(elsewhere), "--output_dir", str(tmp_path / "run"), "--text_model",
            str(tiny_towers / "text"), "--architecture", "3tower", "--vision_model", str(tiny_towers / "vision"), "--image_size", str(IMAGE_SIZE),
            "--product_id_column", "sku", "--title_column", "name", "--description_column", "desc",
            "--image_column", "img_path", "--query_column", "query", "--per_device_train_batch_size", "8",
            "--max_train_steps", "2", "--max_eval_queries", "10", "--logging_steps", "1", "--warmup_steps", "0"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = train_command.parse_args(argv)
        results = run_training(args)
        assert results["images"]["ok"] == 16 and results["images"]["missing"] == 4
        missing = results["images"]["examples"]["missing"]
        assert {example["product_id"] for example in missing} == {"sku-2", "sku-7", "sku-12", "sku-17"}
        assert all("train/img/" in example["reason"] for example in missing)
        on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
        assert on_disk["images"] == results["images"]
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        strict = train_command.parse_args([*argv[:3], str(tmp_path / "strict"), *argv[4:]])
        strict.strict_images = True  # the command-line flag (--strict_images) sets this
        with pytest.raises(ImageFailureError, match=r"^4 of 20 product images failed"):
            run_training(strict)
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
