"""The visual-word tagger: reads a product's colour off its image features and writes it into product texts that
name no colour (`VisualWordTagger`, `training.visual_tagger.fit_visual_tagger`)."""

import copy
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from example_scripts import load_example
from tiny_towers import compose_from_tiny_towers, noisy_png, save_tiny_pretrained_towers
from transformers import AutoTokenizer

from modeling_mmretrieval import MultimodalRetrievalModel
from modeling_mmretrieval.data.catalogue import CatalogueColumns
from modeling_mmretrieval.modeling_mmretrieval import (
    find_token_phrases, insert_tokens_before_end, named_token_phrases, token_phrase_starts,
)
from modeling_mmretrieval.towers import get_minilm_path
from modeling_mmretrieval.training.image_feature_cache import precompute_image_features
from modeling_mmretrieval.training.model_builder import DEFAULT_COLOUR_HISTOGRAM_LEVELS
from modeling_mmretrieval.training.visual_tagger import (
    VisualTaggerError,
    colour_labels,
    colours_to_learn,
    fit_visual_tagger,
    written_forms,
)

IMAGE_SIZE = 28
COLOURS = {"red": (200, 30, 40), "blue": (30, 50, 190), "green": (40, 160, 60), "yellow": (230, 210, 40)}
ARTICLES = ["Kurta", "Tshirt", "Shirt", "Dress", "Top", "Jeans"]
REPO_ROOT = Path(__file__).resolve().parents[1]


def product_image(rgb, seed: int) -> bytes:
    """A real PNG of the colour, with per-pixel noise, so no two images are alike."""
    return noisy_png(rgb, seed)


def catalogue(num_products: int, seed: int = 0, silent_share: float = 0.5) -> list[dict]:
    """Products whose image shows their colour; a seeded share of titles never names it."""
    rng = random.Random(seed)
    rows = []
    for position in range(num_products):
        colour = list(COLOURS)[position % len(COLOURS)]
        article = rng.choice(ARTICLES)
        silent = rng.random() < silent_share
        title = f"Roadster Women {article}" if silent else f"Roadster Women {colour.title()} {article}"
        rows.append({"product_id": f"sku-{seed}-{position}", "title": title, "description": "Cotton, regular fit",
                     "article_type": article, "gender": "Women",
                     "base_colour": colour.title(), "image": {"bytes": product_image(COLOURS[colour], seed * 1000 + position)}})
    return rows


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """The real MiniLM tokenizer, a tiny text tower of its vocabulary, and a tiny frozen DINOv2."""
    root = tmp_path_factory.mktemp("tagger_towers")
    save_tiny_pretrained_towers(root, IMAGE_SIZE, text_layers=1)
    return root


def model_and_processor(towers, architecture: str = "3tower"):
    return compose_from_tiny_towers(towers, architecture)


@pytest.fixture(scope="module")
def fitted(towers):
    model, processor = model_and_processor(towers)
    train = catalogue(160, seed=0)
    features = precompute_image_features(model, processor, train, show_progress=False)
    report = fit_visual_tagger(model, processor.tokenizer, features, train, CatalogueColumns(), min_probability=0.5)
    return model, processor, report


def test_phrases_are_found_as_token_runs_erring_towards_found():
    tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    texts = ["Nike Men Navy Blue Running Shoes", "Nike Men Running Shoes", "Roadster Bluebell Print Top"]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    phrases = [tokenizer(" blue", add_special_tokens=False)["input_ids"],
               tokenizer(" navy blue", add_special_tokens=False)["input_ids"]]
    # "Bluebell" is "blue" + "##bell": counted as naming blue, so its text is left alone (the safe side).
    assert find_token_phrases(inputs["input_ids"], inputs["attention_mask"], phrases).tolist() == [True, False, True]


