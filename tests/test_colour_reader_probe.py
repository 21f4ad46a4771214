"""examples/colour_reader_probe.py: the garment-aware reader looks where the article type says, and the probe runs on a
real catalogue and refuses one without colours."""

import io
import json

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from example_scripts import load_example
from modeling_mmretrieval.data.catalogue import SAMPLE_DATA_DIR, CatalogueColumns, load_catalogue
from modeling_mmretrieval.training.visual_tagger import fit_linear_classifier

probe = load_example("colour_reader_probe.py")
RGB = torch.tensor([[220, 30, 30], [30, 200, 40], [30, 40, 220]], dtype=torch.uint8)  # red, green, blue


def two_garment_photos(count: int, seed: int):
    """Photos of an outfit: a top (upper half) and trousers (lower half) of independent colours. Garment 1 is the top,
    garment 2 the trousers; the label is the colour of the product's own garment."""
    generator = torch.Generator().manual_seed(seed)
    top, bottom = torch.randint(0, 3, (count,), generator=generator), torch.randint(0, 3, (count,), generator=generator)
    photos = torch.empty((count, 3, 80, 60), dtype=torch.uint8)
    photos[:, :, :40] = RGB[top][:, :, None, None]
    photos[:, :, 40:] = RGB[bottom][:, :, None, None]
    garments = torch.randint(1, 3, (count,), generator=generator)
    return photos, torch.where(garments == 1, top, bottom), garments


def test_the_reader_reads_the_colour_where_the_article_type_says_and_a_whole_photo_reading_cannot():
    photos, colours, garments = two_garment_photos(384, seed=0)
    test_photos, test_colours, test_garments = two_garment_photos(256, seed=1)
    reader = probe.train_cnn_reader(photos, colours, garments, num_garments=2, num_colours=3, epochs=6, width=8,
                                    batch_size=32, seed=0)
    cnn = probe.accuracy(lambda a, b: reader(test_photos[a:b], test_garments[a:b]), len(test_photos), test_colours)
    weight, bias = fit_linear_classifier(probe.histogram_features(photos), colours, 3, seed=0)
    whole_photo = probe.accuracy(lambda a, b: probe.histogram_features(test_photos[a:b]) @ weight.T + bias,
                                 len(test_photos), test_colours)
    # Both colours are in every photo: without the garment a whole-photo reading can only guess between them.
    assert cnn >= 0.95 and cnn - whole_photo > 0.2
    with torch.no_grad():
        _, attention = reader.attention(test_photos, test_garments)
    # The garment enters only through the attention: the top is read from the upper half, the trousers less so.
    upper = attention[:, : attention.shape[1] // 2].sum(-1)  # cells are row-major: the first half is the upper half
    assert upper[test_garments == 1].mean() > 0.6  # thresholds with room below what training seeds 0 to 4 give
    assert upper[test_garments == 1].mean() - upper[test_garments == 2].mean() > 0.25


def test_the_probe_trains_both_readers_on_a_catalogue_and_writes_what_it_measured(tmp_path, capsys):
    output = tmp_path / "probe.json"
    results = probe.main(["--dataset", str(SAMPLE_DATA_DIR), "--max_train_products", "300", "--epochs", "1",
                          "--width", "8", "--output", str(output)])
    assert json.loads(output.read_text()) == results
    assert [row["reader"] for row in results["readers"]] == ["colour histogram, linear", "garment-aware CNN"]
    validation = load_catalogue(SAMPLE_DATA_DIR, split="validation", needs_queries=False)
    with_photo_and_colour = sum(1 for row in validation if row["base_colour"] and row["image"] is not None)
    assert results["evaluated_products"] == with_photo_and_colour > 0
    assert results["colours"] >= 2 and results["article_types"] >= 1
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in results["readers"])
    # The colour histogram alone already reads the sample's colours far better than one guess per product.
    assert results["readers"][0]["accuracy"] > 2.0 / results["colours"]
    assert "| garment-aware CNN |" in capsys.readouterr().out


