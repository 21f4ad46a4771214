"""A real 2-process CPU run (accelerate + DDP over gloo) of the contrastive loss against one process.

With embeddings gathered across processes (gradients included), the mean of the per-process losses is
the loss of the whole global batch, and DDP's averaged gradients are its gradients.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_towers import make_batch, make_config

from modeling_mmretrieval import MultimodalRetrievalModel

WORKER = Path(__file__).resolve().parent / "distributed_loss_worker.py"
NUM_PROCESSES = 2
PAIRS = 6
# (batch name, hard negatives per query); every batch has an image-less product.
GLOBAL_BATCHES = {"in_batch_negatives": 0, "hard_negatives": 1}
METHODS = ("plain", "grad_cache", "plain_after_grad_cache")
LAUNCH_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_same_grads(actual: dict, expected: dict):
    """Agreement within rtol 1e-5 and atol 1e-6 relative to each gradient's largest entry (float32)."""
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        scale = max(grad.abs().max().item(), 1.0)
        torch.testing.assert_close(actual[name], grad, rtol=1e-5, atol=1e-6 * scale, msg=name)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Launches the worker once; returns the model directory, the global batches and every rank's results."""
    workdir = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(0)
    model = MultimodalRetrievalModel(make_config("4tower-concat"))
    model.save_pretrained(workdir / "model")
    batches = {name: make_batch(model.config, PAIRS, negatives, seed=1) for name, negatives in GLOBAL_BATCHES.items()}
    torch.save(batches, workdir / "batches.pt")

    # `--multi_gpu` picks accelerate's torchrun launcher (the worker runs on CPU over gloo); `--cpu` with
    # several processes would start just one process in accelerate 1.15 unless given an MPI hostfile.
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(NUM_PROCESSES), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()),
        str(WORKER), str(workdir / "model"), str(workdir / "batches.pt"), str(workdir),
    ]  # fmt: skip
    # An empty accelerate home, so a developer's saved `accelerate config` cannot change the launch.
    env = {**os.environ, "HF_HOME": str(workdir / "hf_home"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    ranks = [torch.load(workdir / f"rank{rank}.pt") for rank in range(NUM_PROCESSES)]
    assert all(r["setup"] == {"distributed_type": "MULTI_CPU", "backend": "gloo"} for r in ranks), ranks[0]["setup"]
    return workdir / "model", batches, ranks


@pytest.fixture(scope="module")
def single_process(two_process_run):
    """The loss and gradients of one process on each whole global batch: {batch name: (loss, grads)}."""
    model_dir, batches, _ = two_process_run
    references = {}
    for name, batch in batches.items():
        model = MultimodalRetrievalModel.from_pretrained(model_dir).eval()
        loss = model(**batch).loss
        loss.backward()
        references[name] = loss.detach(), {key: p.grad for key, p in model.named_parameters() if p.grad is not None}
    return references


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch_name", list(GLOBAL_BATCHES))
def test_two_processes_match_one_process_on_the_global_batch(two_process_run, single_process, batch_name, method):
    expected_loss, expected_grads = single_process[batch_name]
    results = [rank_results[batch_name, method] for rank_results in two_process_run[2]]

    # Each process scores its own queries against all products, so local losses differ; their mean is global.
    local_losses = torch.stack([result["loss"] for result in results])
    assert not torch.allclose(local_losses[0], local_losses[1])
    torch.testing.assert_close(local_losses.mean(), expected_loss, rtol=1e-5, atol=1e-6)
    for result in results:
        assert "logit_scale" in result["grads"]
        assert_same_grads(result["grads"], expected_grads)


@pytest.mark.parametrize("batch_name", list(GLOBAL_BATCHES))
def test_grad_cache_leaves_gradients_local_inside_no_sync(two_process_run, single_process, batch_name):
    _, expected_grads = single_process[batch_name]
    local_grads = [rank_results[batch_name, "grad_cache_no_sync"]["grads"] for rank_results in two_process_run[2]]

    word_embeddings = "text_model.embeddings.word_embeddings.weight"
    assert not torch.allclose(local_grads[0][word_embeddings], local_grads[1][word_embeddings])
    # The all-reduce skipped here is a plain average: the mean of the local gradients is the global one.
    mean_grads = {name: (local_grads[0][name] + local_grads[1][name]) / 2 for name in local_grads[0]}
    assert_same_grads(mean_grads, expected_grads)


# ----- examples/train.py itself in two CPU processes ------------------------------------------------------------
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train.py"
TRAIN_IMAGE_SIZE = 28


@pytest.fixture(scope="module")
def training_assets(tmp_path_factory) -> dict[str, Path]:
    """Tiny pretrained towers (MiniLM's tokenizer, a 28-pixel DINOv2) and 64 catalogue rows."""
    import pyarrow.parquet as pq
    from tiny_towers import tiny_bert, tiny_dinov2
    from transformers import AutoTokenizer, BertModel, BitImageProcessorPil, Dinov2Model

    from modeling_mmretrieval.data import SAMPLE_DATA_DIR
    from modeling_mmretrieval.towers import get_minilm_path

    root = tmp_path_factory.mktemp("train_script_assets")
    tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    text_config = tiny_bert()
    text_config.vocab_size, text_config.max_position_embeddings = tokenizer.vocab_size, 128
    torch.manual_seed(0)
    BertModel(text_config).save_pretrained(root / "text")
    tokenizer.save_pretrained(root / "text")
    vision = tiny_dinov2()
    vision.image_size = TRAIN_IMAGE_SIZE
    Dinov2Model(vision).save_pretrained(root / "vision")
    image_processor = BitImageProcessorPil(size={"shortest_edge": TRAIN_IMAGE_SIZE},
                                           crop_size={"height": TRAIN_IMAGE_SIZE, "width": TRAIN_IMAGE_SIZE})
    image_processor.save_pretrained(root / "vision")
    (root / "data").mkdir()
    pq.write_table(pq.read_table(SAMPLE_DATA_DIR / "train.parquet").slice(0, 64), root / "data" / "train.parquet")
    return {"text": root / "text", "vision": root / "vision", "data": root / "data", "root": root}


def launch_train_script(launcher_flag: str, assets: dict[str, Path], output_dir: Path, *extra) -> None:
    """`accelerate launch <launcher_flag> --num_processes 2 examples/train.py ...` on this CPU-only machine."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", launcher_flag, "--num_processes", str(NUM_PROCESSES),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()), str(TRAIN_SCRIPT),
        "--dataset", str(assets["data"]), "--text_model", str(assets["text"]), "--architecture", "3tower", "--vision_model", str(assets["vision"]),
        "--image_size", str(TRAIN_IMAGE_SIZE), "--output_dir", str(output_dir), "--per_device_train_batch_size", "8",
        "--eval_split", "none", "--warmup_steps", "0", "--checkpointing_steps", "1", *map(str, extra),
    ]  # fmt: skip
    env = {**os.environ, "HF_HOME": str(assets["root"] / "hf_home"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="relaunching `--cpu` reads the launcher from /proc")
def test_train_script_trains_in_two_cpu_processes_with_checkpoints_and_resume(training_assets, tmp_path):
    # `--cpu --num_processes 2`: accelerate's launcher starts one process, which relaunches itself as two.
    launch_train_script("--cpu", training_assets, tmp_path, "--max_train_steps", 2)
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {path.name for path in checkpoint.iterdir()}
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["signature"]["num_processes"] == NUM_PROCESSES and state["completed_steps"] == 2
    assert "| processes | `2` |" in (tmp_path / "final" / "README.md").read_text()

    # `--multi_gpu` on a machine without GPUs (torchrun): a CPU gloo group of 2 ranks resumes and extends the run.
    launch_train_script("--multi_gpu", training_assets, tmp_path, "--max_train_steps", 3,
                        "--resume_from_checkpoint", "latest")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["training"]["resumed_from"] == str(checkpoint)
    assert results["training"]["completed_steps"] == 3 and results["training"]["steps_this_run"] == 1
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {
        path.name for path in (tmp_path / "checkpoints" / "checkpoint-3").iterdir()}
    assert MultimodalRetrievalModel.from_pretrained(tmp_path / "final").config.architecture == "3tower"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="relaunching `--cpu` reads the launcher from /proc")
def test_two_processes_choose_one_image_branch_weight_on_the_evaluation_split(training_assets, tmp_path):
    # The catalogue has no validation split: a seeded hold-out of it is evaluated, by the main process only.
    launch_train_script("--cpu", training_assets, tmp_path, "--max_train_steps", 1, "--eval_split", "validation",
                        "--fusion", "residual")
    results = json.loads((tmp_path / "results.json").read_text())
    choice = results["image_branch_weight"]
    assert choice["chosen"] == float(max(choice["scores"], key=choice["scores"].get))
    assert MultimodalRetrievalModel.from_pretrained(tmp_path / "final").config.image_branch_weight == choice["chosen"]
