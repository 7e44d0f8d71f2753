"""Logical pseudo-anomalies (the "scar" simulation of SLSG, arXiv 2305.00398).

Normal content in the wrong place or number: the image itself (or ``donor``, another
normal image of the same product and size) is rearranged as a whole - grid shuffle, flip,
band swap/duplication, shifted donor, colour jitter - and pasted back through a Perlin
blob on the object, as the authors do. Unlike the authors' code, the mask keeps only the
pixels that really changed, so a shuffle that moved background onto background does not
teach the detector to flag unchanged pixels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance
from scipy import ndimage

from slsg_train.simulation.config import SimulatedAnomaly, SimulationConfig
from slsg_train.simulation.perlin import force_minimum_blob, minimum_mask_area, perlin_blob_mask


def grid_shuffle(image: np.ndarray, rng: np.random.Generator, grid: tuple[int, int]) -> np.ndarray:
    """Permute the cells of a (rows, columns) grid; a remainder at the bottom/right stays in place."""
    rows, cols = grid
    height, width = image.shape[:2]
    cell_h, cell_w = height // rows, width // cols
    if rows * cols < 2 or cell_h == 0 or cell_w == 0:
        return image.copy()
    cells = image[: rows * cell_h, : cols * cell_w].reshape(rows, cell_h, cols, cell_w, -1).swapaxes(1, 2)
    cells = cells.reshape(rows * cols, cell_h, cell_w, -1)
    order = rng.permutation(rows * cols)
    if np.array_equal(order, np.arange(order.size)):
        order = np.roll(order, 1)  # never the identity
    shuffled = cells[order].reshape(rows, cols, cell_h, cell_w, -1).swapaxes(1, 2)
    out = image.copy()
    out[: rows * cell_h, : cols * cell_w] = shuffled.reshape(rows * cell_h, cols * cell_w, -1)
    return out


def flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror top-bottom or left-right."""
    return np.ascontiguousarray(image[::-1] if rng.random() < 0.5 else image[:, ::-1])


def band_swap(image: np.ndarray, rng: np.random.Generator, bands: int = 4) -> np.ndarray:
    """Swap two of ``bands`` horizontal or vertical bands, or copy one over the other (a part twice)."""
    axis = int(rng.integers(2))
    size = image.shape[axis] // bands
    if size == 0:
        return image.copy()
    first, second = (int(i) for i in rng.choice(bands, size=2, replace=False))
    view = image if axis == 0 else image.swapaxes(0, 1)
    out = view.copy()
    a, b = slice(first * size, (first + 1) * size), slice(second * size, (second + 1) * size)
    out[b] = view[a]
    if rng.random() < 0.5:
        out[a] = view[b]
    return out if axis == 0 else out.swapaxes(0, 1)


def shifted(image: np.ndarray, rng: np.random.Generator, max_fraction: float = 0.25) -> np.ndarray:
    """``image`` translated (cyclically) by up to ``max_fraction`` of each side, never by zero."""
    height, width = image.shape[:2]
    dy = int(rng.integers(1, max(2, int(height * max_fraction) + 1))) * (1 if rng.random() < 0.5 else -1)
    dx = int(rng.integers(0, max(1, int(width * max_fraction) + 1))) * (1 if rng.random() < 0.5 else -1)
    return np.roll(image, (dy, dx), axis=(0, 1))


