"""ONNX export and onnxruntime inference (`modeling_mmretrieval.onnx`, `mmretrieval export-onnx`): every exported part
reproduces torch on real inputs (products with and without colour words, PNG photos, padded batches of different
lengths), the int8 query encoder stays close to float32, the visual-word tagger keeps working, a failed parity
check publishes nothing, and the three `load_encoder` backends agree."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from tiny_towers import ARCHITECTURE_CASES, IMAGE_SIZE, real_tokenizers, save_tiny_checkpoint, save_tiny_pretrained_towers

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor, cli
from modeling_mmretrieval.onnx import (
    MANIFEST_NAME, OnnxParityError, OnnxRetrievalEncoder, export_onnx, load_encoder, read_manifest,
)

# Varied lengths, so batches of two pad to different widths (the dynamic sequence axis).
QUERIES = ["red running shoes for men", "kurta", "women's navy blue striped cotton casual shirt with long sleeves",
           "watch", "black formal shoes", "green dress for women"]
PRODUCTS = [
    {"title": "Nike Men Red Running Shoes", "description": "Mesh upper, rubber sole"},
    {"title": "Roadster Women Kurta", "description": "Cotton, regular fit, three-quarter sleeves"},  # names no colour
    {"title": "Clarks Black Formal Shoes", "description": None},
    {"title": "Titan Analog Watch", "description": "Leather strap, water resistant to 50 m, two-year warranty"},
    {"title": "Levis Men Jeans"},  # names no colour
    {"title": "Biba Women Green Printed Anarkali Kurta", "description": "Flared hem"},
]
COLOURS = [(200, 30, 40), (230, 210, 40), (15, 15, 15), (240, 240, 240), (30, 60, 190), (40, 160, 60)]
# Kept fast by default; the fusion variants add nothing new to the export path but layers.
SLOW_CASES = {"4tower-alpha_concat", "4tower-mlp", "3tower-clip-vision", "4tower-residual", "3tower-residual"}


@pytest.fixture(scope="module", autouse=True)
def single_thread(single_torch_thread):
    """Tiny models on shared cores: one intra-op thread (see conftest)."""


def png_photo(rgb, seed: int) -> Image.Image:
    """A product photo as a shop uploads it: a shape on white with noise, encoded as PNG and decoded again."""
    rng = random.Random(seed)
    image = Image.new("RGB", (48, 64), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((6, 8, 42, 56), fill=rgb)
    image.putdata([tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in pixel) for pixel in image.getdata()])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


PHOTOS = [png_photo(rgb, seed) for seed, rgb in enumerate(COLOURS)]
PHOTOS[3] = None  # one image-less product


def cosines(first, second) -> np.ndarray:
    first, second = np.atleast_2d(first).astype(np.float64), np.atleast_2d(second).astype(np.float64)
    return (first * second).sum(1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return real_tokenizers(tmp_path_factory.mktemp("clip_tokenizer"))


def tiny_checkpoint(case: str, folder, tokenizers) -> tuple[MultimodalRetrievalModel, MultimodalRetrievalProcessor]:
    """A tiny model of `case` with the real MiniLM (and CLIP) tokenizers, saved with its processor into `folder`."""
    return save_tiny_checkpoint(case, folder, tokenizers, max_product_length=48)  # the tiny text tower has 64 positions


def photos_for(model):
    return PHOTOS if model.config.uses_images else None


@pytest.fixture(scope="module")
def exported(tokenizers, tmp_path_factory):
    """`exported(case) -> (model, processor, export folder)`: a tiny checkpoint of `case` exported once by
    `mmretrieval export-onnx` (whose own parity check runs on the committed sample's products and photos)."""
    cache = {}

    def export(case: str):
        if case not in cache:
            root = tmp_path_factory.mktemp(case.replace("-", "_"))
            model, processor = tiny_checkpoint(case, root / "checkpoint", tokenizers)
            status = cli.main(["export-onnx", "--model", str(root / "checkpoint"), "--output_dir", str(root / "onnx")])
            assert status == 0
            cache[case] = model, processor, root / "onnx"
        return cache[case]

    return export


@pytest.mark.parametrize(
    "case", [pytest.param(case, marks=pytest.mark.slow) if case in SLOW_CASES else case for case in ARCHITECTURE_CASES]
)
def test_every_exported_part_matches_torch(case, exported):
    model, processor, folder = exported(case)
    images = photos_for(model)
    manifest = read_manifest(folder)
    expected_graphs = {"query", "query_int8", "product"} | ({"image"} if model.config.uses_images else set())
    assert set(manifest["graphs"]) == expected_graphs
    assert all((folder / name).is_file() for name in manifest["files"])
    encoder = OnnxRetrievalEncoder.from_pretrained(folder)

    # Batches of two: every batch pads to its own width.
    for normalize in (True, False):
        expected = model.encode_queries(QUERIES, processor, batch_size=2, normalize=normalize)
        got = encoder.encode_queries(QUERIES, batch_size=2, normalize=normalize)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert cosines(expected, got).min() >= 0.99999
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(expected, axis=1), rtol=1e-4)
    single = encoder.encode_queries("kurta")
    assert single.shape == (model.embedding_dim,) and cosines(single, model.encode_queries("kurta", processor)) >= 0.99999

    expected = model.encode_products(PRODUCTS, images=images, processor=processor, batch_size=2)
    got = encoder.encode_products(PRODUCTS, images=images, batch_size=2, convert_to_tensor=True)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    assert cosines(expected, got.numpy()).min() >= 0.99999
    # Without images every product takes the image-less path, in both.
    assert cosines(model.encode_products(PRODUCTS, processor=processor), encoder.encode_products(PRODUCTS)).min() >= 0.99999

    if model.config.uses_images:
        photos = [photo for photo in PHOTOS if photo is not None]
        pixel_values = processor.encode_images(photos)["pixel_values"]
        with torch.inference_mode():
            features = model.get_image_features(pixel_values).numpy()
        assert cosines(features, encoder.image_features(pixel_values.numpy())).min() >= 0.99999
        if encoder.image_queries_unsupported is None:
            assert cosines(model.encode_images(photos, processor), encoder.encode_images(photos)).min() >= 0.99999
        else:
            with pytest.raises(ValueError, match="Image queries need a 4tower model"):
                encoder.encode_images(photos)