def test_a_phrase_starts_where_its_tokens_run_and_never_in_padding():
    tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    inputs = tokenizer(["Roadster Women Navy Blue Kurta", "Navy Kurta"], padding=True, return_tensors="pt")
    navy_blue = tokenizer(" navy blue", add_special_tokens=False)["input_ids"]
    starts = token_phrase_starts(inputs["input_ids"], inputs["attention_mask"], navy_blue)
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    assert starts.shape == inputs["input_ids"].shape
    assert starts[0].nonzero().flatten().tolist() == [tokens.index("navy")]
    assert not starts[1].any()  # "navy" alone, then [SEP] and padding: never "navy blue"
    pad = tokenizer.pad_token_id
    assert not token_phrase_starts(inputs["input_ids"], inputs["attention_mask"], [pad, pad]).any()
    # An empty phrase starts nowhere (unfolding windows of size 0 would match everywhere).
    assert not token_phrase_starts(inputs["input_ids"], inputs["attention_mask"], []).any()
    too_long = [tokenizer.cls_token_id] * (inputs["input_ids"].shape[1] + 1)
    assert not token_phrase_starts(inputs["input_ids"], None, too_long).any()


def test_tags_go_before_the_closing_token_and_padding_follows():
    tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    inputs = tokenizer(["Kurta", "Roadster Women Kurta"], padding=True, return_tensors="pt")
    red = tokenizer(" red", add_special_tokens=False)["input_ids"]
    ids, mask, types = insert_tokens_before_end(inputs["input_ids"], inputs["attention_mask"],
                                                inputs["token_type_ids"], [red, []], tokenizer.sep_token_id)
    assert tokenizer.decode(ids[0][mask[0].bool()]) == "[CLS] kurta red [SEP]"
    assert tokenizer.decode(ids[1][mask[1].bool()]) == "[CLS] roadster women kurta [SEP]"
    lengths = inputs["attention_mask"].sum(1).tolist()
    assert ids.shape == mask.shape == types.shape and mask.sum(1).tolist() == [lengths[0] + len(red), lengths[1]]


def test_colour_labels_come_from_the_column_else_from_the_titles():
    rows = [{"title": "Navy Blue Kurta", "base_colour": " Navy  Blue "}, {"title": "Kurta", "base_colour": None}]
    assert colour_labels(rows, CatalogueColumns()) == (["navy blue", None], "the `base_colour` column")
    no_column = [{"title": "Navy Blue Kurta"}, {"title": "Off-White Top"}, {"title": "Kurta"}]
    labels, source = colour_labels(no_column, CatalogueColumns(base_colour=None))
    assert labels == ["navy", "off white", None] and source == "colour words in the product texts"


def test_the_fitted_tagger_reads_held_out_colours(fitted):
    _, _, report = fitted
    assert report.tags == ("blue", "green", "red", "yellow")
    assert report.held_out_accuracy >= 0.9 > report.majority_accuracy
    assert "4 colours from the `base_colour` column" in report.summary()


def test_the_learning_curve_judges_the_fitted_tagger_on_other_products(fitted):
    curve = load_example("visual_tagger_learning_curve.py")
    model, processor, _ = fitted
    held_out = catalogue(40, seed=7)
    held_out[0]["base_colour"] = "Mauve"  # a colour outside the vocabulary can only be wrong
    features = precompute_image_features(model, processor, held_out, show_progress=False)
    result = curve.judged(model, features, held_out, CatalogueColumns())
    assert result["evaluated_products"] == 40
    assert 0.9 <= result["accuracy"] <= 39 / 40 + 1e-6 and result["written"] > 0.8 and result["precision"] > 0.9