def colour_jitter(image: np.ndarray, rng: np.random.Generator, strength: tuple[float, float, float]) -> np.ndarray:
    """torchvision-style ColorJitter(brightness, saturation, hue) with factors drawn from ``strength``."""
    brightness, saturation, hue = strength
    picture = Image.fromarray(image)
    picture = ImageEnhance.Brightness(picture).enhance(rng.uniform(max(0.0, 1 - brightness), 1 + brightness))
    picture = ImageEnhance.Color(picture).enhance(rng.uniform(max(0.0, 1 - saturation), 1 + saturation))
    hsv = np.asarray(picture.convert("HSV"), dtype=np.int16).copy()
    hsv[..., 0] = (hsv[..., 0] + int(round(rng.uniform(-hue, hue) * 255))) % 256
    return np.asarray(Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB"))


def _hsv(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> int16 HSV, every channel 0-255 (PIL's convention)."""
    return np.asarray(Image.fromarray(image).convert("HSV"), dtype=np.int16)


def _mean_hue(hue: np.ndarray) -> float:
    """Circular mean of 0-255 hues."""
    angle = hue.astype(np.float64) * (2 * np.pi / 256)
    return float(np.angle(np.exp(1j * angle).mean()) * 256 / (2 * np.pi)) % 256


def coloured_parts(hsv: np.ndarray, foreground: np.ndarray, min_area: int,
                   saturation: float) -> list[np.ndarray]:
    """Masks of the connected, saturated (coloured) regions of an image (its :func:`_hsv`) on
    ``foreground`` of at least ``min_area`` pixels."""
    labels, count = ndimage.label((hsv[..., 1] > saturation) & foreground, structure=np.ones((3, 3)))
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    return [labels == i for i in range(1, count + 1) if areas[i] >= min_area]


def recoloured_part(
    image: np.ndarray, rng: np.random.Generator, foreground: np.ndarray, donor: np.ndarray | None,
    min_area: int, saturation: float,
) -> tuple[np.ndarray, np.ndarray] | None:
    """One coloured part of ``image`` wearing the colour of ``donor``'s main coloured part: (source, region).

    A whole part in a colour that is normal for the product, but not with the rest of this image
    (a cable whose colour belongs to another pin count): the anomaly no local patch can show.
    When the donor's colour is this part's own, or there is no donor, the hue turns by a random
    0.15-0.85 of a circle instead. None when the image has no coloured part.
    """
    hsv = _hsv(image)
    parts = coloured_parts(hsv, foreground, min_area, saturation)
    if not parts:
        return None
    areas = np.array([part.sum() for part in parts], dtype=np.float64)
    part = parts[int(rng.choice(len(parts), p=areas / areas.sum()))]
    # Anti-aliased rims are half-saturated: they turn with the part, so no old-coloured outline stays.
    region = ndimage.binary_dilation(part, iterations=1) & (hsv[..., 1] > saturation / 2)
    own_hue = _mean_hue(hsv[..., 0][part])
    shift, scale_s, scale_v = float(rng.uniform(0.15, 0.85) * 256), 1.0, 1.0
    donor_hsv = _hsv(donor) if donor is not None else None
    donor_parts = ([] if donor_hsv is None else
                   coloured_parts(donor_hsv, np.ones_like(foreground, dtype=bool), min_area, saturation))
    if donor_parts:
        donor_part = max(donor_parts, key=lambda m: int(m.sum()))
        donor_hue = _mean_hue(donor_hsv[..., 0][donor_part])
        difference = (donor_hue - own_hue + 128) % 256 - 128
        if abs(difference) > 0.06 * 256:
            shift = difference
            scale_s = np.median(donor_hsv[..., 1][donor_part]) / max(np.median(hsv[..., 1][part]), 1.0)
            scale_v = np.median(donor_hsv[..., 2][donor_part]) / max(np.median(hsv[..., 2][part]), 1.0)
    out = hsv.copy()
    out[..., 0][region] = np.round(hsv[..., 0][region] + shift).astype(np.int16) % 256
    out[..., 1][region] = np.clip(np.round(hsv[..., 1][region] * scale_s), 0, 255)
    out[..., 2][region] = np.clip(np.round(hsv[..., 2][region] * scale_v), 0, 255)
    source = np.asarray(Image.fromarray(out.astype(np.uint8), mode="HSV").convert("RGB"))
    return source, region


def _rearranged_source(
    image: np.ndarray, rng: np.random.Generator, config: SimulationConfig, donor: np.ndarray | None,
    foreground: np.ndarray, min_area: int,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(source, region): the image rearranged by one operation drawn from ``config.logical_ops``, to be
    pasted through a blob (region None); ``part_recolour`` brings its own region, the part, and gives
    (None, None) on an image without coloured parts."""
    base = image
    if rng.random() < config.logical_rotate_probability:
        base = np.ascontiguousarray(base[::-1, ::-1])
    if rng.random() < config.logical_jitter_probability:
        base = colour_jitter(base, rng, config.logical_jitter)
    names = list(config.logical_ops)
    weights = np.array([config.logical_ops[n] for n in names], dtype=np.float64)
    operation = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    if operation == "part_recolour":  # the unturned image: the part keeps its place
        recoloured = recoloured_part(image, rng, foreground, donor, min_area, config.part_saturation)
        return recoloured if recoloured is not None else (None, None)
    operations: dict[str, Callable[[], np.ndarray]] = {
        "grid_shuffle": lambda: grid_shuffle(
            base, rng, config.logical_grids[int(rng.integers(len(config.logical_grids)))]),
        "flip": lambda: flip(base, rng),
        "band_swap": lambda: band_swap(base, rng),
        # Another normal image seen through the blob: its parts where this one has others.
        # Without a donor (or half the time) it is shifted, so the parts also move.
        "donor_paste": lambda: (donor if donor is not None and rng.random() < 0.5
                                else shifted(image if donor is None else donor, rng)),
        "colour_jitter": lambda: colour_jitter(base, rng, config.logical_jitter),
    }
    return operations[operation](), None


def _blend(image: np.ndarray, source: np.ndarray, where: np.ndarray, beta: float) -> np.ndarray:
    """``(1-beta)*source + beta*image`` at the pixels ``where`` (N, 3), as float32 rounded to integers."""
    return ((1.0 - beta) * source[where].astype(np.float32) + beta * image[where].astype(np.float32)).round()


def _channel_max(values: np.ndarray) -> np.ndarray:
    """Max over the last axis of (N, 3); faster than ``.max(axis=1)`` on such thin arrays."""
    return np.maximum(np.maximum(values[:, 0], values[:, 1]), values[:, 2])


def _opened(mask: np.ndarray) -> np.ndarray:
    """Binary opening computed only around the mask's bounding box (blobs are local)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return mask
    box = (slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2))
    out = np.zeros_like(mask)
    out[box] = ndimage.binary_opening(mask[box])
    return out


def _paste(image: np.ndarray, source: np.ndarray, region: np.ndarray, beta: float, tolerance: float):
    """Blend ``source`` into ``image`` on ``region``; returns (new image, mask of really changed pixels)."""
    changed = np.zeros_like(region)
    blended = _blend(image, source, region, beta)
    changed[region] = _channel_max(np.abs(blended - image[region])) > tolerance
    # An opening drops isolated changed pixels, so the mask is made of regions, not speckle.
    mask = _opened(changed)
    out = image.copy()
    out[mask] = _blend(image, source, mask, beta).astype(np.uint8)
    return out, mask


def simulate_logical_anomaly(
    image: np.ndarray,
    rng: np.random.Generator,
    config: SimulationConfig,
    foreground: np.ndarray,
    donor: np.ndarray | None = None,
) -> SimulatedAnomaly:
    """Paste rearranged normal content into ``image`` (uint8 H, W, 3) inside a blob on ``foreground``."""
    if donor is not None and donor.shape != image.shape:
        raise ValueError(f"donor image has shape {donor.shape}, the image {image.shape}; they must match")
    min_area = minimum_mask_area(foreground.shape, config.min_mask_fraction)
    tolerance = config.logical_change_tolerance
    for _ in range(config.max_attempts):
        source, region = _rearranged_source(image, rng, config, donor, foreground, min_area)
        if source is None:
            continue
        beta = 0.0  # a recoloured part is pasted whole
        if region is None:
            region = perlin_blob_mask(foreground.shape, rng, config.logical_perlin_scale_range,
                                      config.logical_perlin_threshold, config.perlin_rotation) & foreground
            beta = float(rng.uniform(*config.logical_beta_range))
        out, mask = _paste(image, source, region, beta, tolerance)
        if mask.sum() >= min_area:
            return SimulatedAnomaly(image=out, mask=mask.astype(np.float32), kind="logical")
    return _forced_logical_anomaly(image, rng, foreground, min_area, tolerance)


def _forced_logical_anomaly(
    image: np.ndarray, rng: np.random.Generator, foreground: np.ndarray, min_area: int, tolerance: float,
) -> SimulatedAnomaly:
    """Last resort: a disc of far-displaced content; on flat images (nothing to rearrange) a colour shift."""
    disc = force_minimum_blob(foreground, rng, 2 * min_area)
    height, width = image.shape[:2]
    out, mask = _paste(image, np.roll(image, (height // 2, width // 2), axis=(0, 1)), disc, 0.0, tolerance)
    if mask.sum() < min_area:
        out, mask = image.copy(), disc
        out[disc] = image[disc] + np.uint8(128)  # wraps: every channel moves by 128
    return SimulatedAnomaly(image=out, mask=mask.astype(np.float32), kind="logical")
