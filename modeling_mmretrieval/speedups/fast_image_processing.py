"""Batched image preprocessing that reproduces a PIL-backend image processor (CLIP, DINOv2/BiT, ViT, ...).

Transformers' PIL image processors handle one image at a time: PIL resize, numpy centre crop, a float64
rescale and a float32 normalise, each in Python. `FastImageProcessor` reads the same settings and processes
a whole batch at once: images of one size are stacked into a channels-last uint8 tensor and resized by
`torch.nn.functional.interpolate(..., antialias=True)`, whose uint8 kernel follows Pillow's resampling
(same filter support, same coefficients, fixed-point arithmetic), then cropped, rescaled and normalised
in one fused pass.

Tolerance: PyTorch's kernel rounds its intermediate row pass slightly differently from Pillow, so a small
fraction of 8-bit pixel values (about 0.5% on the 60x80 catalogue photos) differ by at most
`MAX_PIXEL_LEVEL_DIFFERENCE` levels before normalisation; everything else is identical. After
normalisation the difference is therefore at most `MAX_PIXEL_LEVEL_DIFFERENCE / (255 * std)` per value
(`pixel_value_tolerance` computes it for a given processor).

Example:
```python
>>> from transformers import CLIPImageProcessorPil
>>> from modeling_mmretrieval.speedups.fast_image_processing import FastImageProcessor
>>> fast = FastImageProcessor.from_image_processor(CLIPImageProcessorPil())
>>> pixel_values = fast(images=pil_images)["pixel_values"]  # (len(pil_images), 3, 224, 224) float32
```
"""

import math
import mmap
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BatchFeature
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import PILImageResampling

# Images resized and normalised together: large enough to amortise per-call overhead, small enough that the
# float32 working set (600 KiB per 224x224 image) stays in the last-level cache.
IMAGES_PER_CHUNK = 16

# Outputs at least this large are backed by 2 MiB transparent huge pages where the OS offers them (Linux).
HUGE_PAGE_MIN_BYTES = 4 << 20

# Largest difference, in 8-bit levels, between this module's resized pixels and Pillow's.
MAX_PIXEL_LEVEL_DIFFERENCE = 2

# Pillow filters whose antialiased (support-scaled) form `interpolate` implements for uint8 images.
_INTERPOLATE_MODES = {
    PILImageResampling.BILINEAR: "bilinear",
    PILImageResampling.BICUBIC: "bicubic",
}


class UnsupportedImageProcessorError(ValueError):
    """The reference image processor uses a setting the batched path does not reproduce."""


