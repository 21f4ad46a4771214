"""Fuzzing over catalogue shapes (issue 15): whatever a shop's catalogue looks like, nothing crashes, hangs or
embeds to NaN.

Each example is a generated catalogue: 1 to 8 rows under one of several column namings (the fashion defaults, a
shop's `sku`/`name`/`desc`/`img_path`, no description column, no image column), with ids that are strings,
integers, repeated, colliding across types (`1` and `"1"`), missing or wrong-typed; titles and descriptions that
are realistic, blank, numbers, random unicode, lone surrogates or lists; images that are real PNG/JPEG bytes,
missing files, empty cells, URLs (not fetched), corrupt or empty bytes, 0x0 headers or 1-pixel strips; with or
without a query column, with decoded or cached image features. The contract checked on every one:

- `find_bad_products` is complete for what the collator refuses: the rows it accepts always collate, and the
  model embeds them to finite, unit-length vectors; every product's image is counted once in the collator's
  `image_report` (ok / missing / undecodable / refused);
- the whole catalogue, bad rows included, either collates or is refused with a one-line `TypeError` /
  `ValueError` that names a product or row;
- no example takes more than the deadline (a hang fails).

Examples: MMRETRIEVAL_CATALOGUE_FUZZ_EXAMPLES (default 500, about 10 s).
"""

import io
import os
import time
from datetime import timedelta

import pytest
import torch
from hostile_images import png_header_only
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tiny_towers import IMAGE_SIZE, make_config
from transformers import AutoTokenizer, CLIPImageProcessorPil

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
from modeling_mmretrieval.data import CatalogueColumns, ImageReport, RetrievalCollator, find_bad_products
from modeling_mmretrieval.data.images import load_product_image
from modeling_mmretrieval.towers import get_minilm_path
from modeling_mmretrieval.training.image_feature_cache import ImageFeatureCache

EXAMPLES = int(os.environ.get("MMRETRIEVAL_CATALOGUE_FUZZ_EXAMPLES", "500"))
UNIT_TOLERANCE = 1e-4

CATALOGUE_FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=10),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)

NAMINGS = {
    "fashion": CatalogueColumns(),
    "shop": CatalogueColumns(product_id="sku", title="name", description="desc", image="img_path", query="q",
                             gender=None, base_colour=None, article_type=None, usage=None, brand=None, attributes=None),
    "no_description": CatalogueColumns(product_id="id", title="title", description=None, image="picture"),
    # No image column at all: every product is embedded from its text and counted as missing.
    "no_image": CatalogueColumns(product_id="sku", title="name", description="desc", image=None, query="q",
                                 article_type=None),
}
TITLES = ["Nike Men White Sneakers", "Red Ceramic Mug 350 ml", "Navy Blue Slim Fit Shirt", "Lámpara de mesa",
          "水筒 500ml", "Ручка шариковая синяя"]


def _encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


# Image cell values of every kind a catalogue holds, and the status each one is reported under.
IMAGE_VALUES = {
    "png": ({"bytes": _encoded(Image.new("RGB", (20, 30), (200, 30, 30)), "PNG"), "path": None}, "ok"),
    "jpeg": (_encoded(Image.new("RGB", (32, 24), (20, 60, 200)), "JPEG"), "ok"),
    "greyscale_alpha": (_encoded(Image.new("LA", (16, 16), (120, 60)), "PNG"), "ok"),
    "none": (None, "missing"),
    "blank_path": ("", "missing"),
    "missing_file": ("/nonexistent/catalogue/img/7.jpg", "missing"),
    "missing_dict": ({"bytes": None, "path": None}, "missing"),
    "url": ("https://cdn.invalid/img/7.jpg", "refused"),
    "corrupt": (b"\xff\xd8\xff not a jpeg at all", "undecodable"),
    "empty_bytes": (b"", "undecodable"),
    "zero_size": (png_header_only(0, 0), "undecodable"),
    "strip": (_encoded(Image.new("RGB", (1, 400)), "PNG"), "undecodable"),
}

lone_surrogates = st.sampled_from(["\ud800", "broken \udcff title", "half \ud83d emoji"])
good_texts = st.one_of(st.sampled_from(TITLES), st.text(min_size=1, max_size=30).filter(str.strip))
odd_texts = st.one_of(
    st.sampled_from(["", "   ", "\n\t", "NA"]),
    lone_surrogates,
    st.none(),
    st.integers(-10**6, 10**6),
    st.floats(allow_nan=True, allow_infinity=False, width=32),
    st.sampled_from([["a", "list"], {"a": 1}, b"bytes", True]),
)
good_ids = st.integers(0, 99).map(lambda number: f"sku-{number}")
odd_ids = st.one_of(st.integers(0, 4), st.sampled_from(["0", "1", "", "  ", "sku-1"]), st.none(),
                    st.sampled_from([1.5, False, ("tuple",)]))
good_queries = st.sampled_from(["white sneakers", "red mug", "shirt", "水筒"])
odd_queries = st.one_of(st.sampled_from(["", "  "]), lone_surrogates, st.none(), st.integers(0, 9))


@st.composite
def catalogues(draw):
    """(columns, rows, with_queries, cached): about one row in three has odd values in one or more fields."""
    columns = NAMINGS[draw(st.sampled_from(sorted(NAMINGS)))]
    with_queries = draw(st.booleans())
    rows = []
    for _ in range(draw(st.integers(1, 8))):
        odd = draw(st.sampled_from([False, False, True]))

        def value(good, bad):
            return draw(st.one_of(good, bad) if odd else good)

        row = {columns.product_id: value(good_ids, odd_ids), columns.title: value(good_texts, odd_texts)}
        if columns.image is not None:
            row[columns.image] = IMAGE_VALUES[draw(st.sampled_from(sorted(IMAGE_VALUES)))][0]
        if columns.description is not None:
            row[columns.description] = value(good_texts, odd_texts)
        if with_queries:
            row[columns.query] = value(good_queries, odd_queries)
        rows.append(row)
    return columns, rows, with_queries, draw(st.booleans())


