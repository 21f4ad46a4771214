"""The colour description of product photos (`config.colour_histogram_levels`, `colour_histogram_features`): what it
reads off real photos, that concatenations and image queries never see it, that the tagger and the residual fusion do,
and that the image-feature store keeps it apart from the tower's features alone."""

import io
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from tiny_towers import compose_from_tiny_towers, make_batch, make_config, product_inputs, save_tiny_pretrained_towers
from transformers import AutoImageProcessor

from modeling_mmretrieval import MultimodalRetrievalModel
from modeling_mmretrieval.data.catalogue import CatalogueColumns
from modeling_mmretrieval.modeling_mmretrieval import colour_histogram_features
from modeling_mmretrieval.retrieval.image_feature_store import image_feature_namespace
from modeling_mmretrieval.training.image_feature_cache import precompute_image_features
from modeling_mmretrieval.commands.train import parse_args
from modeling_mmretrieval.training.model_builder import (
    DEFAULT_COLOUR_HISTOGRAM_LEVELS,
    colour_histogram_settings,
    colour_histogram_levels,
)
from modeling_mmretrieval.training.visual_tagger import fit_visual_tagger

IMAGE_SIZE = 28
REPO_ROOT = Path(__file__).resolve().parents[1]
# Garment colours of equal-ish brightness, so that no grey-level cue tells them apart.
COLOURS = {"red": (190, 40, 40), "green": (40, 150, 60), "blue": (50, 60, 190), "purple": (120, 40, 150)}


