"""Untrusted checkpoints: loading one never runs code from it unless the user opts in.

A checkpoint folder from the Hub or a colleague can carry two kinds of code: pickle files (unpickling calls any
function the file names) and Python files (`trust_remote_code=True` imports them). The package loads weights
from safetensors only, unpickles training state with `weights_only=True`, and, once installed, loads its own
classes through the Auto classes without importing anything from the checkpoint. See docs/reliability.md.
"""

import ast
import builtins
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_towers import IMAGE_SIZE, make_config
from transformers import AutoModel, AutoTokenizer, CLIPImageProcessorPil

import modeling_mmretrieval
from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
from modeling_mmretrieval.towers import get_minilm_path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Code that ships or that users copy: the library, the example scripts and the benchmarks.
SCANNED_FOLDERS = ("modeling_mmretrieval", "examples", "benchmarks", "scripts")
QUERY = "red running shoes for men"


class MarkerPayload:
    """Unpickling this opens (creates) a marker file: the smallest proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def write_malicious_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"text_model.embeddings.word_embeddings.weight": MarkerPayload(marker)}, protocol=2))


@pytest.fixture(scope="module")
def saved_retriever(tmp_path_factory):
    """A tiny 3tower model and its processor (real MiniLM tokenizer, image processor) saved as a checkpoint."""
    tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    config = make_config("3tower-dinov2")
    config.text_config.vocab_size = tokenizer.vocab_size
    model = MultimodalRetrievalModel(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = MultimodalRetrievalProcessor(tokenizer, image_processor, max_query_length=16, max_product_length=32)
    folder = tmp_path_factory.mktemp("checkpoint") / "retriever"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    with torch.no_grad():
        query_embedding = model.get_query_embeddings(**processor.encode_queries([QUERY]))
    return folder, query_embedding


def copy_checkpoint(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def pickle_only_checkpoint(source: Path, target: Path) -> Path:
    """The same checkpoint with its weights in `pytorch_model.bin` (a pickle) instead of safetensors."""
    folder = copy_checkpoint(source, target)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


# ----- pickle weights -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "load", [MultimodalRetrievalModel.from_pretrained, AutoModel.from_pretrained], ids=["class", "auto"]
)
def test_pickle_only_checkpoint_is_refused_with_an_explanation(saved_retriever, tmp_path, load):
    folder = pickle_only_checkpoint(saved_retriever[0], tmp_path / "pickle_only")
    with pytest.raises(OSError, match="no safetensors weights") as refusal:
        load(folder)
    message = str(refusal.value)
    assert "arbitrary code" in message and "safetensors.torch.save_file" in message and "weights_only=True" in message
    # The explicit opt-out works for a trusted pickle, and gives the same model.
    trusted = MultimodalRetrievalModel.from_pretrained(folder, use_safetensors=False)
    reference = MultimodalRetrievalModel.from_pretrained(saved_retriever[0])
    assert all(torch.equal(a, b) for a, b in zip(trusted.state_dict().values(), reference.state_dict().values()))


def test_malicious_pickle_weights_never_run(saved_retriever, tmp_path):
    folder = pickle_only_checkpoint(saved_retriever[0], tmp_path / "malicious")
    marker = tmp_path / "pickle-ran"
    write_malicious_pickle(folder / "pytorch_model.bin", marker)
    with pytest.raises(OSError, match="no safetensors weights"):
        MultimodalRetrievalModel.from_pretrained(folder)
    # Even the explicit opt-out unpickles with weights_only=True, which refuses to call functions.
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        MultimodalRetrievalModel.from_pretrained(folder, use_safetensors=False)
    assert not marker.exists()
    # The payload is live: a plain unpickle runs it.
    pickle.loads((folder / "pytorch_model.bin").read_bytes())
    assert marker.exists()


def test_resuming_training_state_unpickles_with_weights_only(tmp_path):
    """examples/train.py resumes with `accelerator.load_state`; a poisoned optimizer or RNG file must not run."""
    script = textwrap.dedent(
        """
        import json, pickle, sys, builtins
        from pathlib import Path
        import torch
        from accelerate import Accelerator

        class Payload:
            def __init__(self, marker):
                self.marker = marker

            def __reduce__(self):
                return builtins.open, (self.marker, "w")

        checkpoint, markers = Path(sys.argv[1]), Path(sys.argv[2])
        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.AdamW(model.parameters())
        model, optimizer = accelerator.prepare(model, optimizer)
        accelerator.save_state(str(checkpoint))
        results = {}
        for name in ("optimizer.bin", "random_states_0.pkl"):
            original = (checkpoint / name).read_bytes()
            (checkpoint / name).write_bytes(pickle.dumps({"state": Payload(str(markers / (name + ".ran")))}))
            try:
                accelerator.load_state(str(checkpoint))
                results[name] = "no error"
            except pickle.UnpicklingError as error:
                results[name] = "refused: " + str(error).splitlines()[0]
            (checkpoint / name).write_bytes(original)
        accelerator.load_state(str(checkpoint))  # the untouched checkpoint still resumes
        print(json.dumps(results))
        """
    )
    markers = tmp_path / "markers"
    markers.mkdir()
    results = run_python(script, tmp_path / "checkpoint", markers, cwd=tmp_path, env=isolated_env(tmp_path))
    assert results["optimizer.bin"].startswith("refused: Weights only load failed"), results
    # accelerate reads RNG states with weights_only=True too, and logs (rather than raises) when that fails.
    assert results["random_states_0.pkl"].startswith(("no error", "refused: Weights only load failed"))
    assert list(markers.iterdir()) == []


# ----- static checks of the code that ships ---------------------------------------------------------------------------
UNPICKLING_CALLS = {
    ("pickle", "load"), ("pickle", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"), ("dill", "load"),
    ("dill", "loads"), ("joblib", "load"), ("marshal", "load"), ("marshal", "loads"), ("shelve", "open"),
}
# Keyword arguments that switch a safety off wherever they appear.
UNSAFE_KEYWORDS = {"weights_only": False, "use_safetensors": False, "trust_remote_code": True, "allow_pickle": True}


def _dotted_name(node: ast.AST) -> tuple[str, ...]:
    if isinstance(node, ast.Name):
        return (node.id,)
    if isinstance(node, ast.Attribute):
        return (*_dotted_name(node.value), node.attr)
    return ()


def unsafe_loading_calls(source: str, filename: str) -> list[str]:
    """Calls that could run code from a file: unpickling, torch.load without weights_only=True, safety opt-outs,
    and accelerate's `register_for_checkpointing` (whose objects it reloads with weights_only=False)."""
    findings = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted_name(node.func)
        keywords = {k.arg: k.value.value for k in node.keywords if k.arg and isinstance(k.value, ast.Constant)}
        where = f"{filename}:{node.lineno}"
        if name[-2:] == ("torch", "load") and keywords.get("weights_only") is not True:
            findings.append(f"{where}: torch.load without weights_only=True")
        if name[-2:] in UNPICKLING_CALLS:
            findings.append(f"{where}: {'.'.join(name)} unpickles")
        if name and name[-1] == "register_for_checkpointing":
            findings.append(f"{where}: accelerate reloads registered objects with weights_only=False")
        findings += [
            f"{where}: {keyword}={value}"
            for keyword, value in UNSAFE_KEYWORDS.items()
            if keywords.get(keyword, not value) is value
        ]
    return findings