def test_a_catalogue_without_colour_labels_is_refused_in_one_line(tmp_path, capsys):
    for split in ("train", "validation"):
        table = pq.read_table(SAMPLE_DATA_DIR / f"{split}.parquet").slice(0, 40)
        table = table.set_column(table.schema.get_field_index("base_colour"), "base_colour",
                                 [[None] * table.num_rows])
        pq.write_table(table, tmp_path / f"{split}.parquet")
    with pytest.raises(SystemExit) as stopped:
        probe.main(["--dataset", str(tmp_path), "--epochs", "1"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the datasets library's progress lines
    assert error.startswith(f"error: --dataset {tmp_path}: fewer than 2 colours") and "(--min_examples)" in error


def test_a_count_flag_below_one_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as stopped:
        probe.parse_args(["--epochs", "0"])
    assert stopped.value.code == 2
    assert "argument --epochs: invalid count value: '0'" in capsys.readouterr().err


def photo_bytes(rgb) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (60, 80), rgb).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def test_photos_and_labels_skip_what_cannot_be_judged_and_mark_unknown_colours_and_garments():
    def row(product_id, title, colour, article_type, image):
        return {"product_id": product_id, "title": title, "base_colour": colour, "article_type": article_type,
                "image": image}

    rows = [row("1", "Red Kurta", "Red", "Kurtas", photo_bytes((200, 0, 0))),
            row("2", "Teal Top", "Teal", "Tops", photo_bytes((0, 128, 128))),
            row("3", "Blue Jeans", "Blue", "Jeans", None),
            row("4", "Kurta", None, "Kurtas", photo_bytes((9, 9, 9)))]
    columns = CatalogueColumns()
    garments = probe.article_types(rows, columns, min_examples=2)
    assert garments == {"Kurtas": 1}  # "Tops" and "Jeans" are too rare: they share the unknown garment
    photos, colours, types = probe.photos_and_labels(rows, columns, ["blue", "red"], garments)
    # The photo-less and the colour-less products are skipped; teal, outside the vocabulary, can never be right.
    assert photos.shape == (2, 3, 80, 60) and photos.dtype == torch.uint8
    assert colours.tolist() == [1, -1] and types.tolist() == [1, probe.UNKNOWN_GARMENT]
    assert photos[0, :, 40, 30].tolist() == [200, 0, 0]


def test_the_same_seed_trains_the_same_reader_and_leaves_the_global_random_state_alone():
    photos, colours, garments = two_garment_photos(64, seed=0)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = probe.train_cnn_reader(photos, colours, garments, 2, 3, epochs=1, width=4, batch_size=16, seed=5)
    assert torch.rand(1) == before
    second = probe.train_cnn_reader(photos, colours, garments, 2, 3, epochs=1, width=4, batch_size=16, seed=5)
    other = probe.train_cnn_reader(photos, colours, garments, 2, 3, epochs=1, width=4, batch_size=16, seed=6)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(first.head.weight, other.head.weight)


def test_a_missing_catalogue_or_split_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        probe.main(["--dataset", str(tmp_path / "nowhere")])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: cannot load the catalogue") and error.endswith("(--dataset)")
    with pytest.raises(SystemExit) as stopped:
        probe.main(["--dataset", str(SAMPLE_DATA_DIR), "--evaluation_split", "holdout"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --dataset {SAMPLE_DATA_DIR} has no split 'holdout' (--evaluation_split); it has "
        "['test', 'train', 'validation']")


def test_a_shop_catalogue_with_its_own_column_names_is_read_through_the_column_flags(tmp_path, capsys):
    names = {"product_id": "sku", "title": "name", "description": "details", "base_colour": "colour_name",
             "article_type": "category", "image": "photo"}
    for split in ("train", "validation"):
        table = pq.read_table(SAMPLE_DATA_DIR / f"{split}.parquet").slice(0, 150).select(list(names))
        pq.write_table(table.rename_columns([names[column] for column in table.column_names]),
                       tmp_path / f"{split}.parquet")
    flags = [argument for column, name in names.items() for argument in (f"--{column}_column", name)]
    results = probe.main(["--dataset", str(tmp_path), "--epochs", "1", "--width", "4", *flags])
    assert results["train_products"] > 100 and results["evaluated_products"] > 100
    assert results["article_types"] >= 1 and results["dataset"] == str(tmp_path)
    with pytest.raises(SystemExit) as stopped:  # without the flags: the missing columns and their flags, in one line
        probe.main(["--dataset", str(tmp_path), "--epochs", "1"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: split 'train' has no column 'product_id' (--product_id_column)")