@pytest.fixture(scope="module")
def tiny_model(single_torch_thread):
    tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    config = make_config("3tower-dinov2")
    config.text_config.vocab_size = tokenizer.vocab_size
    config.text_config.max_position_embeddings = 128
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = MultimodalRetrievalProcessor(tokenizer, image_processor, max_product_length=24, max_query_length=12)
    model = MultimodalRetrievalModel(config).eval()
    model.lock_image_tower()
    # The frozen tower's feature of every image kind, for the cached-features path.
    kinds = sorted(IMAGE_VALUES)
    inputs = processor.encode_images([load_product_image(IMAGE_VALUES[kind][0]).image for kind in kinds])
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], inputs["image_mask"])
    feature_of = {kind: feature if present else None
                  for kind, feature, present in zip(kinds, features, inputs["image_mask"].tolist())}
    return model, processor, feature_of


def _kind_of(value) -> str:
    return next(kind for kind, (candidate, _) in IMAGE_VALUES.items() if candidate is value)


def _image_of(row, columns: CatalogueColumns):
    """The row's image value; `None` (no image) in a catalogue without an image column."""
    return row[columns.image] if columns.image is not None else None


def _feature_cache(rows, columns, feature_of, model) -> ImageFeatureCache:
    """What `precompute_image_features` would return for these rows (built from the per-kind features)."""
    report = ImageReport()
    cache = ImageFeatureCache(feature_size=model.image_feature_size, image_report=report)
    for row in rows:
        kind = _kind_of(_image_of(row, columns))
        report.add(row[columns.product_id], load_product_image(_image_of(row, columns)))
        cache[str(row[columns.product_id])] = feature_of[kind]
    return cache


MESSAGES = set()
STATS = {"examples": 0, "accepted_rows": 0, "refused_rows": 0, "refused_catalogues": 0, "seconds": 0.0}


def _assert_one_line_naming_a_product(error: Exception) -> None:
    message = str(error)
    assert "\n" not in message, message
    assert message.startswith(("product ", "a product without an id")) or "hold products" in message, message
    MESSAGES.add(message.split(":")[0].split(",")[-1])


@CATALOGUE_FUZZ
@given(catalogue=catalogues())
def test_any_catalogue_shape_is_refused_clearly_or_embedded_finite(tiny_model, catalogue):
    started = time.perf_counter()
    model, processor, feature_of = tiny_model
    columns, rows, with_queries, cached = catalogue
    bad = find_bad_products(rows, columns, check_queries=with_queries)
    assert all("\n" not in item.line() for item in bad)
    bad_rows = {item.row for item in bad}
    good = [row for position, row in enumerate(rows) if position not in bad_rows]
    STATS["accepted_rows"] += len(good)
    STATS["refused_rows"] += len(rows) - len(good)

    def collator_for(some_rows):
        features = _feature_cache(some_rows, columns, feature_of, model) if cached else None
        return RetrievalCollator(processor, columns, with_queries=with_queries, image_features=features,
                                 mask_false_negatives=False)

    # The whole catalogue, bad rows included: collated, or refused in one line naming the product.
    try:
        collator_for(rows)(rows)
    except (TypeError, ValueError) as error:
        _assert_one_line_naming_a_product(error)
        STATS["refused_catalogues"] += 1

    if good:
        collator = collator_for(good)
        batch = collator(good)
        inputs = {key.removeprefix("product_"): value for key, value in batch.items() if not key.startswith("query_")}
        with torch.no_grad():
            embeddings = model.get_product_embeddings(**inputs)
            assert torch.isfinite(embeddings).all()
            assert torch.allclose(embeddings.norm(dim=-1), torch.ones(len(good)), atol=UNIT_TOLERANCE)
            if with_queries:
                assert torch.isfinite(model(**batch).loss)
        expected = {}
        for row in good:
            expected.setdefault(str(row[columns.product_id]), IMAGE_VALUES[_kind_of(_image_of(row, columns))][1])
        report = collator.image_report.to_dict()
        for status in ("ok", "missing", "undecodable", "refused"):
            assert report[status] == sum(value == status for value in expected.values()), (status, report)
        assert batch["image_mask"].tolist() == [
            IMAGE_VALUES[_kind_of(_image_of(row, columns))][1] == "ok" for row in good
        ]
    STATS["examples"] += 1
    STATS["seconds"] += time.perf_counter() - started


def test_the_catalogue_fuzz_ran_every_example():
    """Runs after the property (file order): the examples all ran, fast enough for the default run."""
    if not STATS["examples"]:
        pytest.skip("the catalogue property did not run in this session")
    per_example_ms = 1000 * STATS["seconds"] / STATS["examples"]
    print(f"\ncatalogue fuzz: {STATS['examples']} catalogues, {STATS['accepted_rows']} rows accepted, "
          f"{STATS['refused_rows']} refused up front, {STATS['refused_catalogues']} whole catalogues refused by the "
          f"collator; {per_example_ms:.1f} ms per catalogue; {sorted(MESSAGES)}")
    assert STATS["examples"] >= EXAMPLES
    assert STATS["accepted_rows"] and STATS["refused_rows"] and STATS["refused_catalogues"]