def test_the_learning_curve_refits_the_tagger_per_size_and_goes_on_past_a_size_too_small(fitted, tmp_path,
                                                                                         monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    curve = load_example("visual_tagger_learning_curve.py")
    model, processor, _ = fitted
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    data = tmp_path / "data"
    data.mkdir()
    for split, seed, size in (("train", 5, 120), ("validation", 6, 40)):
        pq.write_table(pa.Table.from_pylist(catalogue(size, seed=seed)), data / f"{split}.parquet")
    monkeypatch.setenv("MMRETRIEVAL_CACHE", str(tmp_path / "cache"))
    rows = curve.main(["--model", str(tmp_path / "ckpt"), "--dataset", str(data), "--sizes", "12", "120",
                       "--output", str(tmp_path / "curve.json")])
    assert rows[0]["products"] == 12 and "cannot fit the visual-word tagger" in rows[0]["error"]
    assert rows[1]["labelled_products"] == 120 and rows[1]["colours"] == 4 and rows[1]["evaluated_products"] == 40
    assert rows[1]["accuracy"] > 0.9 and rows[1]["precision"] > 0.9
    assert json.loads((tmp_path / "curve.json").read_text())["rows"] == rows


def test_the_reader_ceiling_tells_the_tagger_colour_and_puts_right_the_chosen_share_of_its_mistakes(fitted, tmp_path):
    report = load_example("images_that_pay.py")
    model, processor, _ = fitted
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    products = catalogue(40, seed=9)
    for product in products[:10]:  # the photos say otherwise: the tagger reads these ten wrong
        product["base_colour"] = "Mauve"
    products[10]["image"] = None
    read = report.reader_colours(tmp_path / "ckpt", products, {})
    assert len(read) == 39 and "sku-9-10" not in read  # no photo, nothing read
    assert all(read[p["product_id"]] != "mauve" for p in products[:10])
    assert sum(read[p["product_id"]] == p["base_colour"].lower() for p in products[11:]) >= 27
    corrected = report.reader_colours(tmp_path / "ckpt", products, {}, corrected_share=0.5, seed=3)
    changed = [p for p in products if corrected.get(p["product_id"]) != read.get(p["product_id"])]
    assert all(corrected[p["product_id"]] == p["base_colour"].lower() for p in changed)  # only ever to the truth
    assert 2 <= sum(p["base_colour"] == "Mauve" for p in changed) <= 8  # about half of the ten mistakes
    assert report.reader_colours(tmp_path / "ckpt", products, {}, corrected_share=0.5, seed=3) == corrected
    everything = report.reader_colours(tmp_path / "ckpt", products, {}, corrected_share=1.0)
    assert all(everything[p["product_id"]] == p["base_colour"].lower() for p in products if p["image"])
    assert report.reader_accuracy(everything, products) == 1.0
    assert report.reader_accuracy(read, products) <= 29 / 39  # the ten Mauve products are read wrong
    # Among the colours a text names: the image's pick against the colour named first.
    named = [{**p, "title": f"Roadster Women {other.title()} and {p['base_colour']} Kurta"}
             for p, other in zip(catalogue(12, seed=10), ["blue", "green", "red", "yellow"] * 3)
             if other != p["base_colour"].lower()]
    choice = report.named_colour_choice(tmp_path / "ckpt", [*named, *products[11:14]], {})  # those name one colour
    assert choice["products"] == len(named) == 9
    assert choice["first_named"] == 0.0 and choice["image"] >= 7 / 9  # the photo shows the second colour named


def test_the_image_branch_weight_is_chosen_on_validation_products_by_their_top_ten(towers, tmp_path):
    from modeling_mmretrieval.modeling_mmretrieval import image_branch_layers
    from modeling_mmretrieval.retrieval.held_out_evaluation import HeldOutEvaluator

    report = load_example("images_that_pay.py")
    model, processor = model_and_processor(towers)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained image branch: what it adds then depends on its weight
        for layer in image_branch_layers(model):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    validation = HeldOutEvaluator(catalogue(48, seed=11), num_queries=20, seed=0)
    choice = report.choose_branch_weight(validation, tmp_path / "ckpt")
    scores = choice["validation"]
    assert list(scores) == [str(weight) for weight in report.CANDIDATE_IMAGE_BRANCH_WEIGHTS]
    assert choice["chosen"] == float(max(scores, key=scores.get)) and len(set(scores.values())) > 1
    unweighted = report.evaluate_checkpoint(validation, tmp_path / "ckpt", {})["per_query"]["all"]["ndcg@10"]
    assert scores["1.0"] == pytest.approx(sum(unweighted.values()) / len(unweighted))


def test_silent_texts_get_the_colour_of_their_image_and_others_stay(fitted):
    model, processor, _ = fitted
    held_out = catalogue(8, seed=1, silent_share=0.0)
    red = next(row for row in held_out if row["base_colour"] == "Red")
    silent = {**red, "title": "Roadster Women Kurta"}
    wrong = {**red, "title": "Roadster Women Blue Kurta"}  # the text names a colour: the image does not overrule it
    with torch.no_grad():
        tagged = model.get_product_embeddings(**processor.encode_products([silent, wrong], images=[
            Image.open(io.BytesIO(red["image"]["bytes"]))] * 2))
        by_hand = model.get_product_embeddings(**processor.encode_products(
            [{**silent, "description": silent["description"] + " red"}, wrong],
            images=[Image.open(io.BytesIO(red["image"]["bytes"]))] * 2))
        untagged = model.get_product_embeddings(**processor.encode_products([silent], images=[
            Image.open(io.BytesIO(red["image"]["bytes"]))]))
    # The tag goes before the closing [SEP], after the last text field: the description.
    torch.testing.assert_close(tagged, by_hand, rtol=1e-5, atol=1e-5)
    model.visual_tagger, tagger = None, model.visual_tagger
    try:
        with torch.no_grad():
            plain = model.get_product_embeddings(**processor.encode_products([silent], images=[
                Image.open(io.BytesIO(red["image"]["bytes"]))]))
    finally:
        model.visual_tagger = tagger
    assert not torch.allclose(untagged, plain, atol=1e-4)  # the tag changed the silent product's embedding


def test_products_without_an_image_are_never_tagged(fitted):
    model, processor, _ = fitted
    inputs = processor.encode_products([{"title": "Roadster Women Kurta", "description": "Cotton"}])
    tagger = model.visual_tagger
    ids, mask, _ = tagger.write_tags(inputs["input_ids"], inputs["attention_mask"], None,
                                     torch.zeros(1, model.image_feature_size), torch.tensor([False]))
    assert torch.equal(ids, inputs["input_ids"])


def test_a_saved_tagger_loads_with_the_checkpoint(fitted, tmp_path):
    model, processor, _ = fitted
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    loaded = MultimodalRetrievalModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.visual_tags == ["blue", "green", "red", "yellow"]
    rows = [{**row, "title": "Roadster Women Kurta"} for row in catalogue(6, seed=2)]  # silent: tags are written
    images = [Image.open(io.BytesIO(row["image"]["bytes"])) for row in rows]
    inputs = processor.encode_products(rows, images=images)
    with torch.no_grad():
        features = loaded.get_image_features(inputs["pixel_values"], inputs["image_mask"])
        assert any(tag is not None for tag in loaded.visual_tagger.chosen_tags(
            inputs["input_ids"], inputs["attention_mask"], features, inputs["image_mask"]))
    assert not any(parameter.requires_grad for parameter in loaded.visual_tagger.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded.get_product_embeddings(**processor.encode_products(rows, images=images)),
                                   model.get_product_embeddings(**processor.encode_products(rows, images=images)))


def test_a_catalogue_with_one_colour_cannot_teach_a_tagger(towers):
    model, processor = model_and_processor(towers)
    rows = [row for row in catalogue(80, seed=3) if row["base_colour"] == "Red"]
    features = precompute_image_features(model, processor, rows, show_progress=False)
    with pytest.raises(VisualTaggerError, match="1 colours with at least 10"):
        fit_visual_tagger(model, processor.tokenizer, features, rows)
    assert model.visual_tagger is None and model.config.visual_tags is None


def test_the_train_command_fits_the_tagger_and_refuses_it_for_text_only(towers, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    for split, seed, size in (("train", 0, 96), ("validation", 1, 24)):
        pq.write_table(pa.Table.from_pylist(catalogue(size, seed=seed)), data / f"{split}.parquet")
    common = [sys.executable, str(REPO_ROOT / "examples" / "train.py"), "--dataset", str(data), "--image_size",
              str(IMAGE_SIZE), "--per_device_train_batch_size", "16", "--max_train_steps", "2", "--eval_split", "none"]
    refused = subprocess.run([*common, "--output_dir", str(tmp_path / "text"), "--architecture", "text_only",
                              "--visual_tags"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--visual_tags reads colours off product images" in refused.stderr
    assert "Traceback" not in refused.stderr
    refused = subprocess.run([*common, "--output_dir", str(tmp_path / "untagged"), "--architecture", "3tower",
                              "--no_visual_tags", "--tag_among_named_colours"], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "--tag_among_named_colours is a setting of the visual-word tagger" in refused.stderr
    assert "Traceback" not in refused.stderr
    run = subprocess.run([*common, "--output_dir", str(tmp_path / "run"), "--architecture", "3tower",
                          "--text_model", str(towers / "text"), "--vision_model", str(towers / "vision"),
                          "--tag_among_named_colours"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                              "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["visual_tagger"]["tags"] == ["blue", "green", "red", "yellow"]
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["visual_tags"] == ["blue", "green", "red", "yellow"]
    assert config["colour_histogram_levels"] == DEFAULT_COLOUR_HISTOGRAM_LEVELS  # what the tagger reads
    assert len(config["visual_tag_named_token_ids"]) == 4  # each tag's forms: it also tags texts naming several


def test_a_catalogue_that_cannot_teach_the_tagger_trains_a_model_without_its_colour_description(towers, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    for split, seed, size in (("train", 0, 64), ("validation", 1, 16)):  # one colour: nothing for a tagger to tell
        rows = [{**row, "base_colour": "Red"} for row in catalogue(size, seed=seed)]
        pq.write_table(pa.Table.from_pylist(rows), data / f"{split}.parquet")
    command = [sys.executable, str(REPO_ROOT / "examples" / "train.py"), "--dataset", str(data), "--image_size",
               str(IMAGE_SIZE), "--per_device_train_batch_size", "16", "--max_train_steps", "1", "--eval_split", "none",
               "--architecture", "3tower", "--text_model", str(towers / "text"), "--vision_model", str(towers / "vision")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run([*command, "--output_dir", str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "training without visual tags" in run.stderr
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["visual_tags"] is None and config["colour_histogram_levels"] == 0
    asked = subprocess.run([*command, "--output_dir", str(tmp_path / "asked"), "--visual_tags"], capture_output=True,
                           text=True, timeout=300, env=env)
    assert asked.returncode == 2 and "Traceback" not in asked.stderr
    assert "cannot fit the visual-word tagger: 1 colours with at least 10 labelled products" in asked.stderr
    assert "Caching image features" not in asked.stderr  # refused before any image is read


def test_the_colours_a_tagger_could_learn_are_decided_from_the_labels_alone():
    rows = catalogue(80, seed=4)
    assert colours_to_learn(rows) == ["blue", "green", "red", "yellow"]  # 20 of each
    assert colours_to_learn(rows, min_examples=21) == []
    silent = [{**row, "title": "Roadster Women Kurta"} for row in rows]
    assert colours_to_learn(silent, CatalogueColumns(base_colour=None)) == []  # no column and no colour words


def test_tokens_past_the_position_limit_give_way_to_the_tag_and_left_padding_is_kept():
    ids = torch.tensor([[0, 0, 101, 7, 8, 9, 102], [101, 5, 6, 7, 8, 9, 102]])
    mask = (ids != 0).long()
    new_ids, new_mask, _ = insert_tokens_before_end(ids, mask, None, [[42], [42, 43]], 102, max_length=7)
    assert new_ids.tolist() == [[0, 101, 7, 8, 9, 42, 102], [101, 5, 6, 7, 42, 43, 102]]
    assert new_mask.tolist() == [[0, 1, 1, 1, 1, 1, 1], [1] * 7]


def test_training_without_tags_from_a_tagged_checkpoint_drops_the_tagger(fitted, tmp_path):
    from types import SimpleNamespace

    from modeling_mmretrieval.training.trainer import fit_visual_tags

    model, processor, _ = fitted
    model.save_pretrained(tmp_path / "tagged")
    tagged = MultimodalRetrievalModel.from_pretrained(tmp_path / "tagged")
    assert fit_visual_tags(SimpleNamespace(visual_tags=False, seed=0), tagged, processor, {}, [], CatalogueColumns()) is None
    assert tagged.visual_tagger is None and tagged.config.visual_tags is None


def test_named_phrases_count_a_colour_inside_a_longer_one_once():
    tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    tags = ["blue", "navy blue", "white", "red"]
    forms = [written_forms(tokenizer, [tag]) for tag in tags]
    texts = ["Navy Blue and White Striped Shirt", "Blue Shirt with navy blue collar", "Red Kurta", "Kurta"]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    assert named_token_phrases(inputs["input_ids"], inputs["attention_mask"], forms).tolist() == [
        [False, True, True, False], [True, True, False, False], [False, False, False, True], [False] * 4]


@pytest.fixture(scope="module")
def fitted_among_named(towers):
    model, processor = model_and_processor(towers)
    train = catalogue(160, seed=0)
    features = precompute_image_features(model, processor, train, show_progress=False)
    fit_visual_tagger(model, processor.tokenizer, features, train, CatalogueColumns(), among_named=True)
    return model, processor


def test_a_text_naming_several_colours_gets_the_one_its_image_shows(fitted_among_named, fitted):
    model, processor = fitted_among_named
    red = next(row for row in catalogue(8, seed=1, silent_share=0.0) if row["base_colour"] == "Red")
    image = Image.open(io.BytesIO(red["image"]["bytes"]))
    rows = [{**red, "title": "Roadster Women Blue and Red Kurta"},   # several: the image's red is written
            {**red, "title": "Roadster Women Red Kurta"},            # one colour: left alone
            {**red, "title": "Roadster Women Kurta"}]                # none: tagged as before
    inputs = processor.encode_products(rows, images=[image] * 3)
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], inputs["image_mask"])
        chosen = model.visual_tagger.chosen_tags(inputs["input_ids"], inputs["attention_mask"], features,
                                                 inputs["image_mask"])
        tags = model.config.visual_tags
        assert [tags[index] if index is not None else None for index in chosen] == ["red", None, "red"]
        tagged = model.get_product_embeddings(**inputs)
        model.visual_tagger, tagger = None, model.visual_tagger
        try:  # the same text with "red" written by hand, before the closing token, and no tagger
            by_hand = model.get_product_embeddings(**processor.encode_products(
                [{**row, "description": row["description"] + " red"} for row in rows[:1]], images=[image]))
        finally:
            model.visual_tagger = tagger
        torch.testing.assert_close(tagged[:1], by_hand, rtol=1e-5, atol=1e-5)
        # A tagger fitted without `among_named` leaves a text that names several colours as it is.
        other, _, _ = fitted
        assert other.config.visual_tag_named_token_ids is None
        assert other.visual_tagger.chosen_tags(inputs["input_ids"][:1], inputs["attention_mask"][:1], features[:1],
                                               inputs["image_mask"][:1]) == [None]


def test_among_the_named_colours_the_image_must_still_favour_one(fitted_among_named):
    model, processor = fitted_among_named
    tags = model.config.visual_tags  # blue, green, red, yellow
    tagger = copy.deepcopy(model.visual_tagger)
    rows = [{"title": "Roadster Women Blue and Green Kurta", "description": "Cotton"}]
    inputs = processor.encode_products(rows)
    features = torch.ones(1, model.image_feature_size)

    def chosen(probabilities):
        with torch.no_grad():
            tagger.classifier.weight.zero_()
            tagger.classifier.bias.copy_(torch.tensor(probabilities).log())
        return tagger.chosen_tags(inputs["input_ids"], inputs["attention_mask"], features, torch.tensor([True]))

    # Red is the image's colour, but the text names blue and green: among them, blue has 0.625.
    assert chosen([0.25, 0.15, 0.5, 0.1]) == [tags.index("blue")]
    # Among the named colours the image is undecided (0.5 each): nothing is written.
    assert chosen([0.2, 0.2, 0.5, 0.1]) == [None]


def test_a_saved_tagger_keeps_choosing_among_named_colours(fitted_among_named, tmp_path):
    model, processor = fitted_among_named
    model.save_pretrained(tmp_path / "ckpt")
    loaded = MultimodalRetrievalModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.visual_tag_named_token_ids == model.config.visual_tag_named_token_ids
    assert len(loaded.config.visual_tag_named_token_ids) == len(loaded.config.visual_tags)


def test_a_resumed_run_keeps_which_texts_its_tagger_writes_into():
    from modeling_mmretrieval.training.checkpoints import CheckpointMismatchError, check_run_signature

    # A checkpoint written before the setting existed tagged only texts naming no colour.
    check_run_signature({"seed": 42}, {"seed": 42, "tag_among_named_colours": False}, "checkpoint-4")
    with pytest.raises(CheckpointMismatchError, match="tag_among_named_colours: checkpoint False vs now True"):
        check_run_signature({"seed": 42}, {"seed": 42, "tag_among_named_colours": True}, "checkpoint-4")
