"""Issue 16, index identity: an index belongs to the model's config and weights (`model_fingerprint`), not to the
folder the model was loaded from.

A copy of a checkpoint in another folder reuses its indexes; new weights saved into the same folder (a retrain) do
not; an index saved before indexes recorded the fingerprint (format 1) is refused with the rebuild hint, and shards
built by different weights do not merge. Run on a tiny random 3tower retriever (MiniLM's real tokenizer, a 28-pixel
image processor) over a generated shop catalogue whose image column points to real PNG files made with PIL; the
command-line cases run `mmretrieval search` in-process.
"""

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_towers import IMAGE_SIZE, make_config, write_csv_catalogue
from transformers import AutoTokenizer, CLIPImageProcessorPil

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor, cli
from modeling_mmretrieval.commands.evaluate import model_description
from modeling_mmretrieval.data import load_catalogue
from modeling_mmretrieval.retrieval.index import ProductIndex
from modeling_mmretrieval.retrieval.index_files import (
    META_FILENAME,
    IndexIntegrityError,
    IndexModelMismatchError,
)
from modeling_mmretrieval.retrieval.search import (
    build_product_index,
    config_fingerprint,
    embed_queries,
    model_fingerprint,
    model_identity,
    weights_fingerprint,
)
from modeling_mmretrieval.towers import MissingOfflineTowerError, get_minilm_path

COLOURS = {"Red": (200, 30, 30), "Blue": (30, 30, 200), "Black": (10, 10, 10), "White": (245, 245, 245)}
TYPES = ("Tshirt", "Jeans", "Shirt", "Kurta")
NUM_PRODUCTS = 24
QUERY = "blue cotton shirt"