def garment_photo(rgb, seed: int) -> bytes:
    """A product shot: a noisy garment of the colour, of random shape and place, on a white background (JPEG)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (60, 80), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, top = rng.randint(2, 18), rng.randint(2, 20)
    box = (left, top, left + rng.randint(25, 38), top + rng.randint(35, 55))
    shade = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in rgb)
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=shade)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def catalogue(num_products: int, seed: int = 0) -> list[dict]:
    rows = []
    for position in range(num_products):
        colour = list(COLOURS)[position % len(COLOURS)]
        rows.append({"product_id": f"sku-{seed}-{position}", "title": "Roadster Women Kurta", "description": "Cotton",
                     "base_colour": colour.title(), "image": {"bytes": garment_photo(COLOURS[colour], seed * 997 + position)}})
    return rows


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("colour_towers")
    save_tiny_pretrained_towers(root, IMAGE_SIZE, text_layers=1)
    return root


def composed(towers, levels: int):
    """A 3tower model of the tiny towers, with a colour description of `levels` per channel (0: none)."""
    settings = {}
    if levels:
        settings = colour_histogram_settings(AutoImageProcessor.from_pretrained(towers / "vision"), levels)
    return compose_from_tiny_towers(towers, "3tower", **settings)


def test_a_photo_reads_as_its_garment_colour_not_its_white_background(towers):
    model, processor = composed(towers, levels=4)
    pixels = processor.encode_images([Image.open(io.BytesIO(garment_photo(COLOURS["blue"], 3)))])["pixel_values"]
    features = colour_histogram_features(pixels, model.config.colour_histogram_pixel_mean,
                                         model.config.colour_histogram_pixel_std, levels=4)
    assert features.shape == (1, 4**3 + 6)
    shares = features[0, :64] ** 2  # the histogram is square-rooted
    assert shares.sum().item() == pytest.approx(1.0, abs=1e-5)
    cell = int(shares.argmax())  # (red * 4 + green) * 4 + blue
    red, green, blue = cell // 16, cell // 4 % 4, cell % 4
    assert blue > red and blue > green  # the garment's cell, not white's (3, 3, 3)
    assert shares[63].item() < shares[cell].item() / 4  # edge pixels blurred towards white, no background
    mean = features[0, 64:67]
    assert mean[2] > mean[0] + 0.2 and mean[2] > mean[1] + 0.2
    # An all-white product has no foreground: every pixel counts, so it reads as white instead of nothing.
    white = processor.encode_images([Image.new("RGB", (60, 80), (255, 255, 255))])["pixel_values"]
    white_shares = colour_histogram_features(white, model.config.colour_histogram_pixel_mean,
                                             model.config.colour_histogram_pixel_std, levels=4)[0, :64] ** 2
    assert white_shares[63].item() == pytest.approx(1.0, abs=1e-5)


def test_concatenations_and_image_queries_ignore_the_colour_description():
    plain = MultimodalRetrievalModel(make_config("4tower-concat")).eval()
    config = make_config("4tower-concat", colour_histogram_levels=2, colour_histogram_pixel_mean=[0.5] * 3,
                         colour_histogram_pixel_std=[0.5] * 3)
    coloured = MultimodalRetrievalModel(config).eval()
    coloured.load_state_dict(plain.state_dict())  # a concatenation has no weights that read the image record
    batch = make_batch(plain.config)
    with torch.no_grad():
        features = coloured.get_image_features(batch["pixel_values"], batch["image_mask"])
        assert features.shape[-1] == plain.image_feature_size + 2**3 + 6 == coloured.image_feature_size
        torch.testing.assert_close(features[:, : plain.image_feature_size],
                                   plain.get_image_features(batch["pixel_values"], batch["image_mask"]))
        assert features[1].abs().sum() == 0  # the image-less product has no colours either
        torch.testing.assert_close(coloured.get_product_embeddings(**product_inputs(batch)),
                                   plain.get_product_embeddings(**product_inputs(batch)))
        torch.testing.assert_close(coloured.get_image_query_embeddings(pixel_values=batch["pixel_values"]),
                                   plain.get_image_query_embeddings(pixel_values=batch["pixel_values"]))


@pytest.mark.parametrize("in_fusion", [True, False])
def test_the_residual_fusion_reads_the_colours_unless_told_not_to_and_starts_as_the_text_model(in_fusion):
    model = MultimodalRetrievalModel(make_config("4tower-residual-colours", colour_histogram_in_fusion=in_fusion)).eval()
    first_layer = next(module for module in model.product_fusion.modules() if isinstance(module, torch.nn.Linear))
    read = model.image_feature_size if in_fusion else model.image_tower_feature_size
    assert model.image_feature_size == model.image_tower_feature_size + 2**3 + 6
    assert first_layer.in_features == model.text_embedding_dim + read
    assert model.missing_image_embedding.shape == (read,)
    batch = make_batch(model.config)
    with torch.no_grad():
        text = model.get_product_text_features(batch["product_input_ids"], batch["product_attention_mask"])
        torch.testing.assert_close(model.get_product_embeddings(**product_inputs(batch)),
                                   torch.nn.functional.normalize(text, dim=-1))


def test_the_tagger_reads_colours_a_colour_blind_tower_cannot_give(towers):
    """With a tower whose features are the same for every photo, only the colour description can tell the garments'
    colours apart: the tagger then reads them on products it was not fitted on."""
    accuracies = {}
    for levels in (0, 4):
        model, processor = composed(towers, levels)
        with torch.no_grad():
            for parameter in model.vision_model.parameters():
                parameter.zero_()
        train = catalogue(120, seed=0)
        features = precompute_image_features(model, processor, train, show_progress=False)
        report = fit_visual_tagger(model, processor.tokenizer, features, train, CatalogueColumns(), min_probability=0.5)
        test = catalogue(40, seed=1)
        test_features = precompute_image_features(model, processor, test, show_progress=False)
        stacked = torch.stack([test_features[row["product_id"]] for row in test])
        predicted = model.visual_tagger(stacked).argmax(-1).tolist()
        tags = model.config.visual_tags
        accuracies[levels] = sum(tags[index] == row["base_colour"].lower()
                                 for index, row in zip(predicted, test)) / len(test)
        assert report.fitted_products == 120
    assert accuracies[0] <= 0.4  # chance among four colours
    assert accuracies[4] >= 0.9


def test_the_feature_store_keeps_coloured_features_apart(towers):
    plain, processor = composed(towers, levels=0)
    coloured, _ = composed(towers, levels=4)  # the same tower weights, read from the same folder
    assert image_feature_namespace(plain, processor) != image_feature_namespace(coloured, processor)


@pytest.mark.parametrize("flags, message", [
    (["--colour_histogram_levels", "17"], "--colour_histogram_levels must lie in [0, 16]"),
    (["--architecture", "text_only", "--colour_histogram_levels", "4"], "it needs --architecture 3tower or 4tower"),
    (["--model_name_or_path", "some/checkpoint", "--colour_histogram_levels", "4"], "a checkpoint"),
    (["--colour_histogram_levels", "0", "--colour_histogram_in_fusion"], "needs a colour description"),
])
def test_the_train_command_refuses_a_colour_setting_it_cannot_honour(tmp_path, flags, message):
    done = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "train.py"), "--output_dir", str(tmp_path),
                           *flags], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("flags, levels", [
    ([], DEFAULT_COLOUR_HISTOGRAM_LEVELS),  # the tagger reads it
    (["--no_visual_tags"], 0),  # nothing would read it
    (["--train_image_towers"], 0),  # no tagger on a trained tower
    (["--no_visual_tags", "--colour_histogram_in_fusion"], DEFAULT_COLOUR_HISTOGRAM_LEVELS),
    (["--architecture", "3tower", "--colour_histogram_levels", "3"], 3),
])
def test_new_image_models_get_a_colour_description_where_something_reads_it(flags, levels):
    assert colour_histogram_levels(parse_args(["--output_dir", "unused", *flags])) == levels


def test_a_catalogue_that_cannot_teach_the_tagger_leaves_out_what_only_the_tagger_reads():
    args = parse_args(["--output_dir", "unused"])
    assert colour_histogram_levels(args, tagger_can_learn=False) == 0
    fused = parse_args(["--output_dir", "unused", "--colour_histogram_in_fusion"])
    assert colour_histogram_levels(fused, tagger_can_learn=False) == DEFAULT_COLOUR_HISTOGRAM_LEVELS  # the fusion reads it
