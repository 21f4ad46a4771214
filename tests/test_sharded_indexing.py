"""Indexing split across 2 real processes (`accelerate launch`, CPU/gloo) equals a single-process build."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
from modeling_mmretrieval.data import SAMPLE_DATA_DIR
from modeling_mmretrieval.retrieval.index import ProductIndex
from modeling_mmretrieval.towers import get_minilm_path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "build_index.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = get_minilm_path()
    folder = tmp_path_factory.mktemp("minilm-text-only")
    model = MultimodalRetrievalModel.from_towers_pretrained(path)
    model.save_pretrained(folder)
    MultimodalRetrievalProcessor.from_towers_pretrained(path, config=model.config).save_pretrained(folder)
    return folder


def build(checkpoint, output_dir, tmp_path, num_processes: int) -> subprocess.CompletedProcess:
    arguments = [str(SCRIPT), "--model_name_or_path", str(checkpoint), "--dataset", str(SAMPLE_DATA_DIR),
                 "--split", "validation", "--max_products", "37", "--batch_size", "8", "--output_dir", str(output_dir)]
    if num_processes == 1:
        command = [sys.executable, *arguments]
    else:
        # `--multi_gpu` selects accelerate's torchrun launcher; the processes run on the CPU over gloo.
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()), *arguments]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_two_process_index_equals_one_process_index(checkpoint, tmp_path):
    two = build(checkpoint, tmp_path / "two", tmp_path, num_processes=2)
    assert "with 2 process(es)" in two.stdout
    build(checkpoint, tmp_path / "one", tmp_path, num_processes=1)
    single, sharded = ProductIndex.load(tmp_path / "one"), ProductIndex.load(tmp_path / "two")
    assert len(sharded) == 37 and sharded.ids == single.ids
    assert torch.allclose(torch.from_numpy(sharded.embeddings.copy()), torch.from_numpy(single.embeddings.copy()),
                          atol=1e-5)
    assert sharded.model_id == single.model_id and sharded.model_fingerprint == single.model_fingerprint is not None
    assert not (tmp_path / "two.shards").exists()
