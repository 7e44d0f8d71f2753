"""LOCO-size camera frames for the gateway and load benchmarks, made without any data set.

A small synthetic scene (a tray with compartments and parts, as in MVTec LOCO's "breakfast box"
and "juice bottle" set-ups) is drawn with numpy at 1/8 scale, upscaled with Pillow to the
camera size (LOCO images are about 1600x1100-1700x1300) and given sensor noise, so the JPEG has
a realistic size and decode cost rather than compressing to almost nothing.
"""

from __future__ import annotations

import io

import numpy as np

LOCO_FRAME_SIZE = (1600, 1280)  # (width, height)


def parse_size(text: str) -> tuple[int, int]:
    """``"1600x1280"`` -> (1600, 1280) = (width, height), the order camera_jpeg takes."""
    from slsg.sizes import parse_size

    height, width = parse_size(text, minimum=8, what="frame size", form="WIDTHxHEIGHT, e.g. 1600x1280",
                                square=False)
    return width, height


def synthetic_scene(width: int, height: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB [height, width, 3]: a grey tray with a 2x3 compartment grid holding coloured parts."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    scene = np.empty((height, width, 3), np.float32)
    scene[:] = (70, 74, 80)  # dark conveyor belt
    x0, y0, x1, y1 = int(width * 0.08), int(height * 0.1), int(width * 0.92), int(height * 0.9)
    scene[y0:y1, x0:x1] = (185, 185, 178)  # tray
    cell_w, cell_h = (x1 - x0) / 3, (y1 - y0) / 2
    for row in range(2):
        for col in range(3):
            cx, cy = x0 + (col + 0.5) * cell_w, y0 + (row + 0.5) * cell_h
            radius = min(cell_w, cell_h) * rng.uniform(0.25, 0.4)
            part = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
            scene[part] = rng.uniform(40, 230, size=3)
    border = max(1, min(width, height) // 100)
    for col in range(1, 3):  # compartment walls
        x = int(x0 + col * cell_w)
        scene[y0:y1, x - border:x + border] = (150, 150, 145)
    scene[int(y0 + cell_h) - border:int(y0 + cell_h) + border, x0:x1] = (150, 150, 145)
    return np.clip(scene, 0, 255).astype(np.uint8)


def camera_frame(width: int = LOCO_FRAME_SIZE[0], height: int = LOCO_FRAME_SIZE[1], seed: int = 0,
                 noise_sigma: float = 3.0) -> np.ndarray:
    """uint8 RGB [height, width, 3]: the scene drawn at 1/8 scale, upscaled, plus Gaussian sensor noise."""
    from PIL import Image

    small = synthetic_scene(max(8, width // 8), max(8, height // 8), seed)
    big = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.float32)
    noise = np.random.default_rng(seed + 1).normal(0.0, noise_sigma, size=big.shape).astype(np.float32)
    return np.clip(big + noise, 0, 255).astype(np.uint8)


def camera_jpeg(width: int = LOCO_FRAME_SIZE[0], height: int = LOCO_FRAME_SIZE[1], seed: int = 0,
                quality: int = 90) -> bytes:
    """:func:`camera_frame` encoded as a baseline JPEG (what an industrial camera sends)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(camera_frame(width, height, seed)).save(out, format="JPEG", quality=quality)
    return out.getvalue()
