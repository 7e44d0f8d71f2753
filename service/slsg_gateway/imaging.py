"""Image decoding, resizing to the model input, and heat-map PNGs.

Runs in a thread pool (Pillow releases the GIL while decoding). When a JPEG frame is much larger
than the model input it is decoded at reduced scale (Pillow's draft mode: the DCT itself skips
the detail), which is several times cheaper than a full decode followed by a resize.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from slsg.contract import RESIZE_BILINEAR, RESIZE_LANCZOS
from slsg_gateway.errors import BadImage, PayloadTooLarge, UnsupportedMediaType

# media type -> Pillow format
IMAGE_MEDIA_TYPES: dict[str, str] = {
    "image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/bmp": "BMP",
    "image/x-ms-bmp": "BMP", "image/tiff": "TIFF",
}
FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
RESIZE_FILTERS = {RESIZE_BILINEAR: Image.BILINEAR, RESIZE_LANCZOS: Image.LANCZOS}  # the card's name -> Pillow's


@dataclass
class Frame:
    """A decoded frame: ``pixels`` uint8 [H, W, 3] at the model input size, plus the original size."""

    pixels: np.ndarray
    width: int
    height: int
    decode_ms: float
    preprocess_ms: float
    draft: bool
    full: Image.Image | None = None  # the full-size RGB frame, kept only for heat-map overlays


def check_media_type(content_type: str | None) -> str:
    """The bare media type if it is an accepted image type, else 415."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media not in IMAGE_MEDIA_TYPES:
        accepted = ", ".join(sorted(set(IMAGE_MEDIA_TYPES) - {"image/jpg", "image/x-ms-bmp"}))
        raise UnsupportedMediaType(
            f"content type {media or '(none)'!r} is not accepted; send {accepted} or multipart/form-data")
    return media


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise BadImage("empty body: no image bytes received", code="empty_body")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"image rejected as a decompression bomb: {exc}", code="image_too_large") from None
    except UnidentifiedImageError:
        raise BadImage(f"not a {'/'.join(FORMATS)} image ({len(data)} bytes)", code="not_an_image") from None
    except Exception as exc:  # malformed headers raise assorted errors inside Pillow's plugins
        raise BadImage(f"unreadable image header: {exc}", code="not_an_image") from None
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
            code="image_too_large")
    return image


def decode_frame(data: bytes, input_size: tuple[int, int], *, max_pixels: int, draft_min_ratio: float = 2.0,
                 keep_full: bool = False, resize: str = RESIZE_BILINEAR) -> Frame:
    """Decode ``data`` and resize it to ``input_size`` = (height, width) for the model with the card's
    ``resize`` filter. A model that expects LANCZOS (the authors' preprocessing) gets the full decode:
    JPEG draft mode would already have downscaled the frame another way."""
    t0 = time.perf_counter()
    image = _open(data, max_pixels)
    width, height = image.size
    in_h, in_w = input_size
    use_draft = (not keep_full and resize == RESIZE_BILINEAR and image.format == "JPEG"
                 and min(width / in_w, height / in_h) >= draft_min_ratio)
    if use_draft:
        image.draft("RGB", (in_w, in_h))  # picks the largest 1/2, 1/4, 1/8 scale still >= the input size
    try:
        image.load()
    except Exception as exc:
        raise BadImage(f"image data is truncated or corrupt: {exc}", code="truncated_image") from None
    t1 = time.perf_counter()
    rgb = image.convert("RGB")
    small = rgb.resize((in_w, in_h), RESIZE_FILTERS[resize])
    pixels = np.asarray(small, dtype=np.uint8)
    t2 = time.perf_counter()
    return Frame(pixels, width, height, (t1 - t0) * 1e3, (t2 - t1) * 1e3, use_draft, rgb if keep_full else None)


def _colour_table() -> np.ndarray:
    """A 256-entry blue -> cyan -> yellow -> red table (jet-like, no matplotlib needed)."""
    x = np.linspace(0.0, 1.0, 256)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], axis=1) * 255).astype(np.uint8)


_COLOURS = _colour_table()


def heatmap_png(anomaly_map: np.ndarray, size: tuple[int, int], frame: Image.Image | None = None,
                alpha: float = 0.5) -> bytes:
    """PNG of ``anomaly_map`` (model resolution, values in [0, 1]) at ``size`` = (width, height).

    With ``frame`` the coloured map is blended over it; without, the coloured map alone.
    """
    values = Image.fromarray(np.clip(anomaly_map, 0.0, 1.0).astype(np.float32), mode="F")
    values = np.asarray(values.resize(size, Image.BILINEAR))
    coloured = Image.fromarray(_COLOURS[np.clip(values * 255, 0, 255).astype(np.uint8)], mode="RGB")
    if frame is not None:
        coloured = Image.blend(frame.convert("RGB"), coloured, alpha)
    out = io.BytesIO()
    coloured.save(out, format="PNG", compress_level=1)  # speed over size: this is a live response
    return out.getvalue()
