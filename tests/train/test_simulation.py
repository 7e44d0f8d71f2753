"""Tests of the pseudo-anomaly simulator (structural and logical), on small synthetic products."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slsg_train.simulation import (
    AnomalySimulator,
    ForegroundConfig,
    SimulationConfig,
    TextureBank,
    estimate_foreground,
    simulate_logical_anomaly,
    simulate_structural_anomaly,
)
from slsg_train.simulation.logical import grid_shuffle
from slsg_train.simulation.perlin import minimum_mask_area

BACKGROUND = (205, 205, 200)


def product_image(height: int = 96, width: int = 96, box: tuple[float, float, float, float] = (0.2, 0.2, 0.8, 0.8),
                  seed: int = 0) -> np.ndarray:
    """A tray (dark board) on a plain background, holding coloured round parts in a grid."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    top, left, bottom, right = int(box[0] * height), int(box[1] * width), int(box[2] * height), int(box[3] * width)
    image[top:bottom, left:right] = (40, 60, 110)
    yy, xx = np.mgrid[0:height, 0:width]
    rows, cols = 3, 4
    radius = 0.3 * min((bottom - top) / rows, (right - left) / cols)
    for r in range(rows):
        for c in range(cols):
            cy = top + (r + 0.5) * (bottom - top) / rows
            cx = left + (c + 0.5) * (right - left) / cols
            colour = rng.integers(60, 255, size=3)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = colour
    return image


def object_box(image: np.ndarray) -> np.ndarray:
    """Ground truth of ``product_image``: pixels that differ from the background colour."""
    return np.any(image != np.array(BACKGROUND, dtype=np.uint8), axis=2)


@pytest.fixture(scope="module")
def textures() -> TextureBank:
    return TextureBank.from_source(None, seed=0)


@pytest.fixture(scope="module")
def config() -> SimulationConfig:
    return SimulationConfig()


def simulate(kind: str, image: np.ndarray, seed: int, textures: TextureBank, config: SimulationConfig,
             donor: np.ndarray | None = None):
    rng = np.random.default_rng(seed)
    foreground = estimate_foreground(image, config.foreground)
    if kind == "structural":
        return simulate_structural_anomaly(image, rng, textures, config, foreground), foreground
    return simulate_logical_anomaly(image, rng, config, foreground, donor), foreground


# --- foreground --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["border_difference", "otsu"])
def test_foreground_finds_object_on_plain_background(method: str) -> None:
    image = product_image(128, 128)
    truth = object_box(image)
    fg = estimate_foreground(image, ForegroundConfig(method=method, dilation=2))
    assert fg.dtype == bool and fg.shape == truth.shape
    assert fg[truth].mean() > 0.99  # the whole tray is found
    assert fg[~truth].mean() < 0.1  # and the background mostly not
    assert not fg[:8, :8].any() and not fg[-8:, -8:].any()


def test_foreground_none_and_fallback_to_whole_image() -> None:
    assert estimate_foreground(product_image(), ForegroundConfig(method="none")).all()
    tiny = product_image(128, 128, box=(0.48, 0.48, 0.52, 0.52))  # 0.2% of the image
    assert estimate_foreground(tiny, ForegroundConfig(min_fraction=0.05)).all()
    assert not estimate_foreground(tiny, ForegroundConfig(min_fraction=0.0, dilation=0)).all()


def test_unknown_foreground_method_rejected() -> None:
    with pytest.raises(ValueError, match="otsuu"):
        ForegroundConfig(method="otsuu")


# --- masks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["structural", "logical"])
def test_masks_are_large_enough_and_on_the_object(kind: str, textures: TextureBank, config: SimulationConfig) -> None:
    image = product_image(96, 96)
    min_area = minimum_mask_area(image.shape[:2], config.min_mask_fraction)
    for seed in range(25):
        sample, foreground = simulate(kind, image, seed, textures, config)
        assert sample.kind == kind
        assert sample.image.dtype == np.uint8 and sample.image.shape == image.shape
        assert sample.mask.dtype == np.float32 and sample.mask.shape == image.shape[:2]
        assert set(np.unique(sample.mask)) <= {0.0, 1.0}
        mask = sample.mask.astype(bool)
        assert mask.sum() >= min_area, f"seed {seed}: mask of {mask.sum()} px < {min_area}"
        assert not (mask & ~foreground).any(), f"seed {seed}: mask leaves the foreground"


