"""Texture sources for structural anomalies and DRAEM's random texture augmentations.

The paper draws textures from the Describable Textures Dataset (DTD). ``TextureBank`` reads
any such folder, or, offline and without data, uses built-in textures: procedural ones
(fractal noise, stripes, checkers, cracks, dots, marble) and the photographs that ship
inside scikit-image (brick, grass, gravel, ...). ``augment_texture`` applies ``count`` distinct
operations from DRAEM's list (gamma contrast, brightness, sharpness, hue/saturation,
solarize, posterize, invert, autocontrast, equalize, rotation).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from slsg_train.simulation.perlin import fractal_noise

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_MAX_SIDE = 512  # textures are kept at most this large; anomalies are small anyway
_POOL_SIDE = 256
_POOL_PER_KIND = 4
_SKIMAGE_PHOTOS = ("brick", "grass", "gravel", "moon", "cell", "coins", "text", "page", "coffee",
                   "chelsea", "rocket", "astronaut", "immunohistochemistry", "hubble_deep_field", "retina")


def _to_rgb(array: np.ndarray) -> np.ndarray:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array[..., :3]).astype(np.uint8)


def _shrink(image: Image.Image) -> Image.Image:
    if max(image.size) > _MAX_SIDE:
        image.thumbnail((_MAX_SIDE, _MAX_SIDE), Image.BILINEAR)
    return image


@functools.lru_cache(maxsize=64)
def _load_texture_file(path: str) -> np.ndarray:
    with Image.open(path) as image:
        image.draft("RGB", (_MAX_SIDE, _MAX_SIDE))  # JPEG: decode at reduced size, much faster
        return np.asarray(_shrink(image.convert("RGB")))


# --- procedural textures: (rng, side) -> uint8 (side, side, 3) -------------------------------


def _two_colour(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mix two random colours with ``weights`` in [0, 1]."""
    first, second = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    return (first + weights[..., None] * (second - first)).clip(0, 255).astype(np.uint8)


def _normalise(values: np.ndarray) -> np.ndarray:
    return (values - values.min()) / max(float(np.ptp(values)), 1e-6)


def _fractal_texture(rng: np.random.Generator, side: int) -> np.ndarray:
    cells = 2 ** int(rng.integers(1, 4))
    return _two_colour(_normalise(fractal_noise((side, side), (cells, cells), rng)), rng)


def _stripes_texture(rng: np.random.Generator, side: int) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 40)
    phase = (np.cos(angle) * xx + np.sin(angle) * yy) * (2 * np.pi / period)
    return _two_colour(0.5 + 0.5 * np.sin(phase), rng)


def _checker_texture(rng: np.random.Generator, side: int) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    angle, period = rng.uniform(0, np.pi / 2), rng.uniform(8, 48)
    u = np.cos(angle) * xx + np.sin(angle) * yy
    v = -np.sin(angle) * xx + np.cos(angle) * yy
    return _two_colour(((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32), rng)


def _cracks_texture(rng: np.random.Generator, side: int) -> np.ndarray:
    cells = 2 ** int(rng.integers(1, 4))
    ridges = np.abs(fractal_noise((side, side), (cells, cells), rng, octaves=3))
    return _two_colour((ridges > rng.uniform(0.03, 0.1)).astype(np.float32), rng)


def _dots_texture(rng: np.random.Generator, side: int) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    period, radius = rng.uniform(10, 40), rng.uniform(0.15, 0.4)
    dist = np.hypot((xx % period) / period - 0.5, (yy % period) / period - 0.5)
    return _two_colour((dist < radius).astype(np.float32), rng)


def _marble_texture(rng: np.random.Generator, side: int) -> np.ndarray:
    xx = np.mgrid[0:side, 0:side][1].astype(np.float32)
    turbulence = fractal_noise((side, side), (4, 4), rng)
    return _two_colour(0.5 + 0.5 * np.sin(xx * rng.uniform(0.02, 0.1) + 4.0 * turbulence), rng)


PROCEDURAL_TEXTURES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "fractal": _fractal_texture, "stripes": _stripes_texture, "checker": _checker_texture,
    "cracks": _cracks_texture, "dots": _dots_texture, "marble": _marble_texture,
}


def _skimage_photos() -> list[np.ndarray]:
    import skimage.data

    photos = []
    for name in _SKIMAGE_PHOTOS:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        try:
            photos.append(np.asarray(_shrink(Image.fromarray(_to_rgb(loader())))))
        except (OSError, ValueError):  # a photo that would need a download: skip it, never fetch
            continue
    return photos


