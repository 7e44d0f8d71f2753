"""Image decoding, resizing to the model input, and heat-map PNGs.

Every frame becomes uint8 RGB by the project's one decoding rule (:mod:`slsg.image_modes`: 16-bit
frames scaled by their bit depth, greyscale to three channels, ...), the rule training and evaluation
use too. Decoding is split in two: :func:`open_frame` reads the header (size, mode) and plans the
decode, so the caller can check the size and reserve the decode's memory first; :func:`decode_opened`
decodes (in a thread pool: Pillow releases the GIL while decoding).
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from slsg.contract import RESIZE_BILINEAR, RESIZE_LANCZOS
from slsg.image_modes import UnsupportedImageMode, rgb8_from_image
from slsg_gateway.errors import BadImage, FrameTooSmall, PayloadTooLarge, UnsupportedMediaType

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
    source_mode: str = "RGB"  # the Pillow mode it was decoded from
    greyscale: bool = False  # one intensity channel (copied to three by the decoding rule)
    preview: Image.Image | None = None  # RGB at the heat map's size, kept only for overlays


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


@dataclass
class OpenedFrame:
    """A frame whose header is read and whose decode is planned; no pixels yet."""

    image: Image.Image
    width: int  # the frame's own size (a draft decode is smaller)
    height: int
    draft: bool
    open_ms: float

    def cost_bytes(self) -> int:
        """Memory its decode holds at the peak, an upper estimate from the decoded size and mode.

        RGB and L frames are resized by Pillow before the decoding rule (the rule is the identity
        or a channel copy there, so the order does not change the pixels): Pillow's buffer alone.
        Other modes go through the rule at full size: Pillow's buffer, its numpy copy, the rule's
        temporaries and the RGB result with its Pillow copy.
        """
        width, height = self.image.size
        per_pixel = _PILLOW_BYTES_PER_PIXEL.get(self.image.mode, 4)
        if self.image.mode in _RESIZE_FIRST:
            return width * height * per_pixel
        return width * height * (2 * per_pixel + 12)


_PILLOW_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4}
_RESIZE_FIRST = frozenset({"RGB", "L"})


def check_frame_size(width: int, height: int, input_size: tuple[int, int], min_fraction: float) -> None:
    """422 when a side of the frame is under ``min_fraction`` of the model input's side."""
    in_h, in_w = input_size
    need_w, need_h = math.ceil(in_w * min_fraction), math.ceil(in_h * min_fraction)
    if width < need_w or height < need_h:
        raise FrameTooSmall(
            f"frame is {width}x{height} pixels, too small for a model whose input is {in_w}x{in_h}: "
            f"send at least {need_w}x{need_h} (min_frame_fraction {min_fraction:g} of the input's sides)")


def heatmap_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) of a heat map for a ``width`` x ``height`` frame: at most ``max_side`` on the long side."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def open_frame(data: bytes, max_pixels: int) -> OpenedFrame:
    """Read the header of ``data``: 400 / 413 when it is no acceptable image; no pixels are decoded."""
    t0 = time.perf_counter()
    image = _open(data, max_pixels)
    return OpenedFrame(image, image.width, image.height, False, (time.perf_counter() - t0) * 1e3)


def plan_draft(opened: OpenedFrame, input_size: tuple[int, int], preview_size: tuple[int, int] | None,
               min_ratio: float, resize: str = RESIZE_BILINEAR) -> None:
    """Decode a JPEG at reduced scale when it is at least ``min_ratio`` times the size needed.

    The size needed is the model input's, and the heat-map preview's when one is wanted. Pillow's
    draft mode lets the DCT itself skip the detail: several times cheaper than a full decode and a
    resize, and a fraction of the memory. It picks the largest 1/2, 1/4, 1/8 scale still >= that size.
    A model that expects LANCZOS (the authors' preprocessing) always gets the full decode: draft mode
    would already have downscaled the frame another way.
    """
    if resize != RESIZE_BILINEAR:
        return
    in_h, in_w = input_size
    need_w = max(in_w, preview_size[0] if preview_size else 0)
    need_h = max(in_h, preview_size[1] if preview_size else 0)
    if opened.image.format == "JPEG" and min(opened.width / need_w, opened.height / need_h) >= min_ratio:
        opened.image.draft("L" if opened.image.mode == "L" else "RGB", (need_w, need_h))
        opened.draft = True


def decode_opened(opened: OpenedFrame, data: bytes, input_size: tuple[int, int],
                  preview_size: tuple[int, int] | None = None, resize: str = RESIZE_BILINEAR) -> Frame:
    """Decode an opened frame by the shared rule (:mod:`slsg.image_modes`) and resize it to ``input_size`` (H, W).

    ``preview_size`` = (width, height) also keeps an RGB copy at that size for heat-map overlays;
    ``resize`` is the model card's filter for the model input.
    """
    t0 = time.perf_counter()
    image = opened.image
    try:
        image.load()
    except Exception as exc:
        raise BadImage(f"image data is truncated or corrupt: {exc}", code="truncated_image") from None
    t1 = time.perf_counter()
    in_h, in_w = input_size
    try:
        if image.mode in _RESIZE_FIRST:
            source = image
            rule = rgb8_from_image(image.resize((in_w, in_h), RESIZE_FILTERS[resize]))
        else:  # the rule at full size, then the resize
            full = rgb8_from_image(image, data)
            source = Image.fromarray(full.pixels)
            rule = dataclasses.replace(full, pixels=np.asarray(source.resize((in_w, in_h), RESIZE_FILTERS[resize])))
            del full  # its full-size array: only the Pillow copy stays, for the preview
    except UnsupportedImageMode as exc:
        raise BadImage(f"cannot inspect this frame: {exc}", code="unsupported_image_mode") from None
    preview = source.resize(preview_size, Image.BILINEAR).convert("RGB") if preview_size else None
    t2 = time.perf_counter()
    return Frame(rule.pixels, opened.width, opened.height, opened.open_ms + (t1 - t0) * 1e3, (t2 - t1) * 1e3,
                 opened.draft, rule.source_mode, rule.greyscale, preview)


def decode_frame(data: bytes, input_size: tuple[int, int], *, max_pixels: int, draft_min_ratio: float = 2.0,
                 preview_size: tuple[int, int] | None = None, resize: str = RESIZE_BILINEAR) -> Frame:
    """:func:`open_frame`, :func:`plan_draft` and :func:`decode_opened` in one call."""
    opened = open_frame(data, max_pixels)
    plan_draft(opened, input_size, preview_size, draft_min_ratio, resize)
    return decode_opened(opened, data, input_size, preview_size, resize)


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
