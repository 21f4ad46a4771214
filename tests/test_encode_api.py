"""The one-call encode API (`model.encode_*`, `processor(text=, images=)`) and a checkpoint as a sentence-transformers
model: every path gives the embeddings of the low-level API (`get_*_embeddings` on the processor's inputs)."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from tiny_towers import make_config, real_tokenizers, save_tiny_checkpoint
from transformers import pipeline

from modeling_mmretrieval import MultimodalRetrievalModel
from modeling_mmretrieval.modeling_mmretrieval import as_requested_embeddings, embed_in_length_order

QUERIES = ["red running shoes for men", "black formal shoes", "blue denim jacket", "white cotton tee", "watch"]
PRODUCTS = [
    {"title": "Nike Men Red Running Shoes", "description": "Mesh upper, rubber sole"},
    {"title": "Clarks Black Formal Shoes", "description": None},
    {"title": "Levis Blue Denim Jacket", "description": "Classic trucker jacket in washed denim"},
    {"title": "White Cotton Tee"},
    {"title": "Titan Analog Watch", "description": "Leather strap"},
]
COLOURS = {"red": (200, 30, 40), "black": (15, 15, 15), "blue": (30, 60, 190), "white": (240, 240, 240)}


@pytest.fixture(scope="module", autouse=True)
def single_thread(single_torch_thread):
    """Tiny models on shared cores: one intra-op thread (see conftest)."""


def product_photo(colour: str, file_format: str) -> Image.Image:
    """A product photo as a shop would upload it: a coloured shape on white, encoded and decoded again."""
    image = Image.new("RGB", (64, 48), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((8, 6, 56, 42), fill=COLOURS[colour])
    buffer = io.BytesIO()
    image.save(buffer, format=file_format)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


PHOTOS = [product_photo("red", "JPEG"), product_photo("black", "PNG"), None, product_photo("white", "JPEG"), None]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return real_tokenizers(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="module", params=["text_only", "4tower-concat", "3tower-dinov2"])
def checkpoint(request, tmp_path_factory, tokenizers):
    folder = tmp_path_factory.mktemp(request.param.replace("-", "_")) / "checkpoint"
    model, processor = save_tiny_checkpoint(request.param, folder, tokenizers)
    return request.param, folder, model, processor


def reference_queries(model, processor, queries) -> torch.Tensor:
    with torch.no_grad():
        return model.get_query_embeddings(**processor.encode_queries(queries))


def reference_products(model, processor, products, images=None) -> torch.Tensor:
    with torch.no_grad():
        return model.get_product_embeddings(**processor.encode_products(products, images))


# ----- model.encode_* ---------------------------------------------------------------------------------------------------
def test_encode_matches_the_low_level_api_and_finds_the_checkpoint_processor(checkpoint):
    case, folder, model, processor = checkpoint
    loaded = MultimodalRetrievalModel.from_pretrained(folder)
    # batch_size 2 over 5 inputs of different lengths: batches are length-sorted, the result is in input order
    queries = loaded.encode_queries(QUERIES, batch_size=2)
    assert isinstance(queries, np.ndarray) and queries.dtype == np.float32 and queries.shape == (5, model.embedding_dim)
    np.testing.assert_allclose(queries, reference_queries(model, processor, QUERIES).numpy(), atol=1e-5, rtol=0)

    images = PHOTOS if model.config.uses_images else None
    products = loaded.encode_products(PRODUCTS, images=images, batch_size=2, convert_to_tensor=True)
    assert isinstance(products, torch.Tensor)
    torch.testing.assert_close(products, reference_products(model, processor, PRODUCTS, images), atol=1e-5, rtol=0)

    single = loaded.encode_queries("red running shoes for men")
    assert single.shape == (model.embedding_dim,)
    np.testing.assert_allclose(single, queries[0], atol=1e-5, rtol=0)
    # product texts are rows with the text as their first product field
    as_texts = loaded.encode_products(["Nike Men Red Running Shoes", "Clarks Black Formal Shoes"])
    titles_only = [{"title": product["title"]} for product in PRODUCTS[:2]]
    np.testing.assert_allclose(as_texts, reference_products(model, processor, titles_only).numpy(), atol=1e-5, rtol=0)
    scores = loaded.similarity(queries, products)
    torch.testing.assert_close(scores, torch.from_numpy(queries) @ products.t(), atol=1e-5, rtol=0)
    assert not loaded.training  # left in the mode it was in


def test_batches_go_longest_first_and_rows_come_back_in_input_order():
    texts = ["red kurta", "a very long query about black running shoes", "tee", "blue denim jeans for men"]
    seen = []

    def embed(batch):
        seen.append(list(batch))
        return np.array([[len(text), 1.0] for text in batch])

    rows = embed_in_length_order(texts, [len(text) for text in texts], embed, batch_size=2)
    assert seen == [[texts[1], texts[3]], [texts[0], texts[2]]]  # similar lengths share a batch: less padding
    assert rows.dtype == torch.float32 and rows[:, 0].tolist() == [len(text) for text in texts]
    first = as_requested_embeddings(rows, single=True, convert_to_numpy=True, convert_to_tensor=False)
    assert isinstance(first, np.ndarray) and first.tolist() == [9.0, 1.0]
    for numpy, tensor in ((True, True), (False, False)):  # a tensor asked for, or numpy declined
        assert isinstance(as_requested_embeddings(rows, single=False, convert_to_numpy=numpy, convert_to_tensor=tensor),
                          torch.Tensor)
    seen.clear()
    embed_in_length_order(texts, [len(text) for text in texts], embed, batch_size=4)
    assert seen == [texts]  # a single batch goes in the given order
    with pytest.raises(ValueError, match="Nothing to encode: got an empty list"):
        embed_in_length_order([], [], embed, batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        embed_in_length_order(texts, [1] * 4, embed, batch_size=0)


def test_encode_products_accepts_a_dataframe_and_names_bad_rows(checkpoint):
    pandas = pytest.importorskip("pandas")
    _, folder, model, processor = checkpoint
    loaded = MultimodalRetrievalModel.from_pretrained(folder)
    frame = pandas.DataFrame(PRODUCTS)
    np.testing.assert_allclose(
        loaded.encode_products(frame), reference_products(model, processor, PRODUCTS).numpy(), atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError, match="Product 3 has no text"):
        loaded.encode_products([*PRODUCTS[:3], {"title": "  ", "description": None}])
    with pytest.raises(ValueError, match="Query 1 is empty"):
        loaded.encode_queries(["red shoes", "   "])


def test_encode_images_embeds_image_queries_where_the_model_can(checkpoint):
    case, folder, model, processor = checkpoint
    loaded = MultimodalRetrievalModel.from_pretrained(folder)
    photos = [photo for photo in PHOTOS if photo is not None]
    if case != "4tower-concat":
        with pytest.raises(ValueError, match="Image queries need a 4tower model"):
            loaded.encode_images(photos)
        return
    with torch.no_grad():
        expected = model.get_image_query_embeddings(pixel_values=processor.encode_images(photos)["pixel_values"])
    np.testing.assert_allclose(loaded.encode_images(photos, batch_size=2), expected.numpy(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="Image 1 is None"):
        loaded.encode_images([photos[0], None])


def test_a_model_without_a_checkpoint_asks_for_its_processor(tokenizers):
    model = MultimodalRetrievalModel(make_config("text_only")).eval()
    with pytest.raises(ValueError, match="pass processor="):
        model.encode_queries(["red shoes"])


# ----- processor(text=, images=) ----------------------------------------------------------------------------------------
def test_processor_takes_text_and_images_as_transformers_processors_do(checkpoint):
    case, _, model, processor = checkpoint
    text_inputs = processor(text=QUERIES)
    expected = processor.encode_queries(QUERIES)
    assert sorted(text_inputs) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(text_inputs[key], value)
    with torch.no_grad():
        torch.testing.assert_close(model.get_query_embeddings(**text_inputs), reference_queries(model, processor, QUERIES))
    # the contrastive style is unchanged
    batch = processor(queries=QUERIES[:2], products=PRODUCTS[:2])
    assert "query_input_ids" in batch and "product_input_ids" in batch
    with pytest.raises(ValueError, match="not both"):
        processor(text=QUERIES, products=PRODUCTS)
    if not model.config.uses_images:
        with pytest.raises(ValueError, match="no image processor"):
            processor(images=[PHOTOS[0]])
        return
    image_inputs = processor(images=PHOTOS[0])
    assert sorted(image_inputs) == ["image_mask", "pixel_values"]
    assert torch.equal(image_inputs["pixel_values"], processor.encode_images([PHOTOS[0]])["pixel_values"])
    both = processor(text=QUERIES[:1], images=[PHOTOS[0], PHOTOS[1]])
    assert both["input_ids"].shape[0] == 1 and both["pixel_values"].shape[0] == 2


# ----- transformers' pipeline ------------------------------------------------------------------------------------------
def test_feature_extraction_pipeline_gives_query_embeddings(checkpoint):
    case, folder, model, processor = checkpoint
    extractor = pipeline("feature-extraction", model=str(folder), trust_remote_code=True)
    assert type(extractor).__module__.startswith("transformers_modules.")
    vectors = extractor(QUERIES[:2])
    np.testing.assert_allclose(
        np.array(vectors), reference_queries(model, processor, QUERIES[:2]).numpy(), atol=1e-5, rtol=0
    )
    if case == "4tower-concat":
        with torch.no_grad():
            expected = model.get_image_query_embeddings(pixel_values=processor.encode_images(PHOTOS[:1])["pixel_values"])
        torch.testing.assert_close(extractor(PHOTOS[0], return_tensors=True), expected[0], atol=1e-5, rtol=0)


# ----- sentence-transformers --------------------------------------------------------------------------------------------
def test_checkpoint_is_a_sentence_transformers_model_with_the_same_embeddings(checkpoint):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    case, folder, model, processor = checkpoint
    assert json.loads((folder / "modules.json").read_text())[0]["type"] == (
        "integrations_mmretrieval.MultimodalRetrievalSentenceTransformer"
    )
    st_model = sentence_transformers.SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    assert type(st_model[0]).__module__.startswith("transformers_modules.")  # the checkpoint's own code
    assert st_model.get_embedding_dimension() == model.embedding_dim

    expected_queries = reference_queries(model, processor, QUERIES).numpy()
    np.testing.assert_allclose(st_model.encode(["red running shoes for men"])[0], expected_queries[0], atol=1e-5, rtol=0)
    queries = st_model.encode_query(QUERIES, batch_size=2)
    np.testing.assert_allclose(queries, expected_queries, atol=1e-5, rtol=0)

    documents = [" ".join(filter(None, [product["title"], product.get("description")])) for product in PRODUCTS]
    rows = [{"title": text} for text in documents]
    np.testing.assert_allclose(
        st_model.encode_document(documents), reference_products(model, processor, rows).numpy(), atol=1e-5, rtol=0
    )
    if model.config.uses_images:
        products = [{"text": text, "image": image} for text, image in zip(documents, PHOTOS)]
        np.testing.assert_allclose(
            st_model.encode_document(products, batch_size=2),
            reference_products(model, processor, rows, PHOTOS).numpy(), atol=1e-5, rtol=0,
        )
    photo = PHOTOS[0]
    if case == "4tower-concat":
        with torch.no_grad():
            expected = model.get_image_query_embeddings(pixel_values=processor.encode_images([photo])["pixel_values"])
        np.testing.assert_allclose(st_model.encode(photo), expected[0].numpy(), atol=1e-5, rtol=0)
    else:
        with pytest.raises(ValueError) as refused:
            st_model.encode([photo])
        assert "\n" not in str(refused.value)
        assert ("Image queries need a 4tower model" if model.config.uses_images else "Modality 'image'") in str(refused.value)

    # sentence-transformers' own search and evaluator run on these embeddings
    product_embeddings = st_model.encode_document(documents, convert_to_tensor=True)
    hits = sentence_transformers.util.semantic_search(torch.from_numpy(queries), product_embeddings, top_k=2)
    scores = st_model.similarity(queries, product_embeddings)
    assert [hit[0]["corpus_id"] for hit in hits] == scores.argmax(dim=1).tolist()
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    evaluator = InformationRetrievalEvaluator(
        queries={str(i): query for i, query in enumerate(QUERIES)},
        corpus={str(i): document for i, document in enumerate(documents)},
        relevant_docs={str(i): {str(i)} for i in range(len(QUERIES))}, show_progress_bar=False, name="tiny",
    )
    results = evaluator(st_model)
    assert 0.0 <= results["tiny_cosine_ndcg@10"] <= 1.0


def test_sentence_transformers_save_round_trips(checkpoint, tmp_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    case, folder, model, processor = checkpoint
    if case != "text_only":
        pytest.skip("one architecture is enough for the round trip")
    st_model = sentence_transformers.SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    st_model.save(str(tmp_path / "resaved"))
    resaved = sentence_transformers.SentenceTransformer(str(tmp_path / "resaved"), trust_remote_code=True, device="cpu")
    np.testing.assert_allclose(
        resaved.encode_query(QUERIES), reference_queries(model, processor, QUERIES).numpy(), atol=1e-5, rtol=0
    )


ENCODE_WITHOUT_PACKAGE = """
import importlib.abc, json, sys

class HidePackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "modeling_mmretrieval":
            raise ImportError("the package is deliberately hidden: " + name)

sys.meta_path.insert(0, HidePackage())
from sentence_transformers import SentenceTransformer

model = SentenceTransformer(sys.argv[1], trust_remote_code=True, device="cpu")
print(json.dumps({"module": type(model[0]).__module__, "queries": model.encode_query(json.loads(sys.argv[2])).tolist()}))
"""


def test_sentence_transformers_loads_the_checkpoint_without_the_package(tmp_path, tokenizers):
    pytest.importorskip("sentence_transformers")
    model, processor = save_tiny_checkpoint("4tower-concat", tmp_path / "checkpoint", tokenizers)
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1",
                   "HF_HOME": str(tmp_path / "hf_home"), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", ENCODE_WITHOUT_PACKAGE, str(tmp_path / "checkpoint"), json.dumps(QUERIES)],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["module"].startswith("transformers_modules.")
    np.testing.assert_allclose(
        np.array(loaded["queries"]), reference_queries(model, processor, QUERIES).numpy(), atol=1e-5, rtol=0
    )
