"""Robust decoding of product images into RGB PIL images.

Catalogue images arrive in many shapes (a PIL image, a `datasets.Image` dict `{"bytes", "path"}`, raw bytes,
a file path, or nothing at all) and some of them are broken. `load_product_image` turns every one of them into
either an RGB image or a typed, explained failure. The default policy is "mask": a broken or missing image makes
the product image-less (the collator sets `image_mask=0` and the model falls back to the product text) instead of
feeding the model a silent black or grey picture.

Behaviour per input (see also docs/data.md):

| input | result |
|---|---|
| RGB image / JPEG / PNG / ... | RGB image, EXIF orientation applied |
| greyscale (`L`, `1`), palette (`P`), CMYK, YCbCr, ... | converted to RGB |
| alpha (`RGBA`, `LA`, `PA`, `P` with transparency) | composited on **white** (catalogue background), not black |
| 16/32-bit integer or float (`I;16`, `I`, `F`) | rescaled to 8 bits (65535 -> 255), not clipped to white |
| `None`, `{"bytes": None, "path": None}`, missing file | `reason="missing"` |
| `b""` / 0-byte file | `reason="empty"` |
| not an image, corrupt bytes | `reason="undecodable"` |
| truncated file (pixel data cut short) | `reason="truncated"` (Pillow's `LOAD_TRUNCATED_IMAGES` is left alone) |
| width * height over `max_pixels` | `reason="too_large"`, refused from the header before any pixel is decoded |
| width or height 0 | `reason="zero_size"` |

With `on_error="mask"` a failure is returned as `ImageLoadResult(image=None, error=..., reason=...)`; with
`on_error="raise"` it raises `ImageDecodeError` (a `ValueError`) carrying the same reason. An input of an
unsupported Python type (say, an int) is a programming error and always raises `TypeError`.
"""

import contextlib
import enum
import io
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

# Catalogue photographs are far below this (the model only ever sees a few hundred pixels a side); anything larger
# is much more likely a decompression bomb than a product photo. Pillow's own default is ~89M pixels.
DEFAULT_MAX_IMAGE_PIXELS = 6000 * 6000

OnError = Literal["mask", "raise"]
_ON_ERROR_POLICIES = ("mask", "raise")

# Modes whose samples do not fit in 8 bits; `convert("L")` would clip them instead of rescaling.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_UNDECLARED_RANGES = {"I": (255.0, 65535.0), "F": (1.0, 255.0, 65535.0)}
_WIDE_MODES = (*_SIXTEEN_BIT_MODES, *_UNDECLARED_RANGES)

# Product photos are shot on white, so transparent pixels are filled with white.
_BACKGROUND_RGBA = (255, 255, 255, 255)

# Pillow reports truncated data with messages such as "image file is truncated" or "Truncated File Read".
_TRUNCATION_MARKER = "truncated"

_PIL_LIMIT_LOCK = threading.Lock()


class ImageProblem(str, enum.Enum):
    """Why a product image could not be turned into an RGB picture."""

    MISSING = "missing"
    EMPTY = "empty"
    UNDECODABLE = "undecodable"
    TRUNCATED = "truncated"
    TOO_LARGE = "too_large"
    ZERO_SIZE = "zero_size"
    UNSUPPORTED_MODE = "unsupported_mode"


