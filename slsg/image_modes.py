"""One decoding rule for every frame: any image mode Pillow reads -> uint8 RGB ``[H, W, 3]``.

Both the gateway and the training side use it, so a model sees the same pixels in training,
evaluation and service. The core imports numpy only: callers hand over the decoded array, the
Pillow mode name and the frame's bit depth (:func:`to_rgb8`), or a Pillow image object itself
(:func:`rgb8_from_image`, duck-typed, so Pillow is never imported here).

The rule, mode by mode:

- ``RGB``, ``RGBA``, ``RGBX``, ``RGBa``: the colour channels; alpha is dropped (as Pillow's
  ``convert("RGB")`` does: an inspection frame is opaque).
- ``L``, ``LA``, ``La``, ``1``: greyscale copied to three channels (``1``: 0 or 255).
- ``P``, ``PA``: the palette's colours (an image without a palette is read as greyscale indices).
- ``CMYK``: ``255 (1 - C) (1 - K)`` per channel, Pillow's own formula; ``YCbCr``: JFIF's.
- ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` (16-bit, what mono 12/16-bit industrial cameras give)
  and ``I`` (32-bit integers): scaled to 8 bits by the frame's bit depth ``b``,
  ``round(v * 255 / (2**b - 1))``, negative values as 0, then copied to three channels.
- ``F`` (32-bit float): read as intensities in [0, 1] (the convention of float images), clipped.

The bit depth: a PNG's ``sBIT`` chunk says how many bits of each sample are significant (12 for a
12-bit camera frame in a 16-bit PNG); without it, the container's depth (16 for a 16-bit PNG or
TIFF; 32 for ``I``). The PNG standard asks writers to scale such data to the full 16 bits, and
``sBIT`` then only records where it came from; many camera tools instead write the raw 12-bit
values. So ``sBIT`` is used where the data fits in it, and a frame with any value above
``2**sBIT - 1`` (it cannot be raw ``sBIT``-bit data) is scaled by the container's depth instead;
nothing is ever clipped to white by a depth the data exceeds.

A 16-bit colour PNG is read by Pillow as 8-bit ``RGB`` (the high byte of each sample), which is
right for files that follow the standard; such a file holding raw 12-bit values comes out dark.
Modes without a rule (``LAB``, ``HSV``, ``I;16S``, ...) are refused with :class:`UnsupportedImageMode`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Protocol
from collections.abc import Iterable

import numpy as np

COLOUR, GREYSCALE = "colour", "greyscale"
GREYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr"})
SUPPORTED_MODES = GREYSCALE_MODES | COLOUR_MODES
_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_CONTAINER_BITS = {**{m: 16 for m in _SIXTEEN_BIT}, "I": 32}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_BITS_PER_SAMPLE = 258


class UnsupportedImageMode(ValueError):
    """The frame's pixels cannot be turned into RGB by this rule; the message says why."""


@dataclass(frozen=True)
class Rgb8Frame:
    """A frame in the one form every model takes, and what it was before."""

    pixels: np.ndarray  # uint8 [H, W, 3]
    source_mode: str  # the Pillow mode it was decoded from
    greyscale: bool  # True when the frame had one intensity channel (copied to three)
    bits: int  # the bit depth its samples were scaled by (8 for 8-bit modes)


class PillowLikeImage(Protocol):
    """What :func:`rgb8_from_image` reads of a Pillow image (Pillow itself is not imported here)."""

    mode: str
    format: str | None

    def getpalette(self) -> list[int] | None: ...


def is_greyscale_mode(mode: str) -> bool:
    """True for modes with a single intensity channel (optionally with alpha)."""
    return mode in GREYSCALE_MODES


def images_colour(images: Iterable[np.ndarray]) -> str:
    """``"greyscale"`` when every uint8 RGB image has three equal channels everywhere, else ``"colour"``.

    What a model card records of its training images (``ModelCard.image_colour``), so the gateway can
    warn when a colour-trained model is sent greyscale frames.
    """
    for image in images:
        if not (np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])):
            return COLOUR
    return GREYSCALE


def png_significant_bits(data: bytes) -> int | None:
    """The largest significant-bit count in a PNG's ``sBIT`` chunk, or None (not a PNG, or no ``sBIT``).

    Reads the chunks before the image data only; a damaged chunk list returns None (the decoder
    reports the damage itself).
    """
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"sBIT" and body and len(body) == length:
            return max(body)
        if kind in (b"IDAT", b"IEND"):
            return None
        pos += 12 + length
    return None


def to_rgb8(pixels: np.ndarray, mode: str, *, bits: int | None = None,
            palette: np.ndarray | list[int] | None = None) -> Rgb8Frame:
    """Turn a decoded frame into uint8 RGB ``[H, W, 3]`` by the rule in this module's docstring.

    ``pixels`` is ``numpy.asarray(image)`` of a Pillow image of mode ``mode``; ``bits`` the frame's
    significant bits per sample (16- and 32-bit modes only; None = the container's depth);
    ``palette`` the flat RGB palette of a ``P``/``PA`` image.
    """
    if mode not in SUPPORTED_MODES:
        raise UnsupportedImageMode(
            f"image mode {mode!r} cannot be inspected; send RGB, greyscale (8- or 16-bit), palette or CMYK frames")
    array = np.asarray(pixels)
    _check_shape(array, mode)
    if mode in _CONTAINER_BITS:
        depth = _bit_depth(array, mode, bits)
        return Rgb8Frame(_grey_to_rgb(_scale_to_8bit(array, depth)), mode, True, depth)
    return Rgb8Frame(_eight_bit_to_rgb(array, mode, palette), mode, is_greyscale_mode(mode), 8)


