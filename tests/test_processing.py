import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_towers import IMAGE_SIZE, make_config
from transformers import AutoProcessor, AutoTokenizer, BitImageProcessorPil, CLIPImageProcessorPil

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
from modeling_mmretrieval.towers import build_clip_tokenizer, get_minilm_path
from modeling_mmretrieval.processing_mmretrieval import join_product_text


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return AutoTokenizer.from_pretrained(get_minilm_path())


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(build_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer")))


def small_image_processor():
    return CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def product_photo(colour) -> Image.Image:
    pixels = np.zeros((80, 60, 3), dtype=np.uint8)
    pixels[10:70, 15:45] = colour  # a garment-like block on a dark background
    return Image.fromarray(pixels)


PRODUCTS = [
    {"title": "Nike Men Red Running Shoes", "description": "Mesh upper, rubber sole", "price": 2999.0},
    {"title": "Fabindia Women Blue Kurta", "description": None},
    {"title": "Puma Unisex Black Cap", "description": float("nan")},
]


def test_product_text_joins_present_fields_in_order(minilm_tokenizer):
    processor = MultimodalRetrievalProcessor(minilm_tokenizer, product_text_fields=["title", "description"])
    texts = processor.product_texts(PRODUCTS)
    assert texts == ["Nike Men Red Running Shoes [SEP] Mesh upper, rubber sole", "Fabindia Women Blue Kurta",
                     "Puma Unisex Black Cap"]
    assert join_product_text({"brand": "Puma", "title": ""}, ["title", "brand"], " | ") == "Puma"


def test_processor_builds_model_inputs_for_every_side(minilm_tokenizer, clip_tokenizer):
    processor = MultimodalRetrievalProcessor(
        minilm_tokenizer, image_processor=small_image_processor(), dual_tokenizer=clip_tokenizer, max_query_length=8
    )
    images = [product_photo((200, 20, 20)), None, product_photo((20, 20, 200))]
    batch = processor(queries=["red running shoes for men", "blue kurta", "black cap"], products=PRODUCTS, images=images)
    assert batch["query_input_ids"].shape[0] == 3 and batch["query_input_ids"].shape[1] <= 8
    assert batch["query_dual_input_ids"][0, 0].item() == clip_tokenizer.bos_token_id
    assert batch["product_input_ids"].shape[0] == 3
    assert batch["pixel_values"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["image_mask"].tolist() == [True, False, True]
    # The missing image's slot is a zero placeholder that the mask tells the model to ignore.
    assert torch.count_nonzero(batch["pixel_values"][1]) == 0
    reference = small_image_processor()(images=[images[0]], return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(batch["pixel_values"][0], reference)
    decoded = minilm_tokenizer.decode(batch["query_input_ids"][0], skip_special_tokens=True)
    assert decoded == "red running shoes for men"


def test_processor_output_feeds_the_model(minilm_tokenizer, clip_tokenizer):
    config = make_config("4tower-mlp")
    config.text_config.vocab_size = minilm_tokenizer.vocab_size
    config.dual_encoder_config.text_config.vocab_size = len(clip_tokenizer)
    config.dual_encoder_config.text_config.max_position_embeddings = 77
    model = MultimodalRetrievalModel(config)
    processor = MultimodalRetrievalProcessor(minilm_tokenizer, small_image_processor(), clip_tokenizer)
    images = [product_photo((200, 20, 20)), None, product_photo((20, 20, 200))]
    output = model(**processor(queries=["red shoes", "blue kurta", "black cap"], products=PRODUCTS, images=images))
    assert output.logits_per_query.shape == (3, 3) and torch.isfinite(output.loss)
    queries = model.get_query_embeddings(**processor.encode_queries(["red shoes"]))
    products = model.get_product_embeddings(**processor.encode_products(PRODUCTS, images))
    assert queries.shape == (1, model.embedding_dim) and products.shape == (3, model.embedding_dim)


def test_bad_inputs_are_named(minilm_tokenizer):
    processor = MultimodalRetrievalProcessor(minilm_tokenizer)
    with pytest.raises(ValueError, match="Query 1 is empty"):
        processor.encode_queries(["shoes", "   "])
    with pytest.raises(TypeError, match="Query 0 must be a string"):
        processor.encode_queries([None])
    with pytest.raises(ValueError, match="Product 1 has no text"):
        processor.encode_products([{"title": "Shoe"}, {"title": None, "description": ""}])
    with pytest.raises(TypeError, match="Product 0 must be a mapping"):
        processor.encode_products(["just a string"])
    with pytest.raises(ValueError, match="no image processor"):
        processor.encode_images([product_photo((1, 2, 3))])
    image_processor = MultimodalRetrievalProcessor(minilm_tokenizer, small_image_processor())
    with pytest.raises(ValueError, match="Got 1 images for 2 products"):
        image_processor.encode_products(PRODUCTS[:2], images=[None])


@pytest.mark.parametrize("with_images", [False, True])
def test_save_and_from_pretrained_round_trip(minilm_tokenizer, clip_tokenizer, tmp_path, with_images):
    processor = MultimodalRetrievalProcessor(
        minilm_tokenizer,
        image_processor=BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28})
        if with_images else None,
        dual_tokenizer=clip_tokenizer if with_images else None,
        max_query_length=12,
        max_product_length=40,
        product_text_fields=["title", "brand"],
    )
    processor.save_pretrained(tmp_path)
    settings = json.loads((tmp_path / "processor_config.json").read_text())
    assert settings["auto_map"] == {"AutoProcessor": "processing_mmretrieval.MultimodalRetrievalProcessor"}
    assert (tmp_path / "processing_mmretrieval.py").is_file()
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, MultimodalRetrievalProcessor)
    assert loaded.to_dict() == processor.to_dict()
    products = [{"title": "Roadster Men Olive Jacket", "brand": "Roadster"}]
    images = [product_photo((90, 100, 40))] if with_images else None
    before = processor(queries=["olive jacket"], products=products, images=images)
    after = loaded(queries=["olive jacket"], products=products, images=images)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_from_towers_pretrained_follows_the_model_config(tmp_path):
    minilm = get_minilm_path()
    config = make_config("text_only", max_query_length=10, product_text_fields=["title"])
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(minilm, config=config)
    assert processor.max_query_length == 10 and processor.product_text_fields == ["title"]
    assert processor.image_processor is None and processor.dual_tokenizer is None


