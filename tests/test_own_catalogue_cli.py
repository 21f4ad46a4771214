"""Issue 15 from the command line: a shop's own catalogue (its own column names, image paths relative to the data
file, some images missing or broken, no fashion attributes) through every verb, run in-process with
`modeling_mmretrieval.cli.main` on tiny towers.

Each verb either succeeds with a correct image report or fails before any model is loaded with one line on
stderr (exit status 2, no traceback). Up-front failures are shown to come before the model by giving a
checkpoint path that does not exist: a check that ran after loading would report that path instead.
"""

import csv
import io
import json
import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from tiny_towers import make_config
from transformers import AutoTokenizer, BertConfig, BertModel, BitImageProcessor, Dinov2Config, Dinov2Model

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor, cli
from modeling_mmretrieval.data.catalogue import CatalogueColumnError, CatalogueColumns, load_catalogue
from modeling_mmretrieval.retrieval.index import ProductIndex
from modeling_mmretrieval.towers import MissingOfflineTowerError, get_minilm_path

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 28
NUM_PRODUCTS = 40
MISSING_EVERY, CORRUPT_EVERY = 5, 20  # 20% missing, 5% corrupt
CATALOGUE_FLAGS = ["--product_id_column", "sku", "--title_column", "name", "--description_column", "desc",
                   "--image_column", "img_path"]
NO_MODEL = "no/such-model-folder"  # a check that passes with this path ran before loading the model
BIT_PREPROCESSOR = dict(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 160, 30), "black": (10, 10, 10)}
NOUNS = ("mug", "lamp", "kettle", "chair", "vase")


@pytest.fixture(autouse=True)
def one_thread_and_fresh_accelerate():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def tokenizer_path():
    try:
        return get_minilm_path()
    except MissingOfflineTowerError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def towers(tmp_path_factory, tokenizer_path) -> dict[str, Path]:
    """Tiny pretrained towers (a 2-layer BERT with the MiniLM tokenizer, a 1-layer DINOv2 on 28 px images) and a
    tiny 3tower retriever checkpoint made of them."""
    root = tmp_path_factory.mktemp("towers")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=128)).save_pretrained(root / "text")
    tokenizer.save_pretrained(root / "text")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                             image_size=IMAGE_SIZE, patch_size=14)).save_pretrained(root / "vision")
    BitImageProcessor(**BIT_PREPROCESSOR).save_pretrained(root / "vision")
    config = make_config("3tower-residual")
    config.text_config.vocab_size = len(tokenizer)
    processor = MultimodalRetrievalProcessor(
        tokenizer, image_processor=BitImageProcessor(**BIT_PREPROCESSOR), max_query_length=16, max_product_length=32
    )
    MultimodalRetrievalModel(config).save_pretrained(root / "checkpoint")
    processor.save_pretrained(root / "checkpoint")
    return {"text": root / "text", "vision": root / "vision", "checkpoint": root / "checkpoint"}


