"""The shared decoding rule (slsg/image_modes.py) on frames encoded and decoded by real Pillow."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from slsg.image_modes import (
    COLOUR, GREYSCALE, UnsupportedImageMode, images_colour, png_significant_bits, rgb8_from_image, to_rgb8,
)


def _roundtrip(image: Image.Image, fmt: str = "PNG", pnginfo: PngImagePlugin.PngInfo | None = None):
    out = io.BytesIO()
    image.save(out, format=fmt, **({"pnginfo": pnginfo} if pnginfo else {}))
    data = out.getvalue()
    decoded = Image.open(io.BytesIO(data))
    decoded.load()
    return decoded, data


def _ramp16(top: int) -> np.ndarray:
    """A 4x8 16-bit ramp from 0 to ``top``."""
    return np.linspace(0, top, 32).round().astype(np.uint16).reshape(4, 8)


@pytest.fixture
def colours() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK"])
def test_eight_bit_modes_match_pillows_own_conversion(colours: np.ndarray, mode: str) -> None:
    image = Image.fromarray(colours, "RGB").convert(mode)
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    decoded, data = _roundtrip(image, fmt)
    assert decoded.mode == mode
    frame = rgb8_from_image(decoded, data)
    assert frame.pixels.dtype == np.uint8 and frame.pixels.shape == (6, 5, 3)
    np.testing.assert_array_equal(frame.pixels, np.asarray(decoded.convert("RGB")))
    assert frame.greyscale == (mode in ("L", "LA", "1"))


def test_greyscale_becomes_three_equal_channels(colours: np.ndarray) -> None:
    grey = Image.fromarray(colours, "RGB").convert("L")
    frame = rgb8_from_image(*_roundtrip(grey))
    for channel in range(3):
        np.testing.assert_array_equal(frame.pixels[:, :, channel], np.asarray(grey))


def test_sixteen_bit_png_is_scaled_by_its_depth_not_clipped_to_white() -> None:
    """The bug of issue 25: Pillow's convert('RGB') turns a 16-bit grey PNG all white."""
    raw = _ramp16(65535)
    decoded, data = _roundtrip(Image.fromarray(raw))
    assert decoded.mode == "I;16"
    assert np.asarray(decoded.convert("RGB"))[raw > 0].min() == 255  # what the gateway did before
    frame = rgb8_from_image(decoded, data)
    assert frame.bits == 16 and frame.greyscale
    np.testing.assert_array_equal(frame.pixels[:, :, 0], np.rint(raw / 65535 * 255).astype(np.uint8))
    assert frame.pixels.min() == 0 and frame.pixels.max() == 255


def test_twelve_bit_data_uses_the_png_sbit_chunk() -> None:
    raw = _ramp16(4095)  # a 12-bit camera's raw values in a 16-bit PNG
    info = PngImagePlugin.PngInfo()
    info.add(b"sBIT", bytes([12]))
    decoded, data = _roundtrip(Image.fromarray(raw), pnginfo=info)
    assert png_significant_bits(data) == 12
    frame = rgb8_from_image(decoded, data)
    assert frame.bits == 12
    np.testing.assert_array_equal(frame.pixels[:, :, 1], np.rint(raw / 4095 * 255).astype(np.uint8))
    without = rgb8_from_image(*_roundtrip(Image.fromarray(raw)))  # no sBIT: the container's 16 bits
    assert without.bits == 16 and without.pixels.max() == round(4095 / 65535 * 255)


def test_sbit_is_ignored_when_the_data_exceeds_it() -> None:
    """A file that follows the PNG standard scales 12-bit data to 16 bits and keeps sBIT = 12."""
    raw = _ramp16(65535)
    info = PngImagePlugin.PngInfo()
    info.add(b"sBIT", bytes([12]))
    frame = rgb8_from_image(*_roundtrip(Image.fromarray(raw), pnginfo=info))
    assert frame.bits == 16 and frame.pixels.max() == 255 and frame.pixels.min() == 0


def test_sixteen_bit_tiff_and_byte_orders() -> None:
    raw = _ramp16(65535)
    frame = rgb8_from_image(*_roundtrip(Image.fromarray(raw), "TIFF"))
    assert frame.bits == 16
    expected = np.rint(raw / 65535 * 255).astype(np.uint8)
    np.testing.assert_array_equal(frame.pixels[:, :, 2], expected)
    for mode, dtype in (("I;16B", ">u2"), ("I;16L", "<u2")):
        np.testing.assert_array_equal(to_rgb8(raw.astype(dtype), mode).pixels[:, :, 0], expected)


def test_thirty_two_bit_integer_and_float_frames() -> None:
    values = np.array([[-5, 0, 1023]], dtype=np.int32)
    np.testing.assert_array_equal(to_rgb8(values, "I", bits=10).pixels[0, :, 0], [0, 0, 255])
    floats = np.array([[-0.5, 0.0, 0.5, 1.0, 7.0]], dtype=np.float32)
    np.testing.assert_array_equal(to_rgb8(floats, "F").pixels[0, :, 0], [0, 0, 128, 255, 255])
    decoded, data = _roundtrip(Image.fromarray(floats), "TIFF")
    assert decoded.mode == "F"
    np.testing.assert_array_equal(rgb8_from_image(decoded, data).pixels[0, :, 0], [0, 0, 128, 255, 255])


@pytest.mark.parametrize("call, message", [
    (lambda: to_rgb8(np.zeros((2, 2, 3), np.uint8), "LAB"), "image mode 'LAB' cannot be inspected"),
    (lambda: to_rgb8(np.zeros((2, 2), np.uint8), "RGB"), "cannot have pixel array shape (2, 2)"),
    (lambda: to_rgb8(np.zeros((0, 2), np.uint16), "I;16"), "cannot have pixel array shape (0, 2)"),
    (lambda: to_rgb8(np.zeros((2, 2), np.uint16), "I;16", bits=17), "cannot have 17 significant bits"),
    (lambda: to_rgb8(np.full((2, 2), np.nan, np.float32), "F"), "NaN or infinite"),
])
def test_unreadable_frames_are_refused_with_the_reason(call, message: str) -> None:
    with pytest.raises(UnsupportedImageMode) as err:
        call()
    assert message in str(err.value)


def test_sbit_reader_on_other_bytes() -> None:
    assert png_significant_bits(b"GIF89a") is None
    assert png_significant_bits(b"\x89PNG\r\n\x1a\n\x00\x00") is None


def test_images_colour_says_greyscale_only_when_every_channel_agrees(colours: np.ndarray) -> None:
    grey = np.repeat(colours[:, :, :1], 3, axis=2)
    assert images_colour([grey, grey.copy()]) == GREYSCALE
    assert images_colour([grey, colours]) == COLOUR
    one_pixel_off = grey.copy()
    one_pixel_off[0, 0, 2] ^= 1
    assert images_colour([one_pixel_off]) == COLOUR
