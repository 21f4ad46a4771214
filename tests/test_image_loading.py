"""Decoding of product images, including every kind of broken image the mask policy must survive."""

import io
import pickle
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
from hostile_images import png_header_only
from PIL import Image, ImageFile

from modeling_mmretrieval.data import SAMPLE_DATA_DIR
from modeling_mmretrieval.data.images import (
    ImageDecodeError,
    ImageLoadResult,
    ImageProblem,
    load_product_image,
)


def encode(image: Image.Image, image_format: str, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **save_options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def catalogue_jpegs() -> list[bytes]:
    """Real 60x80 catalogue JPEGs from the committed sample."""
    images = pq.read_table(SAMPLE_DATA_DIR / "validation.parquet", columns=["image"]).column("image").to_pylist()
    return [image["bytes"] for image in images[:8]]


def pixels(result: ImageLoadResult) -> np.ndarray:
    assert result.has_image and result.error is None and result.reason is None
    assert result.image.mode == "RGB"
    return np.asarray(result.image)


def test_real_catalogue_jpeg_decodes_identically_from_every_input_form(catalogue_jpegs, tmp_path):
    encoded = catalogue_jpegs[0]
    path = tmp_path / "product.jpg"
    path.write_bytes(encoded)
    expected = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))

    forms = [
        encoded,
        bytearray(encoded),
        {"bytes": encoded, "path": None},
        {"bytes": None, "path": str(path)},
        str(path),
        path,
        Image.open(io.BytesIO(encoded)),
    ]
    for value in forms:
        decoded = pixels(load_product_image(value))
        assert decoded.shape == expected.shape
        np.testing.assert_array_equal(decoded, expected)


def test_every_sample_image_decodes_to_catalogue_size(catalogue_jpegs):
    for encoded in catalogue_jpegs:
        image = load_product_image(encoded).image
        assert image.mode == "RGB" and image.width <= 60 and image.height == 80


def test_corrupt_bytes_are_masked_as_undecodable(catalogue_jpegs):
    scrambled_header = bytes(byte ^ 0xFF for byte in catalogue_jpegs[0][:64]) + catalogue_jpegs[0][64:]
    for corrupt in (b"this is not an image", scrambled_header):
        result = load_product_image(corrupt)
        assert result.image is None and result.reason is ImageProblem.UNDECODABLE
        assert "undecodable" in result.error


def test_truncated_jpeg_is_masked_not_grey_filled(catalogue_jpegs):
    truncated = catalogue_jpegs[0][: len(catalogue_jpegs[0]) // 2]
    setting_before = ImageFile.LOAD_TRUNCATED_IMAGES
    result = load_product_image(truncated)
    assert result.image is None and result.reason is ImageProblem.TRUNCATED
    assert ImageFile.LOAD_TRUNCATED_IMAGES == setting_before
    with pytest.raises(ImageDecodeError, match="truncated") as raised:
        load_product_image(truncated, on_error="raise")
    assert raised.value.reason is ImageProblem.TRUNCATED


@pytest.mark.parametrize("value", [None, {"bytes": None, "path": None}, "does/not/exist.jpg"])
def test_missing_image_is_masked(value):
    result = load_product_image(value)
    assert result == ImageLoadResult(image=None, error=result.error, reason=ImageProblem.MISSING)
    assert result.error


def test_missing_file_under_raise_names_the_path(tmp_path):
    missing = tmp_path / "gone.jpg"
    with pytest.raises(ImageDecodeError, match="gone.jpg"):
        load_product_image(missing, on_error="raise")


def test_zero_byte_bytes_and_file_are_empty(tmp_path):
    empty_file = tmp_path / "empty.jpg"
    empty_file.write_bytes(b"")
    for value in (b"", empty_file, {"bytes": None, "path": str(empty_file)}):
        assert load_product_image(value).reason is ImageProblem.EMPTY


def test_greyscale_is_replicated_to_three_channels():
    decoded = pixels(load_product_image(encode(Image.new("L", (6, 8), 77), "PNG")))
    assert (decoded == 77).all()


def test_palette_image_keeps_its_colours_and_transparent_index_becomes_white():
    palette_image = Image.new("P", (4, 4), 1)
    palette_image.putpalette([0, 0, 0, 200, 10, 20] + [0] * (256 * 3 - 6))
    palette_image.putpixel((0, 0), 0)
    opaque = pixels(load_product_image(encode(palette_image, "PNG")))
    assert tuple(opaque[1, 1]) == (200, 10, 20) and tuple(opaque[0, 0]) == (0, 0, 0)

    transparent = pixels(load_product_image(encode(palette_image, "PNG", transparency=0)))
    assert tuple(transparent[0, 0]) == (255, 255, 255) and tuple(transparent[1, 1]) == (200, 10, 20)


def test_rgba_is_composited_on_white_not_black():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 128))
    rgba.putpixel((2, 2), (10, 20, 30, 255))
    decoded = pixels(load_product_image(encode(rgba, "PNG")))
    assert tuple(decoded[0, 0]) == (255, 255, 255)
    red, green, blue = (int(channel) for channel in decoded[1, 1])
    assert red == 255 and 120 <= green <= 135 and green == blue
    assert tuple(decoded[2, 2]) == (10, 20, 30)