def jpeg_bytes(colour: tuple[int, int, int], size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def product_rows(num_products: int = NUM_PRODUCTS) -> list[dict]:
    rows = []
    for number in range(num_products):
        colour, noun = list(COLOURS)[number % len(COLOURS)], NOUNS[number % len(NOUNS)]
        rows.append({"sku": f"sku-{number}", "name": f"{colour.title()} {noun} {number}",
                     "desc": f"A {colour} {noun} for the home", "img_path": f"images/{number}.jpg",
                     "query": f"{colour} {noun}"})
    return rows


def write_shop(folder: Path, rows: list[dict], *, fmt: str = "csv", name: str = "products") -> Path:
    """A catalogue file with relative image paths: every MISSING_EVERY-th image file is absent, every
    CORRUPT_EVERY-th holds bytes that are not an image, the rest are real JPEGs."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for number, row in enumerate(rows):
        path = folder / (row.get("img_path") or "")
        if not row.get("img_path") or row["img_path"].startswith("http") or number % MISSING_EVERY == 1:
            continue
        colour = COLOURS[row["desc"].split()[1]] if len(row["desc"].split()) > 1 else (0, 0, 0)
        path.write_bytes(b"not an image at all" if number % CORRUPT_EVERY == 3 else jpeg_bytes(colour))
    data_file = folder / f"{name}.{fmt}"
    if fmt == "csv":
        with data_file.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "jsonl":
        data_file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), data_file)
    return data_file


def expected_images(num_products: int = NUM_PRODUCTS) -> dict[str, int]:
    missing = sum(number % MISSING_EVERY == 1 for number in range(num_products))
    corrupt = sum(number % CORRUPT_EVERY == 3 and number % MISSING_EVERY != 1 for number in range(num_products))
    return {"ok": num_products - missing - corrupt, "missing": missing, "undecodable": corrupt, "refused": 0}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    status = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def refused(capsys, *argv) -> str:
    """The one error line of a command that must fail up front: status 2, no traceback."""
    status, _, err = run_cli(capsys, *argv)
    assert status == 2, err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, err
    return error_lines[0]


@pytest.fixture
def shop(tmp_path, monkeypatch) -> Path:
    """A CSV catalogue in its own folder, the working directory being another folder."""
    data_file = write_shop(tmp_path / "shop", product_rows())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return data_file


# ----------------------------------------------------------------------------------------------------------------
# index
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_index_resolves_images_against_the_data_file_and_reports_them(tmp_path, monkeypatch, capsys, towers, fmt):
    data_file = write_shop(tmp_path / "shop", product_rows(), fmt=fmt)
    monkeypatch.chdir(tmp_path)  # not the data file's folder: relative paths must not resolve against it
    status, out, err = run_cli(capsys, "index", "--model_name_or_path", towers["checkpoint"], "--dataset", data_file,
                               *CATALOGUE_FLAGS, "--output_dir", tmp_path / "index", "--device", "cpu")
    assert status == 0, err
    assert "one split, 'train'" in err  # a single file is split "train", and the default follows
    assert f"Indexed {NUM_PRODUCTS} products" in out
    report = json.loads((tmp_path / "index" / "image_report.json").read_text())
    assert {status: report[status] for status in ("ok", "missing", "undecodable", "refused")} == expected_images()
    summary = next(line for line in err.splitlines() if line.startswith("images: "))
    assert f"{expected_images()['ok']} ok" in summary and "'sku-1'" in summary  # sku-1's file is missing
    assert len(ProductIndex.load(tmp_path / "index")) == NUM_PRODUCTS


def test_index_refuses_bad_products_up_front_and_skips_them_on_request(shop, tmp_path, capsys, caplog, towers):
    rows = product_rows()
    rows[7]["name"], rows[7]["desc"] = "   ", ""
    rows[12]["sku"] = "sku-3"  # a duplicate id
    data_file = write_shop(shop.parent, rows)
    line = refused(capsys, "index", "--model_name_or_path", NO_MODEL, "--dataset", data_file, *CATALOGUE_FLAGS,
                   "--output_dir", tmp_path / "index")
    assert "product 'sku-3', column 'sku': duplicate id" in line or "product 'sku-7', column 'name'" in line
    assert "--skip_bad_rows" in line and NO_MODEL not in line

    status, out, err = run_cli(capsys, "index", "--model_name_or_path", towers["checkpoint"], "--dataset", data_file,
                               *CATALOGUE_FLAGS, "--output_dir", tmp_path / "index", "--skip_bad_rows")
    assert status == 0, err
    published = tmp_path / "index" / "bad_rows.jsonl"  # not the staging folder the file was first written to
    assert f"left out 2 bad products of {NUM_PRODUCTS}, listed in {published}" in caplog.text
    bad = [json.loads(line) for line in (tmp_path / "index" / "bad_rows.jsonl").read_text().splitlines()]
    assert {(row["product_id"], row["column"]) for row in bad} == {("sku-7", "name"), ("sku-3", "sku")}
    index = ProductIndex.load(tmp_path / "index")
    assert len(index) == NUM_PRODUCTS - 2 and "sku-7" not in set(index.ids) and "sku-3" in set(index.ids)


def test_strict_images_fail_the_index_and_leave_none(shop, tmp_path, capsys, towers):
    line = refused(capsys, "index", "--model_name_or_path", towers["checkpoint"], "--dataset", shop, *CATALOGUE_FLAGS,
                   "--output_dir", tmp_path / "index", "--strict_images")
    assert "--strict_images" in line
    assert not (tmp_path / "index").exists() and not (tmp_path / "index.shards").exists()
    line = refused(capsys, "search", "--model_name_or_path", towers["checkpoint"], "--dataset", shop, *CATALOGUE_FLAGS,
                   "--index_dir", tmp_path / "search-index", "--query", "red mug", "--on_image_error", "raise")
    assert "--on_image_error raise" in line and f"{expected_images()['missing']} missing" in line
    assert not (tmp_path / "search-index").exists()  # no index is saved that a later run would reuse


def test_image_urls_are_refused_without_the_opt_in_and_counted(tmp_path, capsys, towers, caplog):
    rows = product_rows(12)
    for row in rows:
        row["img_path"] = f"http://127.0.0.1:9/{row['sku']}.jpg"
    data_file = write_shop(tmp_path / "shop", rows)
    status, _, err = run_cli(capsys, "index", "--model_name_or_path", towers["checkpoint"], "--dataset", data_file,
                             *CATALOGUE_FLAGS, "--output_dir", tmp_path / "index")
    assert status == 0, err
    report = json.loads((tmp_path / "index" / "image_report.json").read_text())
    assert (report["refused"], report["ok"], report["failure_share"]) == (12, 0, 1.0)
    assert "--fetch_images" in err  # the reason names the opt-in


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_an_image_column_without_a_single_value_is_indexed_loudly_text_only(tmp_path, capsys, caplog, towers, fmt):
    rows = product_rows(12)
    for row in rows:
        row["img_path"] = None  # an empty CSV cell, a JSON null: read as a column of null numbers
    data_file = write_shop(tmp_path / "shop", rows, fmt=fmt)
    status, _, err = run_cli(capsys, "index", "--model_name_or_path", towers["checkpoint"], "--dataset", data_file,
                             *CATALOGUE_FLAGS, "--output_dir", tmp_path / "index")
    assert status == 0, err
    report = json.loads((tmp_path / "index" / "image_report.json").read_text())
    assert (report["ok"], report["missing"]) == (0, 12)
    assert "100% of product images failed" in caplog.text  # loud: over --max_image_failure_share


# ----------------------------------------------------------------------------------------------------------------
# search, evaluate, data-stats
# ----------------------------------------------------------------------------------------------------------------


def test_search_defaults_to_the_only_split_of_a_single_file(shop, tmp_path, capsys, towers):
    status, out, err = run_cli(capsys, "search", "--model_name_or_path", towers["checkpoint"], "--dataset", shop,
                               *CATALOGUE_FLAGS, "--index_dir", tmp_path / "index", "--query", "red mug",
                               "--top_k", 3, "--output_format", "json")
    assert status == 0, err
    results = json.loads(out)[0]["results"]
    assert len(results) == 3 and all(result["product_id"].startswith("sku-") for result in results)
    assert any(line.startswith("images: ") for line in err.splitlines())


def test_evaluate_without_attributes_reads_a_jsonl_or_csv_queries_file(shop, tmp_path, capsys, towers):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"{colour} things", "product_id": f"sku-{number}"}) + "\n"
                             for number, colour in [(0, "red"), (4, "red"), (1, "blue")]))
    lists = tmp_path / "queries.csv"
    lists.write_text("query,relevant_ids\nred things,sku-0|sku-4\nblue things,sku-1\n")
    reports = []
    for queries_file in (pairs, lists):
        report_file = tmp_path / f"{queries_file.stem}-report.json"
        status, out, err = run_cli(capsys, "evaluate", "--model_name_or_path", towers["checkpoint"], "--dataset", shop,
                                   *CATALOGUE_FLAGS, "--query_column", "none", "--queries_file", queries_file,
                                   "--k_values", 5, "--output_file", report_file)
        assert status == 0, err
        reports.append(json.loads(report_file.read_text()))
    assert reports[0]["metrics"] == reports[1]["metrics"] and reports[0]["num_queries"] == 2
    assert reports[0]["images"]["missing"] == expected_images()["missing"]

    line = refused(capsys, "evaluate", "--model_name_or_path", NO_MODEL, "--dataset", shop, *CATALOGUE_FLAGS,
                   "--query_column", "none")
    assert "--queries_file" in line and "--article_type_column" in line and "CatalogueColumns" not in line


def test_evaluate_reads_queries_from_the_catalogue_query_column(shop, tmp_path, capsys, towers):
    status, _, err = run_cli(capsys, "evaluate", "--model_name_or_path", towers["checkpoint"], "--dataset", shop,
                             *CATALOGUE_FLAGS, "--k_values", 5, "--output_file", tmp_path / "report.json")
    assert status == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_queries"] == len(COLOURS) * len(NOUNS)  # one query per distinct (colour, noun)
    assert report["queries"]["source"] == "query column 'query'"


def test_data_stats_maps_columns_and_reports_images(shop, capsys):
    status, out, err = run_cli(capsys, "data-stats", "--dataset", shop, *CATALOGUE_FLAGS, "--query_column", "none")
    assert status == 0, err
    row = next(line for line in out.splitlines() if line.startswith("train"))
    assert row.split()[1:3] == [str(NUM_PRODUCTS), "-"]  # no article type column
    summary = next(line for line in out.splitlines() if line.startswith("train: images: "))
    assert f"{expected_images()['missing']} missing" in summary


# ----------------------------------------------------------------------------------------------------------------
# up-front refusals: one line, exit status 2, before any model
# ----------------------------------------------------------------------------------------------------------------


def test_column_errors_name_the_flag_not_the_python_api(shop, tmp_path, capsys):
    line = refused(capsys, "index", "--model_name_or_path", NO_MODEL, "--dataset", shop, *CATALOGUE_FLAGS[2:],
                   "--output_dir", tmp_path / "i")
    assert "'product_id' (--product_id_column)" in line and "CatalogueColumns" not in line
    line = refused(capsys, "index", "--model_name_or_path", NO_MODEL, "--dataset", shop, "--output_dir", tmp_path / "i")
    assert "--title_column" in line
    line = refused(capsys, "search", "--model_name_or_path", NO_MODEL, "--dataset", shop, *CATALOGUE_FLAGS,
                   "--base_colour_column", "colour", "--query", "red")
    assert "'colour' (--base_colour_column)" in line and "available columns" in line
    line = refused(capsys, "data-stats", "--dataset", shop, *CATALOGUE_FLAGS, "--split", "test")
    assert "'test'" in line and "train" in line


def test_a_file_that_does_not_parse_is_named_with_the_parser_reason(shop, tmp_path, capsys):
    rows = product_rows(6)
    rows[4]["name"] = "broken \ud800 title"  # json.dumps writes the lone surrogate as an escape no parser accepts
    data_file = write_shop(tmp_path / "other", rows, fmt="jsonl")
    line = refused(capsys, "index", "--model_name_or_path", NO_MODEL, "--dataset", data_file, *CATALOGUE_FLAGS,
                   "--output_dir", tmp_path / "index")
    assert str(data_file) in line and "surrogate" in line and "row 4" in line and "(--dataset)" in line


def test_splits_whose_columns_differ_name_the_split_and_the_column(tmp_path, capsys):
    folder = tmp_path / "splits"
    write_shop(folder, product_rows(12), name="train")
    renamed = [{("title" if key == "name" else key): value for key, value in row.items()} for row in product_rows(6)]
    write_shop(folder, renamed, name="validation")  # this split calls its title column `title`
    line = refused(capsys, "data-stats", "--dataset", folder, *CATALOGUE_FLAGS, "--query_column", "none")
    assert "split 'validation' has no column 'name' (--title_column)" in line
    # Splits that differ only in columns nobody asked for load, each with its own columns.
    extra = [{**row, "material": "steel"} for row in product_rows(6)]
    write_shop(folder, extra, name="validation")
    status, out, err = run_cli(capsys, "data-stats", "--dataset", folder, *CATALOGUE_FLAGS, "--query_column", "none")
    assert status == 0, err
    assert [line.split()[:2] for line in out.splitlines() if line.split()[:1] in (["train"], ["validation"])] == [
        ["train", "12"], ["validation", "6"]]


def test_one_split_of_a_data_files_mapping_is_read_alone(tmp_path):
    train = write_shop(tmp_path / "a", product_rows(12), name="train")
    renamed = [{("title" if key == "name" else key): value for key, value in row.items()} for row in product_rows(6)]
    validation = write_shop(tmp_path / "b", renamed, name="validation")  # this split calls its title `title`
    files = {"train": str(train), "validation": str(validation)}
    columns = CatalogueColumns(product_id="sku", title="name", description="desc", image="img_path")
    assert len(load_catalogue(data_files=files, split="train", columns=columns, needs_queries=False)) == 12
    with pytest.raises(CatalogueColumnError, match="split 'validation' has no column 'name'"):
        load_catalogue(data_files=files, split="validation", columns=columns, needs_queries=False)
    with pytest.raises(KeyError, match="no 'test' split in data_files"):
        load_catalogue(data_files=files, split="test", columns=columns, needs_queries=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_cuda_is_refused(shop, tmp_path, capsys):
    line = refused(capsys, "index", "--model_name_or_path", NO_MODEL, "--dataset", shop, *CATALOGUE_FLAGS,
                   "--output_dir", tmp_path / "index", "--device", "cuda")
    assert "--device cuda" in line and "CUDA is not available" in line


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--logging_steps", "0"], "--logging_steps"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
        (["--checkpointing_steps", "-1"], "--checkpointing_steps"),
        (["--max_image_failure_share", "1.5"], "--max_image_failure_share"),
        (["--max_product_length", "4096"], "--max_product_length"),
        (["--title_column", "nope"], "--title_column"),
        (["--eval_split", "dev", "--validation_share", "0"], "--eval_split"),
        (["--text_tower_anchor", "-1"], "--text_tower_anchor"),
        (["--text_tower_anchor", "1", "--mini_batch_size", "8"], "--text_tower_anchor"),
        (["--architecture", "text_only", "--text_tower_anchor", "1"], "--text_tower_anchor"),
        (["--image_branch_weight", "-1"], "--image_branch_weight"),
        (["--architecture", "text_only", "--image_branch_weight", "0.5"], "--image_branch_weight"),
        (["--architecture", "4tower", "--fusion", "concat", "--image_branch_weight", "0.5"], "--image_branch_weight"),
    ],
)
def test_train_refuses_bad_flags_before_loading_a_model(shop, tmp_path, capsys, towers, flags, named):
    line = refused(capsys, "train", "--dataset", shop, *CATALOGUE_FLAGS, "--text_model", towers["text"],
                   "--vision_model", NO_MODEL, "--output_dir", tmp_path / "run", *flags)
    assert named in line and NO_MODEL not in line


@pytest.mark.parametrize("flag", ["--visual_word_restoration", "--text_tower_anchor", "--image_branch_weight"])
def test_a_text_only_checkpoint_given_an_image_setting_is_refused_in_one_line(shop, tmp_path, capsys, towers, flag):
    checkpoint = tmp_path / "text_only"
    tokenizer = AutoTokenizer.from_pretrained(towers["text"])
    config = make_config("text_only")
    config.text_config.vocab_size = len(tokenizer)
    MultimodalRetrievalModel(config).save_pretrained(checkpoint)
    MultimodalRetrievalProcessor(tokenizer, max_query_length=16, max_product_length=32).save_pretrained(checkpoint)
    line = refused(capsys, "train", "--dataset", shop, *CATALOGUE_FLAGS, "--model_name_or_path", checkpoint,
                   "--output_dir", tmp_path / "run", "--max_train_steps", "1", "--eval_split", "none", flag, "0.5")
    assert flag in line and "text_only" in line


def test_train_refuses_a_catalogue_without_queries_or_article_types(shop, tmp_path, capsys, towers):
    line = refused(capsys, "train", "--dataset", shop, *CATALOGUE_FLAGS, "--query_column", "none",
                   "--text_model", towers["text"], "--output_dir", tmp_path / "run")
    assert "--query_column" in line and "--article_type_column" in line


# ----------------------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------------------


def test_train_on_a_single_file_with_a_query_column_holds_out_validation(shop, tmp_path, capsys, towers, caplog):
    rows = product_rows()
    rows[9]["name"] = rows[9]["desc"] = " "
    data_file = write_shop(shop.parent, rows)
    caplog.set_level("INFO")
    status, _, err = run_cli(
        capsys, "train", "--dataset", data_file, *CATALOGUE_FLAGS, "--text_model", towers["text"],
        "--vision_model", towers["vision"], "--image_size", IMAGE_SIZE, "--per_device_train_batch_size", 8,
        "--max_train_steps", 2, "--max_eval_queries", 10, "--logging_steps", 1, "--skip_bad_rows",
        "--output_dir", tmp_path / "run",
    )
    assert status == 0, err
    assert "holding out 4 of 39 products" in caplog.text
    bad = [json.loads(line) for line in (tmp_path / "run" / "bad_rows.jsonl").read_text().splitlines()]
    assert [(row["product_id"], row["column"]) for row in bad] == [("sku-9", "name")]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["training"]["completed_steps"] == 2
    assert (tmp_path / "run" / "final" / "config.json").is_file()


# ----------------------------------------------------------------------------------------------------------------
# docs/data.md: the "your own catalogue" walk-through runs as written (tiny towers in place of the defaults)
# ----------------------------------------------------------------------------------------------------------------


def walkthrough_commands() -> list[list[str]]:
    text = (REPO_ROOT / "docs" / "data.md").read_text(encoding="utf-8")
    block = text.split("<!-- walkthrough:start -->", 1)[1].split("<!-- walkthrough:end -->", 1)[0]
    script = re.search(r"```bash\n(.*?)```", block, re.S).group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in script.splitlines() if line.startswith("mmretrieval ")]


def test_the_own_catalogue_walkthrough_in_the_docs_runs(tmp_path, monkeypatch, capsys, towers):
    commands = walkthrough_commands()
    assert [command[1] for command in commands] == ["data-stats", "train", "index", "search"]
    write_shop(tmp_path / "shop", product_rows(), name="products")
    monkeypatch.chdir(tmp_path)
    tiny = {"train": ["--text_model", str(towers["text"]), "--architecture", "3tower", "--vision_model", str(towers["vision"]),
                      "--image_size", str(IMAGE_SIZE), "--max_train_steps", "2", "--max_eval_queries", "10"]}
    for command in commands:
        status, out, err = run_cli(capsys, *command[1:], *tiny.get(command[1], []))
        assert status == 0, f"{shlex.join(command)}\n{err}"
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert "sku-" in out  # the search printed products


# ----------------------------------------------------------------------------------------------------------------
# a catalogue without an image column; the evaluator's image report
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def image_less_shop(tmp_path, monkeypatch) -> Path:
    """A CSV catalogue with no image column at all (`sku,name,desc,query`), read from another directory."""
    rows = [{key: value for key, value in row.items() if key != "img_path"} for row in product_rows()]
    data_file = write_shop(tmp_path / "shop", rows)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return data_file


def test_a_catalogue_without_an_image_column_is_announced_once_and_indexed_text_only(
    image_less_shop, tmp_path, capsys, caplog, towers
):
    text_flags = CATALOGUE_FLAGS[:6]  # id, title, description: no --image_column
    status, out, err = run_cli(capsys, "index", "--model_name_or_path", towers["checkpoint"], "--dataset",
                               image_less_shop, *text_flags, "--output_dir", tmp_path / "index")
    assert status == 0, err
    assert err.count("has no image column 'image' (--image_column)") == 1
    assert "product images failed" not in caplog.text  # said once, up front, not again as a failure share
    report = json.loads((tmp_path / "index" / "image_report.json").read_text())
    assert (report["ok"], report["missing"], report["total"]) == (0, NUM_PRODUCTS, NUM_PRODUCTS)
    index = ProductIndex.load(tmp_path / "index")
    assert len(index) == NUM_PRODUCTS and np.isfinite(index.embeddings).all()

    status, out, err = run_cli(capsys, "search", "--model_name_or_path", towers["checkpoint"], "--dataset",
                               image_less_shop, *text_flags, "--index_dir", tmp_path / "fresh-index",
                               "--query", "red mug", "--top_k", 3, "--output_format", "json")
    assert status == 0, err
    assert [result["product_id"] for result in json.loads(out)[0]["results"]][0].startswith("sku-")

    # Naming an image column the catalogue lacks, or asking for strict images, fails before any model.
    line = refused(capsys, "index", "--model_name_or_path", NO_MODEL, "--dataset", image_less_shop,
                   *CATALOGUE_FLAGS, "--output_dir", tmp_path / "i")
    assert "'img_path' (--image_column)" in line
    for strict in (["--strict_images"], ["--on_image_error", "raise"]):
        line = refused(capsys, "index", "--model_name_or_path", NO_MODEL, "--dataset", image_less_shop, *text_flags,
                       "--output_dir", tmp_path / "i", *strict)
        assert "no image column" in line and strict[0] in line and NO_MODEL not in line


def test_a_catalogue_without_an_image_column_trains_and_counts_text_stats(image_less_shop, tmp_path, capsys, towers):
    text_flags = CATALOGUE_FLAGS[:6]
    status, out, err = run_cli(capsys, "data-stats", "--dataset", image_less_shop, *text_flags)
    assert status == 0, err
    assert "train: images: none (no image column" in out
    status, _, err = run_cli(
        capsys, "train", "--dataset", image_less_shop, *text_flags, "--text_model", towers["text"],
        "--vision_model", towers["vision"], "--image_size", IMAGE_SIZE, "--per_device_train_batch_size", 8,
        "--max_train_steps", 2, "--max_eval_queries", 10, "--output_dir", tmp_path / "run",
    )
    assert status == 0, err
    assert err.count("every product is embedded from its text alone") == 1
    # No --architecture: the default multimodal model needs images, so a text_only model is trained, and said so.
    assert err.count("no image column: training a text_only model") == 1
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["training"]["completed_steps"] == 2
    assert "images" not in results  # a text_only model reads no image
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["architecture"] == "text_only"
    assert all(math.isfinite(value) for value in results["after"].values())


def test_evaluate_reports_the_images_of_both_compared_models(shop, tmp_path, capsys, towers):
    status, _, err = run_cli(capsys, "evaluate", "--model_name_or_path", towers["checkpoint"], "--dataset", shop,
                             *CATALOGUE_FLAGS, "--k_values", 5, "--compare_to", towers["checkpoint"],
                             "--output_file", tmp_path / "report.json")
    assert status == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    expected = expected_images()
    for images in (report["images"], report["comparison"]["images"]):
        assert {status: images[status] for status in expected} == expected
    assert sum(line.split(": ", 1)[-1].startswith("images: ") for line in err.splitlines()) == 2


def test_an_evaluation_split_that_gives_no_query_is_said_and_training_goes_on(caplog):
    from types import SimpleNamespace

    import datasets
    from accelerate import PartialState

    from modeling_mmretrieval.data.catalogue import CatalogueColumns
    from modeling_mmretrieval.training.training_data import TrainingData, build_evaluator

    # A shop's small validation split with no attribute a query could be derived from.
    products = datasets.Dataset.from_list([{"product_id": f"sku-{i}", "title": f"Gift card {i}", "description": "",
                                            "image": None} for i in range(24)])
    data = TrainingData(products=products, pairs=products, queries_are_derived=True, eval_products=products)
    args = SimpleNamespace(max_eval_queries=100, seed=0, per_device_eval_batch_size=8, eval_split="validation")
    accelerator = SimpleNamespace(is_main_process=True)
    PartialState()  # the trainer's logger is accelerate's
    with caplog.at_level("WARNING"):
        assert build_evaluator(args, accelerator, None, None, data, CatalogueColumns(), cache_image_features=True) is None
    assert "No evaluation: the 24 products of --eval_split validation give no attribute-derived evaluation query" in caplog.text
