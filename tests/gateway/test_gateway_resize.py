"""Frames reach the model resized with the filter its card names: bilinear (our runs, and every card from
before the field) or LANCZOS (the SLSG authors' preprocessing, which their imported weights expect)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from onnx_fixtures import make_card
from slsg.contract import ModelCard
from slsg_gateway.imaging import decode_frame


def _photo(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("resize,pillow", [("bilinear", Image.BILINEAR), ("lanczos", Image.LANCZOS)])
def test_frames_are_resized_with_the_cards_filter_ignoring_aspect(resize, pillow):
    image = _photo(300, 180)
    frame = decode_frame(_encoded(image, "PNG"), (64, 96), max_pixels=10**7, resize=resize)
    assert frame.pixels.shape == (64, 96, 3) and (frame.width, frame.height) == (300, 180)
    np.testing.assert_array_equal(frame.pixels, np.asarray(image.resize((96, 64), pillow)))


def test_the_two_filters_give_different_frames():
    data = _encoded(_photo(300, 180), "PNG")
    frames = [decode_frame(data, (64, 64), max_pixels=10**7, resize=r).pixels for r in ("bilinear", "lanczos")]
    assert np.abs(frames[0].astype(int) - frames[1].astype(int)).max() > 10


def test_a_lanczos_model_gets_the_full_jpeg_decode_not_draft_mode():
    data = _encoded(_photo(640, 480), "JPEG")
    assert decode_frame(data, (64, 64), max_pixels=10**7).draft  # bilinear: a quarter-scale decode is enough
    frame = decode_frame(data, (64, 64), max_pixels=10**7, resize="lanczos")
    assert not frame.draft
    full = Image.open(io.BytesIO(data)).convert("RGB")
    np.testing.assert_array_equal(frame.pixels, np.asarray(full.resize((64, 64), Image.LANCZOS)))


def test_cards_name_their_resize_and_older_cards_read_as_bilinear():
    card = make_card("toy")
    assert card.resize == "bilinear"
    stored = json.loads(card.to_json())
    del stored["resize"]  # a card written before the field
    assert ModelCard.from_json(json.dumps(stored)).resize == "bilinear"
    stored["resize"] = "lanczos"
    assert ModelCard.from_json(json.dumps(stored)).resize == "lanczos"
    stored["resize"] = "nearest"
    with pytest.raises(ValueError, match="resize 'nearest' is not one of bilinear, lanczos"):
        ModelCard.from_json(json.dumps(stored))