def test_batches_are_widened_to_a_multiple_of_eight_within_the_truncation_length(minilm_tokenizer, clip_tokenizer):
    queries = ["red shoes", "navy blue slim fit stretchable jeans for men with five pockets, a zip fly and a mid rise waist"]
    processor = MultimodalRetrievalProcessor(
        minilm_tokenizer, dual_tokenizer=clip_tokenizer, max_query_length=20, max_dual_length=13
    )
    short = processor.encode_queries(queries[:1])
    assert short["input_ids"].shape[1] == 8 and short["attention_mask"][0].tolist() == [1] * 4 + [0] * 4
    assert short["input_ids"][0, 4:].tolist() == [minilm_tokenizer.pad_token_id] * 4
    both = processor.encode_queries(queries)
    # 20 and 13 are the truncation lengths: a width past them would overrun a tower's positions (CLIP: 77).
    assert both["input_ids"].shape[1] == 20 and both["dual_input_ids"].shape[1] == 13
    unwidened = MultimodalRetrievalProcessor(minilm_tokenizer, pad_to_multiple_of=None).encode_queries(queries[:1])
    assert unwidened["input_ids"].shape[1] == 4

    config = make_config("text_only")
    config.text_config.vocab_size = minilm_tokenizer.vocab_size
    model = MultimodalRetrievalModel(config).eval()
    with torch.no_grad():  # the extra columns are padding: masked out, the embedding is the same
        torch.testing.assert_close(model.get_query_embeddings(**short), model.get_query_embeddings(**unwidened))
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        MultimodalRetrievalProcessor(minilm_tokenizer, pad_to_multiple_of=0)


def test_pad_to_multiple_of_round_trips(minilm_tokenizer, tmp_path):
    MultimodalRetrievalProcessor(minilm_tokenizer, pad_to_multiple_of=16).save_pretrained(tmp_path)
    assert MultimodalRetrievalProcessor.from_pretrained(tmp_path).pad_to_multiple_of == 16
    settings = json.loads((tmp_path / "processor_config.json").read_text())
    del settings["pad_to_multiple_of"]  # a processor saved before the option existed
    (tmp_path / "processor_config.json").write_text(json.dumps(settings))
    assert MultimodalRetrievalProcessor.from_pretrained(tmp_path).pad_to_multiple_of == 8


def test_product_images_without_products_are_refused():
    from modeling_mmretrieval.towers import get_minilm_path

    processor = MultimodalRetrievalProcessor.from_towers_pretrained(get_minilm_path())
    with pytest.raises(ValueError, match="pass them with `products`"):
        processor(queries=["red shirt"], images=[None])
