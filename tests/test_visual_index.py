"""Image queries for every architecture (issue 17): the visual-similarity index beside the product index, image queries
through it ("more like this"), text + image queries, and `mmretrieval search --image` / `--image_weight`.

The models are tiny random towers (a 2-layer BERT with the real all-MiniLM-L6-v2 tokenizer, a 1-layer DINOv2 or CLIP
on 28 px images). Product photos are real PNG and JPEG files made with PIL: solid colours with pixel noise, three
per colour, so a photo's look-alikes are the products of its colour. A random image tower already tells these
apart (same colour: cosine above 0.999; other colours: below 0.91), and a new residual model ranks text exactly as
its text tower does, so a query that repeats a title scores that product 1.
"""

import copy
import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from tiny_towers import IMAGE_SIZE, make_config
from transformers import AutoTokenizer, BitImageProcessor, CLIPImageProcessorPil

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor, cli
from modeling_mmretrieval.data.images import ImageReport, ImageStatus
from modeling_mmretrieval.retrieval.index import ProductIndex
from modeling_mmretrieval.retrieval.index_files import IndexModelMismatchError
from modeling_mmretrieval.retrieval.search import (
    build_product_index,
    embed_image_features,
    embed_images,
    model_fingerprint,
    search_images,
    search_text,
    search_text_and_image,
)
from modeling_mmretrieval.retrieval.visual_index import build_visual_index, load_visual_index, visual_index_dir
from modeling_mmretrieval.towers import MissingOfflineTowerError, get_minilm_path
from modeling_mmretrieval.training.image_feature_cache import precompute_image_features