def test_la_transparency_is_white_and_the_callers_image_is_untouched():
    grey_alpha = Image.new("LA", (3, 3), (0, 0))
    decoded = pixels(load_product_image(grey_alpha))
    assert (decoded == 255).all()
    assert grey_alpha.mode == "LA" and grey_alpha.getpixel((0, 0)) == (0, 0)


def test_cmyk_jpeg_converts_to_rgb_colours():
    cyan = encode(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG", quality=95)
    red, green, blue = (int(channel) for channel in pixels(load_product_image(cyan))[4, 4])
    assert red < 20 and green > 235 and blue > 235


def test_sixteen_bit_greyscale_is_rescaled_not_clipped():
    gradient = np.array([[0, 32768, 65535]], dtype=np.uint16)
    sixteen_bit = Image.fromarray(gradient)
    assert sixteen_bit.mode == "I;16"
    for value in (sixteen_bit, encode(sixteen_bit, "PNG")):
        decoded = pixels(load_product_image(value))[0, :, 0]
        assert decoded[0] == 0 and abs(int(decoded[1]) - 128) <= 1 and decoded[2] == 255


def test_32_bit_integer_image_with_16_bit_values_is_rescaled():
    mid_grey = Image.fromarray(np.full((2, 2), 32768, dtype=np.int32))
    assert mid_grey.mode == "I"
    assert abs(int(pixels(load_product_image(mid_grey))[0, 0, 0]) - 128) <= 1


def test_float_image_in_unit_range_is_rescaled():
    half = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))
    assert abs(int(pixels(load_product_image(half))[0, 0, 0]) - 128) <= 1


def test_bomb_is_refused_from_the_header_before_any_pixel_is_decoded():
    # No pixel data follows the header: had the decoder run, it would have failed ("undecodable"), as it does for
    # the same file under the limit.
    bomb = png_header_only(5_000, 5_000)
    result = load_product_image(bomb, max_pixels=1_000_000)
    assert result.reason is ImageProblem.TOO_LARGE and "max_pixels=1000000" in result.error
    assert load_product_image(png_header_only(500, 500), max_pixels=1_000_000).reason is ImageProblem.UNDECODABLE
    # Far beyond Pillow's own limit too: Pillow refuses it while reading the header, still before decoding.
    assert load_product_image(png_header_only(50_000, 50_000)).reason is ImageProblem.TOO_LARGE


def test_small_configured_limit_refuses_an_ordinary_image(catalogue_jpegs):
    assert load_product_image(catalogue_jpegs[0], max_pixels=60 * 80 - 1).reason is ImageProblem.TOO_LARGE
    assert load_product_image(catalogue_jpegs[0], max_pixels=60 * 80).has_image
    assert load_product_image(catalogue_jpegs[0], max_pixels=None).has_image


def test_limit_above_pillows_is_honoured_without_changing_pillows_global(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    large = encode(Image.new("L", (200, 200), 9), "PNG")
    result = load_product_image(large, max_pixels=100_000)
    assert pixels(result).shape == (200, 200, 3)
    assert Image.MAX_IMAGE_PIXELS == 1_000


def test_pillows_own_bomb_error_and_warning_are_reported_as_too_large(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    # 40,000 pixels is over twice Pillow's limit: Pillow raises DecompressionBombError itself.
    large = encode(Image.new("L", (200, 200), 9), "PNG")
    assert load_product_image(large, max_pixels=500).reason is ImageProblem.TOO_LARGE
    # 1,600 pixels is between Pillow's limit and twice it: Pillow only warns, an error under "-W error".
    medium = encode(Image.new("L", (40, 40), 9), "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert load_product_image(medium, max_pixels=800).reason is ImageProblem.TOO_LARGE
    assert Image.MAX_IMAGE_PIXELS == 1_000


@pytest.mark.parametrize("size", [(0, 0), (60, 0), (0, 80)])
def test_zero_size_image_is_masked(size):
    assert load_product_image(Image.new("RGB", size)).reason is ImageProblem.ZERO_SIZE


def test_exif_orientation_is_applied():
    landscape = Image.new("RGB", (40, 20), (0, 90, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    rotated = load_product_image(encode(landscape, "JPEG", exif=exif.tobytes())).image
    assert rotated.size == (20, 40)


def test_raise_policy_gives_a_typed_value_error_that_survives_pickling():
    with pytest.raises(ImageDecodeError) as raised:
        load_product_image(None, on_error="raise")
    assert isinstance(raised.value, ValueError) and raised.value.reason is ImageProblem.MISSING
    copied = pickle.loads(pickle.dumps(raised.value))  # data-loader workers send errors between processes
    assert copied.reason is ImageProblem.MISSING and str(copied) == str(raised.value)


@pytest.mark.parametrize(
    "options, error",
    [
        ({"on_error": "ignore"}, "on_error"),
        ({"max_pixels": 0}, "max_pixels"),
        ({"max_pixels": 2.5}, "max_pixels"),
    ],
)
def test_invalid_options_are_rejected(options, error):
    with pytest.raises(ValueError, match=error):
        load_product_image(b"", **options)


def test_unsupported_input_type_is_a_type_error_even_under_mask():
    with pytest.raises(TypeError, match="int"):
        load_product_image(12345)
