"""The train command (`mmretrieval train`, `examples/train.py`) end to end on tiny towers and small slices of the
committed sample, and the training building blocks it runs on.

The text tower is a 2-layer, 32-wide BERT with the real all-MiniLM-L6-v2 tokenizer (its vocabulary size), the
vision tower a 1-layer DINOv2 on 28 px images. Runs that must be separate processes (SIGKILL, HF_ENDPOINT) are
subprocesses; the rest call `commands.train.run()` in-process.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from hub_server import MiniHub
from safetensors.torch import load_file
from tiny_towers import dinov2_preprocessor, save_tiny_pretrained_towers
from transformers import (
    AutoModel,
)

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
from modeling_mmretrieval.commands import train as train_command
from modeling_mmretrieval.data import (
    SAMPLE_DATA_DIR,
    load_catalogue,
    make_training_pairs,
)
from modeling_mmretrieval.data.collator import RetrievalCollator
from modeling_mmretrieval.data.images import load_product_image
from modeling_mmretrieval.retrieval.held_out_evaluation import HeldOutEvaluator
from modeling_mmretrieval.training.checkpoints import (
    ABANDONED_DIR,
    COMPLETION_MARKER,
    MODEL_SUBDIR,
    ROLLBACK_JOURNAL,
    TRAINER_STATE_NAME,
    CheckpointMismatchError,
    checkpoint_problem,
    find_latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    mark_complete,
    resolve_checkpoint,
    start_lineage,
    temporary_dir_for,
)
from modeling_mmretrieval.training.image_feature_cache import (
    check_cached_image_features,
    precompute_image_features,
)
from modeling_mmretrieval.training.model_builder import build_model_and_processor
from modeling_mmretrieval.training.optimization import (
    EpochSeededSampler,
    NonFiniteLossError,
    build_lr_scheduler,
    parameter_groups,
    training_length,
)
from modeling_mmretrieval.training.reporting import format_results_table
from modeling_mmretrieval.training.trainer import (
    build_loss_fn,
    continue_schedule,
    trackers_for,
    training_step,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "examples" / "train.py"
TRAIN_ROWS, EVAL_ROWS, BATCH_SIZE, IMAGE_SIZE = 96, 48, 16, 28
DINOV2_PREPROCESSOR = dinov2_preprocessor(IMAGE_SIZE)


@pytest.fixture(autouse=True)
def isolated_runs():
    """One intra-op thread: tiny models on a shared CPU train twice as fast, and runs compared bit for bit (in this
    process and in subprocesses, see `subprocess_env`) must use the same thread count. Accelerate's process-wide
    state is reset after each test, as accelerate's own `AccelerateTestCase` does, so in-process runs (one of
    which stops with an exception mid-epoch) do not leak into each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Tiny pretrained towers and a small catalogue (train/validation parquet slices of the sample)."""
    root = tmp_path_factory.mktemp("train_assets")
    save_tiny_pretrained_towers(root, IMAGE_SIZE)
    (root / "data").mkdir()
    for split, rows in (("train", TRAIN_ROWS), ("validation", EVAL_ROWS)):
        sample = pq.read_table(SAMPLE_DATA_DIR / f"{split}.parquet")
        pq.write_table(sample.slice(0, rows), root / "data" / f"{split}.parquet")
    return {"root": root, "text": root / "text", "vision": root / "vision", "data": root / "data"}


def train_args(assets, output_dir, *extra, towers: bool = True) -> list[str]:
    args = ["--dataset", str(assets["data"]), "--output_dir", str(output_dir), "--image_size", str(IMAGE_SIZE),
            "--per_device_train_batch_size", str(BATCH_SIZE), "--max_eval_queries", "30", "--logging_steps", "2"]
    if towers:
        args += ["--text_model", str(assets["text"]), "--vision_model", str(assets["vision"])]
        if "--architecture" not in extra:  # these tests exercise the 3tower path; 4tower has its own
            args += ["--architecture", "3tower"]
    return args + [str(value) for value in extra]


def subprocess_env(**overrides) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    env.update(overrides)
    return env


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# Small building blocks
# ----------------------------------------------------------------------------------------------------------------


def test_parameter_groups_split_towers_head_and_decay(assets):
    model = MultimodalRetrievalModel.from_towers_pretrained(str(assets["text"]), str(assets["vision"]))
    groups = {g["name"]: g for g in parameter_groups(model, tower_learning_rate=2e-5, head_learning_rate=1e-3,
                                                      weight_decay=0.01)}
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = {g: {names[id(p)] for p in group["params"]} for g, group in groups.items()}
    assert {g: (groups[g]["lr"], groups[g]["weight_decay"]) for g in groups} == {
        "towers": (2e-5, 0.01), "towers_no_decay": (2e-5, 0.0), "head": (1e-3, 0.01), "head_no_decay": (1e-3, 0.0)
    }
    assert "logit_scale" in grouped["head_no_decay"] and "missing_image_embedding" in grouped["head_no_decay"]
    assert "text_model.encoder.layer.0.attention.self.query.weight" in grouped["towers"]
    assert "text_model.encoder.layer.0.attention.self.query.bias" in grouped["towers_no_decay"]
    assert "text_model.embeddings.LayerNorm.weight" in grouped["towers_no_decay"]
    assert "product_fusion.layers.0.weight" in grouped["head"]
    # The frozen vision tower is in no group; every trainable parameter is in exactly one.
    assert not any(name.startswith("vision_model") for members in grouped.values() for name in members)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(n for members in grouped.values() for n in members) == sorted(trainable)


def test_training_length_and_seeded_order():
    assert training_length(10, 4, 2.0, None) == (3, 6, 2)  # the last partial window still steps
    assert training_length(10, 1, 1.0, 25) == (10, 25, 3)
    with pytest.raises(ValueError, match="fewer training pairs than one batch"):
        training_length(0, 1, 1.0, None)
    sampler = EpochSeededSampler(50, seed=3)
    first = list(sampler)
    assert first == list(EpochSeededSampler(50, seed=3)) and sorted(first) == list(range(50))
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_results_table_lists_metrics_and_slices():
    before = {"eval/recall@10": 0.1, "eval/mrr@10": 0.05, "eval/slice/recall@10": 0.0, "eval/num_queries": 30.0}
    after = {"eval/recall@10": 0.35, "eval/mrr@10": 0.2, "eval/slice/recall@10": 0.5, "eval/num_queries": 30.0}
    lines = format_results_table(before, after).splitlines()
    assert lines[0].split() == ["metric", "before", "after", "change"]
    assert [line.split() for line in lines[1:]] == [
        ["recall@10", "0.1000", "0.3500", "+0.2500"], ["mrr@10", "0.0500", "0.2000", "+0.1500"],
        ["slice/recall@10", "0.0000", "0.5000", "+0.5000"],
    ]


# ----------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------


def test_short_run_saves_a_loadable_model_results_and_card(assets, tmp_path):
    results = train_command.run(train_args(assets, tmp_path / "run", "--max_train_steps", 6, "--eval_steps", 3,
                                           "--warmup_steps", 0))
    final = tmp_path / "run" / "final"
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["training"]["completed_steps"] == 6 and on_disk["training"]["skipped_steps"] == 0
    for metrics in (on_disk["before"], on_disk["after"], on_disk["history"][0]):
        assert {"eval/recall@10", "eval/recall@100", "eval/ndcg@10", "eval/mrr@10"} <= set(metrics)
        assert 0.0 <= metrics["eval/recall@10"] <= metrics["eval/recall@100"] <= 1.0
    assert on_disk["history"][0]["step"] == 3 and results["after"] == on_disk["after"]

    model = MultimodalRetrievalModel.from_pretrained(final)
    processor = MultimodalRetrievalProcessor.from_pretrained(final)
    assert processor.image_processor.crop_size == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    saved, tiny_text, tiny_vision = weights(final), weights(assets["text"]), weights(assets["vision"])
    # The text tower was trained, the frozen vision tower was not.
    assert not torch.equal(saved["text_model.encoder.layer.0.attention.self.query.weight"],
                           tiny_text["encoder.layer.0.attention.self.query.weight"])
    assert all(torch.equal(saved[f"vision_model.{name}"], tensor) for name, tensor in tiny_vision.items())
    # The reloaded model reproduces the evaluation it was saved with (held-out phrasings, text-silent slice,
    # degraded-text variant).
    evaluator = HeldOutEvaluator(load_catalogue(assets["data"], split="validation"), num_queries=30, seed=42,
                                 processor=processor, name="eval")
    reloaded = evaluator(model)
    assert reloaded["eval/degraded/num_queries"] > 0
    assert reloaded["eval/ndcg@10"] == pytest.approx(on_disk["after"]["eval/ndcg@10"], abs=1e-6)
    card = (final / "README.md").read_text()
    assert card.startswith("---\n") and "attribute-derived" in card and "| recall@10 |" in card
    # The towers are named by their folder, never by the absolute path of this machine.
    assert "| text | `text` |" in card and str(assets["root"]) not in card and "library_name: transformers" in card


def test_dataset_queries_are_used_when_the_catalogue_has_them(assets, tmp_path):
    """A catalogue with its own (query, product) rows: a product may appear in several rows, and every product
    a query text is paired with is relevant to it."""
    for split in ("train", "validation"):
        table = pq.read_table(assets["data"] / f"{split}.parquet")
        article_types = table["article_type"].to_pylist()
        brand_queries = [f"{b} {a}".lower() for b, a in zip(table["brand"].to_pylist(), article_types)]
        colour_queries = [f"{c} {a}".lower() for c, a in zip(table["base_colour"].to_pylist(), article_types)]
        rows = pa.concat_tables([table.append_column("search_term", pa.array(brand_queries)),
                                 table.append_column("search_term", pa.array(colour_queries))])
        pq.write_table(rows, tmp_path / f"{split}.parquet")
    results = train_command.run(train_args(assets, tmp_path / "run", "--architecture", "text_only",
                                           "--dataset", tmp_path, "--query_column", "search_term",
                                           "--max_train_steps", 2, "--max_eval_queries", 1000))
    validation = pq.read_table(tmp_path / "validation.parquet")
    assert results["training"]["train_pairs"] == 2 * TRAIN_ROWS
    assert results["after"]["eval/num_queries"] == len(set(validation["search_term"].to_pylist()))
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "the dataset's own query column" in card and "attribute-derived" not in card
    assert MultimodalRetrievalModel.from_pretrained(tmp_path / "run" / "final").config.architecture == "text_only"


def test_fast_image_path_is_the_default_where_it_reproduces_the_image_processor(assets, tmp_path):
    Accelerator(cpu=True)  # as in a run: the trainer logs through accelerate

    def processor_for(*extra, vision=assets["vision"]):
        args = train_command.parse_args(train_args(assets, tmp_path, "--vision_model", vision, *extra))
        return build_model_and_processor(args).processor

    fast, reference = processor_for(), processor_for("--no_fast_image_processing")
    assert fast.fast_image_processing and not reference.fast_image_processing
    images = [load_product_image(row["image"]).image for row in load_catalogue(assets["data"], split="train")
              .select(range(6)).to_list()]
    # DINOv2's transform (bicubic resize, centre crop) is reproduced to within 2 levels of 255.
    torch.testing.assert_close(fast.encode_images(images)["pixel_values"],
                               reference.encode_images(images)["pixel_values"], atol=2 / 255 / 0.224, rtol=0)
    fast.save_pretrained(tmp_path / "saved")
    assert MultimodalRetrievalProcessor.from_pretrained(tmp_path / "saved").fast_image_processing

    # A resampling filter the batched path does not have: left off by default, refused when asked for.
    box_filter = tmp_path / "box_filter_vision"
    shutil.copytree(assets["vision"], box_filter)
    (box_filter / "preprocessor_config.json").write_text(json.dumps({**DINOV2_PREPROCESSOR, "resample": 4}))
    assert not processor_for(vision=box_filter).fast_image_processing
    with pytest.raises(ValueError, match="resample=BOX"):
        processor_for("--fast_image_processing", vision=box_filter)


def test_cached_image_features_give_the_same_loss_as_recomputing(assets):
    model = MultimodalRetrievalModel.from_towers_pretrained(str(assets["text"]), str(assets["vision"]))
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(str(assets["text"]), str(assets["vision"]),
                                                                    config=model.config)
    catalogue = load_catalogue(assets["data"], split="train").select(range(32))
    pairs = make_training_pairs(catalogue, seed=0)
    cache = precompute_image_features(model, processor, catalogue, batch_size=12, show_progress=False)
    rows = pairs.select(range(5, 21)).to_list()
    recomputed_batch = RetrievalCollator(processor)(rows)
    cached_batch = RetrievalCollator(processor, image_features=cache)(rows)
    assert "pixel_values" in recomputed_batch and "pixel_values" not in cached_batch
    model.train()  # training mode: text dropout is on, the frozen tower must still be deterministic
    losses = []
    for batch in (recomputed_batch, cached_batch):
        torch.manual_seed(7)
        losses.append(model(**batch).loss)
    assert torch.allclose(losses[0], losses[1], rtol=0, atol=1e-6), losses
    recomputed = model.get_image_features(recomputed_batch["pixel_values"], recomputed_batch["image_mask"])
    assert torch.allclose(recomputed, cached_batch["image_features"], atol=1e-5)

    model.lock_image_tower(False)
    with pytest.raises(ValueError, match="frozen image tower"):
        precompute_image_features(model, processor, catalogue, show_progress=False)


def test_cached_image_features_are_checked_against_a_recomputation(assets):
    model = MultimodalRetrievalModel.from_towers_pretrained(str(assets["text"]), str(assets["vision"]))
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(str(assets["text"]), str(assets["vision"]),
                                                                    config=model.config)
    catalogue = load_catalogue(assets["data"], split="train").select(range(24))
    cache = precompute_image_features(model, processor, catalogue, batch_size=16, show_progress=False)
    sample = catalogue.select(range(8)).to_list()
    # Another batch size, same frozen tower: float noise only, within the CPU default of 1e-4.
    assert check_cached_image_features(model, processor, sample, cache) <= 1e-4

    stale = dict(cache)
    stale[str(sample[3]["product_id"])] = cache[str(sample[3]["product_id"])] + 0.05
    with pytest.raises(ValueError, match="differ from recomputed"):
        check_cached_image_features(model, processor, sample, stale)
    assert check_cached_image_features(model, processor, sample, stale, tolerance=0.1) == pytest.approx(0.05, abs=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# One training step: the same path with or without GradCache, under the run's autocast
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mini_batch_size", [None, 4])
def test_bf16_training_step_runs_the_towers_in_bf16_with_and_without_grad_cache(assets, mini_batch_size):
    """`--mixed_precision bf16` on the CPU: the text tower computes in bf16 in every pass of a step, GradCache's
    no-grad first pass and its replay during `accelerator.backward` included (the issue's bug: they ran in fp32)."""
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = MultimodalRetrievalModel.from_towers_pretrained(str(assets["text"]), str(assets["vision"]))
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(str(assets["text"]), str(assets["vision"]),
                                                                    config=model.config)
    pairs = make_training_pairs(load_catalogue(assets["data"], split="train").select(range(BATCH_SIZE)), seed=0)
    batch = RetrievalCollator(processor)(pairs.to_list())
    model = accelerator.prepare(model.train())
    passes = []
    query_layer = model.text_model.encoder.layer[0].attention.self.query
    query_layer.register_forward_hook(
        lambda module, inputs, output: passes.append((torch.is_grad_enabled(), output.dtype))
    )

    loss = training_step(accelerator, model, build_loss_fn(mini_batch_size), batch)

    assert torch.isfinite(loss) and not loss.requires_grad
    assert {dtype for _, dtype in passes} == {torch.bfloat16}
    with_grad = [grad_enabled for grad_enabled, _ in passes]
    if mini_batch_size:  # first pass without autograd, replay with it: one call per chunk and side each
        chunks = 2 * (BATCH_SIZE // mini_batch_size)
        assert with_grad == [False] * chunks + [True] * chunks
    else:
        assert with_grad == [True, True]  # queries, products
    assert query_layer.weight.grad is not None and torch.isfinite(query_layer.weight.grad).all()


def test_grad_cache_run_with_mixed_precision_trains(assets, tmp_path):
    results = train_command.run(train_args(assets, tmp_path, "--max_train_steps", 2, "--eval_split", "none",
                                           "--mini_batch_size", 4, "--mixed_precision", "bf16"))
    assert results["training"]["completed_steps"] == 2 and results["training"]["skipped_steps"] == 0


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: completeness, SIGKILL + resume
# ----------------------------------------------------------------------------------------------------------------


def write_checkpoint(checkpoints_dir: Path, step: int, complete: bool = True) -> Path:
    directory = checkpoints_dir / f"checkpoint-{step}"
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(os.urandom(4096))
    (directory / TRAINER_STATE_NAME).write_text(json.dumps({"completed_steps": step}))
    if complete:
        mark_complete(directory, step)
    return directory


def test_latest_never_takes_a_half_written_checkpoint(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    good = write_checkpoint(checkpoints, 4)
    write_checkpoint(checkpoints, 8, complete=False)  # killed before the marker
    truncated = write_checkpoint(checkpoints, 12)
    with open(truncated / "model.safetensors", "r+b") as handle:  # damaged after it was written
        handle.truncate(1000)
    corrupted = write_checkpoint(checkpoints, 16)
    (corrupted / "model.safetensors").write_bytes(os.urandom(4096))  # same size, other bytes
    temporary = temporary_dir_for(checkpoints, 20)
    temporary.mkdir()
    (temporary / "model.safetensors").write_bytes(os.urandom(4096))

    assert [step for step, _ in list_checkpoints(checkpoints)] == [16, 12, 8, 4]  # the temporary dir is no checkpoint
    assert "SHA-256" in checkpoint_problem(corrupted)
    assert "1000 bytes" in checkpoint_problem(truncated)
    assert COMPLETION_MARKER in checkpoint_problem(checkpoints / "checkpoint-8")
    assert checkpoint_problem(good) is None
    assert find_latest_checkpoint(checkpoints) == good
    assert resolve_checkpoint("latest", checkpoints) == good
    assert resolve_checkpoint("latest", tmp_path / "no-checkpoints-yet") is None
    with pytest.raises(FileNotFoundError, match="interrupted while writing"):
        resolve_checkpoint(str(checkpoints / "checkpoint-8"), checkpoints)


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_weights_as_an_uninterrupted_run(assets, tmp_path):
    common = ("--max_train_steps", 40, "--checkpointing_steps", 3, "--eval_split", "none", "--warmup_steps", 4)
    reference = tmp_path / "reference"
    train_command.run(train_args(assets, reference, *common))

    interrupted = tmp_path / "interrupted"
    checkpoints = interrupted / "checkpoints"
    process = subprocess.Popen(
        [sys.executable, str(TRAIN_SCRIPT), *train_args(assets, interrupted, *common)],
        env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    try:
        # Kill once two checkpoints were started: often in the middle of writing the second one (the case where a
        # half-written directory exists), otherwise between checkpoints.
        while not [path for path in (checkpoints.iterdir() if checkpoints.is_dir() else [])
                   if path.name in ("checkpoint-6", ".tmp-checkpoint-6")]:
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run never wrote a checkpoint"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (interrupted / "final").exists()
    survivor = find_latest_checkpoint(checkpoints)
    assert survivor is not None and 3 <= int(survivor.name.removeprefix("checkpoint-")) < 40

    results = train_command.run(train_args(assets, interrupted, *common, "--resume_from_checkpoint", "latest"))
    assert results["training"]["resumed_from"] == str(survivor)
    expected, resumed = weights(reference / "final"), weights(interrupted / "final")
    assert expected.keys() == resumed.keys()
    different = [name for name in expected if not torch.equal(expected[name], resumed[name])]
    assert different == []  # bit-identical: same data order, optimizer, schedule and dropout RNG


def test_resume_refuses_a_checkpoint_of_other_settings(assets, tmp_path, capsys):
    train_command.run(train_args(assets, tmp_path, "--max_train_steps", 2, "--checkpointing_steps", 2,
                                 "--eval_split", "none"))
    mismatched = train_args(assets, tmp_path, "--max_train_steps", 2, "--eval_split", "none",
                            "--per_device_train_batch_size", 8, "--resume_from_checkpoint", "latest")
    with pytest.raises(CheckpointMismatchError, match="per_device_train_batch_size"):
        train_command.run(mismatched)
    # Another restoration weight changes the loss: refused too (the default run trained with 1.0).
    reweighted = train_args(assets, tmp_path, "--max_train_steps", 2, "--eval_split", "none",
                            "--visual_word_restoration", 0.5, "--resume_from_checkpoint", "latest")
    with pytest.raises(CheckpointMismatchError, match="visual_word_restoration: checkpoint 1.0 vs now 0.5"):
        train_command.run(reweighted)
    # The command line: one error line and exit status 1, no traceback.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    assert train_command.main(mismatched) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "per_device_train_batch_size" in errors[0]


# ----------------------------------------------------------------------------------------------------------------
# NaN handling
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def poisoned_model(assets, tmp_path_factory):
    """A saved model whose word embedding of one rare token is NaN, and the optimizer step that first meets it.

    The token appears in the product text of exactly one training product (and in no query), so only the batch
    holding that product has a NaN loss; the seeded sampler says which step that is.
    """
    model = MultimodalRetrievalModel.from_towers_pretrained(str(assets["text"]), str(assets["vision"]),
                                                            max_product_length=64, max_query_length=24)
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(str(assets["text"]), str(assets["vision"]),
                                                                    config=model.config)
    pairs = make_training_pairs(load_catalogue(assets["data"], split="train"), seed=42)
    product_tokens = processor.encode_products(pairs.to_list())["input_ids"]
    query_tokens = set(processor.encode_queries(pairs["query"])["input_ids"].flatten().tolist())
    order = list(EpochSeededSampler(len(pairs), seed=42))
    step_of_row = {row: position // BATCH_SIZE + 1 for position, row in enumerate(order)}
    counts = torch.bincount(product_tokens.flatten(), minlength=model.config.text_config.vocab_size)
    token, row = next(
        (token, int((product_tokens == token).any(dim=1).nonzero()[0]))
        for token in (counts == 1).nonzero().flatten().tolist()
        if token not in query_tokens and 3 <= step_of_row[int((product_tokens == token).any(dim=1).nonzero()[0])] <= 5
    )
    with torch.no_grad():
        model.text_model.embeddings.word_embeddings.weight[token] = float("nan")
    directory = tmp_path_factory.mktemp("poisoned")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory, token, step_of_row[row]


def test_nan_loss_stops_the_run_without_a_poisoned_checkpoint(assets, poisoned_model, tmp_path):
    directory, _, poisoned_step = poisoned_model
    args = train_args(assets, tmp_path, "--model_name_or_path", directory, "--max_train_steps", 6,
                      "--checkpointing_steps", 1, "--eval_split", "none", towers=False)
    with pytest.raises(NonFiniteLossError, match=f"optimizer step {poisoned_step}, epoch 0"):
        train_command.run(args)
    saved = [step for step, _ in list_checkpoints(tmp_path / "checkpoints")]
    assert saved == list(range(poisoned_step - 1, 0, -1))
    latest = find_latest_checkpoint(tmp_path / "checkpoints")
    assert all(torch.isfinite(t).all() for name, t in weights(latest).items() if "word_embeddings" not in name)
    assert not (tmp_path / "final").exists()


def test_nan_policy_skip_skips_only_the_poisoned_step(assets, poisoned_model, tmp_path):
    directory, token, _ = poisoned_model
    results = train_command.run(train_args(assets, tmp_path, "--model_name_or_path", directory, "--max_train_steps", 6,
                                           "--eval_split", "none", "--nan_policy", "skip", towers=False))
    assert results["training"]["skipped_steps"] == 1 and results["training"]["completed_steps"] == 6
    trained, initial = weights(tmp_path / "final"), weights(directory)
    embedding = "text_model.embeddings.word_embeddings.weight"
    assert torch.isnan(trained[embedding][token]).all()
    trained[embedding][token] = 0.0
    assert all(torch.isfinite(tensor).all() for tensor in trained.values())
    assert not torch.equal(trained["product_fusion.layers.0.weight"], initial["product_fusion.layers.0.weight"])


# ----------------------------------------------------------------------------------------------------------------
# Push to a (local) Hub
# ----------------------------------------------------------------------------------------------------------------

LOAD_FROM_HUB = textwrap.dedent("""
    import json, sys
    import torch
    import modeling_mmretrieval
    from huggingface_hub import HfApi
    from transformers import AutoModel
    from modeling_mmretrieval import MultimodalRetrievalProcessor
    from modeling_mmretrieval.data.collator import RetrievalCollator
    from modeling_mmretrieval.data import load_catalogue

    repo_id, local_dir, data_dir = sys.argv[1:4]
    rows = load_catalogue(data_dir, split="validation").select(range(6)).to_list()
    queries = ["red casual tshirt for men", "women black handbag"]

    def embed(source):
        model = AutoModel.from_pretrained(source).eval()
        processor = MultimodalRetrievalProcessor.from_pretrained(source)
        batch = RetrievalCollator(processor, with_queries=False)(rows)
        with torch.no_grad():
            products = model.get_product_embeddings(**{k.removeprefix("product_"): v for k, v in batch.items()})
            query_embeds = model.get_query_embeddings(**processor.encode_queries(queries))
        return torch.cat([query_embeds, products])

    info = HfApi().model_info(repo_id)
    hub, local = embed(repo_id), embed(local_dir)
    print(json.dumps({"files": sorted(s.rfilename for s in info.siblings), "private": info.private,
                      "max_difference": (hub - local).abs().max().item(), "rows": hub.shape[0]}))
""")


@pytest.mark.slow
def test_push_to_hub_uploads_a_model_that_loads_back_with_the_same_embeddings(assets, tmp_path):
    with MiniHub(token="hf_test_token", user="tester") as hub:
        env = subprocess_env(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
                             HF_HOME=str(tmp_path / "hf_home"), HF_TOKEN="hf_test_token")
        run = subprocess.run(
            [sys.executable, str(TRAIN_SCRIPT), *train_args(assets, tmp_path / "run", "--max_train_steps", 2,
                                                            "--eval_split", "none", "--push_to_hub",
                                                            "--hub_model_id", "fashion-retriever", "--hub_private")],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        results = json.loads((tmp_path / "run" / "results.json").read_text())
        assert results["hub_commit_url"].startswith(f"{hub.endpoint}/tester/fashion-retriever/commit/")
        loaded = subprocess.run(
            [sys.executable, "-c", LOAD_FROM_HUB, "tester/fashion-retriever", str(tmp_path / "run" / "final"),
             str(assets["data"])], env=env, capture_output=True, text=True, timeout=300,
        )
        assert loaded.returncode == 0, loaded.stderr[-3000:]
        report = json.loads(loaded.stdout.strip().splitlines()[-1])
        assert hub.unhandled == [], hub.unhandled
        stored = hub.repos["tester/fashion-retriever"].head[1]
    local_files = sorted(p.name for p in (tmp_path / "run" / "final").iterdir())
    assert report["files"] == local_files and "README.md" in local_files and report["private"] is True
    assert stored["model.safetensors"].lfs and not stored["config.json"].lfs  # binary via LFS, text inline
    assert stored["model.safetensors"].content == (tmp_path / "run" / "final" / "model.safetensors").read_bytes()
    assert report["rows"] == 8 and report["max_difference"] == 0.0


def test_an_adapter_aligned_pair_trains_a_4tower_model_with_restoration(assets, tmp_path):
    from modeling_mmretrieval.commands import align_pair

    pair_dir = tmp_path / "pair"
    assert align_pair.main(["--output_dir", str(pair_dir), "--text_model", str(assets["text"]), "--vision_model",
                            str(assets["vision"]), "--dataset", str(assets["data"]), "--image_size", str(IMAGE_SIZE),
                            "--epochs", "5", "--batch_size", "16"]) == 0
    report = json.loads((pair_dir / "alignment.json").read_text())
    assert report["training_pairs"] + report["held_out_pairs"] + report["products_without_image"] == TRAIN_ROWS
    assert 0.0 <= report["held_out_image_to_title_recall_at_10"] <= 1.0
    results = train_command.run(train_args(
        assets, tmp_path / "run", "--architecture", "4tower", "--clip_model", str(pair_dir), "--fusion", "residual",
        "--max_train_steps", 2, towers=False) + ["--text_model", str(assets["text"])])
    assert results["training"]["completed_steps"] == 2
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "visual-word dropout / restoration weight | `0.0 / 1.0`" in card
    assert "text-tower anchor weight | `1.0`" in card  # on by default for the residual fusion
    # The residual fusion's default: the image branch weight with the best nDCG@10 on the evaluation products.
    choice = results["image_branch_weight"]
    assert list(choice["scores"]) == ["0.25", "0.5", "0.75", "1.0"]
    assert choice["chosen"] == float(max(choice["scores"], key=choice["scores"].get))
    assert f"image branch weight at search | `{choice['chosen']}`" in card
    model = MultimodalRetrievalModel.from_pretrained(tmp_path / "run" / "final")
    assert model.config.architecture == "4tower" and model.config.fusion == "residual"
    assert model.config.image_branch_weight == choice["chosen"]


def test_the_final_model_searches_with_the_image_branch_weight_and_the_checkpoints_keep_the_trained_one(
        assets, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        train_command.run(train_args(assets, tmp_path / "run", "--fusion", "residual", "--max_train_steps", 2,
                                     "--checkpointing_steps", 2, "--image_branch_weight", 0.25, "--eval_split", "none"))
    final = MultimodalRetrievalModel.from_pretrained(tmp_path / "run" / "final")
    checkpoint = MultimodalRetrievalModel.from_pretrained(tmp_path / "run" / "checkpoints" / "checkpoint-2" / "model")
    assert final.config.image_branch_weight == 0.25 and checkpoint.config.image_branch_weight == 1.0
    assert weights(tmp_path / "run" / "final").keys() == weights(tmp_path / "run" / "checkpoints" / "checkpoint-2" /
                                                               "model").keys()
    assert "The final model's image branch is weighted 0.25" in caplog.text
    # The model cards say what each model searches with.
    assert "image branch weight at search | `0.25`" in (tmp_path / "run" / "final" / "README.md").read_text()
    checkpoint_card = (tmp_path / "run" / "checkpoints" / "checkpoint-2" / "model" / "README.md").read_text()
    assert "image branch weight at search | `1.0`" in checkpoint_card
    # "auto" without an evaluation split has nothing to choose on: fine-tuning the saved model further keeps its
    # weight (not 1, nor the weight applied twice), and says so.
    with caplog.at_level(logging.INFO):
        results = train_command.run(train_args(assets, tmp_path / "again", "--model_name_or_path",
                                               tmp_path / "run" / "final", "--max_train_steps", 1, "--eval_split",
                                               "none", towers=False))
    assert results["image_branch_weight"]["chosen"] == 0.25 and results["image_branch_weight"]["scores"] is None
    assert "no evaluation split to choose on, so the model keeps its image branch weight (0.25)" in caplog.text
    assert MultimodalRetrievalModel.from_pretrained(tmp_path / "again" / "final").config.image_branch_weight == 0.25
    # A new model has weight 1 until a weight is chosen or given.
    results = train_command.run(train_args(assets, tmp_path / "unevaluated", "--fusion", "residual",
                                           "--max_train_steps", 1, "--eval_split", "none"))
    assert results["image_branch_weight"]["chosen"] == 1.0
    assert MultimodalRetrievalModel.from_pretrained(tmp_path / "unevaluated" / "final").config.image_branch_weight == 1.0


def test_grad_cache_runs_turn_the_default_text_tower_anchor_off_and_say_so(assets, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        train_command.run(train_args(assets, tmp_path / "run", "--fusion", "residual", "--mini_batch_size", 4,
                                     "--max_train_steps", 1, "--eval_split", "none"))
    assert "text-tower anchor weight | `0.0`" in (tmp_path / "run" / "final" / "README.md").read_text()
    assert "The text-tower anchor is off: it does not combine with --mini_batch_size" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# Runs as in transformers' Trainer: loadable checkpoints, extended runs, one lineage, kept evaluations, trackers
# ----------------------------------------------------------------------------------------------------------------


def test_every_checkpoint_holds_a_model_that_from_pretrained_loads(assets, tmp_path):
    train_command.run(train_args(assets, tmp_path, "--max_train_steps", 5, "--checkpointing_steps", 2,
                                 "--eval_split", "none", "--warmup_steps", 0))
    checkpoints = tmp_path / "checkpoints"
    # Every 2 steps, and the last step too, so a finished run can be extended from where it ended.
    assert [step for step, _ in list_checkpoints(checkpoints)] == [5, 4, 2]
    loadable = checkpoints / "checkpoint-2" / MODEL_SUBDIR
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", "preprocessor_config.json",
            "modeling_mmretrieval.py"} <= {path.name for path in loadable.iterdir()}
    assert checkpoint_problem(checkpoints / "checkpoint-2") is None  # the marker vouches for model/ as well
    model = AutoModel.from_pretrained(loadable, trust_remote_code=True)
    processor = MultimodalRetrievalProcessor.from_pretrained(loadable)
    assert processor.image_processor.crop_size == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    assert "library_name: transformers" in (loadable / "README.md").read_text()
    # The loadable copy holds the checkpoint's weights (accelerate's own file), not the final ones.
    state, own = model.state_dict(), weights(checkpoints / "checkpoint-2")
    name = "text_model.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(state[name], own[name])
    assert not torch.equal(state[name], weights(tmp_path / "final")[name])
    last = weights(checkpoints / "checkpoint-5" / MODEL_SUBDIR)
    assert all(torch.equal(tensor, last[key]) for key, tensor in weights(tmp_path / "final").items())


def test_continue_schedule_gives_the_longer_runs_learning_rate_at_the_step_reached():
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([parameter], lr=0.3)
    finished = build_lr_scheduler(optimizer, "linear", num_warmup_steps=0, num_training_steps=6)
    for _ in range(6):
        optimizer.step()
        finished.step()
    assert optimizer.param_groups[0]["lr"] == 0.0  # a finished linear schedule
    saved_optimizer, saved_scheduler = optimizer.state_dict(), finished.state_dict()
    # A resumed run, as `accelerator.load_state` restores it: the longer schedule built, then both states loaded.
    extended = build_lr_scheduler(optimizer, "linear", num_warmup_steps=0, num_training_steps=9)
    optimizer.load_state_dict(saved_optimizer)
    extended.load_state_dict(saved_scheduler)
    assert optimizer.param_groups[0]["lr"] == 0.0  # loading alone keeps the finished schedule's rate
    assert continue_schedule(extended) == pytest.approx([0.3 * 3 / 9])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1) and extended.get_last_lr() == pytest.approx([0.1])
    optimizer.step()
    extended.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.3 * 2 / 9)


def test_a_finished_run_is_extended_with_a_larger_max_train_steps(assets, tmp_path):
    common = ("--eval_split", "none", "--checkpointing_steps", 3, "--warmup_steps", 0)
    train_command.run(train_args(assets, tmp_path, "--max_train_steps", 6, *common))
    six_steps = weights(tmp_path / "final")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    results = train_command.run(train_args(assets, tmp_path, "--max_train_steps", 9, *common,
                                           "--resume_from_checkpoint", "latest"))
    assert results["training"]["resumed_from"] == str(tmp_path / "checkpoints" / "checkpoint-6")
    assert results["training"]["completed_steps"] == 9 and results["training"]["steps_this_run"] == 3
    name = "text_model.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(weights(tmp_path / "final")[name], six_steps[name])  # the extension trained
    assert load_trainer_state(tmp_path / "checkpoints" / "checkpoint-9")["max_train_steps"] == 9
    # Fewer steps than the checkpoint already has: refused with one line, not silently a longer run.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(CheckpointMismatchError, match="checkpoint-9 is at step 9, past the 4 steps"):
        train_command.run(train_args(assets, tmp_path, "--max_train_steps", 4, *common,
                                     "--resume_from_checkpoint", "latest"))


def test_a_relaunch_without_evaluation_keeps_the_evaluation_of_the_same_weights(assets, tmp_path):
    # Weight 1: the relaunch without an evaluation split keeps the model's own (the checkpoint's), the same.
    train_command.run(train_args(assets, tmp_path, "--max_train_steps", 2, "--checkpointing_steps", 2,
                                 "--image_branch_weight", 1))
    evaluated = json.loads((tmp_path / "results.json").read_text())
    assert evaluated["after"]["eval/recall@10"] >= 0.0
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    relaunched = train_command.run(train_args(assets, tmp_path, "--max_train_steps", 2, "--eval_split", "none",
                                              "--resume_from_checkpoint", "latest"))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert relaunched["training"]["steps_this_run"] == 0 and on_disk["evaluation_kept_from_earlier_run"] is True
    assert (on_disk["before"], on_disk["after"]) == (evaluated["before"], evaluated["after"])
    card = (tmp_path / "final" / "README.md").read_text()
    assert "Not evaluated" not in card and "| recall@10 |" in card
    # Weights that changed are not credited with the earlier evaluation.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train_command.run(train_args(assets, tmp_path, "--max_train_steps", 3, "--eval_split", "none",
                                 "--resume_from_checkpoint", "latest"))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["after"] == {} and "evaluation_kept_from_earlier_run" not in on_disk
    assert "Not evaluated" in (tmp_path / "final" / "README.md").read_text()
    # The same weights searched with another image branch weight rank otherwise: not credited either.
    for weight, evaluation in ((1, []), (0.5, ["--eval_split", "none"])):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        train_command.run(train_args(assets, tmp_path, "--max_train_steps", 3, "--image_branch_weight", weight,
                                     *evaluation, "--resume_from_checkpoint", "latest"))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["after"] == {} and "evaluation_kept_from_earlier_run" not in on_disk


def test_resuming_an_older_checkpoint_moves_the_abandoned_checkpoints_aside(assets, tmp_path):
    common = ("--eval_split", "none", "--warmup_steps", 0, "--max_train_steps", 6)
    train_command.run(train_args(assets, tmp_path, *common, "--checkpointing_steps", 2))
    checkpoints = tmp_path / "checkpoints"
    abandoned_weights = weights(checkpoints / "checkpoint-6")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    results = train_command.run(train_args(assets, tmp_path, *common, "--checkpointing_steps", 1,
                                           "--checkpoints_total_limit", 2, "--max_grad_norm", 0.001,
                                           "--resume_from_checkpoint", checkpoints / "checkpoint-2"))
    assert results["training"]["steps_this_run"] == 4
    # Only the new lineage is left, pruned to its own 2 newest; the abandoned run's are kept aside.
    assert [step for step, _ in list_checkpoints(checkpoints)] == [6, 5]
    (aside,) = (checkpoints / ABANDONED_DIR).iterdir()
    assert aside.name.startswith("after-2-") and sorted(p.name for p in aside.iterdir()) == ["checkpoint-4",
                                                                                             "checkpoint-6"]
    name = "text_model.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(weights(aside / "checkpoint-6")[name], abandoned_weights[name])
    assert not torch.equal(weights(checkpoints / "checkpoint-6")[name], abandoned_weights[name])


def test_a_move_aside_killed_half_way_is_completed_before_latest_is_resolved(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        write_checkpoint(checkpoints, step)
    # What a SIGKILL in the middle of the move leaves: the plan, one of its checkpoints moved, one not yet.
    destination = checkpoints / ABANDONED_DIR / "after-2-killed"
    (checkpoints / ROLLBACK_JOURNAL).write_text(json.dumps(
        {"resume_step": 2, "destination": f"{ABANDONED_DIR}/after-2-killed",
         "checkpoints": ["checkpoint-6", "checkpoint-4"]}))
    destination.mkdir(parents=True)
    os.rename(checkpoints / "checkpoint-6", destination / "checkpoint-6")
    assert find_latest_checkpoint(checkpoints) == checkpoints / "checkpoint-4"  # what `latest` alone would take
    assert start_lineage(Accelerator(cpu=True), "latest", checkpoints) == checkpoints / "checkpoint-2"
    assert [step for step, _ in list_checkpoints(checkpoints)] == [2]
    assert not (checkpoints / ROLLBACK_JOURNAL).exists()
    assert sorted(path.name for path in destination.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    # Starting afresh in a folder of checkpoints: none of them may be taken for this run's.
    assert start_lineage(Accelerator(cpu=True), None, checkpoints) is None
    assert list_checkpoints(checkpoints) == []


@pytest.mark.slow
def test_a_rollback_resume_killed_by_sigkill_continues_its_own_lineage(assets, tmp_path):
    """The issue's failure: resuming from an older checkpoint with newer ones of the abandoned run in place, a
    SIGKILL, then `latest`, published the abandoned run's model. The new lineage (another clipping norm, so other
    weights) must be the one continued and published."""
    common = ("--eval_split", "none", "--warmup_steps", 0, "--max_train_steps", 6)
    run_dir, reference_dir = tmp_path / "run", tmp_path / "reference"
    train_command.run(train_args(assets, run_dir, *common, "--checkpointing_steps", 2))
    abandoned = weights(run_dir / "final")
    shutil.copytree(run_dir / "checkpoints" / "checkpoint-2", reference_dir / "checkpoints" / "checkpoint-2")
    rollback = (*common, "--checkpointing_steps", 1, "--checkpoints_total_limit", 2, "--max_grad_norm", 0.001)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train_command.run(train_args(assets, reference_dir, *rollback, "--resume_from_checkpoint",
                                 reference_dir / "checkpoints" / "checkpoint-2"))

    checkpoints = run_dir / "checkpoints"
    process = subprocess.Popen(
        [sys.executable, str(TRAIN_SCRIPT), *train_args(assets, run_dir, *rollback, "--resume_from_checkpoint",
                                                        checkpoints / "checkpoint-2")],
        env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    try:
        while not (checkpoints / "checkpoint-3").exists():  # the new lineage has begun; the old one was at 6
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the resumed run never wrote a checkpoint"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    survivor = find_latest_checkpoint(checkpoints)
    assert 3 <= int(survivor.name.removeprefix("checkpoint-")) <= 6

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    results = train_command.run(train_args(assets, run_dir, *rollback, "--resume_from_checkpoint", "latest"))
    assert results["training"]["resumed_from"] == str(survivor)
    published, expected = weights(run_dir / "final"), weights(reference_dir / "final")
    assert [name for name in expected if not torch.equal(expected[name], published[name])] == []
    name = "text_model.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(published[name], abandoned[name])


def test_report_to_accepts_accelerates_trackers_and_names_a_missing_package(assets, tmp_path, capsys):
    from accelerate.tracking import get_available_trackers

    assert trackers_for(["none"]) is None and trackers_for("none") is None
    installed = [str(getattr(tracker, "value", tracker)) for tracker in get_available_trackers()]
    missing = next(name for name in ("mlflow", "wandb", "aim", "swanlab") if name not in installed)
    for flag, message in ((missing, f"--report_to {missing}: its package is not installed"),
                          ("neptune", "--report_to neptune: not a tracker accelerate supports"),
                          ("none,tensorboard", "--report_to none cannot be combined")):
        assert train_command.main(train_args(assets, tmp_path, "--report_to", flag)) == 2
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and message in errors[0], errors
    if installed:
        assert trackers_for(["all"]) == installed and trackers_for([",".join(installed)]) == installed