def test_shipped_code_never_unpickles_unsafely_or_trusts_remote_code():
    files = [path for folder in SCANNED_FOLDERS for path in sorted((REPO_ROOT / folder).rglob("*.py"))]
    assert any(path.parent.name == "modeling_mmretrieval" for path in files) and len(files) > 10
    findings = [
        finding
        for path in files
        for finding in unsafe_loading_calls(path.read_text(encoding="utf-8"), str(path.relative_to(REPO_ROOT)))
    ]
    assert findings == []


def test_the_scan_finds_every_unsafe_pattern():
    source = textwrap.dedent(
        """
        import pickle, torch, numpy as np
        torch.load("optimizer.pt")
        torch.load("optimizer.pt", weights_only=False)
        torch.load("optimizer.pt", weights_only=True)  # safe
        pickle.loads(payload)
        np.load("features.npy", allow_pickle=True)
        AutoModel.from_pretrained(path, trust_remote_code=True)
        AutoModel.from_pretrained(path, use_safetensors=False)
        accelerator.register_for_checkpointing(sampler)
        """
    )
    findings = unsafe_loading_calls(source, "example.py")
    assert [finding.split(": ", 1)[1] for finding in findings] == [
        "torch.load without weights_only=True",
        "torch.load without weights_only=True",
        "weights_only=False",
        "pickle.loads unpickles",
        "allow_pickle=True",
        "trust_remote_code=True",
        "use_safetensors=False",
        "accelerate reloads registered objects with weights_only=False",
    ]


# ----- Python files in a checkpoint -----------------------------------------------------------------------------------
def plant_marker_code(folder: Path, marker_dir: Path) -> list[str]:
    """Prefixes every Python file of the checkpoint with code that leaves `<module>.ran` in `marker_dir` when it is
    imported (the rest of the file is unchanged, so trusting it still loads a working model)."""
    planted = []
    for path in sorted(folder.glob("*.py")):
        prefix = (
            "import pathlib as _pathlib\n"
            f"_pathlib.Path({str(marker_dir)!r}, __name__.rpartition('.')[2] + '.ran').touch()\n"
        )
        path.write_text(prefix + path.read_text(encoding="utf-8"), encoding="utf-8")
        planted.append(path.stem)
    return planted