@pytest.mark.parametrize("kind", ["structural", "logical"])
def test_image_changes_only_inside_mask(kind: str, textures: TextureBank, config: SimulationConfig) -> None:
    image = product_image(96, 96)
    for seed in range(15):
        sample, _ = simulate(kind, image, seed, textures, config)
        mask = sample.mask.astype(bool)
        changed = np.any(sample.image != image, axis=2)
        assert not (changed & ~mask).any(), f"seed {seed}: pixels changed outside the mask"
        assert changed[mask].mean() > (0.999 if kind == "logical" else 0.5)


def test_logical_mask_is_only_changed_pixels(config: SimulationConfig) -> None:
    image = product_image(96, 96)
    for seed in range(15):
        sample, _ = simulate("logical", image, seed, None, config)
        diff = np.abs(sample.image.astype(int) - image.astype(int)).max(axis=2)
        assert (diff[sample.mask.astype(bool)] > config.logical_change_tolerance).all()


def test_flat_image_still_gets_a_minimum_mask(textures: TextureBank, config: SimulationConfig) -> None:
    flat = np.full((64, 64, 3), 90, dtype=np.uint8)  # nothing to rearrange, no object to find
    min_area = minimum_mask_area(flat.shape[:2], config.min_mask_fraction)
    for kind in ("structural", "logical"):
        sample, foreground = simulate(kind, flat, 3, textures, config)
        assert foreground.all()
        assert sample.mask.sum() >= min_area
        assert np.any(sample.image != flat, axis=2)[sample.mask.astype(bool)].any()


# --- blending and rearranging ------------------------------------------------------------------


def test_structural_blend_follows_draem_formula() -> None:
    texture = np.zeros((64, 64, 3), dtype=np.uint8)
    texture[:] = (250, 10, 130)
    bank = TextureBank(images=[texture])
    config = SimulationConfig(beta_range=(0.3, 0.3), fixed_beta_probability=0.0, texture_augmentations=0)
    image = product_image(96, 96)
    sample, _ = simulate("structural", image, 1, bank, config)
    mask = sample.mask.astype(bool)
    expected = (0.7 * texture[0, 0].astype(float) + 0.3 * image[mask].astype(float)).round()
    assert np.abs(sample.image[mask].astype(float) - expected).max() <= 1


def test_grid_shuffle_moves_cells_and_keeps_pixels() -> None:
    image = product_image(64, 96)
    shuffled = grid_shuffle(image, np.random.default_rng(0), (2, 4))
    assert not np.array_equal(shuffled, image)
    assert sorted(map(tuple, shuffled.reshape(-1, 3))) == sorted(map(tuple, image.reshape(-1, 3)))


def test_donor_content_is_pasted() -> None:
    image = product_image(96, 96, seed=0)
    donor = np.zeros_like(image)
    donor[:] = (0, 255, 0)  # a colour the image does not have
    config = SimulationConfig(logical_ops={"donor_paste": 1.0}, logical_beta_range=(0.0, 0.0),
                              logical_rotate_probability=0.0, logical_jitter_probability=0.0)
    for seed in range(5):
        sample, _ = simulate("logical", image, seed, None, config, donor=donor)
        pasted = sample.image[sample.mask.astype(bool)]
        assert (pasted == (0, 255, 0)).all()