def png_bytes(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    """A CSV catalogue of clothes, each with a PNG image of its colour."""
    folder = tmp_path_factory.mktemp("shop")
    (folder / "images").mkdir()
    products = []
    for number in range(NUM_PRODUCTS):
        colour, article_type = list(COLOURS)[number % 4], TYPES[(number // 4) % 4]
        image = f"images/{number}.png"
        (folder / image).write_bytes(png_bytes(COLOURS[colour]))
        products.append({
            "product_id": f"p{number:03d}",
            "title": f"{colour} {article_type} {number}",
            "description": f"A {colour.lower()} {article_type.lower()} in soft cotton",
            "image": image,
        })
    return write_csv_catalogue(folder / "products.csv", products)


@pytest.fixture(scope="module")
def catalogue(shop):
    return load_catalogue(shop, split="train", needs_queries=False)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> Path:
    """A tiny random 3tower retriever saved as a checkpoint; tests copy it before changing it."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    except MissingOfflineTowerError as error:
        pytest.skip(str(error))
    config = make_config("3tower-dinov2")
    config.text_config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    folder = tmp_path_factory.mktemp("tiny-3tower")
    MultimodalRetrievalModel(config).save_pretrained(folder)
    MultimodalRetrievalProcessor(
        tokenizer, image_processor, max_query_length=16, max_product_length=32
    ).save_pretrained(folder)
    return folder


@pytest.fixture()
def checkpoint(saved_checkpoint, tmp_path) -> Path:
    """This test's own copy of the checkpoint, at `<tmp>/models/run/final` as a training run would leave it."""
    return Path(shutil.copytree(saved_checkpoint, tmp_path / "models" / "run" / "final"))


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(folder: Path):
    return (MultimodalRetrievalModel.from_pretrained(folder).eval(),
            MultimodalRetrievalProcessor.from_pretrained(folder))


def retrain_in_place(folder: Path) -> None:
    """What a second training run into the same output folder leaves: the same config, other weights."""
    model = MultimodalRetrievalModel.from_pretrained(folder)
    with torch.no_grad():
        model.text_model.embeddings.word_embeddings.weight[1000, 0] += 0.25
    model.save_pretrained(folder)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # only the command's own output (not, say, save_pretrained's progress bar)
    status = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def error_line(stderr: str) -> str:
    """The one error line of a refused command (transformers' progress bars may come before it), no traceback."""
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if "error" in line]
    assert line.startswith("mmretrieval search: error: ") and stderr.rstrip().endswith(line)
    return line


def search_args(checkpoint, index_dir, *extra):
    return ["search", "--model_name_or_path", checkpoint, "--index_dir", index_dir, "--device", "cpu",
            "--query", QUERY, "--top_k", 5, "--output_format", "json", *extra]


def index_file_stamps(index_dir: Path) -> dict:
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in index_dir.iterdir()}


def as_format_1(index_dir: Path) -> None:
    """Rewrites an index's meta file exactly as the format-1 writer left it: no model fingerprint."""
    meta = json.loads((index_dir / META_FILENAME).read_text())
    del meta["model_fingerprint"], meta["provenance_sha256"]
    (index_dir / META_FILENAME).write_text(json.dumps({**meta, "format_version": 1}, indent=2))


# --- the fingerprints ---------------------------------------------------------------------------------------------


def test_the_fingerprint_follows_the_weights_not_the_folder(checkpoint, tmp_path):
    model, _ = load(checkpoint)
    copy, _ = load(Path(shutil.copytree(checkpoint, tmp_path / "elsewhere")))
    assert model_identity(copy) != model_identity(model)
    assert weights_fingerprint(copy) == weights_fingerprint(model)
    assert model_fingerprint(copy) == model_fingerprint(model)
    assert len(model_fingerprint(model)) == 16 and len(weights_fingerprint(model)) == 64
    # The evaluation report carries the same identity an index records.
    assert model_description(copy)["model_fingerprint"] == model_fingerprint(model)

    retrain_in_place(checkpoint)
    retrained, _ = load(checkpoint)
    # What the index used to compare (path and config) cannot tell the retrained model apart; the weights can.
    assert model_identity(retrained) == model_identity(model)
    assert config_fingerprint(retrained.config) == config_fingerprint(model.config)
    assert weights_fingerprint(retrained) != weights_fingerprint(model)
    assert model_fingerprint(retrained) != model_fingerprint(model)
    # The same values in another dtype embed differently, so they are another model too.
    assert model_fingerprint(copy.to(torch.bfloat16)) != model_fingerprint(model)


# --- the library ---------------------------------------------------------------------------------------------------


def test_a_copied_checkpoint_reuses_the_index_and_a_retrain_in_place_is_refused(checkpoint, catalogue, tmp_path):
    model, processor = load(checkpoint)
    index_dir = tmp_path / "indexes" / "shop"
    built = build_product_index(model, processor, catalogue, output_dir=index_dir, show_progress=False)
    recorded = json.loads((index_dir / META_FILENAME).read_text())
    assert recorded["model_fingerprint"] == built.model_fingerprint == model_fingerprint(model)
    assert recorded["model_id"] == model_identity(model)  # kept for people to read

    # The same checkpoint, moved: accepted, and it finds what the original found.
    copy, copy_processor = load(Path(shutil.copytree(checkpoint, tmp_path / "moved" / "final")))
    reused = ProductIndex.load(index_dir, expected_model_fingerprint=model_fingerprint(copy))
    assert reused.ids == built.ids and reused.model_id == model_identity(model)
    queries = embed_queries(copy, copy_processor, [QUERY, "red kurta"])
    assert reused.search(queries, k=5)[1] == built.search(embed_queries(model, processor, [QUERY, "red kurta"]), k=5)[1]

    # New weights saved into the folder the index names: refused, naming both fingerprints and the index folder.
    retrain_in_place(checkpoint)
    retrained, _ = load(checkpoint)
    with pytest.raises(IndexModelMismatchError) as refusal:
        ProductIndex.load(index_dir, expected_model_fingerprint=model_fingerprint(retrained))
    message = str(refusal.value)
    assert str(index_dir) in message and "\n" not in message
    assert model_fingerprint(model) in message and model_fingerprint(retrained) in message


def test_an_index_of_format_1_is_readable_but_matches_no_model(checkpoint, catalogue, tmp_path):
    model, processor = load(checkpoint)
    index_dir = tmp_path / "index"
    built = build_product_index(model, processor, catalogue, output_dir=index_dir, show_progress=False)
    as_format_1(index_dir)
    old = ProductIndex.load(index_dir)  # inspecting it needs no model
    assert old.ids == built.ids and old.model_fingerprint is None and old.config_hash == built.config_hash
    with pytest.raises(IndexModelMismatchError, match=r"index format 1, before .*rebuild the index"):
        ProductIndex.load(index_dir, expected_model_fingerprint=model_fingerprint(model))


def test_an_edited_model_fingerprint_or_model_id_is_detected(checkpoint, catalogue, tmp_path):
    model, processor = load(checkpoint)
    index_dir = tmp_path / "index"
    build_product_index(model, processor, catalogue, output_dir=index_dir, show_progress=False)
    original = json.loads((index_dir / META_FILENAME).read_text())
    for field, value in (("model_fingerprint", "0123456789abcdef"), ("model_id", "org/another-model")):
        (index_dir / META_FILENAME).write_text(json.dumps({**original, field: value}))
        with pytest.raises(IndexIntegrityError, match="provenance checksum"):
            ProductIndex.load(index_dir, expected_model_fingerprint=value)


def test_shards_merge_across_folders_but_not_across_weights(checkpoint, catalogue, tmp_path):
    model, processor = load(checkpoint)
    copy, copy_processor = load(Path(shutil.copytree(checkpoint, tmp_path / "node-1" / "final")))

    def shard(directory: Path, rank: int, shard_model, shard_processor) -> Path:
        build_product_index(shard_model, shard_processor, catalogue, output_dir=directory, shard=(rank, 2),
                            show_progress=False)
        return directory

    first = shard(tmp_path / "shard-0", 0, model, processor)
    # Rank 1 ran on another node, from its own copy of the checkpoint: one model, two folders.
    second = shard(tmp_path / "shard-1", 1, copy, copy_processor)
    merged = ProductIndex.merge([first, second], tmp_path / "merged")
    assert len(merged) == NUM_PRODUCTS and merged.model_fingerprint == model_fingerprint(model)
    whole = build_product_index(model, processor, catalogue, show_progress=False)
    assert merged.ids == whole.ids and torch.allclose(torch.from_numpy(merged.embeddings.copy()),
                                                      torch.from_numpy(whole.embeddings.copy()), atol=1e-6)

    # Rank 1 rebuilt after a retrain into the first folder: same path, same config, other weights.
    retrain_in_place(checkpoint)
    retrained, retrained_processor = load(checkpoint)
    stale = shard(tmp_path / "shard-1-retrained", 1, retrained, retrained_processor)
    with pytest.raises(IndexModelMismatchError, match="cannot merge shards built by different models") as refusal:
        ProductIndex.merge([first, stale], tmp_path / "merged-stale")
    assert str(stale) in str(refusal.value) and model_fingerprint(retrained) in str(refusal.value)
    assert not (tmp_path / "merged-stale").exists()


# --- mmretrieval search --------------------------------------------------------------------------------------------


def test_search_reuses_the_index_from_a_copied_checkpoint_and_refuses_it_after_a_retrain(
    capsys, checkpoint, shop, tmp_path
):
    index_dir = tmp_path / "index"
    status, first, err = run_cli(capsys, *search_args(checkpoint, index_dir, "--dataset", shop, "--split", "train"))
    assert status == 0, err
    stamps = index_file_stamps(index_dir)

    # No catalogue is given: a copy of the checkpoint must reuse the saved index, not rebuild it.
    copied = shutil.copytree(checkpoint, tmp_path / "published" / "tiny-3tower")
    status, out, err = run_cli(capsys, *search_args(copied, index_dir))
    assert status == 0, err
    assert json.loads(out) == json.loads(first)
    assert index_file_stamps(index_dir) == stamps

    retrain_in_place(checkpoint)
    status, out, err = run_cli(capsys, *search_args(checkpoint, index_dir, "--dataset", shop, "--split", "train"))
    assert status == 2 and out == ""
    line = error_line(err)
    retrained, _ = load(checkpoint)
    recorded = json.loads((index_dir / META_FILENAME).read_text())["model_fingerprint"]
    assert str(index_dir) in line and "pass --rebuild_index" in line
    assert f"model_fingerprint={recorded!r}" in line and repr(model_fingerprint(retrained)) in line
    assert index_file_stamps(index_dir) == stamps  # nothing rebuilt behind the user's back

    status, out, err = run_cli(capsys, *search_args(checkpoint, index_dir, "--dataset", shop, "--split", "train",
                                                    "--rebuild_index"))
    assert status == 0, err
    rebuilt = ProductIndex.load(index_dir, expected_model_fingerprint=model_fingerprint(retrained))
    assert rebuilt.model_id == str(checkpoint.resolve())


def test_search_refuses_an_index_of_format_1_with_the_rebuild_hint(capsys, checkpoint, shop, catalogue, tmp_path):
    # Built by the library (no speedups applied): the command's speedups leave the weights, and so the fingerprint,
    # as they are.
    model, processor = load(checkpoint)
    index_dir = tmp_path / "index"
    build_product_index(model, processor, catalogue, output_dir=index_dir, show_progress=False)
    status, _, err = run_cli(capsys, *search_args(checkpoint, index_dir))
    assert status == 0, err

    as_format_1(index_dir)
    status, out, err = run_cli(capsys, *search_args(checkpoint, index_dir))
    assert status == 2 and out == ""
    line = error_line(err)
    assert "index format 1" in line and str(index_dir) in line and "pass --rebuild_index" in line

    status, out, err = run_cli(capsys, *search_args(checkpoint, index_dir, "--dataset", shop, "--split", "train",
                                                    "--rebuild_index"))
    assert status == 0, err
    meta = json.loads((index_dir / META_FILENAME).read_text())
    assert (meta["format_version"], meta["model_fingerprint"]) == (2, model_fingerprint(model))