COLOURS = {"red": (200, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 200), "yellow": (230, 210, 40)}
NOUNS = ("tshirt", "mug", "sneaker")
PHOTOS_PER_COLOUR = 3
BIT_PREPROCESSOR = dict(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
# The text + image catalogue's three products of interest: a query repeating TITLE with a photo like QUERY_PHOTO.
TITLE = "Crimson linen shirt with rolled sleeves"
QUERY_PHOTO = ("blue", 7)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def photo(colour: str, seed: int, fmt: str = "PNG") -> bytes:
    """A 30x40 photo of `colour` with Gaussian pixel noise, encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    pixels = np.array(COLOURS[colour])[None, None] + rng.normal(0, 12, (40, 30, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def colour_rows() -> list[dict]:
    """Three photographed products per colour (PNG and JPEG), one without an image and one with a broken one."""
    rows = []
    for colour in COLOURS:
        for number in range(PHOTOS_PER_COLOUR):
            fmt = "JPEG" if number == 2 else "PNG"
            rows.append({"product_id": f"{colour}-{number}", "title": f"{colour.title()} {NOUNS[number]}",
                         "description": f"A {colour} {NOUNS[number]}", "image": photo(colour, number, fmt)})
    rows.append({"product_id": "no-photo", "title": "Grey scarf", "description": "A grey scarf", "image": None})
    rows.append({"product_id": "broken-photo", "title": "Black belt", "description": "A black belt",
                 "image": b"\x89PNG\r\n\x1a\n truncated"})
    return rows


def text_and_image_rows() -> list[dict]:
    """`colour_rows` and three products for the query (TITLE, a photo like QUERY_PHOTO): `text-only-match` has the
    title and a red photo, `both-match` the title and a blue photo, `photo-match` another title and the query's own
    photo. The text ranking ties the first two (the earlier one wins), the image ranking puts `photo-match` first,
    and only a blend of both ranks `both-match` first."""
    return colour_rows() + [
        {"product_id": "text-only-match", "title": TITLE, "description": None, "image": photo("red", 40)},
        {"product_id": "both-match", "title": TITLE, "description": None, "image": photo("blue", 41, "JPEG")},
        {"product_id": "photo-match", "title": "Nike Men Running Shoes", "description": None,
         "image": photo(*QUERY_PHOTO)},
    ]


def ids_with_images(rows: list[dict]) -> list[str]:
    return [row["product_id"] for row in rows if row["image"] is not None and row["product_id"] != "broken-photo"]


@pytest.fixture(scope="module")
def tokenizer():
    try:
        return AutoTokenizer.from_pretrained(get_minilm_path())
    except MissingOfflineTowerError as error:
        pytest.skip(str(error))


def tiny_model(tokenizer, case: str, image_processor) -> tuple:
    torch.manual_seed(0)
    config = make_config(case)
    config.text_config.vocab_size = tokenizer.vocab_size
    config.text_config.max_position_embeddings = 128
    processor = MultimodalRetrievalProcessor(tokenizer, image_processor, max_query_length=32, max_product_length=48)
    return MultimodalRetrievalModel(config).eval(), processor


@pytest.fixture(scope="module")
def residual_3tower(tokenizer):
    return tiny_model(tokenizer, "3tower-residual", BitImageProcessor(**BIT_PREPROCESSOR))


@pytest.fixture(scope="module")
def concat_4tower(tokenizer):
    return tiny_model(tokenizer, "4tower-concat", CLIPImageProcessorPil(**BIT_PREPROCESSOR))


@pytest.fixture(scope="module")
def text_only(tokenizer):
    return tiny_model(tokenizer, "text_only", None)


@pytest.fixture(scope="module")
def colour_indexes(residual_3tower):
    """The 3tower model's product index and visual index of `colour_rows`, with the visual index's image report."""
    model, processor = residual_3tower
    rows = colour_rows()
    index = build_product_index(model, processor, rows, show_progress=False)
    report = ImageReport()
    visual_index = build_visual_index(model, processor, rows, image_report=report, show_progress=False)
    return rows, index, visual_index, report


# ----------------------------------------------------------------------------------------------------------------
# Image queries
# ----------------------------------------------------------------------------------------------------------------


def test_image_query_on_a_3tower_residual_model_finds_the_look_alikes_first(residual_3tower, colour_indexes):
    model, processor = residual_3tower
    rows, index, visual_index, report = colour_indexes
    assert list(visual_index.ids) == ids_with_images(rows)  # catalogue order, photo-less products left out
    assert visual_index.dim == model.image_feature_size
    assert report.status_of("no-photo") is ImageStatus.MISSING
    assert report.status_of("broken-photo") is ImageStatus.UNDECODABLE
    assert report.counts[ImageStatus.OK] == len(COLOURS) * PHOTOS_PER_COLOUR

    # A product's own photo finds that product (cosine 1), then its near-duplicates: the same colour.
    own = next(row for row in rows if row["product_id"] == "green-2")
    scores, ids = search_images(model, processor, index, [own["image"]], k=4, visual_index=visual_index)
    assert ids[0][0] == "green-2" and scores[0][0] == pytest.approx(1.0, abs=1e-5)
    assert set(ids[0][:3]) == {"green-0", "green-1", "green-2"} and not ids[0][3].startswith("green")
    assert scores[0].tolist() == sorted(scores[0].tolist(), reverse=True)

    # A new photo (another noise draw, as JPEG) finds the three products of its colour.
    scores, ids = search_images(model, processor, index, [photo("red", 99, "JPEG")], k=3, visual_index=visual_index)
    assert set(ids[0]) == {"red-0", "red-1", "red-2"}

    # A filter applies inside the search: k allowed products still come back.
    allowed = np.array([product_id != "red-0" for product_id in index.ids])
    _, ids = search_images(model, processor, index, [photo("red", 99)], k=3, visual_index=visual_index,
                           allowed=allowed)
    assert ids[0][:2] in (["red-1", "red-2"], ["red-2", "red-1"]) and len(ids[0]) == 3 and "red-0" not in ids[0]


def test_image_query_without_a_visual_index_says_what_to_pass(residual_3tower, colour_indexes):
    model, processor = residual_3tower
    _, index, _, _ = colour_indexes
    with pytest.raises(ValueError, match=r"pass visual_index=build_visual_index\(model, processor, catalogue\)"):
        search_images(model, processor, index, [photo("red", 1)], k=3)
    with pytest.raises(ValueError, match="it is a product index, or another model's visual index"):
        search_images(model, processor, index, [photo("red", 1)], k=3, visual_index=ProductIndex.from_embeddings(
            torch.eye(model.image_feature_size + 1), [str(n) for n in range(model.image_feature_size + 1)]))


def test_a_4tower_concat_model_keeps_its_fused_image_path(concat_4tower):
    model, processor = concat_4tower
    rows = colour_rows()
    index = build_product_index(model, processor, rows, show_progress=False)
    visual_index = build_visual_index(model, processor, rows, show_progress=False)
    query = [next(row["image"] for row in rows if row["product_id"] == "blue-1")]

    scores, ids = search_images(model, processor, index, query, k=5)
    expected_scores, expected_ids = index.search(embed_images(model, processor, query), k=5)
    assert ids == expected_ids and torch.equal(scores, expected_scores)
    assert ids[0][0] == "blue-1"
    # The fused space: the query holds only the image half of a [text ; image] product vector (alpha 0.5), so the
    # product with the very same photo scores 1/sqrt(2), not the visual index's image-to-image 1.
    assert scores[0][0] == pytest.approx(2**-0.5, abs=1e-4)
    # A visual index passed along changes nothing for this model.
    assert search_images(model, processor, index, query, k=5, visual_index=visual_index)[1] == ids
    # Its visual index holds the dual encoder's image embeddings, where the same photo scores 1.
    visual_scores, visual_ids = visual_index.search(embed_image_features(model, processor, query), k=1)
    assert visual_ids[0] == ["blue-1"] and visual_scores[0][0] == pytest.approx(1.0, abs=1e-5)


def test_a_text_only_model_refuses_image_queries_in_one_line(text_only, colour_indexes):
    model, processor = text_only
    rows, _, visual_index, _ = colour_indexes
    index = build_product_index(model, processor, rows, show_progress=False)
    message = r"Image queries need a 4tower or 3tower model \(one with an image tower\); this model is " \
              r"architecture='text_only'"
    with pytest.raises(ValueError, match=message):
        search_images(model, processor, index, [photo("red", 1)], k=3, visual_index=visual_index)
    with pytest.raises(ValueError, match=message):
        build_visual_index(model, processor, rows, show_progress=False)
    with pytest.raises(ValueError, match=message):
        search_text_and_image(model, processor, index, visual_index, ["red tshirt"], [photo("red", 1)], k=3)


# ----------------------------------------------------------------------------------------------------------------
# Saved visual indexes
# ----------------------------------------------------------------------------------------------------------------


def test_visual_index_round_trip_and_refusal_after_a_retrain(residual_3tower, colour_indexes, tmp_path):
    model, processor = residual_3tower
    rows, _, in_memory, _ = colour_indexes
    with pytest.raises(ValueError, match="holds no product index"):  # it is kept beside one
        build_visual_index(model, processor, rows, index_dir=tmp_path / "empty", show_progress=False)

    index_dir = tmp_path / "index"
    build_product_index(model, processor, rows, output_dir=index_dir, show_progress=False)
    built = build_visual_index(model, processor, rows, index_dir=index_dir, show_progress=False)
    assert (visual_index_dir(index_dir) / "index_meta.json").is_file()
    with pytest.raises(FileExistsError):
        build_visual_index(model, processor, rows, index_dir=index_dir, show_progress=False)

    fingerprint = model_fingerprint(model)
    loaded = load_visual_index(index_dir, expected_model_fingerprint=fingerprint)
    assert loaded.ids == built.ids == in_memory.ids and loaded.model_fingerprint == fingerprint
    np.testing.assert_allclose(loaded.embeddings, in_memory.embeddings, atol=1e-6)
    product_index = ProductIndex.load(index_dir, expected_model_fingerprint=fingerprint)  # untouched by visual/
    assert len(product_index) == len(rows)
    query = [photo("yellow", 5)]
    assert search_images(model, processor, product_index, query, k=4, visual_index=loaded)[1] == \
        search_images(model, processor, product_index, query, k=4, visual_index=in_memory)[1]

    retrained = copy.deepcopy(model)
    with torch.no_grad():
        next(retrained.vision_model.parameters()).add_(1e-3)
    with pytest.raises(IndexModelMismatchError, match="was built by another model"):
        load_visual_index(index_dir, expected_model_fingerprint=model_fingerprint(retrained))


def test_precomputed_image_features_give_the_same_visual_index(residual_3tower, colour_indexes):
    model, processor = residual_3tower
    rows, _, visual_index, _ = colour_indexes
    cache = precompute_image_features(model, processor, rows, show_progress=False)
    report = ImageReport()
    from_cache = build_visual_index(model, processor, rows, image_features=cache, image_report=report,
                                    show_progress=False)
    assert from_cache.ids == visual_index.ids
    np.testing.assert_allclose(from_cache.embeddings, visual_index.embeddings, atol=1e-5)
    assert report.status_of("broken-photo") is ImageStatus.UNDECODABLE  # the cache's report, copied


# ----------------------------------------------------------------------------------------------------------------
# Text + image queries
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blend(residual_3tower):
    model, processor = residual_3tower
    rows = text_and_image_rows()
    index = build_product_index(model, processor, rows, show_progress=False)
    visual_index = build_visual_index(model, processor, rows, show_progress=False)
    return rows, index, visual_index, photo(*QUERY_PHOTO)


def combined(residual_3tower, blend, weight, k=None, **kwargs):
    model, processor = residual_3tower
    rows, index, visual_index, query_photo = blend
    scores, ids = search_text_and_image(model, processor, index, visual_index, [TITLE], [query_photo],
                                        k=k or len(index), image_weight=weight, **kwargs)
    return scores[0], ids[0]


def test_text_and_image_weight_0_is_the_text_ranking_and_1_the_image_ranking(residual_3tower, blend):
    model, processor = residual_3tower
    rows, index, visual_index, query_photo = blend
    text_scores, text_ids = search_text(model, processor, index, [TITLE], k=len(index))
    scores, ids = combined(residual_3tower, blend, 0.0)
    assert ids == text_ids[0] and ids[0] == "text-only-match"  # tied with both-match at cosine 1; catalogue order
    np.testing.assert_allclose(scores, text_scores[0], atol=1e-5)

    image_scores, image_ids = search_images(model, processor, index, [query_photo], k=len(visual_index),
                                            visual_index=visual_index)
    scores, ids = combined(residual_3tower, blend, 1.0)
    with_photo = [(product_id, score) for product_id, score in zip(ids, scores.tolist()) if product_id in visual_index]
    assert [product_id for product_id, _ in with_photo] == image_ids[0] and image_ids[0][0] == "photo-match"
    np.testing.assert_allclose([score for _, score in with_photo], image_scores[0], atol=1e-5)
    assert dict(zip(ids, scores.tolist()))["no-photo"] == 0.0  # a product without a photo has only its text part


def test_text_and_image_in_between_ranks_the_product_matching_both_first(residual_3tower, blend):
    model, processor = residual_3tower
    rows, index, visual_index, query_photo = blend
    scores, ids = combined(residual_3tower, blend, 0.5)
    assert ids[0] == "both-match"
    assert {ids[1], ids[2]} >= {"photo-match"} or {ids[1], ids[2]} >= {"text-only-match"}

    # The scores are exactly (1 - w) * text cosine + w * image cosine, for every product.
    weight = 0.3
    text_scores, text_ids = search_text(model, processor, index, [TITLE], k=len(index))
    image_scores, image_ids = search_images(model, processor, index, [query_photo], k=len(visual_index),
                                            visual_index=visual_index)
    text_of = dict(zip(text_ids[0], text_scores[0].tolist()))
    image_of = dict(zip(image_ids[0], image_scores[0].tolist()))
    scores, ids = combined(residual_3tower, blend, weight)
    expected = {product_id: (1 - weight) * text_of[product_id] + weight * image_of.get(product_id, 0.0)
                for product_id in index.ids}
    np.testing.assert_allclose(scores.numpy(), [expected[product_id] for product_id in ids], atol=1e-5)
    assert scores.tolist() == sorted(scores.tolist(), reverse=True)

    # A filter applies inside: k allowed products come back, the best one left out.
    allowed = np.array([product_id != "both-match" for product_id in index.ids])
    scores, ids = combined(residual_3tower, blend, 0.5, k=5, allowed=allowed)
    assert len(ids) == 5 and "both-match" not in ids


def test_text_and_image_queries_refuse_bad_input(residual_3tower, blend):
    model, processor = residual_3tower
    rows, index, visual_index, query_photo = blend
    with pytest.raises(ValueError, match="image_weight must lie between 0 and 1, got 1.5"):
        combined(residual_3tower, blend, 1.5)
    with pytest.raises(ValueError, match="give one image per text query: got 2 texts and 1 images"):
        search_text_and_image(model, processor, index, visual_index, [TITLE, "red"], [query_photo], k=3)
    with pytest.raises(ValueError, match="Text \\+ image queries .* pass visual_index="):
        search_text_and_image(model, processor, index, None, [TITLE], [query_photo], k=3)
    with pytest.raises(ValueError, match="query image 0 cannot be read"):
        search_text_and_image(model, processor, index, visual_index, [TITLE], [b"not an image"], k=3)
    other_catalogue = build_product_index(model, processor, colour_rows(), show_progress=False)
    with pytest.raises(ValueError, match="visual index holds product id 'text-only-match', which the product index"):
        search_text_and_image(model, processor, other_catalogue, visual_index, [TITLE], [query_photo], k=3)


# ----------------------------------------------------------------------------------------------------------------
# mmretrieval search --image, --image_weight
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shop(tmp_path_factory, residual_3tower, text_only) -> dict[str, Path]:
    """The text + image catalogue as a parquet file (images as `datasets.Image` structs), the query photo as a PNG
    file, and the 3tower and text-only models saved as checkpoints."""
    root = tmp_path_factory.mktemp("shop")
    rows = [{**row, "image": None if row["image"] is None else {"bytes": row["image"], "path": None}}
            for row in text_and_image_rows()]
    (root / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "test.parquet")
    (root / "query.png").write_bytes(photo(*QUERY_PHOTO))
    for name, (model, processor) in (("3tower", residual_3tower), ("text_only", text_only)):
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    return {"root": root, "data": root / "data", "photo": root / "query.png", "3tower": root / "3tower",
            "text_only": root / "text_only"}


def run_search(capsys, shop, checkpoint: str, index_dir: Path, *argv) -> tuple[int, str, str]:
    status = cli.main(["search", "--model_name_or_path", str(shop[checkpoint]), "--dataset", str(shop["data"]),
                       "--split", "test", "--index_dir", str(index_dir), "--device", "cpu",
                       *(str(arg) for arg in argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def error_line(status: int, err: str) -> str:
    assert status == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_image_query_on_a_3tower_checkpoint_builds_then_reuses_the_visual_index(capsys, caplog, shop, tmp_path):
    caplog.set_level(logging.INFO)
    index_dir = tmp_path / "index"
    status, out, err = run_search(capsys, shop, "3tower", index_dir, "--image", shop["photo"], "--top_k", 3,
                                  "--output_format", "json")
    assert status == 0, err
    (search,) = json.loads(out)
    assert (search["kind"], search["ranker"]) == ("image", "visual")
    assert [record["product_id"] for record in search["results"]][0] == "photo-match"
    assert {record["product_id"] for record in search["results"]} <= {"photo-match", "both-match", "blue-0",
                                                                      "blue-1", "blue-2"}
    assert (visual_index_dir(index_dir) / "index_meta.json").is_file()
    assert "Built a visual index of 15 product images" in caplog.text
    caplog.clear()

    status, again, err = run_search(capsys, shop, "3tower", index_dir, "--image", shop["photo"], "--top_k", 3,
                                    "--output_format", "json")
    assert status == 0, err
    assert "Loaded the visual index of 15 product images" in caplog.text and "Indexing product images" not in err
    assert json.loads(again) == json.loads(out)

    status, out, err = run_search(capsys, shop, "3tower", index_dir, "--query", TITLE, "--image", shop["photo"],
                                  "--image_weight", 0.5, "--top_k", 3)
    assert status == 0, err
    assert f"text+image query: {TITLE} + {shop['photo']} (image weight 0.5)" in out
    assert out.splitlines()[2].split()[2] == "both-match"  # the first row of the table


def test_cli_refuses_image_queries_of_a_text_only_checkpoint_and_bad_weights(capsys, shop, tmp_path):
    index_dir = tmp_path / "index"
    line = error_line(*run_search(capsys, shop, "text_only", index_dir, "--image", shop["photo"])[::2])
    assert "Image queries need a 4tower or 3tower model" in line and "architecture='text_only'" in line
    assert not index_dir.exists()  # refused before any index was built

    line = error_line(*run_search(capsys, shop, "3tower", index_dir, "--query", TITLE, "--image", shop["photo"],
                                  "--image_weight", 1.5)[::2])
    assert "--image_weight must lie between 0 and 1, got 1.5" in line
    line = error_line(*run_search(capsys, shop, "3tower", index_dir, "--query", TITLE, "--query", "red",
                                  "--image", shop["photo"], "--image_weight", 0.3)[::2])
    assert "give one --query and one --image" in line
