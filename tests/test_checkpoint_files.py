"""A checkpoint carries only the model: five Python files, none of which changes global state.

`save_pretrained` copies the model's and processor's modules (and their relative imports) into the checkpoint
so that `trust_remote_code=True` can load it without the package. Those files must be the model itself —
configuration, modeling, processing, losses and the sentence-transformers module — and never the package's
training, retrieval or speedup machinery, even when the speedups were applied to the model that was saved.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_towers import IMAGE_SIZE, make_batch, make_config, product_inputs, query_inputs
from transformers import AutoTokenizer, CLIPImageProcessorPil

import modeling_mmretrieval
from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor, speedups
from modeling_mmretrieval.towers import get_minilm_path

CHECKPOINT_FILES = {
    "configuration_mmretrieval.py", "modeling_mmretrieval.py", "processing_mmretrieval.py", "losses.py",
    "integrations_mmretrieval.py",  # sentence-transformers' module (modules.json)
}
PACKAGE_DIR = Path(modeling_mmretrieval.__file__).parent


def module_level_calls(source: str) -> list[str]:
    """Names of the calls a module makes when imported (module-level statements, not function bodies)."""
    calls = []
    for statement in ast.parse(source).body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for node in ast.walk(statement):
            if isinstance(node, ast.Call):
                calls.append(ast.unparse(node.func))
    return calls


def test_checkpoint_modules_import_only_each_other_and_register_nothing():
    for name in CHECKPOINT_FILES:
        tree = ast.parse((PACKAGE_DIR / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                # Relative imports of sibling checkpoint files only: a subpackage would not travel.
                assert node.level == 1 and f"{node.module}.py" in CHECKPOINT_FILES, (name, node.module)
            if isinstance(node, ast.Import) or (isinstance(node, ast.ImportFrom) and not node.level):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(module.startswith("modeling_mmretrieval") for module in modules), (name, modules)
        calls = module_level_calls((PACKAGE_DIR / name).read_text(encoding="utf-8"))
        assert not [call for call in calls if "register" in call], (name, calls)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(get_minilm_path())


def saved_with_speedups(case: str, folder: Path, tokenizer) -> tuple[MultimodalRetrievalModel, dict]:
    """A tiny model of `case`, with every speedup applied, saved with its processor into `folder`."""
    config = make_config(case)
    config.text_config.vocab_size = tokenizer.vocab_size
    model = MultimodalRetrievalModel(config).eval()
    image_processor = None
    if config.uses_images:
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
    processor = MultimodalRetrievalProcessor(tokenizer, image_processor)
    speedups.apply(model, processor)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, make_batch(config, seed=3)


LOAD_WITHOUT_PACKAGE = """
import importlib.abc, json, sys
import torch

class HidePackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "modeling_mmretrieval":
            raise ImportError("the package is deliberately hidden: " + name)

sys.meta_path.insert(0, HidePackage())
from transformers import AttentionInterface, AutoModel, AutoProcessor
from transformers.masking_utils import AttentionMaskInterface

def registries():
    return {"attention": sorted(AttentionInterface._global_mapping), "masks": sorted(AttentionMaskInterface._global_mapping)}

before = registries()
checkpoint, batch_file = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
batch = torch.load(batch_file)
with torch.no_grad():
    queries = model.get_query_embeddings(**batch["query"])
    products = model.get_product_embeddings(**batch["product"])
print(json.dumps({
    "model": type(model).__module__, "processor": type(processor).__module__,
    "registries_unchanged": registries() == before,
    "queries": queries.tolist(), "products": products.tolist(),
}))
"""


@pytest.mark.parametrize("case", ["text_only", "4tower-mlp", "3tower-dinov2"])
def test_checkpoint_holds_five_files_and_loads_without_the_package(case, tokenizer, tmp_path):
    folder = tmp_path / "checkpoint"
    model, batch = saved_with_speedups(case, folder, tokenizer)
    assert {path.name for path in folder.glob("*.py")} == CHECKPOINT_FILES
    assert not list(folder.glob("*/*.py"))
    inputs = {"query": query_inputs(batch), "product": product_inputs(batch)}
    torch.save(inputs, tmp_path / "batch.pt")
    with torch.no_grad():
        expected = model.get_query_embeddings(**inputs["query"]), model.get_product_embeddings(**inputs["product"])

    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1",
                   "HF_HOME": str(tmp_path / "hf_home"), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(folder), str(tmp_path / "batch.pt")], cwd=tmp_path,
        env=environment, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["model"].startswith("transformers_modules.")
    assert loaded["processor"].startswith("transformers_modules.")
    assert loaded["registries_unchanged"]
    torch.testing.assert_close(torch.tensor(loaded["queries"]), expected[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(loaded["products"]), expected[1], atol=1e-6, rtol=0)