def isolated_env(tmp_path: Path) -> dict:
    """A clean environment: offline, with its own Hugging Face cache (the dynamic-module cache included)."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
        "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
    }


def run_python(script: str, *args, cwd: Path, env: dict):
    """Runs `script` in a fresh interpreter and returns the JSON it prints last."""
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300, stdin=subprocess.DEVNULL, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# `input` is replaced so that a trust_remote_code prompt is counted (and answered "no") instead of waiting.
LOAD_WITH_INSTALLED_PACKAGE = """
import builtins, inspect, json, sys
prompts = []
builtins.input = lambda *args: prompts.append(args) or "n"
import torch
import modeling_mmretrieval
from transformers import AutoConfig, AutoModel, AutoProcessor

checkpoint = sys.argv[1]
loaded = {"config": AutoConfig.from_pretrained(checkpoint), "model": AutoModel.from_pretrained(checkpoint),
          "processor": AutoProcessor.from_pretrained(checkpoint)}
with torch.no_grad():
    query = loaded["model"].get_query_embeddings(**loaded["processor"].encode_queries([sys.argv[2]]))
print(json.dumps({
    "files": {name: inspect.getfile(type(value)) for name, value in loaded.items()},
    "package": modeling_mmretrieval.__file__,
    "prompts": len(prompts),
    "query_embedding": query.tolist(),
}))
"""

LOAD_REMOTE_CODE_WITHOUT_PACKAGE = """
import builtins, importlib.abc, json, sys
prompts = []
builtins.input = lambda *args: prompts.append(args) or "n"

class HidePackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "modeling_mmretrieval":
            raise ImportError("the package is deliberately hidden: " + name)

sys.meta_path.insert(0, HidePackage())
from transformers import AutoModel, AutoProcessor

checkpoint = sys.argv[1]
model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
print(json.dumps({"model": type(model).__module__, "processor": type(processor).__module__, "prompts": len(prompts)}))
"""


@pytest.fixture(scope="module")
def planted_loads(saved_retriever, tmp_path_factory):
    """Loads a checkpoint with marker code planted in its Python files, in two fresh interpreters run side by side:
    with the package installed and no trust_remote_code, and without the package and trust_remote_code=True."""
    root = tmp_path_factory.mktemp("planted")
    runs = {}
    for case, script in (("installed", LOAD_WITH_INSTALLED_PACKAGE), ("remote_code", LOAD_REMOTE_CODE_WITHOUT_PACKAGE)):
        folder = copy_checkpoint(saved_retriever[0], root / case / "checkpoint")
        markers = root / case / "markers"
        markers.mkdir()
        planted = plant_marker_code(folder, markers)
        process = subprocess.Popen(
            [sys.executable, "-c", script, str(folder), QUERY], cwd=root / case, env=isolated_env(root / case),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )
        runs[case] = (process, markers, planted)
    outcomes = {}
    for case, (process, markers, planted) in runs.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-4000:]
        outcomes[case] = {
            "result": json.loads(stdout.strip().splitlines()[-1]),
            "ran": sorted(path.stem for path in markers.glob("*.ran")),
            "planted": planted,
        }
    return outcomes


def test_installed_package_loads_a_checkpoint_without_running_its_code(planted_loads, saved_retriever):
    outcome = planted_loads["installed"]
    assert {"modeling_mmretrieval", "configuration_mmretrieval", "processing_mmretrieval"} <= set(outcome["planted"])
    assert outcome["ran"] == [], f"checkpoint code ran: {outcome['ran']}"
    result = outcome["result"]
    package_dir = Path(result["package"]).parent
    assert package_dir == Path(modeling_mmretrieval.__file__).parent
    for name, path in result["files"].items():
        assert Path(path).parent == package_dir, f"{name} class came from {path}"
    assert result["prompts"] == 0
    assert torch.allclose(torch.tensor(result["query_embedding"]), saved_retriever[1], atol=1e-6)


def test_trust_remote_code_does_run_the_checkpoint_code(planted_loads):
    """The control: without the package, trust_remote_code=True imports every planted file (so the check above
    would have seen it), which is exactly what docs/reliability.md warns about."""
    outcome = planted_loads["remote_code"]
    # The sentence-transformers glue is imported only by sentence-transformers or the pipeline, not by the Auto classes.
    assert outcome["ran"] == [name for name in outcome["planted"] if name != "integrations_mmretrieval"]
    assert outcome["result"]["model"].startswith("transformers_modules.")
    assert outcome["result"]["processor"].startswith("transformers_modules.")


def test_remote_code_processor_loads_without_prompting(planted_loads):
    assert planted_loads["remote_code"]["result"]["prompts"] == 0