def cable_image(colour: tuple[int, int, int], height: int = 96, width: int = 96) -> np.ndarray:
    """Two grey connectors joined by a coloured horizontal cable, on a plain background."""
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    image[height // 2 - 3:height // 2 + 3, width // 5:4 * width // 5] = colour
    for left in (width // 10, 7 * width // 10):
        image[height // 2 - 12:height // 2 + 12, left:left + width // 5] = (90, 90, 95)
    return image


def hue_of(pixels: np.ndarray) -> float:
    """Mean hue (0-255, PIL's scale) of RGB pixels of one colour."""
    hsv = np.asarray(Image.fromarray(pixels.reshape(1, -1, 3).astype(np.uint8)).convert("HSV"))
    return float(np.median(hsv[..., 0]))


def test_part_recolour_gives_the_part_the_donors_colour() -> None:
    yellow, blue = (232, 200, 40), (40, 95, 215)
    image, donor = cable_image(yellow), cable_image(blue)
    config = SimulationConfig(logical_ops={"part_recolour": 1.0})
    cable = np.all(image == yellow, axis=2)
    for seed in range(3):
        sample, foreground = simulate("logical", image, seed, None, config, donor=donor)
        mask = sample.mask.astype(bool)
        assert mask[cable].mean() > 0.97 and not (mask & ~cable).any()  # the cable (opening trims corners), nothing else
        assert abs(hue_of(sample.image[cable]) - hue_of(np.array(blue))) <= 2
        assert np.array_equal(sample.image[~mask], image[~mask]) and not (mask & ~foreground).any()


def test_part_recolour_turns_the_hue_when_the_donor_has_the_same_colour() -> None:
    yellow = (232, 200, 40)
    image = cable_image(yellow)
    config = SimulationConfig(logical_ops={"part_recolour": 1.0})
    cable = np.all(image == yellow, axis=2)
    for donor in (cable_image((228, 196, 44)), None):
        sample, _ = simulate("logical", image, 0, None, config, donor=donor)
        turned = (hue_of(sample.image[cable]) - hue_of(np.array(yellow))) % 256
        assert 0.14 * 256 <= turned <= 0.86 * 256
        assert sample.mask.astype(bool)[cable].mean() > 0.97


def test_part_recolour_without_coloured_parts_falls_back_to_other_operations() -> None:
    grey = cable_image((120, 120, 120))
    config = SimulationConfig(logical_ops={"part_recolour": 1.0, "grid_shuffle": 0.01})
    sample, foreground = simulate("logical", grey, 0, None, config, donor=grey)
    assert sample.mask.sum() >= minimum_mask_area(grey.shape[:2], config.min_mask_fraction)
    assert not (sample.mask.astype(bool) & ~foreground).any()


def test_donor_of_other_size_rejected(config: SimulationConfig) -> None:
    with pytest.raises(ValueError, match="donor"):
        simulate("logical", product_image(96, 96), 0, None, config, donor=product_image(64, 64))


# --- the simulator -----------------------------------------------------------------------------


def test_same_seed_same_sample_other_seed_other_sample(textures: TextureBank) -> None:
    simulator = AnomalySimulator(SimulationConfig(), textures)
    image = product_image(96, 96)
    first = simulator(image, np.random.default_rng(7))
    again = simulator(image, np.random.default_rng(7))
    assert first.kind == again.kind
    assert np.array_equal(first.image, again.image) and np.array_equal(first.mask, again.mask)
    others = [simulator(image, np.random.default_rng(seed)) for seed in range(8, 12)]
    assert all(not np.array_equal(first.mask, other.mask) for other in others)


def test_kinds_occur_with_configured_probability(textures: TextureBank) -> None:
    image = product_image(64, 64)
    simulator = AnomalySimulator(SimulationConfig(logical_probability=0.3), textures)
    rng = np.random.default_rng(0)
    kinds = [simulator(image, rng).kind for _ in range(300)]
    assert 0.22 < kinds.count("logical") / len(kinds) < 0.38
    only_logical = AnomalySimulator(SimulationConfig(logical_probability=1.0), textures)
    assert {only_logical(image, rng).kind for _ in range(10)} == {"logical"}
    only_structural = AnomalySimulator(SimulationConfig(logical_probability=0.0), textures)
    assert {only_structural(image, rng).kind for _ in range(10)} == {"structural"}


@pytest.mark.parametrize("shape", [(64, 160), (240, 96), (1024, 200)])
def test_non_square_sizes(shape: tuple[int, int], textures: TextureBank) -> None:
    image = product_image(*shape)
    config = SimulationConfig()
    simulator = AnomalySimulator(config, textures)
    min_area = minimum_mask_area(shape, config.min_mask_fraction)
    rng = np.random.default_rng(1)
    for _ in range(6):
        sample = simulator(image, rng)
        assert sample.image.shape == image.shape and sample.mask.shape == shape
        assert sample.mask.sum() >= min_area
        assert not (np.any(sample.image != image, axis=2) & (sample.mask == 0)).any()


def test_grey_image_accepted_and_bad_input_rejected(textures: TextureBank) -> None:
    simulator = AnomalySimulator(SimulationConfig(), textures)
    grey = product_image(64, 64)[..., 0]
    assert simulator(grey, np.random.default_rng(0)).image.shape == (64, 64, 3)
    with pytest.raises(ValueError, match="uint8"):
        simulator(product_image().astype(np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="shape"):
        simulator(np.zeros((32, 32, 4), dtype=np.uint8), np.random.default_rng(0))


# --- configuration -------------------------------------------------------------------------------


def test_category_overrides_applied_and_unknown_keys_rejected() -> None:
    config = SimulationConfig(category_overrides={
        "widget": {"beta_range": [0.1, 0.2], "foreground": {"method": "none"}, "logical_grids": [[2, 2]]},
    })
    widget = config.for_category("widget")
    assert widget.beta_range == (0.1, 0.2)
    assert widget.logical_grids == ((2, 2),)
    assert widget.foreground.method == "none" and widget.foreground.threshold == config.foreground.threshold
    other = config.for_category("other")
    assert other.category_overrides == {} and other.beta_range == config.beta_range == (0.0, 0.9)
    with pytest.raises(ValueError, match="betta_range"):
        SimulationConfig(category_overrides={"widget": {"betta_range": [0.1, 0.2]}})
    with pytest.raises(ValueError, match="metod"):
        SimulationConfig(category_overrides={"widget": {"foreground": {"metod": "none"}}})


def test_loco_presets_follow_the_authors() -> None:
    config = SimulationConfig()
    assert config.for_category("juice_bottle").beta_range == (0.0, 0.0)
    assert config.for_category("breakfast_box").logical_probability == 0.5
    assert config.for_category("pushpins").foreground.method == "none"
    assert SimulationConfig(category_overrides={}).for_category("pushpins").foreground.method == "border_difference"


def test_config_json_round_trip() -> None:
    config = SimulationConfig(texture_source="/data/dtd/images").for_category("screw_bag")
    text = json.dumps(config.to_dict())
    assert SimulationConfig.from_dict(json.loads(text)) == config
    assert SimulationConfig.from_dict(json.loads(json.dumps(SimulationConfig().to_dict()))) == SimulationConfig()
    with pytest.raises(ValueError, match="bogus"):
        SimulationConfig.from_dict({"bogus": 1})


def test_invalid_values_rejected() -> None:
    with pytest.raises(ValueError, match="logical_probability"):
        SimulationConfig(logical_probability=1.5)
    with pytest.raises(ValueError, match="teleport"):
        SimulationConfig(logical_ops={"teleport": 1.0})


# --- texture sources -------------------------------------------------------------------------------


def write_texture_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("banded", "dotted"):
        (root / "images" / cls).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, size=(40 + 8 * i, 56, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / cls / f"{cls}_{i}.jpg", quality=90)
    return root / "images"


def test_dtd_folder_source(tmp_path: Path) -> None:
    folder = write_texture_folder(tmp_path)
    bank = TextureBank.from_source(folder)
    assert len(bank) == 4
    patch = bank.sample(np.random.default_rng(0), 70, 90)
    assert patch.shape == (70, 90, 3) and patch.dtype == np.uint8 and patch.std() > 10
    simulator = AnomalySimulator(SimulationConfig(texture_source=str(folder), logical_probability=0.0))
    assert len(simulator.textures) == 4
    sample = simulator(product_image(64, 64), np.random.default_rng(0))
    assert sample.kind == "structural" and sample.mask.sum() > 0


def test_missing_or_empty_texture_folder_rejected(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dtd"
    with pytest.raises(ValueError, match="no_such_dtd"):
        TextureBank.from_source(missing)
    empty = tmp_path / "empty_dtd"
    (empty / "images" / "banded").mkdir(parents=True)
    (empty / "images" / "banded" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="empty_dtd"):
        TextureBank.from_source(empty)


def test_builtin_textures_are_varied(textures: TextureBank) -> None:
    assert len(textures) >= 20
    rng = np.random.default_rng(0)
    patches = [textures.sample(rng, 48, 80) for _ in range(10)]
    assert all(p.shape == (48, 80, 3) and p.dtype == np.uint8 for p in patches)
    assert len({p.tobytes() for p in patches}) == len(patches)
