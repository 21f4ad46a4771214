import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The image-feature store is on by default: tests (and their subprocesses) keep theirs apart from the user's cache.
if "MMRETRIEVAL_CACHE" not in os.environ:
    os.environ["MMRETRIEVAL_CACHE"] = tempfile.mkdtemp(prefix="mmretrieval-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MMRETRIEVAL_CACHE"], ignore_errors=True)

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s (multi-process runs, real towers)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny models on shared cores run faster on one intra-op thread, and bit-for-bit comparisons need a fixed count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