def test_int8_query_encoder_stays_close_to_float32_and_products_stay_float(exported):
    _, _, folder = exported("3tower-dinov2")
    float32 = OnnxRetrievalEncoder.from_pretrained(folder)
    int8 = OnnxRetrievalEncoder.from_pretrained(folder, quantized=True, intra_op_threads=1)
    # On the tiny random tower the bound is loose (0.99); the benchmark measures the retrieval cost on MiniLM.
    assert cosines(float32.encode_queries(QUERIES), int8.encode_queries(QUERIES)).min() > 0.99
    assert not np.array_equal(float32.encode_queries(QUERIES), int8.encode_queries(QUERIES))  # really quantised
    np.testing.assert_array_equal(float32.encode_products(PRODUCTS, images=PHOTOS), int8.encode_products(PRODUCTS, images=PHOTOS))
    assert read_manifest(folder)["parity"]["queries_int8"] > 0.99


def test_visual_word_tagger_runs_in_the_onnx_product_path(tmp_path):
    from test_visual_tagger import catalogue
    from modeling_mmretrieval.data.catalogue import CatalogueColumns
    from modeling_mmretrieval.training.image_feature_cache import precompute_image_features
    from modeling_mmretrieval.training.visual_tagger import fit_visual_tagger

    text, vision = save_tiny_pretrained_towers(tmp_path / "towers", IMAGE_SIZE, text_layers=1)
    model = MultimodalRetrievalModel.from_towers_pretrained(str(text), str(vision), architecture="3tower",
                                                            fusion="residual", max_product_length=32).eval()
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(str(text), str(vision), config=model.config)
    train = catalogue(64, seed=0)
    fit_visual_tagger(model, processor.tokenizer, precompute_image_features(model, processor, train, show_progress=False),
                      train, CatalogueColumns(), min_probability=0.5)
    # Held-out products, half of whose titles name no colour: those get the colour read off their photo.
    products = catalogue(12, seed=1)
    photos = [Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB") for row in products]
    photos[5] = None
    inputs = processor.encode_products(products, images=photos)
    with torch.inference_mode():
        features = model.get_image_features(inputs["pixel_values"], inputs["image_mask"])
    chosen = model.visual_tagger.chosen_tags(inputs["input_ids"], inputs["attention_mask"], features, inputs["image_mask"])
    assert sum(tag is not None for tag in chosen) >= 2  # the tagger really writes into some texts

    export_onnx(model, processor, tmp_path / "onnx", quantize_int8=False, parity_inputs=(["red kurta"], products, photos))
    encoder = load_encoder(tmp_path / "onnx", backend="onnx")
    expected = model.encode_products(products, images=photos, processor=processor, batch_size=4)
    assert cosines(expected, encoder.encode_products(products, images=photos, batch_size=4)).min() >= 0.99999
    # Had the tagger been left out, the tagged products would differ.
    untagged = model.encode_products(products, processor=processor)
    tagged = [position for position, tag in enumerate(chosen) if tag is not None]
    assert cosines(expected[tagged], untagged[tagged]).max() < 0.99999


def test_a_failed_parity_check_is_one_line_and_publishes_nothing(tokenizers, tmp_path):
    model, processor = tiny_checkpoint("text_only", tmp_path / "checkpoint", tokenizers)
    with pytest.raises(OnnxParityError) as raised:
        export_onnx(model, processor, tmp_path / "onnx", quantize_int8=False, parity_inputs=(QUERIES, PRODUCTS, None),
                    min_cosine=1.5)  # no export reaches it
    assert "\n" not in str(raised.value) and "queries" in str(raised.value)
    assert not (tmp_path / "onnx").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint"]  # no staging folder left behind


def test_the_cli_writes_the_export_and_refuses_a_bad_model_in_one_line(exported, tmp_path, capsys):
    _, _, folder = exported("4tower-concat")
    root = folder.parent
    manifest = read_manifest(folder)
    assert {"query_encoder.onnx", "query_encoder_int8.onnx", "product_encoder.onnx", "image_encoder.onnx",
            "processor_config.json", "tokenizer.json", "preprocessor_config.json", MANIFEST_NAME} <= set(manifest["files"])
    from modeling_mmretrieval.retrieval.search import model_fingerprint

    assert manifest["model_fingerprint"] == model_fingerprint(MultimodalRetrievalModel.from_pretrained(root / "checkpoint"))
    assert set(manifest["graphs"]["query"]["inputs"]) >= {"input_ids", "attention_mask", "dual_input_ids"}

    capsys.readouterr()
    assert cli.main(["export-onnx", "--model", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--model" in error and "missing" in error and "Traceback" not in error
    # An existing export is not overwritten without --overwrite.
    assert cli.main(["export-onnx", "--model", str(root / "checkpoint"), "--output_dir", str(root / "onnx")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_load_encoder_backends_agree(exported):
    root = exported("4tower-concat")[2].parent
    encoders = {backend: load_encoder(root / ("checkpoint" if backend == "torch" else "onnx"), backend=backend)
                for backend in ("torch", "onnx", "onnx-int8")}
    queries = {backend: encoder.encode_queries(QUERIES) for backend, encoder in encoders.items()}
    products = {backend: encoder.encode_products(PRODUCTS, images=PHOTOS) for backend, encoder in encoders.items()}
    assert cosines(queries["torch"], queries["onnx"]).min() >= 0.99999
    assert cosines(queries["torch"], queries["onnx-int8"]).min() > 0.99
    assert cosines(products["torch"], products["onnx"]).min() >= 0.99999
    np.testing.assert_array_equal(products["onnx"], products["onnx-int8"])
    similarity = encoders["onnx"].similarity(queries["onnx"], products["onnx"])
    assert similarity.shape == (len(QUERIES), len(PRODUCTS))
    with pytest.raises(ValueError, match="backend='onnx'"):
        load_encoder(root / "onnx", backend="torch")
    with pytest.raises(ValueError, match="backend="):
        load_encoder(root / "onnx", backend="tensorrt")