class TextureBank:
    """Texture images to blend into structural anomalies; ``sample`` crops and resizes one."""

    def __init__(self, images: list[np.ndarray] | None = None, paths: list[Path] | None = None,
                 description: str = "textures") -> None:
        self.images = list(images or [])
        self.paths = [str(p) for p in paths or []]
        self.description = description
        if not self.images and not self.paths:
            raise ValueError(f"{description}: no texture images")

    def __len__(self) -> int:
        return len(self.images) + len(self.paths)

    @classmethod
    def from_source(cls, source: str | Path | None, seed: int = 0) -> TextureBank:
        """``None``: built-in textures (procedural ones drawn with ``seed``); else every image under a folder."""
        if source is None:
            return cls.builtin(seed)
        folder = Path(source)
        if not folder.is_dir():
            raise ValueError(f"texture source {str(folder)!r} is not a folder (expected e.g. dtd/images)")
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise ValueError(f"texture source {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return cls(paths=paths, description=f"texture folder {folder}")

    @classmethod
    def builtin(cls, seed: int = 0) -> TextureBank:
        rng = np.random.default_rng(seed)
        pool = [make(rng, _POOL_SIDE) for make in PROCEDURAL_TEXTURES.values() for _ in range(_POOL_PER_KIND)]
        return cls(images=pool + _skimage_photos(), description="built-in textures")

    def _image(self, index: int) -> np.ndarray:
        if index < len(self.images):
            return self.images[index]
        path = self.paths[index - len(self.images)]
        try:
            return _load_texture_file(path)
        except OSError as exc:
            raise ValueError(f"cannot read texture image {path!r}: {exc}") from exc

    def sample(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        """A random crop (50-100% of the shorter side) of a random texture, resized to uint8 (H, W, 3)."""
        source = self._image(int(rng.integers(len(self))))
        src_h, src_w = source.shape[:2]
        # Crop with the target's aspect ratio so the texture is not stretched.
        scale = rng.uniform(0.5, 1.0) * min(src_h / height, src_w / width)
        crop_h, crop_w = max(1, int(height * scale)), max(1, int(width * scale))
        top = int(rng.integers(src_h - crop_h + 1))
        left = int(rng.integers(src_w - crop_w + 1))
        crop = Image.fromarray(source[top:top + crop_h, left:left + crop_w])
        return np.asarray(crop.resize((width, height), Image.BILINEAR))


# --- DRAEM's texture augmentations (imgaug in the original; PIL/numpy here) -------------------


def _gamma_contrast(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    gamma = rng.uniform(0.5, 2.0, size=3)  # per channel
    levels = np.arange(256, dtype=np.float32)[:, None] / 255.0
    lut = (255.0 * levels ** gamma[None, :]).round().astype(np.uint8)  # (256, 3)
    return image.point(lut.T.ravel().tolist())


def _brightness(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    mul, add = rng.uniform(0.8, 1.2), rng.uniform(-30, 30)
    return Image.fromarray((np.asarray(image, dtype=np.float32) * mul + add).clip(0, 255).astype(np.uint8))


def _sharpness(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Sharpness(image).enhance(rng.uniform(0.0, 2.0))


def _hue_saturation(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    hsv = np.asarray(image.convert("HSV"), dtype=np.int16).copy()
    hue_shift, saturation_shift = rng.integers(-50, 51, size=2)
    hsv[..., 0] = (hsv[..., 0] + hue_shift) % 256
    hsv[..., 1] = (hsv[..., 1] + saturation_shift).clip(0, 255)
    return Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB")


def _solarize(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    if rng.random() < 0.5:  # imgaug Solarize(0.5, ...): applied to half the images
        return image
    return ImageOps.solarize(image, threshold=int(rng.integers(32, 129)))


def _posterize(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.posterize(image, int(rng.integers(1, 9)))


def _invert(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.invert(image)


def _autocontrast(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.autocontrast(image, cutoff=int(rng.integers(0, 21)))


def _equalize(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.equalize(image)


def _rotate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.rotate(rng.uniform(-45, 45), resample=Image.BILINEAR, fillcolor=(0, 0, 0))


TEXTURE_AUGMENTATIONS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "gamma_contrast": _gamma_contrast, "brightness": _brightness, "sharpness": _sharpness,
    "hue_saturation": _hue_saturation, "solarize": _solarize, "posterize": _posterize, "invert": _invert,
    "autocontrast": _autocontrast, "equalize": _equalize, "rotate": _rotate,
}


def augment_texture(texture: np.ndarray, rng: np.random.Generator, count: int = 3) -> np.ndarray:
    """Apply ``count`` distinct random DRAEM augmentations, in random order, to uint8 (H, W, 3)."""
    names = list(TEXTURE_AUGMENTATIONS)
    chosen = rng.choice(len(names), size=min(count, len(names)), replace=False)
    image = Image.fromarray(texture)
    for index in chosen:
        image = TEXTURE_AUGMENTATIONS[names[index]](image, rng)
    return np.asarray(image.convert("RGB"))