class ImageDecodeError(ValueError):
    """A product image could not be decoded; `reason` says why (an `ImageProblem`)."""

    def __init__(self, reason: ImageProblem, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        # Keeps the error picklable (multiprocessing data loaders) despite the two-argument constructor.
        return type(self), (self.reason, str(self))


@dataclass(frozen=True)
class ImageLoadResult:
    """Outcome of `load_product_image`: an RGB `image`, or `image=None` with the `error` message and `reason`."""

    image: Image.Image | None
    error: str | None = None
    reason: ImageProblem | None = None

    @property
    def has_image(self) -> bool:
        """Whether the product has a usable image (the value of its `image_mask`)."""
        return self.image is not None


def _describe_source(value: Any) -> str:
    if isinstance(value, Mapping):
        return _describe_source(value.get("bytes") if value.get("bytes") is not None else value.get("path"))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"{len(value)} bytes"
    if isinstance(value, (str, os.PathLike)):
        return f"file {os.fspath(value)!r}"
    return type(value).__name__


def _validate_options(max_pixels: int | None, on_error: str) -> None:
    if on_error not in _ON_ERROR_POLICIES:
        raise ValueError(f"on_error must be one of {_ON_ERROR_POLICIES}, got {on_error!r}")
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive int or None (no limit), got {max_pixels!r}")


def _read_encoded_bytes(value: Any) -> bytes:
    """Resolve a dict / bytes / path input to the encoded image bytes, or raise `ImageDecodeError`."""
    if isinstance(value, Mapping):
        # `datasets.Image(decode=False)` rows: embedded bytes win; the path is only a fallback.
        if value.get("bytes") is not None:
            return _read_encoded_bytes(value["bytes"])
        if value.get("path"):
            return _read_encoded_bytes(value["path"])
        raise ImageDecodeError(ImageProblem.MISSING, "no image: the image entry has neither bytes nor a path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        encoded = bytes(value)
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise ImageDecodeError(ImageProblem.MISSING, f"no image: there is no file at {str(path)!r}")
        encoded = path.read_bytes()
    else:
        raise TypeError(
            "an image must be a PIL image, a datasets.Image dict {'bytes', 'path'}, bytes, a file path or None; "
            f"got {type(value).__name__}"
        )
    if not encoded:
        raise ImageDecodeError(ImageProblem.EMPTY, f"empty image ({_describe_source(value)})")
    return encoded


@contextlib.contextmanager
def _pil_limit_at_least(max_pixels: int | None) -> Iterator[None]:
    """Lift (never lower) Pillow's global pixel limit around one `Image.open`.

    Pillow checks its own `Image.MAX_IMAGE_PIXELS` while reading the header, so a caller limit above Pillow's
    would otherwise be overridden. Nothing changes in the usual case (caller limit at or below Pillow's), and
    the previous value is always restored: the global is never changed permanently.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is None or (max_pixels is not None and max_pixels <= current):
        yield
        return
    with _PIL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _resolve_source(value: Any) -> Image.Image | bytes:
    """Return the caller's PIL image as is, or the encoded bytes behind any other input."""
    if isinstance(value, Image.Image):
        return value
    if value is None:
        raise ImageDecodeError(ImageProblem.MISSING, "no image: the product has no image")
    return _read_encoded_bytes(value)


def _open_header(encoded: bytes, max_pixels: int | None) -> Image.Image:
    """Read the header only: Pillow decodes pixels lazily, on `load()`."""
    with _pil_limit_at_least(max_pixels):
        return Image.open(io.BytesIO(encoded))


def _check_dimensions(image: Image.Image, max_pixels: int | None) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(ImageProblem.ZERO_SIZE, f"zero-size image ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            ImageProblem.TOO_LARGE,
            f"image of {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels} "
            "(possible decompression bomb); raise max_pixels if such images are expected",
        )


def _wide_to_8bit(image: Image.Image) -> Image.Image:
    """Rescale a 16/32-bit integer or float greyscale image to 8 bits instead of clipping it."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode in _SIXTEEN_BIT_MODES:
        full_scale = 65535.0
    else:
        # "I" and "F" declare no bit depth: take the smallest usual range that holds the data, else its peak.
        peak = float(values.max(initial=0.0))
        full_scale = next((limit for limit in _UNDECLARED_RANGES[image.mode] if peak <= limit), peak)
    scaled = np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _WIDE_MODES:
        image = _wide_to_8bit(image)
    if image.has_transparency_data:
        background = Image.new("RGBA", image.size, _BACKGROUND_RGBA)
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _classify_pillow_failure(error: Exception) -> ImageProblem:
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageProblem.TOO_LARGE
    if isinstance(error, OSError) and _TRUNCATION_MARKER in str(error).lower():
        return ImageProblem.TRUNCATED
    return ImageProblem.UNDECODABLE


def _decode_to_rgb(value: Any, max_pixels: int | None) -> Image.Image:
    source = _resolve_source(value)
    try:
        image = source if isinstance(source, Image.Image) else _open_header(source, max_pixels)
        _check_dimensions(image, max_pixels)
        image.load()
        image = ImageOps.exif_transpose(image)
    except ImageDecodeError:
        raise
    except Exception as error:  # Pillow's format plugins raise many exception types on malformed files.
        problem = _classify_pillow_failure(error)
        description = problem.value.replace("_", " ")
        message = f"{description} image ({_describe_source(value)}): {type(error).__name__}: {error}"
        raise ImageDecodeError(problem, message) from error
    try:
        return _to_rgb(image)
    except ValueError as error:
        raise ImageDecodeError(
            ImageProblem.UNSUPPORTED_MODE, f"cannot convert an image of mode {image.mode!r} to RGB: {error}"
        ) from error


def load_product_image(
    value: Any,
    *,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    on_error: OnError = "mask",
) -> ImageLoadResult:
    """Decode one product image into an RGB PIL image, or explain why it cannot be.

    Args:
        value: a PIL image, a `datasets.Image` dict `{"bytes": ..., "path": ...}` (bytes preferred), raw encoded
            bytes, a file path (`str` / `os.PathLike`), or `None` for a product without an image.
        max_pixels: largest accepted `width * height`; checked on the header, before pixels are decoded, so
            decompression bombs cost nothing. `None` disables the limit.
        on_error: `"mask"` (default) returns `ImageLoadResult(image=None, ...)` for a missing or broken image so
            the caller can set `image_mask=0`; `"raise"` raises `ImageDecodeError` instead (every successful
            call then returns an image).

    Returns:
        `ImageLoadResult` with an RGB `image`, or `image=None` plus `error` and `reason` under the mask policy.

    Example:
    ```python
    >>> from modeling_mmretrieval.data.images import load_product_image
    >>> result = load_product_image({"bytes": b"not a jpeg", "path": None})
    >>> result.has_image, result.reason.value
    (False, 'undecodable')
    ```
    """
    _validate_options(max_pixels, on_error)
    try:
        return ImageLoadResult(image=_decode_to_rgb(value, max_pixels))
    except ImageDecodeError as error:
        if on_error == "raise":
            raise
        return ImageLoadResult(image=None, error=str(error), reason=error.reason)