def rgb8_from_image(image: PillowLikeImage, data: bytes | None = None) -> Rgb8Frame:
    """:func:`to_rgb8` of a loaded Pillow image; ``data``, its encoded bytes, supplies a PNG's ``sBIT``.

    A TIFF's BitsPerSample tag gives its depth; anything else is read at its container's depth.
    """
    mode = image.mode
    bits = png_significant_bits(data) if data is not None else None
    if bits is None and image.format == "TIFF":
        bits = _tiff_bits(image)
    palette = image.getpalette() if mode in ("P", "PA") else None
    return to_rgb8(np.asarray(image), mode, bits=bits, palette=palette)


def _tiff_bits(image: Any) -> int | None:
    per_sample = getattr(image, "tag_v2", {}).get(_TIFF_BITS_PER_SAMPLE)
    if isinstance(per_sample, tuple):
        per_sample = per_sample[0] if per_sample else None
    return int(per_sample) if per_sample else None


def _check_shape(array: np.ndarray, mode: str) -> None:
    channels = {"LA": 2, "La": 2, "PA": 2, "RGB": 3, "YCbCr": 3, "RGBA": 4, "RGBX": 4, "RGBa": 4, "CMYK": 4}
    want = channels.get(mode)
    ok = array.ndim == 2 if want is None else (array.ndim == 3 and array.shape[2] == want)
    if not ok or array.shape[0] == 0 or array.shape[1] == 0:
        raise UnsupportedImageMode(f"a {mode!r} frame cannot have pixel array shape {array.shape}")


def _bit_depth(array: np.ndarray, mode: str, bits: int | None) -> int:
    """The depth to scale by: ``bits`` unless the data exceeds it, else the container's."""
    container = _CONTAINER_BITS[mode]
    if bits is None:
        return container
    if not 1 <= bits <= container:
        raise UnsupportedImageMode(f"a {mode!r} frame cannot have {bits} significant bits (1 to {container})")
    return bits if int(array.max()) <= (1 << bits) - 1 else container


def _scale_to_8bit(array: np.ndarray, bits: int) -> np.ndarray:
    top = (1 << bits) - 1
    if array.dtype.itemsize <= 2 and array.dtype.kind == "u":  # 16-bit frames: a table, no float copy
        table = np.rint(np.minimum(np.arange(1 << 16), top) * (255.0 / top)).astype(np.uint8)
        return table[array]
    values = np.clip(array.astype(np.float64), 0.0, float(top))
    return np.rint(values * (255.0 / top)).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def _eight_bit_to_rgb(array: np.ndarray, mode: str, palette: np.ndarray | list[int] | None) -> np.ndarray:
    if mode == "1":
        return _grey_to_rgb(np.where(array, 255, 0).astype(np.uint8))
    if mode == "F":
        if not np.isfinite(array).all():
            raise UnsupportedImageMode("a floating-point ('F') frame holds NaN or infinite values")
        return _grey_to_rgb(np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8))
    if mode == "L":
        return _grey_to_rgb(array.astype(np.uint8, copy=False))
    if mode in ("LA", "La"):
        return _grey_to_rgb(array[:, :, 0].astype(np.uint8))
    if mode in ("P", "PA"):
        return _palette_to_rgb(array if mode == "P" else array[:, :, 0], palette)
    if mode == "CMYK":
        return _cmyk_to_rgb(array)
    if mode == "YCbCr":
        return _ycbcr_to_rgb(array)
    return np.ascontiguousarray(array[:, :, :3], dtype=np.uint8)


def _palette_to_rgb(indices: np.ndarray, palette: np.ndarray | list[int] | None) -> np.ndarray:
    if palette is None:
        return _grey_to_rgb(indices.astype(np.uint8))
    table = np.zeros((256, 3), dtype=np.uint8)
    flat = np.asarray(palette, dtype=np.uint8).reshape(-1)
    entries = min(256, flat.size // 3)
    table[:entries] = flat[:entries * 3].reshape(entries, 3)
    return table[indices.astype(np.uint8)]


def _cmyk_to_rgb(array: np.ndarray) -> np.ndarray:
    cmy = array[:, :, :3].astype(np.float64) / 255.0
    k = array[:, :, 3:].astype(np.float64) / 255.0
    return np.rint(255.0 * (1.0 - cmy) * (1.0 - k)).astype(np.uint8)


def _ycbcr_to_rgb(array: np.ndarray) -> np.ndarray:
    y, cb, cr = (array[:, :, i].astype(np.float64) for i in range(3))
    rgb = np.stack([y + 1.402 * (cr - 128.0),
                    y - 0.344136 * (cb - 128.0) - 0.714136 * (cr - 128.0),
                    y + 1.772 * (cb - 128.0)], axis=2)
    return np.rint(np.clip(rgb, 0.0, 255.0)).astype(np.uint8)
