"""A real 2-process CPU run (accelerate + DDP over gloo) of the contrastive loss against one process.

With embeddings gathered across processes (gradients included), the mean of the per-process losses is
the loss of the whole global batch, and DDP's averaged gradients are its gradients.
"""

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