def resized_height_width(height: int, width: int, size: Mapping[str, int]) -> tuple[int, int]:
    """Output `(height, width)` of transformers' resize for a size dict, with its rounding.

    `{"shortest_edge": s}` scales the short side to `s` and the long side to `int(s * long / short)`;
    `{"height": h, "width": w}` is exact.

    Example:
    ```python
    >>> resized_height_width(80, 60, {"shortest_edge": 224})
    (298, 224)
    ```
    """
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    shortest_edge = size.get("shortest_edge")
    if not shortest_edge or size.get("longest_edge"):
        raise UnsupportedImageProcessorError(
            f"size {dict(size)} is not supported by the batched path; use 'shortest_edge' or 'height'+'width'."
        )
    short, long = sorted((height, width))
    if short < 1:
        raise ValueError(f"cannot resize a {width}x{height} image: it has no pixels")
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def center_crop_offsets(height: int, width: int, crop_height: int, crop_width: int) -> tuple[int, int, int, int]:
    """`(top_pad, left_pad, top, left)` of transformers' centre crop: zero padding first when the image is
    smaller than the crop, then the crop's corner in the padded image."""
    padded_height, padded_width = max(crop_height, height), max(crop_width, width)
    top_pad = -(-(padded_height - height) // 2)
    left_pad = -(-(padded_width - width) // 2)
    top = (height - crop_height) // 2 + top_pad
    left = (width - crop_width) // 2 + left_pad
    return top_pad, left_pad, max(top, 0), max(left, 0)


def _empty_float_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor; a large one is backed by transparent huge pages where available.

    A batch of 224x224 images is tens of MiB of fresh memory. Faulting it in 4 KiB pages can cost more
    than the normalisation itself on virtual machines; with 2 MiB pages the kernel takes 512 times fewer
    faults. The tensor owns the mapping, which is released with it.
    """
    num_bytes = math.prod(shape) * 4
    if num_bytes < HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=torch.float32)
    memory = mmap.mmap(-1, num_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=torch.float32).view(shape)


def _rgb_array(image) -> np.ndarray:
    """`(height, width, 3)` uint8 pixels, converted to RGB exactly as the reference processor does."""
    if isinstance(image, Image.Image):
        return np.asarray(image) if image.mode == "RGB" else convert_to_rgb(image, return_numpy=True)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
        return image
    raise TypeError(
        "FastImageProcessor takes PIL images or (height, width, 3) uint8 arrays; got "
        f"{type(image).__name__}{getattr(image, 'shape', '')}."
    )


@dataclass(frozen=True)
class FastImageProcessor:
    r"""
    Batched resize, centre crop, rescale and normalise with the settings of a PIL-backend image processor.

    Build it with [`from_image_processor`]; calling it returns a `BatchFeature` with `pixel_values` of
    shape `(num_images, 3, height, width)` like the reference processor (see the module docstring for the
    tolerance). Images may have different sizes: each size is resized as one batch.

    Example:
    ```python
    >>> fast = FastImageProcessor.from_image_processor(AutoImageProcessor.from_pretrained(folder))
    >>> fast(images=[image_a, image_b])["pixel_values"].shape
    torch.Size([2, 3, 224, 224])
    ```
    """

    size: Mapping[str, int] | None
    crop_size: tuple[int, int] | None
    resample_mode: str
    scale: tuple[float, float, float]
    offset: tuple[float, float, float]

    @classmethod
    def from_image_processor(cls, image_processor) -> "FastImageProcessor":
        """Reads the settings of a transformers image processor; raises `UnsupportedImageProcessorError`
        (a `ValueError`) naming any setting this path cannot reproduce."""
        settings = image_processor.to_dict()
        if settings.get("do_pad"):
            raise UnsupportedImageProcessorError("do_pad=True is not supported by the batched path.")
        size = settings.get("size") if settings.get("do_resize", True) else None
        resample = PILImageResampling(settings.get("resample", PILImageResampling.BILINEAR))
        if size is not None and resample not in _INTERPOLATE_MODES:
            raise UnsupportedImageProcessorError(
                f"resample={resample.name} is not supported by the batched path; "
                f"supported: {[mode.name for mode in _INTERPOLATE_MODES]}."
            )
        crop = settings.get("crop_size") if settings.get("do_center_crop") else None
        crop_size = (int(crop["height"]), int(crop["width"])) if crop else None
        # (x * rescale - mean) / std = x * scale + offset, per channel.
        rescale = settings.get("rescale_factor", 1 / 255) if settings.get("do_rescale", True) else 1.0
        mean, std = (0.0,) * 3, (1.0,) * 3
        if settings.get("do_normalize", True):
            mean = _per_channel(settings.get("image_mean"), "image_mean")
            std = _per_channel(settings.get("image_std"), "image_std")
        scale = tuple(rescale / channel_std for channel_std in std)
        offset = tuple(-channel_mean / channel_std for channel_mean, channel_std in zip(mean, std))
        return cls(
            size=dict(size) if size is not None else None,
            crop_size=crop_size,
            resample_mode=_INTERPOLATE_MODES.get(resample, "bilinear"),
            scale=scale,
            offset=offset,
        )

    def output_height_width(self, height: int, width: int) -> tuple[int, int]:
        """Size of the processed image for an input of `height x width`."""
        if self.crop_size is not None:
            return self.crop_size
        if self.size is not None:
            return resized_height_width(height, width, self.size)
        return height, width

    def _resize_and_crop(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 `(n, 3, h, w)` channels-last images of one size -> uint8 resized and cropped images."""
        height, width = pixels.shape[-2:]
        if self.size is not None:
            target = resized_height_width(height, width, self.size)
            if target != (height, width):
                pixels = F.interpolate(
                    pixels, size=target, mode=self.resample_mode, antialias=True, align_corners=False
                )
                height, width = target
        if self.crop_size is None:
            return pixels
        crop_height, crop_width = self.crop_size
        top_pad, left_pad, top, left = center_crop_offsets(height, width, crop_height, crop_width)
        if top_pad or left_pad:
            padded = pixels.new_zeros((*pixels.shape[:2], max(crop_height, height), max(crop_width, width)))
            padded[..., top_pad : top_pad + height, left_pad : left_pad + width] = pixels
            pixels = padded
        return pixels[..., top : top + crop_height, left : left + crop_width]

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """`(len(images), 3, height, width)` float32 pixel values for PIL images or HWC uint8 arrays."""
        arrays = [_rgb_array(image) for image in images]
        if not arrays:
            raise ValueError("FastImageProcessor needs at least one image.")
        for position, array in enumerate(arrays):
            if array.shape[0] < 1 or array.shape[1] < 1:
                raise ValueError(
                    f"Image {position} is {array.shape[1]}x{array.shape[0]}: an image without pixels cannot be "
                    "processed (load_product_image reports it as a zero-size image)."
                )
        output_sizes = {self.output_height_width(*array.shape[:2]) for array in arrays}
        if len(output_sizes) > 1:
            raise ValueError(
                f"Images resize to different shapes {sorted(output_sizes)} and cannot be stacked; "
                "set a crop_size or a fixed height and width."
            )
        positions_by_size = defaultdict(list)
        for position, array in enumerate(arrays):
            positions_by_size[array.shape[:2]].append(position)
        output = _empty_float_tensor((len(arrays), 3, *output_sizes.pop()))
        for positions in positions_by_size.values():
            # Chunks keep the float working set in cache; one huge batch is slower, not faster.
            for start in range(0, len(positions), IMAGES_PER_CHUNK):
                chunk = positions[start : start + IMAGES_PER_CHUNK]
                # Stacked HWC arrays are an NCHW tensor in channels-last layout, the layout of the fast uint8 kernel.
                stacked = torch.from_numpy(np.stack([arrays[position] for position in chunk])).permute(0, 3, 1, 2)
                self._normalize_into(output, chunk, self._resize_and_crop(stacked))
        return output

    def _normalize_into(self, output: torch.Tensor, positions: list[int], pixels: torch.Tensor) -> None:
        """Writes `pixels * scale + offset` to `output[positions]`, in place when the positions are a run.

        numpy does it: one single-threaded pass per operation, converting from the channels-last uint8 layout
        on the way. This memory-bound work gains nothing from more threads and stalls at their barriers
        when cores are shared.
        """
        first = positions[0]
        is_run = positions[-1] - first == len(positions) - 1
        target = output[first : first + len(positions)] if is_run else torch.empty((len(positions), *output.shape[1:]))
        values = target.numpy()
        np.multiply(pixels.numpy(), np.asarray(self.scale, dtype=np.float32).reshape(1, 3, 1, 1), out=values)
        np.add(values, np.asarray(self.offset, dtype=np.float32).reshape(1, 3, 1, 1), out=values)
        if not is_run:
            output[torch.tensor(positions)] = target

    def __call__(self, images: Sequence, return_tensors: str = "pt", **kwargs) -> BatchFeature:
        """`BatchFeature({"pixel_values": ...})`, like calling the reference image processor."""
        if kwargs:
            raise TypeError(f"FastImageProcessor takes no per-call settings, got {sorted(kwargs)}.")
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        return BatchFeature({"pixel_values": self.preprocess(images)}, tensor_type=return_tensors)


def _per_channel(values, name: str) -> tuple[float, float, float]:
    if values is None:
        raise UnsupportedImageProcessorError(f"do_normalize=True needs {name}.")
    values = [values] * 3 if isinstance(values, (int, float)) else list(values)
    if len(values) != 3:
        raise UnsupportedImageProcessorError(f"{name} must have 3 values (RGB), got {values}.")
    return tuple(float(value) for value in values)


def pixel_value_tolerance(fast: FastImageProcessor) -> float:
    """Largest per-value difference from the reference processor's `pixel_values` allowed by the stated
    tolerance: `MAX_PIXEL_LEVEL_DIFFERENCE` 8-bit levels through the processor's rescale and normalise."""
    return MAX_PIXEL_LEVEL_DIFFERENCE * max(abs(value) for value in fast.scale) + 1e-5


__all__ = [
    "MAX_PIXEL_LEVEL_DIFFERENCE",
    "FastImageProcessor",
    "UnsupportedImageProcessorError",
    "center_crop_offsets",
    "pixel_value_tolerance",
    "resized_height_width",
]
